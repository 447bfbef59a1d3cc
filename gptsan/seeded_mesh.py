"""A CPU/GPU mesh implementation whose random ops replay after a resume."""
import zlib

from gptsan.compat import mtf, tf


class StepSeededMeshImpl(mtf.placement_mesh_impl.PlacementMeshImpl):
    """`PlacementMeshImpl` whose random ops are stateless, keyed by (seed, op, slice, step).

    mtf's own `random()` seeds each op from Python's `random` and `hash()`, and TF's stateful
    random kernels restart after a restore, so neither a rerun nor a resumed run would see the
    noise of an uninterrupted run. Here the k-th random op of the graph draws
    `stateless_uniform/normal(seed=(seed * 2**32 + crc32(k, slice begin), global_step))`:
    slices that mtf replicates (same slice begin) still get equal values.
    """

    _STATELESS = {tf.random.uniform: tf.random.stateless_uniform,
                  tf.random.normal: tf.random.stateless_normal}

    def __init__(self, shape, layout, devices, global_step, seed=0):
        super().__init__(shape, layout, devices)
        self._step = tf.cast(global_step, tf.int64)
        self._seed = int(seed)
        self._ops = 0

    def random(self, shape, tf_fn, kwargs):
        stateless = self._STATELESS.get(tf_fn)
        if stateless is None:
            return super().random(shape, tf_fn, kwargs)
        self._ops += 1
        op_index = self._ops
        slice_shape = self.slice_shape(shape)

        def draw(pnum):
            key = zlib.crc32(f"{op_index},{self.slice_begin(shape, pnum)}".encode())
            base = (self._seed * 2 ** 32 + key) % 2 ** 63
            seed = tf.stack([tf.constant(base, tf.int64), self._step])
            return stateless(slice_shape, seed=seed, **kwargs)

        return self.slicewise(draw, self.laid_out_pnum())
