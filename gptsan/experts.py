"""The ways to run the Switch experts on routed tokens, one small class each.

Every method is called as `method(tokens, routing, w_in, w_out) -> y [G, S, D]`: each token
kept by its expert's capacity gets `gate * relu(x . wi[e]) . wo[e]`, a dropped token zero
(`switch.switch_ffn` adds the softmlp bypass). They give the same numbers; they differ in
work, in the layouts they accept and in whether they have a gradient
(tests/test_switch_dispatch.py runs them all against one NumPy reference). Which one runs is
decided by `plan.execution_plan`, never by the layer.
"""
import dataclasses

from gptsan import mesh as meshlib
from gptsan.compat import mtf, tf

MAX_SLICED_TOKENS = 8  # token choice: up to this many tokens per slice use aliasing slices


@dataclasses.dataclass
class Routing:
    """A call's top-1 routing in G groups of S token slots over E experts (mtf tensors)."""
    mask: object  # float32 [G, S, E]: one-hot of the chosen expert (0 on padding slots)
    gate: object  # float32 [G, S]: router probability of the chosen expert
    kept: object  # float32 [G, S]: 1 if the token fits in its expert's capacity
    position: object  # float32 [G, S]: the token's place in its expert's queue (from 0)
    capacity: int  # C: places per expert and group


@dataclasses.dataclass(frozen=True)
class OneHotDispatch:
    """Capacity slots through one-hot einsums (the published Mesh-TF layer): tokens ->
    [E, G, C, D] -> experts -> back. Any layout and mode: mtf computes the gradients and sums
    them across the mesh."""
    differentiable = True

    def __call__(self, tokens, routing, w_in, w_out):
        groups_dim, group_dim, d_dim = tokens.shape.dims
        experts_dim, _, hidden_dim = w_in.shape.dims
        capacity_dim = mtf.Dimension(meshlib.CAPACITY, routing.capacity)
        dispatch = routing.mask * routing.kept * mtf.one_hot(
            mtf.cast(routing.position, tf.int32), capacity_dim, dtype=tf.float32)  # [G, S, E, C]
        expert_in = mtf.einsum([mtf.cast(dispatch, tokens.dtype), tokens],
                               [experts_dim, groups_dim, capacity_dim, d_dim])
        h = mtf.relu(mtf.einsum([expert_in, w_in],
                                [experts_dim, groups_dim, capacity_dim, hidden_dim]))
        expert_out = mtf.einsum([h, w_out], [experts_dim, groups_dim, capacity_dim, d_dim])
        return mtf.einsum([expert_out, mtf.cast(dispatch * routing.gate, tokens.dtype)],
                          [groups_dim, group_dim, d_dim])


@dataclasses.dataclass(frozen=True)
class EveryExpert:
    """Every token through every expert, then each keeps its own expert's output: cheaper
    than E * C >= E * S dispatch slots when S <= C (nothing can be dropped). Any layout and
    mode (mtf gradients)."""
    differentiable = True

    def __call__(self, tokens, routing, w_in, w_out):
        groups_dim, group_dim, d_dim = tokens.shape.dims
        experts_dim, _, hidden_dim = w_in.shape.dims
        # Experts first: TF einsum then batch-multiplies over experts without transposing
        # the weights.
        per_expert = mtf.broadcast(tokens, [experts_dim, groups_dim, group_dim, d_dim])
        h = mtf.relu(mtf.einsum([per_expert, w_in],
                                [experts_dim, groups_dim, group_dim, hidden_dim]))
        out = mtf.einsum([h, w_out], [experts_dim, groups_dim, group_dim, d_dim])
        return mtf.einsum([out, _combine_weights(routing, tokens.dtype)],
                          [groups_dim, group_dim, d_dim])


@dataclasses.dataclass(frozen=True)
class TokenChoice:
    """Each token multiplies only its own expert's weights, gathered per token (tf.gather,
    or aliasing tf.slice views for up to MAX_SLICED_TOKENS tokens): for a few tokens
    (incremental decoding) it reads one expert instead of E. Any layout: a model shard sees
    its local experts only and gives a zero row for tokens routed elsewhere (summed over
    experts). No gradient (inference)."""
    differentiable = False

    def __call__(self, tokens, routing, w_in, w_out):
        groups_dim, group_dim, d_dim = tokens.shape.dims
        experts_dim = w_in.shape.dims[0]
        combine = _combine_weights(routing, tokens.dtype)  # [G, S, E]
        per_expert = mtf.slicewise(
            _token_choice_slice, [tokens, combine, w_in, w_out],
            output_shape=[groups_dim, group_dim, experts_dim, d_dim], output_dtype=tokens.dtype,
            splittable_dims=[groups_dim, experts_dim], grad_function=0,
            name="token_choice_experts")
        return mtf.reduce_sum(per_expert, reduced_dim=experts_dim)


