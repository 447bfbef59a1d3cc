"""The GPTSAN network on Mesh-TF: embeddings, Prefix-LM attention, Switch/extra layers, spout.

Letters in shape comments: B batch, T input tokens (`length`), M memory (keys incl. the
spout/past slots), P past slots, D d_model, H heads, K head_dim, V vocab, L layers.

Per layer (post-sublayer LayerNorm, published): x = x + LN_an(Attention(x));
x = x + LN_ln(SwitchFFN(x) + tanh(x . softmlp)) for Switch layers, or
x = x + LN_ln(swish(x . p1 + b1) . p2 + b2) for extra layers. Variable names and
shapes are the published checkpoint's (docs/ARCHITECTURE.md "Forward pass", "Checkpoint names").
"""
import dataclasses
from typing import List

import numpy as np

from gptsan import mesh as meshlib
from gptsan.compat import mtf, tf
from gptsan.config import SPOUT_DEPTH
from gptsan.errors import GPTSANError
from gptsan.layers import dense, normal_initializer
from gptsan.switch import RouterStats, switch_ffn

LAYER_NORM_EPSILON = 1e-5  # published (and HF) LayerNorm epsilon
MASKED_SCORE = -1e4  # published: masked attention scores become s*m - (1-m)*1e4
# Initialisation of a model trained from scratch (HEAD modeling.py): normal stddevs; the
# extra-layer position embedding `ete`, biases and LayerNorm b start at 0, LayerNorm g at 1.
WTE_STDDEV = 0.02  # token embedding
WPE_STDDEV = 0.01  # position embedding
PROJECTION_STDDEV = 0.02  # attention qkv/o, extra-layer p1/p2, the head's dense kernel
SPOUT_STDDEV = 0.01  # the spout projection (pasts/mlp*, pasts/out)


@dataclasses.dataclass
class KVCache:
    """A fixed-length K/V cache read by `build_model` (incremental decoding).

    keys/values: one mtf [memory, batch, heads, head_dim] per layer (memory = cache size;
    memory-major, so the filled slots are one contiguous block); length: int32 mtf scalar,
    the slots already filled = memory index of the first new token.
    """
    keys: list
    values: list
    length: object


@dataclasses.dataclass
class ModelOutput:
    logits: object  # float32 [B, T, V]
    hidden_states: List[object]  # L x [B, T, D]: output of every layer
    aux_loss: object  # float32 scalar: sum over Switch layers of the load-balancing loss
    router_stats: List[RouterStats]  # one per Switch layer
    presents: List[tuple]  # per layer (K, V) [B, M, H, K] incl. spout; None with a cache
    new_keys_values: List[tuple]  # per layer (k, v) [B, T, H, K] of this call's tokens only


