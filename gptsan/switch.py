"""The Switch FFN layer of GPTSAN: top-1 routed experts plus the softmlp tanh bypass.

Routing follows the published Mesh-TF `transformer_moe_layer_v1` with `_switch_gating`:
all batch*length tokens are flattened (row-major) and split into G groups of S <= 1024
tokens (the last group padded when G does not divide them); each expert takes at most
C = max(min(S, int(S * cf / E)), 4) tokens per group in group order (exclusive cumsum);
a token over capacity gets zero expert output, while the softmlp bypass `tanh(x . W_soft)`
is always added.
"""
import dataclasses

from gptsan import mesh as meshlib
from gptsan.compat import mtf, tf
from gptsan.experts import Routing
from gptsan.layers import dense_initializer, normal_initializer

MAX_GROUP_SIZE = 1024  # published moe_group_size
TRAIN_CAPACITY_FACTOR = 1.25  # published moe_capacity_factor_train
EVAL_CAPACITY_FACTOR = 2.0  # published moe_capacity_factor_eval
MIN_EXPERT_CAPACITY = 4  # published moe_min_expert_capacity
JITTER = 1e-2  # published switch input jitter (multiplicative, train only, gate input only)
SOFTMLP_STDDEV = 0.01  # HEAD's softmlp kernel init (router and experts: mtf's default)


@dataclasses.dataclass
class RouterStats:
    """Per-layer routing statistics (mtf tensors)."""
    expert_index: object  # int32 [batch, length]: chosen expert (before capacity)
    kept: object  # float32 [batch, length]: 1 if the token fit in its expert's capacity
    router_entropy: object  # float32 scalar: mean entropy of the router distribution
    expert_fraction: object  # float32 [experts]: fraction of tokens routed to each expert


