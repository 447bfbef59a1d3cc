"""Mesh-TF building blocks shared by `modeling` and `switch`: dense products and their init,
and the two ways a plan runs them (`EinsumProducts`, `SliceProducts`)."""
import dataclasses
import math

from gptsan.compat import mtf, tf


def dense_initializer(fan_in):
    """mtf.layers.dense's default init (VarianceScalingInitializer: a truncated normal with
    stddev fan_in ** -0.5): HEAD keeps it for the Switch router and experts."""
    return tf.truncated_normal_initializer(stddev=fan_in ** -0.5)


def normal_initializer(stddev):
    """A normal init with a fixed stddev (HEAD's explicit kernel initialisers)."""
    return tf.random_normal_initializer(stddev=stddev)


def dense(x, w, output_dims, fused, differentiable=False):
    """x . w summed over the dims they share -> `output_dims`.

    fused: one tf.matmul per slice on 2-D views, which oneDNN runs several times faster
    than an einsum on one-token inputs (and without transposes on big ones). It applies when
    the shared dims are x's last dims and w's first dims in the same order, and
    `output_dims` are x's other dims then w's, and the caller knows the layout keeps the
    shared dims whole on every slice (a per-slice matmul would miss the other slices'
    partial sums; a slice holding part of them raises). Otherwise: mtf.einsum.
    differentiable (with fused): matmul gradients per slice; the weight gradient sums over
    this slice's tokens only, so callers use it on one-slice meshes.
    """
    output_dims = list(output_dims)
    shared = [d for d in x.shape.dims if d in w.shape.dims]
    lead, rest = x.shape.dims[:-len(shared)], w.shape.dims[len(shared):]
    natural = (x.shape.dims[-len(shared):] == shared and w.shape.dims[:len(shared)] == shared
               and output_dims == lead + rest)
    if not (fused and shared and natural):
        return mtf.einsum([x, w], output_dims)
    inner = math.prod(d.size for d in shared)

    def flat(x_slice, w_slice):  # 2-D views [tokens, inner], [inner, out]
        if x_slice.shape.as_list()[len(lead):] != [d.size for d in shared]:
            raise ValueError(f"fused dense on a layout that splits {shared}")
        return tf.reshape(x_slice, [-1, inner]), tf.reshape(w_slice, [inner, -1])

    def matmul(x_slice, w_slice):
        product = tf.matmul(*flat(x_slice, w_slice))
        return tf.reshape(product, x_slice.shape[:len(lead)].concatenate(
            w_slice.shape[len(shared):]))

    def gradient(op, dy):
        def backward(x_slice, w_slice, dy_slice):
            x2, w2 = flat(x_slice, w_slice)
            dy2 = tf.reshape(dy_slice, [x2.shape[0], -1])
            return (tf.reshape(tf.matmul(dy2, w2, transpose_b=True), x_slice.shape),
                    tf.reshape(tf.matmul(x2, dy2, transpose_a=True), w_slice.shape))

        return mtf.slicewise(backward, [op.inputs[0], op.inputs[1], dy],
                             output_shape=[x.shape, w.shape], output_dtype=[x.dtype, w.dtype],
                             splittable_dims=x.shape.dims + rest, grad_function=0,
                             name="dense_grad")

    return mtf.slicewise(matmul, [x, w], output_shape=output_dims, output_dtype=x.dtype,
                         splittable_dims=x.shape.dims + rest,
                         grad_function=gradient if differentiable else 0, name="dense")


def softmax_cross_entropy(logits, labels, vocab_dim, z_loss=0.0):
    """Per-token softmax cross entropy plus z_loss * log(Z)^2 (the published loss).

    logits float32 [..., vocab] (vocab last and never split), labels int32 [...]; returns
    float32 [...]. One softmax kernel per slice (oneDNN's is several times faster than a
    log-sum-exp built from reductions); log Z = max(x) - log(max(softmax)), exact and safe
    since max(softmax) >= 1/vocab. The gradient reuses the softmax: (1 + 2z log Z) * softmax
    - onehot, with no one-hot tensor. Any layout: rows are independent.
    """
    if logits.shape.dims[-1] != vocab_dim:
        raise ValueError(f"softmax_cross_entropy needs {vocab_dim} last in {logits.shape}")
    token_dims = logits.shape.dims[:-1]

    def forward(logits, labels):
        probs = tf.nn.softmax(logits)  # [..., vocab]
        log_z = tf.reduce_max(logits, -1) - tf.math.log(tf.reduce_max(probs, -1))
        target = tf.gather(logits, labels, batch_dims=len(token_dims))  # [...]
        return log_z - target + z_loss * tf.square(log_z), log_z, probs

    def gradient(op, dy, *unused):
        def backward(probs, log_z, labels, dy):
            grad = probs * (dy * (1.0 + 2.0 * z_loss * log_z))[..., None]
            rows = tf.reshape(grad, [-1, vocab_dim.size])
            flat_labels = tf.reshape(labels, [-1])
            at_labels = tf.stack([tf.range(tf.size(flat_labels)), flat_labels], axis=1)
            return tf.reshape(tf.tensor_scatter_nd_sub(rows, at_labels, tf.reshape(dy, [-1])),
                              probs.shape)

        _, log_z, probs = op.outputs
        return [mtf.slicewise(backward, [probs, log_z, op.inputs[1], dy],
                              output_shape=logits.shape, output_dtype=logits.dtype,
                              splittable_dims=token_dims, grad_function=0,
                              name="cross_entropy_grad"), None]

    loss, _, _ = mtf.slicewise(forward, [logits, labels],
                               output_shape=[mtf.Shape(token_dims)] * 2 + [logits.shape],
                               output_dtype=[tf.float32] * 3, splittable_dims=token_dims,
                               grad_function=gradient, name="cross_entropy")
    return loss