def build_model(config, mesh, input_ids, num_precontext=None, spout=None, train=False,
                variable_dtype=None, past=None, unsplit_model=False, routing_group_size=None,
                one_slice=False, group_routing=None, recompute_ext_layers=False):
    """Builds the GPTSAN forward pass on `mesh`.

    Args:
      config: ModelConfig.
      mesh: mtf.Mesh.
      input_ids: int32 mtf [batch, length].
      num_precontext: optional int32 mtf [batch]: keys with memory index < num_precontext
        are visible from every query (Prefix-LM; counts spout/past slots, as published).
      spout: optional float mtf [batch, spout]; ignored when `past` is given (the cache
        already holds the spout slot).
      train: bool (router jitter, training capacity factor).
      variable_dtype: mtf.VariableDType (default `dtype_policy("float32")`).
      past: optional KVCache: slots < past.length hold earlier keys/values (later slots are
        never read); this call's tokens take memory positions past.length .. + length - 1 and
        their keys/values come back in `new_keys_values` for the caller to store.
      unsplit_model: inference on a mesh whose model dimension is 1 (heads and experts are
        whole on every slice): enables the per-expert gather/scatter path (see
        `switch.switch_ffn`) and one-matmul output projections.
      routing_group_size: optional Switch routing group size (see `switch.switch_ffn`).
      group_routing: optional list of `switch.GroupRouting`, one per Switch layer (a cached
        step continuing a routed group).
      one_slice: the mesh is one device (1x1): per-slice TF code sees whole tensors, so
        training may use it too, with its own per-slice gradients (the per-expert Switch
        path, a segment-sum embedding gradient, matmul projections and tied head) instead
        of one-hot einsums.
      recompute_ext_layers: training (fine-tuning): each extra dense layer keeps only its
        input for the backward pass and recomputes the rest there (`mtf.recompute_grad`),
        so activation memory stays about one layer's whatever the number of added layers.
        Such layers report no `presents` / `new_keys_values` (training does not use them).
    Returns:
      ModelOutput.
    """
    variable_dtype = variable_dtype or meshlib.dtype_policy("float32")
    dtype = variable_dtype.activation_dtype
    batch_dim, length_dim = input_ids.shape.dims
    dims = _Dims(config, batch_dim, length_dim)
    if past is None and length_dim.size > config.num_contexts:
        raise GPTSANError(f"sequence length {length_dim.size} is longer than num_contexts="
                          f"{config.num_contexts}")

    with tf.variable_scope("model"):
        wte = mtf.get_variable(mesh, "wte", [dims.vocab, dims.d], dtype=variable_dtype,
                               initializer=normal_initializer(WTE_STDDEV))
        wpe = mtf.get_variable(mesh, "wpe", [dims.contexts, dims.d], dtype=variable_dtype,
                               initializer=normal_initializer(WPE_STDDEV))
        ete = None
        if config.num_ext_layers:
            ete = mtf.get_variable(mesh, "ete", [dims.contexts, dims.d], dtype=variable_dtype,
                                   initializer=tf.zeros_initializer())

    spout_kv = None
    if config.num_spout:
        with tf.variable_scope("pasts"):
            spout_kv = _spout_projection(mesh, config, dims, spout, variable_dtype,
                                         active=spout is not None and past is None)

    # Past slots P and memory M (with a cache, P is only known at run time: M unused).
    if past is not None:
        num_past, memory_dim = past.length, None  # int32 mtf scalar
    else:
        num_past = 1 if spout_kv is not None else 0
        memory_dim = mtf.Dimension(meshlib.MEMORY, num_past + length_dim.size)

    # Positions: t + P, clipped to num_contexts - 1 (published clips only with pasts/spout;
    # without them t + 0 <= num_contexts - 1 already).
    positions = mtf.range(mesh, length_dim, tf.int32) + num_past  # [T]
    positions = mtf.minimum(positions, config.num_contexts - 1)
    position_embedding = _gather_rows(wpe, positions, [length_dim, dims.d], one_slice)  # [T, D]
    x = _gather_rows(wte, input_ids, [batch_dim, length_dim, dims.d], one_slice) \
        + position_embedding

    # Key j (memory index) visible from query t iff j <= t + P or j < num_precontext.
    if past is None:
        mask = _visibility(mesh, batch_dim, length_dim, memory_dim, 0, num_past,
                           num_precontext, dtype)  # [B?, T, M]
    else:
        # Filled cache slots (j < P) are all visible; the new keys by the same rule.
        new_dim = mtf.Dimension(meshlib.MEMORY + "_new", length_dim.size)
        mask = _visibility(mesh, batch_dim, length_dim, new_dim, num_past, num_past,
                           num_precontext, dtype)  # [B?, T, T']

    hidden_states, stats, presents, new_kv = [], [], [], []
    aux_loss = mtf.zeros(mesh, [], dtype=tf.float32)
    for layer in range(config.num_layers):
        if layer == config.num_switch_layers and ete is not None:
            x += _gather_rows(ete, positions, [length_dim, dims.d], one_slice)
        layer_past = None
        if past is not None:
            layer_past = (past.keys[layer], past.values[layer], past.length)
        elif spout_kv is not None:
            layer_past = spout_kv[layer]
        if train and recompute_ext_layers and layer >= config.num_switch_layers:
            def ext_layer(x_, mask_, *past_, layer=layer):
                return _ext_block(x_, mask_, tuple(past_) or None, layer, dims, memory_dim,
                                  variable_dtype, one_slice)

            x = mtf.recompute_grad(ext_layer, [x, mask] + list(layer_past or ()))
            presents.append(None)
            new_kv.append(None)
            hidden_states.append(x)
            continue
        with tf.variable_scope(f"model/att{layer}"):
            attended, present, kv = _attention(x, mask, dims, memory_dim, layer_past,
                                               variable_dtype, train, unsplit_model, one_slice)
        presents.append(present)
        new_kv.append(kv)
        with tf.variable_scope(f"model/an{layer}"):
            x += layer_norm(attended, dims.d, variable_dtype)
        if layer < config.num_switch_layers:
            with tf.variable_scope(f"model/moe{layer}"):
                y, loss, layer_stats = switch_ffn(x, config, train, variable_dtype,
                                                  local_experts=one_slice if train
                                                  else unsplit_model,
                                                  group_size=routing_group_size,
                                                  group_routing=None if group_routing is None
                                                  else group_routing[layer])
            aux_loss += loss
            stats.append(layer_stats)
        else:
            with tf.variable_scope(f"model/mlp{layer}"):
                y = _ext_mlp(x, dims, variable_dtype, not train or one_slice, train)
        with tf.variable_scope(f"model/ln{layer}"):
            x += layer_norm(y, dims.d, variable_dtype)
        hidden_states.append(x)

    with tf.variable_scope("model"):
        logits = _head(x, wte, dims, variable_dtype, train, one_slice)
    return ModelOutput(logits=logits, hidden_states=hidden_states, aux_loss=aux_loss,
                       router_stats=stats, presents=presents, new_keys_values=new_kv)


