"""Attention probabilities and context on Mesh-TF: one fused TF kernel per slice.

Masked scores become s * m - (1 - m) * 1e4 (published). `StoredAttention` keeps the
[B, H, T, M] probabilities (inference); `RecomputedAttention` recomputes them in the backward
pass (training). `plan.execution_plan` picks one; `modeling._attention` calls it.
"""
import dataclasses

from gptsan import mesh as meshlib
from gptsan.compat import mtf, tf

MASKED_SCORE = -1e4  # published: masked attention scores become s*m - (1-m)*1e4


@dataclasses.dataclass(frozen=True)
class StoredAttention:
    """softmax(q . keys, masked) . values as two einsums around `masked_softmax`."""

    def __call__(self, q, keys, values, mask, bthk):
        """q [B, T, H, K], keys/values [B, M, H, K], mask [B?, T, M] -> [B, T, H, K]."""
        batch_dim, length_dim, heads_dim, _ = bthk
        scores = mtf.einsum([q, keys], [batch_dim, heads_dim, length_dim, keys.shape.dims[1]])
        return mtf.einsum([masked_softmax(scores, mask), values], bthk)


@dataclasses.dataclass(frozen=True)
class RecomputedAttention:
    """`recomputed_attention`: no [B, H, T, M] tensor is kept for the backward pass."""

    def __call__(self, q, keys, values, mask, bthk):
        return recomputed_attention(q, keys, values, mask, bthk)


def masked_softmax(scores, mask):
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


def recomputed_attention(q, keys, values, mask, bthk):
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