def split_into_groups(num_tokens, max_group_size=MAX_GROUP_SIZE):
    """(G, S): G = ceil(n / max) groups of S = ceil(n / G) <= max token slots.

    When G * S > n the last group ends with G * S - n padding slots that are not routed
    (published batches are [batch, 1280], always divisible; other lengths pad).
    """
    groups = -(-num_tokens // max_group_size)
    return groups, -(-num_tokens // groups)


def expert_capacity(group_size, num_experts, train):
    """C = max(min(S, int(S * cf / E)), 4), cf = 1.25 train / 2.0 eval (published formula)."""
    factor = TRAIN_CAPACITY_FACTOR if train else EVAL_CAPACITY_FACTOR
    return max(min(group_size, int(group_size * factor / num_experts)), MIN_EXPERT_CAPACITY)


@dataclasses.dataclass
class GroupRouting:
    """A cached decoding step's place in a longer routed group (mtf tensors).

    offsets: float32 [experts]: tokens of the group before this call that chose each expert;
    capacity: float32 scalar: the expert capacity of that group. With them, a step routes its
    token exactly as the full padded pass would (it is dropped once its expert is full).
    """
    offsets: object
    capacity: object


def switch_ffn(x, config, plan, variable_dtype, group_size=None, group_routing=None):
    """Switch FFN of one layer (call inside the layer's `moe{i}` variable scope).

    Args:
      x: [batch, length, d_model] activations.
      config: ModelConfig.
      plan: plan.ExecutionPlan: its products run the router and softmlp matmuls, its experts
        the routed tokens; `plan.training` adds input jitter and the training capacity factor.
      variable_dtype: mtf.VariableDType.
      group_size: route in groups of this many token slots (the last group padded)
        instead of the published split of this call's tokens: a prompt prefilled alone
        then routes exactly as at the start of the longer padded sequence it stands for.
      group_routing: optional GroupRouting: this call continues a group routed earlier
        (incremental decoding with the cache); capacity counts the earlier tokens too.
    Returns:
      (y [batch, length, d_model], aux_loss scalar float32, RouterStats)
    """
    batch_dim, length_dim, d_dim = x.shape.dims
    groups = _Groups(x, group_size)
    w_gate, w_soft, w_in, w_out = _switch_variables(x.mesh, config, d_dim, variable_dtype)
    experts_dim = w_in.shape.dims[0]
    tokens = _to_groups(x, groups.groups_dim, groups.group_dim, groups.padding)  # [G, S, d]

    probs = _router_probabilities(tokens, w_gate, plan)  # [G, S, E]
    gate, index = mtf.top_1(probs, experts_dim)  # [G, S]
    mask = mtf.one_hot(index, experts_dim, dtype=tf.float32)  # [G, S, E]
    valid = groups.valid_slots(x.mesh)  # [G, S] or None
    if valid is not None:
        mask *= valid
    aux_loss = _load_balancing_loss(mask, probs, valid, groups.group_dim)
    capacity = expert_capacity(groups.group_dim.size, config.num_experts, plan.training)
    routing = _capacity_routing(mask, gate, capacity, group_routing)

    y = _from_groups(plan.experts(tokens, routing, w_in, w_out), x.shape, groups.padding)
    soft = mtf.tanh(plan.products.dense(x, w_soft, [batch_dim, length_dim,
                                                    w_soft.shape.dims[1]]))
    y += mtf.rename_dimension(soft, meshlib.D_MODEL_OUT, meshlib.D_MODEL)

    entropy = -mtf.reduce_sum(probs * mtf.log(mtf.maximum(probs, 1e-9)), reduced_dim=experts_dim)
    token_shape = mtf.Shape([batch_dim, length_dim])
    stats = RouterStats(
        expert_index=_from_groups(index, token_shape, groups.padding),
        kept=_from_groups(routing.kept, token_shape, groups.padding),
        router_entropy=mtf.reduce_mean(_from_groups(entropy, token_shape, groups.padding)),
        expert_fraction=mtf.reduce_sum(mask, output_shape=[experts_dim]) / float(
            groups.num_tokens))
    return y, aux_loss, stats


class _Groups:
    """How a call's B * T tokens are cut into routing groups [G, S] (the last one padded)."""

    def __init__(self, x, group_size=None):
        self.num_tokens = x.shape.dims[0].size * x.shape.dims[1].size
        if group_size is None:
            num_groups, group_size = split_into_groups(self.num_tokens)
        else:
            num_groups = -(-self.num_tokens // group_size)
        self.padding = num_groups * group_size - self.num_tokens
        self.groups_dim = mtf.Dimension(meshlib.GROUPS, num_groups)
        self.group_dim = mtf.Dimension(meshlib.GROUP, group_size)

    def valid_slots(self, mesh):
        """float32 [G, S]: 0 on padding slots, 1 elsewhere; None without padding."""
        if not self.padding:
            return None
        slot = (mtf.range(mesh, self.groups_dim, tf.int32) * self.group_dim.size
                + mtf.range(mesh, self.group_dim, tf.int32))
        return mtf.cast(mtf.less(slot, self.num_tokens), tf.float32)


def _switch_variables(mesh, config, d_dim, variable_dtype):
    """(router [d, E] float32, softmlp [d, d_out], wi [E, d, F], wo [E, F, d])."""
    experts_dim = mtf.Dimension(meshlib.EXPERTS, config.num_experts)
    hidden_dim = mtf.Dimension(meshlib.MOE_HIDDEN, config.num_moe_hidden)
    router_dtype = mtf.VariableDType(variable_dtype.master_dtype, variable_dtype.slice_dtype,
                                     tf.float32)
    w_gate = mtf.get_variable(mesh, "switch_gating/kernel", [d_dim, experts_dim],
                              dtype=router_dtype, initializer=dense_initializer(d_dim.size))
    w_soft = mtf.get_variable(mesh, "softmlp/kernel",
                              [d_dim, mtf.Dimension(meshlib.D_MODEL_OUT, d_dim.size)],
                              dtype=variable_dtype, initializer=normal_initializer(SOFTMLP_STDDEV))
    w_in = mtf.get_variable(mesh, "wi/kernel", [experts_dim, d_dim, hidden_dim],
                            dtype=variable_dtype, initializer=dense_initializer(d_dim.size))
    w_out = mtf.get_variable(mesh, "wo/kernel", [experts_dim, hidden_dim, d_dim],
                             dtype=variable_dtype, initializer=dense_initializer(hidden_dim.size))
    return w_gate, w_soft, w_in, w_out


def _router_probabilities(tokens, w_gate, plan):
    """Router (float32): softmax over experts of tokens [G, S, d] -> [G, S, E]."""
    gate_inputs = mtf.cast(tokens, tf.float32)
    if plan.training:  # model semantics (published): jitter the router's input copy
        gate_inputs *= mtf.random_uniform(tokens.mesh, gate_inputs.shape, minval=1.0 - JITTER,
                                          maxval=1.0 + JITTER, dtype=tf.float32)
    experts_dim = w_gate.shape.dims[1]
    router_logits = plan.products.dense(gate_inputs, w_gate,
                                        tokens.shape.dims[:2] + [experts_dim])
    return mtf.softmax(router_logits, experts_dim)


def _load_balancing_loss(mask, probs, valid, group_dim):
    """mean(density * density_proxy) * E^2 over groups and experts (before capacity)."""
    if valid is None:
        density = mtf.reduce_mean(mask, reduced_dim=group_dim)  # [G, E]
        density_proxy = mtf.reduce_mean(probs, reduced_dim=group_dim)
    else:
        count = mtf.reduce_sum(valid, reduced_dim=group_dim)  # [G]
        density = mtf.reduce_sum(mask, reduced_dim=group_dim) / count
        density_proxy = mtf.reduce_sum(probs * valid, reduced_dim=group_dim) / count
    return mtf.reduce_mean(density * density_proxy) * float(mask.shape.dims[-1].size ** 2)


def _capacity_routing(mask, gate, capacity, group_routing):
    """experts.Routing: priority = exclusive cumsum in group order (plus the earlier calls'
    tokens with `group_routing`); a token is kept while its place < capacity."""
    groups_dim, group_dim, experts_dim = mask.shape.dims
    earlier = mtf.cumsum(mask, group_dim, exclusive=True)  # [G, S, E]
    if group_routing is not None:  # continue a group routed by earlier calls
        earlier += group_routing.offsets
    position = mtf.reduce_sum(earlier * mask, reduced_dim=experts_dim)  # [G, S]
    if group_routing is not None:
        kept = mtf.cast(mtf.less(position, group_routing.capacity), tf.float32)  # [G, S]
    elif group_dim.size <= capacity:  # every token fits, whatever the routing
        kept = mtf.ones(mask.mesh, [groups_dim, group_dim], dtype=tf.float32)
    else:
        kept = mtf.cast(mtf.less(position, float(capacity)), tf.float32)  # [G, S]
    return Routing(mask=mask, gate=gate, kept=kept, position=position, capacity=capacity)


def _to_groups(x, groups_dim, group_dim, padding):
    """[B, T, ...] -> [G, S, ...] in row-major token order, zero padding at the end."""
    rest = x.shape.dims[2:]
    if not padding:
        return mtf.reshape(x, [groups_dim, group_dim] + rest)
    flat_dim = mtf.Dimension(meshlib.GROUP + "_tokens", x.shape.dims[0].size * x.shape.dims[1].size)
    flat = mtf.pad(mtf.reshape(x, [flat_dim] + rest), [0, padding], flat_dim.name)
    return mtf.reshape(flat, [groups_dim, group_dim] + rest)


def _from_groups(x, shape, padding):
    """[G, S, ...] -> `shape` ([B, T, ...]), dropping the padding slots."""
    if not padding:
        return mtf.reshape(x, shape)
    groups_dim, group_dim = x.shape.dims[:2]
    rest = x.shape.dims[2:]
    flat_dim = mtf.Dimension(meshlib.GROUP + "_tokens", groups_dim.size * group_dim.size)
    flat = mtf.reshape(x, [flat_dim] + rest)
    return mtf.reshape(mtf.slice(flat, 0, flat_dim.size - padding, flat_dim.name), shape)