def _ext_block(x, mask, past, layer, dims, memory_dim, variable_dtype, one_slice):
    """One extra dense layer in training (attention + MLP, residuals): x [B, T, D] -> same."""
    with tf.variable_scope(f"model/att{layer}"):
        attended, _, _ = _attention(x, mask, dims, memory_dim, past, variable_dtype, True,
                                    False, one_slice)
    with tf.variable_scope(f"model/an{layer}"):
        x += layer_norm(attended, dims.d, variable_dtype)
    with tf.variable_scope(f"model/mlp{layer}"):
        y = _ext_mlp(x, dims, variable_dtype, one_slice, True)
    with tf.variable_scope(f"model/ln{layer}"):
        return x + layer_norm(y, dims.d, variable_dtype)


def _visibility(mesh, batch_dim, length_dim, keys_dim, keys_offset, num_past, num_precontext,
                dtype):
    """1/0 mask [B?, T, keys]: key i (memory index keys_offset + i) is visible from query t
    (memory index t + num_past) iff it is not in the future or it is a prefix key."""
    keys_index = mtf.range(mesh, keys_dim, tf.int32) + keys_offset
    visible = mtf.less_equal(keys_index, mtf.range(mesh, length_dim, tf.int32) + num_past,
                             output_shape=[length_dim, keys_dim])
    if num_precontext is not None:
        prefix = mtf.less(keys_index, num_precontext, output_shape=[batch_dim, keys_dim])
        visible = mtf.logical_or(visible, prefix, output_shape=[batch_dim, length_dim, keys_dim])
    return mtf.cast(visible, dtype)


