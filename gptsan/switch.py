"""The Switch FFN layer of GPTSAN: top-1 routed experts plus the softmlp tanh bypass.

Routing follows the published Mesh-TF `transformer_moe_layer_v1` with `_switch_gating`:
all batch*length tokens are flattened (row-major) and split into G groups of S <= 1024
tokens; each expert takes at most C = max(min(S, int(S * cf / E)), 4) tokens per group in
group order (exclusive cumsum); a token over capacity gets zero expert output, while the
softmlp bypass `tanh(x . W_soft)` is always added.
"""
import dataclasses

from gptsan.compat import mtf, tf
from gptsan import mesh as meshlib

MAX_GROUP_SIZE = 1024  # published moe_group_size
TRAIN_CAPACITY_FACTOR = 1.25  # published moe_capacity_factor_train
EVAL_CAPACITY_FACTOR = 2.0  # published moe_capacity_factor_eval
MIN_EXPERT_CAPACITY = 4  # published moe_min_expert_capacity
JITTER = 1e-2  # published switch input jitter (multiplicative, train only, gate input only)
MAX_SLICED_TOKENS = 8  # token-choice path: up to this many tokens per slice use aliasing slices


@dataclasses.dataclass
class RouterStats:
    """Per-layer routing statistics (mtf tensors)."""
    expert_index: object  # int32 [batch, length]: chosen expert (before capacity)
    kept: object  # float32 [batch, length]: 1 if the token fit in its expert's capacity
    router_entropy: object  # float32 scalar: mean entropy of the router distribution
    expert_fraction: object  # float32 [experts]: fraction of tokens routed to each expert


def split_into_groups(num_tokens, max_group_size=MAX_GROUP_SIZE):
    """(G, S): the fewest groups G dividing `num_tokens` with S = num_tokens / G <= max."""
    for groups in range(1, num_tokens + 1):
        if num_tokens % groups == 0 and num_tokens // groups <= max_group_size:
            return groups, num_tokens // groups
    raise ValueError(f"cannot group {num_tokens} tokens")


def expert_capacity(group_size, num_experts, train):
    """C = max(min(S, int(S * cf / E)), 4), cf = 1.25 train / 2.0 eval (published formula)."""
    factor = TRAIN_CAPACITY_FACTOR if train else EVAL_CAPACITY_FACTOR
    return max(min(group_size, int(group_size * factor / num_experts)), MIN_EXPERT_CAPACITY)