@dataclasses.dataclass(frozen=True)
class RoutedExperts:
    """Each expert multiplies exactly its kept tokens (tf.where + gather_nd, then scatter
    back), like HF's per-expert loop: S tokens of work instead of E * C >= 2S slots plus two
    one-hot einsums. Needs a layout that keeps the experts whole on every slice.

    differentiable: the slice also returns each token's hidden pre-activation [G, S, F], from
    which a hand-written per-slice gradient computes the expert weight and token gradients
    (no recomputation; the router weight multiplies in mtf). Its weight gradients sum over
    the slice's own tokens only: one-slice meshes.
    """
    differentiable: bool = False

    def __call__(self, tokens, routing, w_in, w_out):
        routed = routing.mask * routing.kept  # [G, S, E]: 0 when dropped
        weight = routing.gate * routing.kept  # [G, S]
        splittable = [tokens.shape.dims[0], w_in.shape.dims[0]]
        dtype = tokens.dtype
        if not self.differentiable:
            def run(x, onehot, gate, wi, wo):
                return _expert_loop(x, onehot, wi, wo)[0] * tf.cast(gate, x.dtype)[..., None]

            return mtf.slicewise(run, [tokens, routed, mtf.cast(weight, dtype), w_in, w_out],
                                 output_shape=tokens.shape, output_dtype=dtype,
                                 splittable_dims=splittable, grad_function=0,
                                 name="routed_experts")
        hidden_shape = tokens.shape.dims[:2] + w_in.shape.dims[2:]
        outputs, _ = mtf.slicewise(lambda *args: _expert_loop(*args, keep_hidden=True),
                                   [tokens, routed, w_in, w_out],
                                   output_shape=[tokens.shape, hidden_shape],
                                   output_dtype=[dtype] * 2, splittable_dims=splittable,
                                   grad_function=_routed_gradient, name="routed_experts")
        return outputs * mtf.cast(weight, dtype)


@dataclasses.dataclass(frozen=True)
class ByGroupShape:
    """A plan's expert dispatch: per call, the cheapest method valid for its group shape.

    few_tokens (None: never) when 2 S <= E, else every_token when S <= C (no token can be
    dropped), else general.
    """
    general: object
    few_tokens: object = None
    every_token: object = EveryExpert()

    def __call__(self, tokens, routing, w_in, w_out):
        group_size, num_experts = tokens.shape.dims[1].size, w_in.shape.dims[0].size
        if self.few_tokens is not None and 2 * group_size <= num_experts:
            method = self.few_tokens
        elif group_size <= routing.capacity:
            method = self.every_token
        else:
            method = self.general
        return method(tokens, routing, w_in, w_out)


def _combine_weights(routing, dtype):
    """[G, S, E]: the router probability on the chosen expert, 0 for dropped tokens."""
    return mtf.cast(routing.mask * (routing.gate * routing.kept), dtype)


def _token_choice_slice(x, weights, wi, wo):
    """x [g, s, d], weights [g, s, e_local], wi [e_local, d, f], wo [e_local, f, d] ->
    [g, s, e_local, d]: each token's output on its (local) expert's row."""
    index = tf.argmax(weights, axis=-1, output_type=tf.int32)  # [g, s]
    scale = tf.reduce_sum(weights, axis=-1, keepdims=True)  # [g, s, 1]; 0 if not local
    if x.shape[0] * x.shape[1] <= MAX_SLICED_TOKENS:
        y = _sliced_expert_outputs(x, index, wi, wo)
    else:
        h = tf.nn.relu(tf.einsum("gsd,gsdf->gsf", x, tf.gather(wi, index)))
        y = tf.einsum("gsf,gsfd->gsd", h, tf.gather(wo, index))  # [g, s, d]
    local = tf.one_hot(index, tf.shape(weights)[-1], dtype=y.dtype)  # [g, s, e_local]
    return local[..., None] * (y * scale)[:, :, None, :]


def _sliced_expert_outputs(x, index, wi, wo):
    """Per token: relu(x . wi[e]) . wo[e] with wi[e], wo[e] taken by tf.slice along dim 0,
    which aliases the weights (no copy, unlike tf.gather). x [g, s, d] -> [g, s, d]."""
    rows = []
    for gi in range(x.shape[0]):
        row = []
        for si in range(x.shape[1]):
            w1, w2 = _expert_weights(wi, wo, index[gi, si])
            h = tf.nn.relu(tf.matmul(x[gi, si][None], w1))  # [1, f]
            row.append(tf.matmul(h, w2)[0])  # [d]
        rows.append(tf.stack(row))
    return tf.stack(rows)


def _expert_weights(wi, wo, expert):
    """(wi[expert] [d, f], wo[expert] [f, d]) as tf.slice views (no copy)."""
    start = tf.stack([expert, 0, 0])
    return tf.slice(wi, start, [1, -1, -1])[0], tf.slice(wo, start, [1, -1, -1])[0]


def _expert_slices(onehot, wi, wo):
    """(where [n, 2] of its tokens, wi[expert] [d, f], wo[expert] [f, d]) per expert."""
    if wi.shape[0] != onehot.shape[-1]:  # our invariant: only layouts that keep experts whole
        raise ValueError("RoutedExperts on a layout that splits the experts")
    for expert in range(wi.shape[0]):
        yield (tf.where(onehot[:, :, expert] > 0),) + _expert_weights(wi, wo, expert)


def _expert_loop(x, onehot, wi, wo, keep_hidden=False):
    """One slice of `RoutedExperts` before the router weight: x [g, s, d], onehot
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


def _routed_gradient(op, dy, *unused):
    """mtf gradient of the differentiable `RoutedExperts` slice (tokens, weights; none for
    the routing)."""
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
        output_shape=[x.shape, wi.shape, wo.shape], output_dtype=[x.dtype] * 3,
        splittable_dims=[x.shape.dims[0], wi.shape.dims[0]], grad_function=0,
        name="routed_experts_grad")
    return [dx, None, dwi, dwo]