class _Dims:
    """The mtf dimensions of one model build."""

    def __init__(self, config, batch_dim, length_dim):
        self.batch, self.length = batch_dim, length_dim
        self.vocab = mtf.Dimension(meshlib.VOCAB, config.num_vocabulary)
        self.contexts = mtf.Dimension(meshlib.CONTEXTS, config.num_contexts)
        self.d = mtf.Dimension(meshlib.D_MODEL, config.num_hidden)
        self.d_out = mtf.Dimension(meshlib.D_MODEL_OUT, config.num_hidden)
        self.heads = mtf.Dimension(meshlib.HEADS, config.num_header)
        self.head_dim = mtf.Dimension(meshlib.HEAD_DIM, config.head_dim)
        self.qkv = mtf.Dimension(meshlib.QKV, 3)
        self.kv = mtf.Dimension(meshlib.KV, 2)
        self.layers = mtf.Dimension(meshlib.LAYERS, config.num_layers)
        self.ext_hidden = mtf.Dimension(meshlib.EXT_HIDDEN, config.num_ext_hidden)
        if config.num_spout:
            self.spout = mtf.Dimension(meshlib.SPOUT, config.num_spout)
            self.spout_hidden = mtf.Dimension(meshlib.SPOUT_HIDDEN, config.num_spout)
            self.spout_kv = mtf.Dimension(meshlib.SPOUT_KV,
                                          config.num_layers * 2 * config.num_hidden)


def _gather_rows(table, indices, output_shape, one_slice=False):
    """table[indices] with tf.gather per slice (the table's first dim must not be split).

    The gradient w.r.t. the table is the one-hot einsum (what `mtf.gather` computes forward;
    mtf sums it over split batch slices), or on a one-slice mesh a segment sum, which skips
    the [tokens, rows] one-hot product (2048 x 36k x d multiply-adds for a small batch).
    """
    row_dim = table.shape.dims[0]
    output_shape = mtf.Shape(output_shape)

    def gradient(op, dy):
        if one_slice:
            def segment_sum(ids, grad):  # [...], [..., d] -> [rows, d]
                return tf.math.unsorted_segment_sum(grad, ids, row_dim.size)

            return [mtf.slicewise(segment_sum, [op.inputs[1], dy],
                                  output_shape=op.inputs[0].shape, output_dtype=dy.dtype,
                                  splittable_dims=dy.shape.dims, grad_function=0,
                                  name="gather_rows_grad"), None]
        onehot = mtf.one_hot(op.inputs[1], row_dim, dtype=dy.dtype)
        return [mtf.einsum([onehot, dy], output_shape=op.inputs[0].shape), None]

    return mtf.slicewise(lambda rows, ids: tf.gather(rows, ids), [table, indices],
                         output_shape=output_shape, output_dtype=table.dtype,
                         splittable_dims=output_shape.dims, grad_function=gradient,
                         name="gather_rows")


def layer_norm(x, dim, variable_dtype):
    """LayerNorm over `dim` (eps 1e-5, biased variance, statistics in float32); vars g, b."""
    g = mtf.get_variable(x.mesh, "g", [dim], dtype=variable_dtype,
                         initializer=tf.ones_initializer())
    b = mtf.get_variable(x.mesh, "b", [dim], dtype=variable_dtype,
                         initializer=tf.zeros_initializer())
    x32 = mtf.cast(x, tf.float32)
    centered = x32 - mtf.reduce_mean(x32, reduced_dim=dim)
    variance = mtf.reduce_mean(mtf.square(centered), reduced_dim=dim)
    normed = centered * mtf.rsqrt(variance + LAYER_NORM_EPSILON)
    return mtf.cast(normed, x.dtype) * g + b