@dataclasses.dataclass(frozen=True)
class EinsumProducts:
    """Products as mtf.einsum, whose gradients mtf sums across the mesh: training on a mesh
    of more than one slice."""

    def dense(self, x, w, output_dims):
        """x . w over their shared dims -> output_dims."""
        return mtf.einsum([x, w], output_dims)

    def tied_logits(self, z, table, bias, output_dims):
        """z [B, T, D] . table [V, D]^T + bias [V] -> [B, T, V]."""
        return mtf.einsum([z, table], output_dims) + bias

    def gather_rows(self, table, indices, output_shape):
        """table[indices]; the table's gradient is the one-hot einsum (what `mtf.gather`
        computes forward; mtf sums it over split batch slices)."""
        return _gather_rows(table, indices, output_shape, _one_hot_rows_gradient)


@dataclasses.dataclass(frozen=True)
class SliceProducts:
    """Products as one TF kernel per slice: `dense`'s fused matmul (several times faster on
    CPU than an einsum), a tied head of one matmul + bias_add, tf.gather lookups.

    split: names of the tensor dims the layout may split; a product contracting one of them
    stays an mtf.einsum (a per-slice matmul would miss the other slices' partial sums).
    differentiable: the kernels' own per-slice gradients (matmuls, a segment-sum table
    gradient instead of the [tokens, rows] one-hot product); their weight gradients sum over
    the slice's own tokens only, so only one-slice meshes train with them.
    """
    split: frozenset = frozenset()
    differentiable: bool = False

    def dense(self, x, w, output_dims):
        """x . w over their shared dims -> output_dims."""
        shared = {d.name for d in x.shape.dims if d in w.shape.dims}
        return dense(x, w, output_dims, fused=not shared & self.split,
                     differentiable=self.differentiable)

    def tied_logits(self, z, table, bias, output_dims):
        """z [B, T, D] . table [V, D]^T + bias [V] -> [B, T, V] (vocab is never split)."""
        return tied_projection(z, table, bias, output_dims, self.differentiable)

    def gather_rows(self, table, indices, output_shape):
        """table[indices] (the table's first dim must not be split)."""
        gradient = _segment_sum_rows_gradient if self.differentiable else 0
        return _gather_rows(table, indices, output_shape, gradient)


def _gather_rows(table, indices, output_shape, gradient):
    """table[indices] with tf.gather per slice (the table's first dim must not be split)."""
    output_shape = mtf.Shape(output_shape)
    return mtf.slicewise(lambda rows, ids: tf.gather(rows, ids), [table, indices],
                         output_shape=output_shape, output_dtype=table.dtype,
                         splittable_dims=output_shape.dims, grad_function=gradient,
                         name="gather_rows")


def _one_hot_rows_gradient(op, dy):
    onehot = mtf.one_hot(op.inputs[1], op.inputs[0].shape.dims[0], dtype=dy.dtype)
    return [mtf.einsum([onehot, dy], output_shape=op.inputs[0].shape), None]


def _segment_sum_rows_gradient(op, dy):
    """One-slice table gradient: a segment sum, which skips the [tokens, rows] one-hot
    product (2048 x 36k x d multiply-adds for a small batch)."""
    rows = op.inputs[0].shape.dims[0].size

    def segment_sum(ids, grad):  # [...], [..., d] -> [rows, d]
        return tf.math.unsorted_segment_sum(grad, ids, rows)

    return [mtf.slicewise(segment_sum, [op.inputs[1], dy], output_shape=op.inputs[0].shape,
                          output_dtype=dy.dtype, splittable_dims=dy.shape.dims,
                          grad_function=0, name="gather_rows_grad"), None]


def tied_projection(z, table, bias, output_dims, differentiable):
    """z [B, T, D] . table [V, D]^T + bias [V] -> [B, T, V] as one matmul + bias_add per
    slice (table and bias whole on every slice); with `differentiable`, a gradient of two
    matmuls (no transposed copy of the [tokens, vocab] gradient), one-slice meshes only."""
    splittable = z.shape.dims[:-1]

    def forward(hidden, table, bias):  # [b, t, d], [V, d], [V] -> [b, t, V]
        flat = tf.reshape(hidden, [-1, hidden.shape[-1]])
        out = tf.nn.bias_add(tf.matmul(flat, table, transpose_b=True), bias)
        return tf.reshape(out, hidden.shape[:-1].concatenate(table.shape[:1]))

    def gradient(op, dy):
        def backward(hidden, table, dy):  # -> d hidden [b, t, d], d table [V, d], d bias [V]
            flat, dy2 = tf.reshape(hidden, [-1, hidden.shape[-1]]), tf.reshape(
                dy, [-1, dy.shape[-1]])
            return (tf.reshape(tf.matmul(dy2, table), hidden.shape),
                    tf.matmul(dy2, flat, transpose_a=True), tf.reduce_sum(dy2, 0))

        z_, table_, bias_ = op.inputs
        return mtf.slicewise(backward, [z_, table_, dy],
                             output_shape=[z_.shape, table_.shape, bias_.shape],
                             output_dtype=[z_.dtype, table_.dtype, bias_.dtype],
                             splittable_dims=splittable, grad_function=0, name="tied_grad")

    return mtf.slicewise(forward, [z, table, bias], output_shape=output_dims,
                         output_dtype=z.dtype, splittable_dims=splittable,
                         grad_function=gradient if differentiable else 0,
                         name="tied_projection")
