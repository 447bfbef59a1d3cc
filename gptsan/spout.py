"""The spout input: a vector per example, built from its class id (`i` feature) for training,
and the same vectors for generation (`run_generate.py --spout <class id>`)."""
import numpy as np

from gptsan.compat import tf
from gptsan.errors import GPTSANError

SPOUT_VECTORS = ("none", "uniform", "stateless_uniform", "onehot", "half_onehot")


def check_spout_vector(kind, num_spout):
    """--spout_vector `kind` must be one of SPOUT_VECTORS, and other than none needs a spout."""
    if kind not in SPOUT_VECTORS:
        raise GPTSANError(f"unknown --spout_vector {kind!r}; use one of {', '.join(SPOUT_VECTORS)}")
    if kind != "none" and num_spout <= 0:
        raise GPTSANError(f"--spout_vector {kind} needs a model with num_spout > 0")


def check_spout_input(spout, num_spout, batch, what="spout"):
    """A spout given to the model (named `what` in messages) -> float32 [batch, num_spout].

    A [num_spout] vector is repeated for every row; anything that does not fit the model is a
    one-line GPTSANError.
    """
    if num_spout <= 0:
        raise GPTSANError(f"{what} was given but the model has no spout input (num_spout=0)")
    spout = np.asarray(spout, dtype=np.float32)
    if spout.ndim == 1:
        spout = np.tile(spout[None], [batch, 1])
    if spout.ndim != 2 or spout.shape[1] != num_spout:
        raise GPTSANError(f"{what} has length {spout.shape[-1] if spout.ndim else 0} but the "
                          f"model expects num_spout={num_spout} (shape [{num_spout}] or "
                          f"[batch, {num_spout}])")
    if spout.shape[0] != batch:
        raise GPTSANError(f"{what} has {spout.shape[0]} rows for a batch of {batch}")
    if not np.all(np.isfinite(spout)):
        raise GPTSANError(f"{what} has NaN or infinite values")
    return spout


def spout_vectors(kind, ids, num_spout, global_step=None, seed=0):
    """The spout input for each example of a batch, from its class id (`i` feature).

    kind (the meanings of the published run_training.py --spout_vector):
      none               no spout (None)
      uniform            fresh U[0,1) noise every step, ignoring the id
      stateless_uniform  a fixed U[0,1) vector per id: stateless_uniform(seed=(id, id))
      onehot             one_hot(truncatemod(id, num_spout)) (a negative id: all zeros)
      half_onehot        one_hot(truncatemod(id, num_spout/2)) ++ fresh U[0,1) noise for the rest
    The noise of `uniform`/`half_onehot` is drawn statelessly from (seed, global_step), so a
    resumed run sees the same vectors as an uninterrupted one (the published script draws it
    from TF's stateful generator: same distribution, other values).
    ids: int Tensor [batch, 1] or [batch]. Returns float32 [batch, num_spout] or None.
    """
    check_spout_vector(kind, num_spout)
    if kind == "none":
        return None
    ids = tf.reshape(tf.cast(ids, tf.int32), [-1])  # [batch]
    batch = ids.shape[0]

    def noise(width):
        step = tf.constant(0, tf.int64) if global_step is None else tf.cast(global_step, tf.int64)
        stateless_seed = tf.stack([tf.constant(seed, tf.int64), step])
        return tf.random.stateless_uniform([batch, width], seed=stateless_seed)

    if kind == "uniform":
        return noise(num_spout)
    if kind == "stateless_uniform":
        return tf.map_fn(lambda i: tf.random.stateless_uniform([num_spout], seed=tf.stack([i, i])),
                         ids, fn_output_signature=tf.float32)
    if kind == "onehot":
        return tf.one_hot(tf.truncatemod(ids, num_spout), num_spout)
    half = num_spout // 2
    return tf.concat([tf.one_hot(tf.truncatemod(ids, max(half, 1)), half),
                      noise(num_spout - half)], axis=1)


def class_spout_vector(class_id, num_spout, kind="onehot", seed=0):
    """The spout training feeds for class id `class_id` -> float32 [num_spout] (numpy).

    Evaluates `spout_vectors` itself (one tiny graph), so generation cannot drift from training.
    """
    with tf.Graph().as_default():
        ids = tf.constant([[int(class_id)]], tf.int64)  # [batch=1, 1] like the `i` feature
        vector = spout_vectors(kind, ids, num_spout, seed=seed)  # [1, num_spout]
        with tf.Session() as session:
            return np.asarray(session.run(vector)[0], np.float32)