def _attention(x, mask, dims, memory_dim, past, variable_dtype, train, unsplit_model,
               one_slice):
    """Multi-head attention (qkv and o without bias; scores scaled by head_dim^-0.5).

    x: [B, T, D]. Without a cache: mask [B?, T, M] (1 visible / 0), past None or the spout's
    (k, v) [B, 1, H, K]. With a fixed cache: past = (K [M, B, H, K], V, length) and mask =
    [B?, T, T'] for this call's keys (the filled cache slots are all visible).
    Returns (output [B, T, D], (keys, values) [B, M, H, K] or None with a cache,
             (k, v) [B, T, H, K] of this call's tokens).
    """
    mesh = x.mesh
    w_qkv = mtf.get_variable(mesh, "qkv/kernel", [dims.d, dims.qkv, dims.heads, dims.head_dim],
                             dtype=variable_dtype,
                             initializer=normal_initializer(PROJECTION_STDDEV))
    w_o = mtf.get_variable(mesh, "o/kernel", [dims.heads, dims.head_dim, dims.d],
                           dtype=variable_dtype, initializer=normal_initializer(PROJECTION_STDDEV))
    # One matmul in natural order, then split the activations: q, k, v [B, T, H, K].
    # Per-slice matmuls (layers.dense): in inference, and on one-slice meshes in training.
    qkv = dense(x, w_qkv, [dims.batch, dims.length, dims.qkv, dims.heads, dims.head_dim],
                fused=not train or one_slice, differentiable=train)
    q, k, v = mtf.unstack(qkv, dims.qkv)
    q *= dims.head_dim.size ** -0.5
    bthk = [dims.batch, dims.length, dims.heads, dims.head_dim]
    if past is not None and len(past) == 3:
        context = _cached_context(q, k, v, past, mask, dims)
        presents = None
    else:
        keys = mtf.rename_dimension(k, meshlib.LENGTH, meshlib.MEMORY)
        values = mtf.rename_dimension(v, meshlib.LENGTH, meshlib.MEMORY)
        if past is not None:
            keys = mtf.concat([past[0], keys], meshlib.MEMORY)
            values = mtf.concat([past[1], values], meshlib.MEMORY)
        if train:  # the [B, H, T, M] probabilities are recomputed in the backward pass
            context = _recomputed_attention(q, keys, values, mask, bthk)
        else:
            scores = mtf.einsum([q, keys], [dims.batch, dims.heads, dims.length, memory_dim])
            weights = _masked_softmax(scores, mask)
            context = mtf.einsum([weights, values], bthk)
        presents = (keys, values)
    # The heads are contracted here: one matmul per slice only when they are not split.
    output = dense(context, w_o, [dims.batch, dims.length, dims.d],
                   fused=one_slice if train else unsplit_model, differentiable=train)
    return output, presents, (k, v)


def _masked_softmax(scores, mask):
    """softmax(s * m - (1 - m) * 1e4) over the last (memory) dim in one TF kernel.

    scores [B, H, T, M]; mask [B, T, M] or [T, M] (1 visible / 0). The gradient reuses the
    softmax: ds = (dp - sum(dp * p)) * p * m. Splits over every dim but memory.
    """
    broadcast = _broadcast_mask

    def run(s, m):
        m = broadcast(m)
        return tf.nn.softmax(s * m + (m - 1.0) * -MASKED_SCORE)

    splittable = [d for d in scores.shape.dims if d.name != meshlib.MEMORY]

    def gradient(op, dy):
        def backward(p, m, dp):
            return (dp - tf.reduce_sum(dp * p, -1, keepdims=True)) * p * broadcast(m)

        return [mtf.slicewise(backward, [op.outputs[0], op.inputs[1], dy],
                              output_shape=scores.shape, output_dtype=scores.dtype,
                              splittable_dims=splittable, grad_function=0,
                              name="masked_softmax_grad"), None]

    return mtf.slicewise(run, [scores, mask], output_shape=scores.shape,
                         output_dtype=scores.dtype, splittable_dims=splittable,
                         grad_function=gradient, name="masked_softmax")


def _broadcast_mask(m):
    """[B, T, M] or [T, M] (1 visible / 0) -> [B or 1, 1, T, M]: broadcast over heads."""
    return m[:, None] if m.shape.ndims == 3 else m[None, None]


def _attention_probabilities(q, k, m):
    """Per slice: q [B, T, H, K], k [B, M, H, K], mask -> masked softmax [B, H, T, M]."""
    m = _broadcast_mask(m)
    return tf.nn.softmax(tf.einsum("bthk,bmhk->bhtm", q, k) * m + (m - 1.0) * -MASKED_SCORE)


