"""The training loop: an Estimator (CPU/GPU) or TPUEstimator over `gptsan.model_fn`,
resumed from the last checkpoint of the output directory on the batches not yet trained on."""
from gptsan.checkpoint import find_checkpoint
from gptsan.compat import session_config, tf
from gptsan.hooks import ProgressBar, StopOnNonFiniteLoss, TrainingDiverged
from gptsan.model_fn import model_fn_builder


TPU_ITERATIONS_PER_LOOP = 100  # published TPUConfig(iterations_per_loop=100)


def latest_global_step(model_dir):
    """global_step of the newest checkpoint in `model_dir` (0 when there is none)."""
    path = find_checkpoint(model_dir, required=False) if model_dir else None
    if not path:
        return 0
    return int(tf.train.NewCheckpointReader(path).get_tensor(tf.GraphKeys.GLOBAL_STEP))


def resumable_input_fn(input_fn, start_step):
    """Skips the `start_step` batches a resumed run has already trained on (same seed order)."""

    def wrapped(params):
        dataset = input_fn(params)
        return dataset.skip(start_step) if start_step else dataset

    return wrapped


def make_estimator(setup, tpu_cluster=None, summary_steps=100):
    """`tf.estimator.Estimator` (CPU/GPU) or `TPUEstimator` for `setup`."""
    model_fn = model_fn_builder(setup)
    batch_size = setup.config.train.batch_size
    if setup.use_tpu:
        run_config = tf.estimator.tpu.RunConfig(
            cluster=tpu_cluster, model_dir=setup.model_dir, save_checkpoints_steps=None,
            save_checkpoints_secs=None, tf_random_seed=setup.seed,
            tpu_config=tf.estimator.tpu.TPUConfig(
                iterations_per_loop=TPU_ITERATIONS_PER_LOOP, num_cores_per_replica=1,
                per_host_input_for_training=tf.estimator.tpu.InputPipelineConfig.BROADCAST))
        return tf.estimator.tpu.TPUEstimator(use_tpu=True, eval_on_tpu=False, model_fn=model_fn,
                                             config=run_config, params={},
                                             train_batch_size=batch_size)
    run_config = tf.estimator.RunConfig(
        model_dir=setup.model_dir, tf_random_seed=setup.seed, save_checkpoints_steps=None,
        save_checkpoints_secs=None, save_summary_steps=summary_steps if setup.summaries else None,
        log_step_count_steps=None, session_config=session_config(setup.mesh_shape.size))
    return tf.estimator.Estimator(model_fn=model_fn, config=run_config, params={})


def train(setup, input_fn, max_steps=None, tpu_cluster=None, summary_steps=100, progress=True):
    """Trains from the last checkpoint in `setup.model_dir` up to global step `max_steps`.

    `input_fn(params) -> tf.data.Dataset` must yield the same batches in the same order for the
    same seed; the batches already trained on are skipped on resume. Returns the list of
    (global step, loss) of every step run (empty on TPU).
    """
    start = latest_global_step(setup.model_dir)
    if max_steps is not None and start >= max_steps:
        return []
    estimator = make_estimator(setup, tpu_cluster, summary_steps)
    bar = ProgressBar(max_steps, enabled=progress)
    hooks = [StopOnNonFiniteLoss(setup.model_dir), bar]
    if setup.use_tpu:
        hooks = []  # TPU runs iterations_per_loop steps per session.run; hooks see only loops
    try:
        estimator.train(resumable_input_fn(input_fn, start), max_steps=max_steps, hooks=hooks)
    except tf.train.NanLossDuringTrainingError:
        raise TrainingDiverged(f"loss became NaN during training; training stopped and the last "
                               f"checkpoint in {setup.model_dir} is kept") from None
    return bar.losses


LOSS_SUMMARY_STEPS = 5  # describe_losses averages this many steps at each end


def describe_losses(losses):
    """'; loss 10.43 -> 6.12 (mean of the first/last 5 steps)' or '' for no steps."""
    if not losses:
        return ""
    k = min(LOSS_SUMMARY_STEPS, len(losses))
    first = sum(v for _, v in losses[:k]) / k
    last = sum(v for _, v in losses[-k:]) / k
    return f"; loss {first:.4f} -> {last:.4f} (mean of the first/last {k} steps)"