def switch_ffn(x, config, train, variable_dtype):
    """Switch FFN of one layer (call inside the layer's `moe{i}` variable scope).

    Args:
      x: [batch, length, d_model] activations.
      config: ModelConfig.
      train: bool; enables input jitter and the training capacity factor.
      variable_dtype: mtf.VariableDType.
    Returns:
      (y [batch, length, d_model], aux_loss scalar float32, RouterStats)
    """
    mesh = x.mesh
    batch_dim, length_dim, d_dim = x.shape.dims
    experts_dim = mtf.Dimension(meshlib.EXPERTS, config.num_experts)
    hidden_dim = mtf.Dimension(meshlib.MOE_HIDDEN, config.num_moe_hidden)
    num_groups, group_size = split_into_groups(batch_dim.size * length_dim.size)
    groups_dim = mtf.Dimension(meshlib.GROUPS, num_groups)
    group_dim = mtf.Dimension(meshlib.GROUP, group_size)
    capacity = expert_capacity(group_size, config.num_experts, train)
    router_dtype = mtf.VariableDType(variable_dtype.master_dtype, variable_dtype.slice_dtype,
                                     tf.float32)

    w_gate = mtf.get_variable(mesh, "switch_gating/kernel", [d_dim, experts_dim],
                              dtype=router_dtype, initializer=dense_initializer(d_dim.size))
    w_soft = mtf.get_variable(mesh, "softmlp/kernel",
                              [d_dim, mtf.Dimension(meshlib.D_MODEL_OUT, d_dim.size)],
                              dtype=variable_dtype, initializer=dense_initializer(d_dim.size))
    w_in = mtf.get_variable(mesh, "wi/kernel", [experts_dim, d_dim, hidden_dim],
                            dtype=variable_dtype, initializer=dense_initializer(d_dim.size))
    w_out = mtf.get_variable(mesh, "wo/kernel", [experts_dim, hidden_dim, d_dim],
                             dtype=variable_dtype, initializer=dense_initializer(hidden_dim.size))

    tokens = mtf.reshape(x, [groups_dim, group_dim, d_dim])  # [G, S, d]

    # Router (float32): softmax over experts, top-1.
    gate_inputs = mtf.cast(tokens, tf.float32)
    if train:
        gate_inputs *= mtf.random_uniform(mesh, gate_inputs.shape, minval=1.0 - JITTER,
                                          maxval=1.0 + JITTER, dtype=tf.float32)
    router_logits = mtf.einsum([gate_inputs, w_gate], [groups_dim, group_dim, experts_dim])
    probs = mtf.softmax(router_logits, experts_dim)  # [G, S, E]
    gate, index = mtf.top_1(probs, experts_dim)  # [G, S]
    mask = mtf.one_hot(index, experts_dim, dtype=tf.float32)  # [G, S, E]

    # Load-balancing loss (before capacity): mean(density * density_proxy) * E^2.
    density = mtf.reduce_mean(mask, reduced_dim=group_dim)  # [G, E]
    density_proxy = mtf.reduce_mean(probs, reduced_dim=group_dim)
    aux_loss = mtf.reduce_mean(density * density_proxy) * float(config.num_experts ** 2)

    # Capacity: priority = exclusive cumsum in group order.
    position = mtf.reduce_sum(mtf.cumsum(mask, group_dim, exclusive=True) * mask,
                              reduced_dim=experts_dim)  # [G, S]
    kept = mtf.cast(mtf.less(position, float(capacity)), tf.float32)  # [G, S]
    weight = gate * kept  # [G, S]: router prob, 0 for dropped tokens

    dtype = variable_dtype.activation_dtype
    if not train and 2 * group_size <= config.num_experts:
        # Few tokens (incremental decoding): each token runs only its own expert.
        combine = mtf.cast(mask * weight, dtype)  # [G, S, E]
        y = mtf.reduce_sum(_token_choice_experts(tokens, combine, w_in, w_out),
                           reduced_dim=experts_dim)
    elif group_size <= capacity:
        # Every token fits: run each token through all experts and pick (cheaper than
        # dispatching into E * C >= E * S slots).
        # Experts first: TF einsum then batch-multiplies over experts without transposing
        # the weights.
        per_expert = mtf.broadcast(tokens, [experts_dim, groups_dim, group_dim, d_dim])
        h = mtf.relu(mtf.einsum([per_expert, w_in],
                                [experts_dim, groups_dim, group_dim, hidden_dim]))
        out = mtf.einsum([h, w_out], [experts_dim, groups_dim, group_dim, d_dim])
        combine = mtf.cast(mask * weight, dtype)  # [G, S, E]
        y = mtf.einsum([out, combine], [groups_dim, group_dim, d_dim])
    else:
        capacity_dim = mtf.Dimension(meshlib.CAPACITY, capacity)
        dispatch = mask * kept * mtf.one_hot(mtf.cast(position, tf.int32), capacity_dim,
                                             dtype=tf.float32)  # [G, S, E, C]
        expert_in = mtf.einsum([mtf.cast(dispatch, dtype), tokens],
                               [experts_dim, groups_dim, capacity_dim, d_dim])
        h = mtf.relu(mtf.einsum([expert_in, w_in],
                                [experts_dim, groups_dim, capacity_dim, hidden_dim]))
        expert_out = mtf.einsum([h, w_out], [experts_dim, groups_dim, capacity_dim, d_dim])
        y = mtf.einsum([expert_out, mtf.cast(dispatch * gate, dtype)],
                       [groups_dim, group_dim, d_dim])
    y = mtf.reshape(y, x.shape)
    soft = mtf.tanh(mtf.einsum([x, w_soft], [batch_dim, length_dim, w_soft.shape.dims[1]]))
    y += mtf.rename_dimension(soft, meshlib.D_MODEL_OUT, meshlib.D_MODEL)

    entropy = -mtf.reduce_sum(probs * mtf.log(mtf.maximum(probs, 1e-9)), reduced_dim=experts_dim)
    stats = RouterStats(
        expert_index=mtf.reshape(index, [batch_dim, length_dim]),
        kept=mtf.reshape(kept, [batch_dim, length_dim]),
        router_entropy=mtf.reduce_mean(entropy),
        expert_fraction=mtf.reduce_mean(mask, output_shape=[experts_dim]))
    return y, aux_loss, stats