def _recomputed_attention(q, keys, values, mask, bthk):
    """softmax(q . keys, masked) . values -> [B, T, H, K], keeping no [B, H, T, M] tensor.

    Training: the backward pass recomputes the probabilities p from q and keys instead of
    holding them from the forward pass (they are the largest activations of a layer: heads x
    T x M, 105 MB per layer at 1280 positions and 16 heads). Gradients, per slice:
    dp = dy . v, dv = p^T . dy, ds = (dp - sum(dp * p)) * p * m, dq = ds . k, dk = ds^T . q.
    q [B, T, H, K], keys/values [B, M, H, K], mask [B, T, M] or [T, M].
    """
    splittable = [d for d in q.shape.dims if d.name != meshlib.HEAD_DIM]  # not K, M

    def forward(q_, k_, v_, m_):
        return tf.einsum("bhtm,bmhk->bthk", _attention_probabilities(q_, k_, m_), v_)

    def gradient(op, dy):
        def backward(q_, k_, v_, m_, dy_):
            with tf.control_dependencies([dy_]):  # not before the backward pass reaches here
                p = _attention_probabilities(q_, k_, m_)  # [B, H, T, M]
            dp = tf.einsum("bthk,bmhk->bhtm", dy_, v_)
            ds = (dp - tf.reduce_sum(dp * p, -1, keepdims=True)) * p * _broadcast_mask(m_)
            return (tf.einsum("bhtm,bmhk->bthk", ds, k_), tf.einsum("bhtm,bthk->bmhk", ds, q_),
                    tf.einsum("bhtm,bthk->bmhk", p, dy_))

        dq, dk, dv = mtf.slicewise(
            backward, list(op.inputs) + [dy],
            output_shape=[op.inputs[0].shape, op.inputs[1].shape, op.inputs[2].shape],
            output_dtype=[op.inputs[0].dtype] * 3, splittable_dims=splittable, grad_function=0,
            name="recomputed_attention_grad")
        return [dq, dk, dv, mtf.zeros_like(op.inputs[3])]  # recompute_grad wants all four

    return mtf.slicewise(forward, [q, keys, values, mask], output_shape=mtf.Shape(bthk),
                         output_dtype=q.dtype, splittable_dims=splittable,
                         grad_function=gradient, name="recomputed_attention")


def _cached_context(q, k, v, past, new_mask, dims):
    """Inference attention over the filled cache slots plus this call's keys.

    q, k, v [B, T, H, K]; past = (K, V [M, B, H, K], length P); new_mask [B?, T, T'].
    Only the P filled slots are read (a leading-dim slice: no work for empty slots); they
    are all visible, the new keys follow `new_mask`. One softmax over both
    key sets (masked new scores s * m + (m - 1) * 1e4, as published). Broadcast multiplies
    and sums with a spelled-out softmax: for the few query tokens of a decoding step this
    is several times faster on CPU than oneDNN's batched matmul and softmax kernels.
    Splits over batch and heads (any layout). No gradient: the cache is inference-only.
    Returns the context [B, T, H, K].
    """
    cache_k, cache_v, length = past

    def attend(q, k, v, cache_k, cache_v, length, new_mask):
        if q.shape[0] * q.shape[1] == 1:
            return _one_query_attention(q, k, v, cache_k[:length], cache_v[:length])
        old_k, old_v = cache_k[:length, :, None], cache_v[:length, :, None]  # [p, b, 1, h, k]
        old = tf.reduce_sum(q[None] * old_k, -1)  # [p, b, t, h]
        new = tf.reduce_sum(q[:, :, None] * k[:, None], -1)  # [b, t, t', h]
        keep = new_mask[..., None] if new_mask.shape.ndims == 3 else new_mask[None, ..., None]
        new = new * keep + (keep - 1.0) * -MASKED_SCORE
        top = tf.maximum(tf.reduce_max(old, 0), tf.reduce_max(new, 2))  # [b, t, h]
        old, new = tf.exp(old - top), tf.exp(new - top[:, :, None])
        total = tf.reduce_sum(old, 0) + tf.reduce_sum(new, 2)  # [b, t, h]
        context = (tf.reduce_sum(old[..., None] * old_v, 0)
                   + tf.reduce_sum(new[..., None] * v[:, None], 2))  # [b, t, h, k]
        return context / total[..., None]

    return mtf.slicewise(attend, [q, k, v, cache_k, cache_v, length, new_mask],
                         output_shape=q.shape, output_dtype=q.dtype,
                         splittable_dims=[dims.batch, dims.heads], grad_function=0,
                         name="cached_attention")


