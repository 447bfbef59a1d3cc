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
from gptsan.layers import dense, dense_initializer, normal_initializer

MAX_GROUP_SIZE = 1024  # published moe_group_size
TRAIN_CAPACITY_FACTOR = 1.25  # published moe_capacity_factor_train
EVAL_CAPACITY_FACTOR = 2.0  # published moe_capacity_factor_eval
MIN_EXPERT_CAPACITY = 4  # published moe_min_expert_capacity
JITTER = 1e-2  # published switch input jitter (multiplicative, train only, gate input only)
SOFTMLP_STDDEV = 0.01  # HEAD's softmlp kernel init (router and experts: mtf's default)
MAX_SLICED_TOKENS = 8  # token-choice path: up to this many tokens per slice use aliasing slices


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


def switch_ffn(x, config, train, variable_dtype, local_experts=False, group_size=None,
               group_routing=None):
    """Switch FFN of one layer (call inside the layer's `moe{i}` variable scope).

    Args:
      x: [batch, length, d_model] activations.
      config: ModelConfig.
      train: bool; enables input jitter and the training capacity factor.
      variable_dtype: mtf.VariableDType.
      local_experts: each expert may run on exactly its tokens (no one-hot dispatch):
        in inference when the layout keeps the experts whole (mesh model size 1), in
        training only on a one-slice mesh (its per-slice weight gradients sum over this
        slice's tokens only; nothing would add up split batch slices).
      group_size: route in groups of this many token slots (the last group padded)
        instead of the published split of this call's tokens: a prompt prefilled alone
        then routes exactly as at the start of the longer padded sequence it stands for.
      group_routing: optional GroupRouting: this call continues a group routed earlier
        (incremental decoding with the cache); capacity counts the earlier tokens too.
    Returns:
      (y [batch, length, d_model], aux_loss scalar float32, RouterStats)
    """
    mesh = x.mesh
    batch_dim, length_dim, d_dim = x.shape.dims
    experts_dim = mtf.Dimension(meshlib.EXPERTS, config.num_experts)
    hidden_dim = mtf.Dimension(meshlib.MOE_HIDDEN, config.num_moe_hidden)
    num_tokens = batch_dim.size * length_dim.size
    if group_size is None:
        num_groups, group_size = split_into_groups(num_tokens)
    else:
        num_groups = -(-num_tokens // group_size)
    padding = num_groups * group_size - num_tokens
    groups_dim = mtf.Dimension(meshlib.GROUPS, num_groups)
    group_dim = mtf.Dimension(meshlib.GROUP, group_size)
    capacity = expert_capacity(group_size, config.num_experts, train)
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

    tokens = _to_groups(x, groups_dim, group_dim, padding)  # [G, S, d]

    # Router (float32): softmax over experts, top-1.
    gate_inputs = mtf.cast(tokens, tf.float32)
    if train:
        gate_inputs *= mtf.random_uniform(mesh, gate_inputs.shape, minval=1.0 - JITTER,
                                          maxval=1.0 + JITTER, dtype=tf.float32)
    # Per-slice matmuls: always in inference; in training on one-slice meshes (local_experts).
    fused = not train or local_experts
    router_logits = dense(gate_inputs, w_gate, [groups_dim, group_dim, experts_dim], fused,
                          differentiable=train)
    probs = mtf.softmax(router_logits, experts_dim)  # [G, S, E]
    gate, index = mtf.top_1(probs, experts_dim)  # [G, S]
    mask = mtf.one_hot(index, experts_dim, dtype=tf.float32)  # [G, S, E]
    valid = None
    if padding:
        valid = mtf.cast(mtf.less(mtf.range(mesh, groups_dim, tf.int32) * group_size
                                  + mtf.range(mesh, group_dim, tf.int32), num_tokens),
                         tf.float32)  # [G, S]: 0 on padding slots
        mask *= valid

    # Load-balancing loss (before capacity): mean(density * density_proxy) * E^2.
    if valid is None:
        density = mtf.reduce_mean(mask, reduced_dim=group_dim)  # [G, E]
        density_proxy = mtf.reduce_mean(probs, reduced_dim=group_dim)
    else:
        count = mtf.reduce_sum(valid, reduced_dim=group_dim)  # [G]
        density = mtf.reduce_sum(mask, reduced_dim=group_dim) / count
        density_proxy = mtf.reduce_sum(probs * valid, reduced_dim=group_dim) / count
    aux_loss = mtf.reduce_mean(density * density_proxy) * float(config.num_experts ** 2)

    # Capacity: priority = exclusive cumsum in group order.
    position = None
    if group_routing is not None:  # continue a group routed by earlier calls
        earlier = mtf.cumsum(mask, group_dim, exclusive=True) + group_routing.offsets
        kept = mtf.cast(mtf.less(mtf.reduce_sum(earlier * mask, reduced_dim=experts_dim),
                                 group_routing.capacity), tf.float32)  # [G, S]
    elif group_size <= capacity:  # every token fits, whatever the routing
        kept = mtf.ones(mesh, [groups_dim, group_dim], dtype=tf.float32)
    else:
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
    elif local_experts:
        y = _routed_experts(tokens, mask * kept, weight, w_in, w_out, differentiable=train)
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
    y = _from_groups(y, x.shape, padding)
    soft = mtf.tanh(dense(x, w_soft, [batch_dim, length_dim, w_soft.shape.dims[1]], fused,
                          differentiable=train))
    y += mtf.rename_dimension(soft, meshlib.D_MODEL_OUT, meshlib.D_MODEL)

    entropy = -mtf.reduce_sum(probs * mtf.log(mtf.maximum(probs, 1e-9)), reduced_dim=experts_dim)
    token_shape = mtf.Shape([batch_dim, length_dim])
    stats = RouterStats(
        expert_index=_from_groups(index, token_shape, padding),
        kept=_from_groups(kept, token_shape, padding),
        router_entropy=mtf.reduce_mean(_from_groups(entropy, token_shape, padding)),
        expert_fraction=mtf.reduce_sum(mask, output_shape=[experts_dim]) / float(num_tokens))
    return y, aux_loss, stats


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


def _routed_experts(tokens, routed, weight, w_in, w_out, differentiable=False):
    """Experts without capacity slots (experts must not be split; see `local_experts`).

    Each expert multiplies exactly the tokens routed to it and kept (tf.where + gather_nd,
    then scatter back), like HF's per-expert loop: S tokens of work instead of E * C >= 2S
    slots plus two one-hot dispatch einsums. Same result as the dispatch path.
    tokens [G, S, D], routed [G, S, E] (one-hot of the chosen expert, 0 when dropped),
    weight [G, S] (router prob * kept).

    `differentiable` (one-slice training meshes): the slice also returns each token's
    hidden pre-activation [G, S, F], from which the gradient computes the expert weight and
    token gradients per expert (no recomputation); the router weight multiplies in mtf.
    """
    groups_dim, group_dim, d_dim = tokens.shape.dims
    splittable = [groups_dim, w_in.shape.dims[0]]
    dtype = tokens.dtype
    if not differentiable:
        def run(x, onehot, gate, wi, wo):
            return _expert_loop(x, onehot, wi, wo)[0] * tf.cast(gate, x.dtype)[..., None]

        return mtf.slicewise(run, [tokens, routed, mtf.cast(weight, dtype), w_in, w_out],
                             output_shape=tokens.shape, output_dtype=dtype,
                             splittable_dims=splittable, grad_function=0, name="routed_experts")

    def gradient(op, dy, *unused):
        def backward(x, onehot, wi, wo, hidden, dy):
            dx, dwi, dwo = tf.zeros_like(x), [], []
            for where, w1, w2 in _expert_slices(onehot, wi, wo):
                h = tf.gather_nd(hidden, where)  # [n, f]
                dy_e = tf.gather_nd(dy, where)  # [n, d]
                dwo.append(tf.matmul(tf.nn.relu(h), dy_e, transpose_a=True))  # [f, d]
                dh = tf.matmul(dy_e, w2, transpose_b=True) * tf.cast(h > 0, h.dtype)
                dwi.append(tf.matmul(tf.gather_nd(x, where), dh, transpose_a=True))  # [d, f]
                dx += tf.scatter_nd(where, tf.matmul(dh, w1, transpose_b=True),
                                    tf.shape(x, out_type=tf.int64))
            return dx, tf.stack(dwi), tf.stack(dwo)

        x, onehot, wi, wo = op.inputs
        dx, dwi, dwo = mtf.slicewise(
            backward, [x, onehot, wi, wo, op.outputs[1], dy],
            output_shape=[x.shape, wi.shape, wo.shape], output_dtype=[dtype] * 3,
            splittable_dims=splittable, grad_function=0, name="routed_experts_grad")
        return [dx, None, dwi, dwo]

    hidden_shape = [groups_dim, group_dim, w_in.shape.dims[2]]
    outputs, _ = mtf.slicewise(lambda *args: _expert_loop(*args, keep_hidden=True),
                               [tokens, routed, w_in, w_out],
                               output_shape=[tokens.shape, hidden_shape],
                               output_dtype=[dtype] * 2, splittable_dims=splittable,
                               grad_function=gradient, name="routed_experts")
    return outputs * mtf.cast(weight, dtype)


def _expert_slices(onehot, wi, wo):
    """(where [n, 2] of its tokens, wi[expert] [d, f], wo[expert] [f, d]) per expert; the
    weights are tf.slice views (no copy)."""
    if wi.shape[0] != onehot.shape[-1]:  # our invariant: only layouts that keep experts whole
        raise ValueError("local_experts=True on a layout that splits the experts")
    for expert in range(wi.shape[0]):
        yield (tf.where(onehot[:, :, expert] > 0),
               tf.slice(wi, [expert, 0, 0], [1, -1, -1])[0],
               tf.slice(wo, [expert, 0, 0], [1, -1, -1])[0])


def _expert_loop(x, onehot, wi, wo, keep_hidden=False):
    """One slice of `_routed_experts` before the router weight: x [g, s, d], onehot
    [g, s, e], wi [e, d, f], wo [e, f, d] -> (y [g, s, d], hidden [g, s, f] or None)."""
    y = tf.zeros_like(x)  # [g, s, d]
    hidden = tf.zeros(tf.concat([tf.shape(x)[:2], tf.shape(wi)[2:]], 0), x.dtype) \
        if keep_hidden else None
    for where, w1, w2 in _expert_slices(onehot, wi, wo):
        h = tf.matmul(tf.gather_nd(x, where), w1)  # [n, f]
        y += tf.scatter_nd(where, tf.matmul(tf.nn.relu(h), w2), tf.shape(y, out_type=tf.int64))
        if keep_hidden:
            hidden += tf.scatter_nd(where, h, tf.shape(hidden, out_type=tf.int64))
    return y, hidden


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