def _token_choice_experts(tokens, combine, w_in, w_out):
    """Inference path for tiny groups: gathers each token's expert weights (tf.gather).

    Reads one expert per token instead of all E experts. Valid on any layout: a model
    shard sees its local experts only; tokens routed elsewhere get a zero row (their
    `combine` row is all zero there) and the caller sums the [G, S, E, D] output over
    experts. No gradient (never used in training).

    tokens [G, S, D], combine [G, S, E] (router prob * kept on the chosen expert).
    """
    groups_dim, group_dim, d_dim = tokens.shape.dims
    experts_dim = combine.shape.dims[2]

    def run_local_experts(x, weights, wi, wo):
        # x [g, s, d], weights [g, s, e_local], wi [e_local, d, f], wo [e_local, f, d]
        index = tf.argmax(weights, axis=-1, output_type=tf.int32)  # [g, s]
        scale = tf.reduce_sum(weights, axis=-1, keepdims=True)  # [g, s, 1]; 0 if not local
        if x.shape[0] * x.shape[1] <= MAX_SLICED_TOKENS:
            y = _sliced_expert_outputs(x, index, wi, wo)
        else:
            h = tf.nn.relu(tf.einsum("gsd,gsdf->gsf", x, tf.gather(wi, index)))
            y = tf.einsum("gsf,gsfd->gsd", h, tf.gather(wo, index))  # [g, s, d]
        local = tf.one_hot(index, tf.shape(weights)[-1], dtype=y.dtype)  # [g, s, e_local]
        return local[..., None] * (y * scale)[:, :, None, :]  # [g, s, e_local, d]

    return mtf.slicewise(run_local_experts, [tokens, combine, w_in, w_out],
                         output_shape=[groups_dim, group_dim, experts_dim, d_dim],
                         output_dtype=tokens.dtype, splittable_dims=[groups_dim, experts_dim],
                         grad_function=0, name="token_choice_experts")


def _sliced_expert_outputs(x, index, wi, wo):
    """Per token: relu(x . wi[e]) . wo[e] with wi[e], wo[e] taken by tf.slice along dim 0,
    which aliases the weights (no copy, unlike tf.gather). x [g, s, d] -> [g, s, d]."""
    rows = []
    for gi in range(x.shape[0]):
        row = []
        for si in range(x.shape[1]):
            expert = index[gi, si]
            w1 = tf.slice(wi, tf.stack([expert, 0, 0]), [1, -1, -1])[0]  # [d, f]
            w2 = tf.slice(wo, tf.stack([expert, 0, 0]), [1, -1, -1])[0]  # [f, d]
            h = tf.nn.relu(tf.matmul(x[gi, si][None], w1))  # [1, f]
            row.append(tf.matmul(h, w2)[0])  # [d]
        rows.append(tf.stack(row))
    return tf.stack(rows)


def dense_initializer(fan_in):
    """Published mtf dense init: normal with stddev fan_in ** -0.5 (variance scaling 1.0)."""
    return tf.random_normal_initializer(stddev=fan_in ** -0.5)