def _one_query_attention(q, k, v, keys, values):
    """`_cached_context` for one row and one token: its key is always visible.

    q, k, v [1, 1, h, d]; keys, values [p, 1, h, d] (the filled slots) -> [1, 1, h, d].
    Both products over the slots are single 2-D matmuls (one read of the cache each): with
    the query as a block-diagonal [h * d, h] matrix, and the values' [h, h * d] product,
    whose diagonal blocks are the heads' contexts.
    """
    heads, width = q.shape[2], q.shape[3]
    blocks = tf.constant(np.kron(np.eye(heads), np.ones([width, 1])), q.dtype)  # [h*d, h]
    old = tf.matmul(tf.reshape(keys, [-1, heads * width]),
                    tf.reshape(q, [heads * width, 1]) * blocks)  # [p, h]
    new = tf.reduce_sum(q * k, -1)[0]  # [1, h]
    top = tf.maximum(tf.reduce_max(old, 0, keepdims=True), new)
    old, new = tf.exp(old - top), tf.exp(new - top)  # [p, h], [1, h]
    mixed = tf.matmul(old, tf.reshape(values, [-1, heads * width]), transpose_a=True)
    diagonal = tf.reduce_sum(tf.reshape(mixed, [heads, heads, width])
                             * tf.constant(np.eye(heads)[:, :, None], q.dtype), 1)  # [h, d]
    context = (diagonal + tf.transpose(new) * v[0, 0]) / tf.transpose(
        tf.reduce_sum(old, 0, keepdims=True) + new)
    return context[None, None]


def _ext_mlp(x, dims, variable_dtype, fused, differentiable):
    """Extra dense layer FFN: swish(x . p1 + b1) . p2 + b2."""
    mesh = x.mesh
    p1 = mtf.get_variable(mesh, "p1/kernel", [dims.d, dims.ext_hidden], dtype=variable_dtype,
                          initializer=normal_initializer(PROJECTION_STDDEV))
    b1 = mtf.get_variable(mesh, "p1/bias", [dims.ext_hidden], dtype=variable_dtype,
                          initializer=tf.zeros_initializer())
    p2 = mtf.get_variable(mesh, "p2/kernel", [dims.ext_hidden, dims.d], dtype=variable_dtype,
                          initializer=normal_initializer(PROJECTION_STDDEV))
    b2 = mtf.get_variable(mesh, "p2/bias", [dims.d], dtype=variable_dtype,
                          initializer=tf.zeros_initializer())
    h = mtf.swish(dense(x, p1, [dims.batch, dims.length, dims.ext_hidden], fused,
                        differentiable) + b1)
    return dense(h, p2, [dims.batch, dims.length, dims.d], fused, differentiable) + b2


