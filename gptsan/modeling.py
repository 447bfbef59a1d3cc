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
from gptsan.attention import MASKED_SCORE
from gptsan.layers import normal_initializer
from gptsan.plan import execution_plan
from gptsan.switch import RouterStats, switch_ffn

LAYER_NORM_EPSILON = 1e-5  # published (and HF) LayerNorm epsilon
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


def build_model(config, mesh, input_ids, num_precontext=None, spout=None, plan=None,
                variable_dtype=None, past=None, routing_group_size=None, group_routing=None):
    """Builds the GPTSAN forward pass on `mesh`.

    Args:
      config: ModelConfig.
      mesh: mtf.Mesh.
      input_ids: int32 mtf [batch, length].
      num_precontext: optional int32 mtf [batch]: keys with memory index < num_precontext
        are visible from every query (Prefix-LM; counts spout/past slots, as published).
      spout: optional float mtf [batch, spout]; ignored when `past` is given (the cache
        already holds the spout slot).
      plan: `plan.ExecutionPlan` (default `execution_plan()`: inference on any layout): how
        products, experts and attention run, and whether the build trains.
      variable_dtype: mtf.VariableDType (default `dtype_policy("float32")`).
      past: optional KVCache: slots < past.length hold earlier keys/values (later slots are
        never read); this call's tokens take memory positions past.length .. + length - 1 and
        their keys/values come back in `new_keys_values` for the caller to store.
      routing_group_size: optional Switch routing group size (see `switch.switch_ffn`).
      group_routing: optional list of `switch.GroupRouting`, one per Switch layer (a cached
        step continuing a routed group).
    Returns:
      ModelOutput (extra layers recomputed in the backward pass: no presents / keys).
    """
    plan = plan or execution_plan()
    variable_dtype = variable_dtype or meshlib.dtype_policy("float32")
    dims = _Dims(config, *input_ids.shape.dims)
    _check_inputs(config, dims, spout, past)
    wte, wpe, ete = _embedding_tables(mesh, config, dims, variable_dtype)
    spout_kv = None
    if config.num_spout:
        with tf.variable_scope("pasts"):
            spout_kv = _spout_projection(mesh, config, dims, spout, variable_dtype,
                                         active=spout is not None and past is None)
    num_past, memory_dim, positions = _positions(mesh, config, dims, past, spout_kv)
    lookup = plan.products.gather_rows
    x = (lookup(wte, input_ids, [dims.batch, dims.length, dims.d])  # [B, T, D]
         + lookup(wpe, positions, [dims.length, dims.d]))  # [T, D]
    mask = _attention_mask(mesh, dims, memory_dim, num_past, num_precontext, past,
                           variable_dtype.activation_dtype)

    hidden_states, stats, presents, new_kv = [], [], [], []
    aux_loss = mtf.zeros(mesh, [], dtype=tf.float32)
    for layer in range(config.num_layers):
        if layer == config.num_switch_layers and ete is not None:
            x += lookup(ete, positions, [dims.length, dims.d])
        x, present, kv, switch = _layer(x, mask, _layer_past(past, spout_kv, layer), layer,
                                         config, dims, plan, variable_dtype,
                                         routing_group_size, group_routing)
        presents.append(present)
        new_kv.append(kv)
        hidden_states.append(x)
        if switch is not None:
            aux_loss += switch[0]
            stats.append(switch[1])

    with tf.variable_scope("model"):
        logits = _head(x, wte, dims, variable_dtype, plan.products)
    return ModelOutput(logits=logits, hidden_states=hidden_states, aux_loss=aux_loss,
                       router_stats=stats, presents=presents, new_keys_values=new_kv)


def _check_inputs(config, dims, spout, past):
    """Refuses a sequence longer than the position table and a spout the model lacks."""
    if past is None and dims.length.size > config.num_contexts:
        raise GPTSANError(f"sequence length {dims.length.size} is longer than num_contexts="
                          f"{config.num_contexts}")


def _positions(mesh, config, dims, past, spout_kv):
    """(P past slots, memory dim M, positions [T]). With a cache P is only known at run time
    (an int32 mtf scalar) and M is None. Positions: t + P, clipped to num_contexts - 1
    (published clips only with pasts/spout; without them t + 0 <= num_contexts - 1 already)."""
    if past is not None:
        num_past, memory_dim = past.length, None
    else:
        num_past = 1 if spout_kv is not None else 0
        memory_dim = mtf.Dimension(meshlib.MEMORY, num_past + dims.length.size)
    positions = mtf.range(mesh, dims.length, tf.int32) + num_past  # [T]
    return num_past, memory_dim, mtf.minimum(positions, config.num_contexts - 1)