def _head(x, wte, dims, variable_dtype, train, one_slice=False):
    """Tied LM head: swish(x . dense + bias) . wte^T + wob -> float32 [B, T, V].

    Inference, and training on one-slice meshes, use one matmul + bias_add per slice
    (vocab is never split; the training gradient is two matmuls, no transposed copy of the
    [tokens, vocab] gradient); other training meshes keep the mtf einsum (whose gradient
    mtf reduces across the mesh).
    """
    mesh = x.mesh
    kernel = mtf.get_variable(mesh, "dense/kernel", [dims.d, dims.d_out], dtype=variable_dtype,
                              initializer=normal_initializer(PROJECTION_STDDEV))
    bias = mtf.get_variable(mesh, "dense_1/bias", [dims.d_out], dtype=variable_dtype,
                            initializer=tf.zeros_initializer())
    wob = mtf.get_variable(mesh, "wob", [dims.vocab], dtype=variable_dtype,
                           initializer=tf.zeros_initializer())
    fused = not train or one_slice
    z = mtf.swish(dense(x, kernel, [dims.batch, dims.length, dims.d_out], fused,
                        differentiable=train) + bias)
    z = mtf.rename_dimension(z, meshlib.D_MODEL_OUT, meshlib.D_MODEL)
    if not fused:
        return mtf.cast(mtf.einsum([z, wte], [dims.batch, dims.length, dims.vocab]) + wob,
                        tf.float32)
    splittable = [dims.batch, dims.length]

    def tied_projection(hidden, table, bias):  # [b, t, d], [V, d], [V] -> [b, t, V]
        flat = tf.reshape(hidden, [-1, hidden.shape[-1]])
        out = tf.nn.bias_add(tf.matmul(flat, table, transpose_b=True), bias)
        return tf.reshape(out, hidden.shape[:-1].concatenate(table.shape[:1]))

    def gradient(op, dy):
        def backward(hidden, table, dy):  # -> d hidden [b, t, d], d table [V, d], d bias [V]
            flat, dy2 = tf.reshape(hidden, [-1, hidden.shape[-1]]), tf.reshape(
                dy, [-1, dy.shape[-1]])
            return (tf.reshape(tf.matmul(dy2, table), hidden.shape),
                    tf.matmul(dy2, flat, transpose_a=True), tf.reduce_sum(dy2, 0))

        z_, table, bias = op.inputs
        return mtf.slicewise(backward, [z_, table, dy],
                             output_shape=[z_.shape, table.shape, bias.shape],
                             output_dtype=[z_.dtype, table.dtype, bias.dtype],
                             splittable_dims=splittable, grad_function=0, name="tied_grad")

    logits = mtf.slicewise(tied_projection, [z, wte, wob],
                           output_shape=[dims.batch, dims.length, dims.vocab],
                           output_dtype=z.dtype, splittable_dims=splittable,
                           grad_function=gradient if train else 0, name="tied_projection")
    return mtf.cast(logits, tf.float32)


def _spout_projection(mesh, config, dims, spout, variable_dtype, active):
    """pasts/: spout -> 8 x (dense, tanh) -> dense -> per layer (k, v) [B, 1, H, K].

    The variables are always created (they belong to the checkpoint); the projection is
    computed only when `active`. Returns None when inactive.
    """
    kernels = []
    for n in range(SPOUT_DEPTH):
        with tf.variable_scope(f"mlp{n}"):
            kernels.append(mtf.get_variable(mesh, "kernel", [dims.spout, dims.spout_hidden],
                                            dtype=variable_dtype,
                                            initializer=normal_initializer(SPOUT_STDDEV)))
    with tf.variable_scope("out"):
        out = mtf.get_variable(mesh, "kernel", [dims.spout, dims.spout_kv], dtype=variable_dtype,
                               initializer=normal_initializer(SPOUT_STDDEV))
    if not active:
        return None
    p = mtf.cast(spout, variable_dtype.activation_dtype)
    for kernel in kernels:
        p = mtf.tanh(mtf.einsum([p, kernel], [dims.batch, dims.spout_hidden]))
        p = mtf.rename_dimension(p, meshlib.SPOUT_HIDDEN, meshlib.SPOUT)
    kv = mtf.einsum([p, out], [dims.batch, dims.spout_kv])
    one = mtf.Dimension(meshlib.MEMORY, 1)
    # Size-1 memory dim placed to match the attention's keys [B, M, H, K].
    kv = mtf.reshape(kv, [dims.batch, dims.layers, dims.kv, one, dims.heads, dims.head_dim])
    per_layer = []
    for layer_kv in mtf.unstack(kv, dims.layers):
        k, v = mtf.unstack(layer_kv, dims.kv)  # [B, 1, H, K]
        per_layer.append((k, v))
    return per_layer