def _embedding_tables(mesh, config, dims, variable_dtype):
    """model/wte [V, D], wpe [C, D] and (with extra layers, else None) ete [C, D]."""
    with tf.variable_scope("model"):
        wte = mtf.get_variable(mesh, "wte", [dims.vocab, dims.d], dtype=variable_dtype,
                               initializer=normal_initializer(WTE_STDDEV))
        wpe = mtf.get_variable(mesh, "wpe", [dims.contexts, dims.d], dtype=variable_dtype,
                               initializer=normal_initializer(WPE_STDDEV))
        ete = None
        if config.num_ext_layers:
            ete = mtf.get_variable(mesh, "ete", [dims.contexts, dims.d], dtype=variable_dtype,
                                   initializer=tf.zeros_initializer())
    return wte, wpe, ete


def _attention_mask(mesh, dims, memory_dim, num_past, num_precontext, past, dtype):
    """Key j (memory index) visible from query t iff j <= t + P or j < num_precontext:
    [B?, T, M], or with a cache [B?, T, T'] for this call's keys (the filled cache slots
    j < P are all visible)."""
    if past is None:
        return _visibility(mesh, dims.batch, dims.length, memory_dim, 0, num_past,
                           num_precontext, dtype)
    new_dim = mtf.Dimension(meshlib.MEMORY + "_new", dims.length.size)
    return _visibility(mesh, dims.batch, dims.length, new_dim, num_past, num_past,
                       num_precontext, dtype)


def _layer_past(past, spout_kv, layer):
    """The layer's (K, V, length) from the cache, (k, v) of the spout, or None."""
    if past is not None:
        return past.keys[layer], past.values[layer], past.length
    return None if spout_kv is None else spout_kv[layer]


def _layer(x, mask, past, layer, config, dims, plan, variable_dtype, group_size,
           group_routing):
    """Layer `layer`: x [B, T, D] -> (x, present, kv, (aux loss, RouterStats) or None)."""
    if layer < config.num_switch_layers:
        def ffn(x):
            with tf.variable_scope(f"model/moe{layer}"):
                y, loss, stats = switch_ffn(x, config, plan, variable_dtype,
                                            group_size=group_size,
                                            group_routing=None if group_routing is None
                                            else group_routing[layer])
            return y, (loss, stats)
    else:
        def ffn(x):
            with tf.variable_scope(f"model/mlp{layer}"):
                return _ext_mlp(x, dims, variable_dtype, plan.products), None

        if plan.recompute_ext_layers:  # memory: keep only the layer's input
            def block(x_, mask_, *past_):
                return _block(x_, mask_, tuple(past_) or None, layer, dims, plan,
                              variable_dtype, ffn)[0]

            return mtf.recompute_grad(block, [x, mask] + list(past or ())), None, None, None
    return _block(x, mask, past, layer, dims, plan, variable_dtype, ffn)


def _block(x, mask, past, layer, dims, plan, variable_dtype, ffn):
    """x + LN_an(attention(x)), then + LN_ln(y) for (y, extra) = ffn(x): x [B, T, D] ->
    (x, present, kv, extra)."""
    with tf.variable_scope(f"model/att{layer}"):
        attended, present, kv = _attention(x, mask, dims, past, variable_dtype, plan)
    with tf.variable_scope(f"model/an{layer}"):
        x += layer_norm(attended, dims.d, variable_dtype)
    y, extra = ffn(x)
    with tf.variable_scope(f"model/ln{layer}"):
        x += layer_norm(y, dims.d, variable_dtype)
    return x, present, kv, extra


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


def _attention(x, mask, dims, past, variable_dtype, plan):
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
    # One product in natural order, then split the activations: q, k, v [B, T, H, K].
    qkv = plan.products.dense(x, w_qkv,
                              [dims.batch, dims.length, dims.qkv, dims.heads, dims.head_dim])
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
        context = plan.attention(q, keys, values, mask, bthk)
        presents = (keys, values)
    # The heads are contracted here (an einsum when the layout may split them).
    output = plan.products.dense(context, w_o, [dims.batch, dims.length, dims.d])
    return output, presents, (k, v)


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


def _ext_mlp(x, dims, variable_dtype, products):
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
    h = mtf.swish(products.dense(x, p1, [dims.batch, dims.length, dims.ext_hidden]) + b1)
    return products.dense(h, p2, [dims.batch, dims.length, dims.d]) + b2


def _head(x, wte, dims, variable_dtype, products):
    """Tied LM head: swish(x . dense + bias) . wte^T + wob -> float32 [B, T, V]."""
    mesh = x.mesh
    kernel = mtf.get_variable(mesh, "dense/kernel", [dims.d, dims.d_out], dtype=variable_dtype,
                              initializer=normal_initializer(PROJECTION_STDDEV))
    bias = mtf.get_variable(mesh, "dense_1/bias", [dims.d_out], dtype=variable_dtype,
                            initializer=tf.zeros_initializer())
    wob = mtf.get_variable(mesh, "wob", [dims.vocab], dtype=variable_dtype,
                           initializer=tf.zeros_initializer())
    z = mtf.swish(products.dense(x, kernel, [dims.batch, dims.length, dims.d_out]) + bias)
    z = mtf.rename_dimension(z, meshlib.D_MODEL_OUT, meshlib.D_MODEL)
    return mtf.cast(products.tied_logits(z, wte, wob, [dims.batch, dims.length, dims.vocab]),
                    tf.float32)


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
