"""Estimator glue for training: spout vectors, losses, `model_fn_builder`, hooks, `train()`.

The graph of one step: TFRecord features -> mtf model (gptsan.modeling.build_model) ->
cross entropy (z-loss) over targets != -1 + 1e-2 x load-balancing loss -> optimizer updates
(gptsan.optimization) -> lowering on the mesh -> `control_dependencies(updates) ->
assign_add(global_step, 1)`. The loss a run reports (progress bar, the Estimator's `loss`
summary) is the cross entropy without the load-balancing term, as published. Plain
`tf.estimator.Estimator` with `PlacementMeshImpl` on CPU/GPU, `TPUEstimator` with
`SimdMeshImpl` on TPU. Checkpoints hold the full master variables plus the
optimizer slots and `global_step`, so a killed run resumes where its last checkpoint left off.
"""
import math
import os
import time
import typing
import zlib

from tqdm import tqdm

from gptsan import fileio
from gptsan import fingerprint
from gptsan import mesh as mesh_lib
from gptsan import optimization, records, tensorio
from gptsan.checkpoint import check_checkpoint, find_checkpoint
from gptsan.compat import mtf, session_config, tf
from gptsan.config import PARAMETERS_FILE, GPTSANConfig
from gptsan.errors import GPTSANError
from gptsan.layers import softmax_cross_entropy
from gptsan.spout import spout_vectors
from gptsan.variables import variable_shapes

Z_LOSS = 1e-4  # published: softmax_cross_entropy_with_logits(..., z_loss=1e-4)
LOSS_DENOMINATOR_EPSILON = 1e-5  # published: sum(mask * loss) / (sum(mask) + 1e-5)
# published: loss += 1e-2 * the Switch load-balancing losses (docs/ARCHITECTURE.md "Training loss")
AUX_LOSS_WEIGHT = 1e-2
TPU_ITERATIONS_PER_LOOP = 100  # published TPUConfig(iterations_per_loop=100)
LOSS_COLLECTION = "gptsan_train_loss"  # hooks find the reported loss tensor here
OBJECTIVE_COLLECTION = "gptsan_train_objective"  # ... and the optimized total (NaN check)
TOKENS_COLLECTION = "gptsan_tokens_per_step"


class TrainingDiverged(GPTSANError):
    """The loss became NaN/Inf; training stopped without saving the broken weights."""


# ---------------------------------------------------------------------------------------------
# losses


def lm_loss(logits, targets, vocab_dim):
    """Mean softmax cross entropy (+ z-loss) over the positions whose target is not -1.

    The published masked mean: sum(weights * loss) / (sum(weights) + 1e-5).
    logits: float mtf [batch, length, vocab]; targets: int32 mtf [batch, length] (-1 = no loss).
    Returns (loss, token_count) as float32 mtf scalars.
    """
    weights = mtf.cast(mtf.not_equal(targets, -1), tf.float32)  # [batch, length]
    labels = mtf.maximum(targets, 0)  # -1 -> any valid id; its loss is weighted out
    per_token = softmax_cross_entropy(mtf.cast(logits, tf.float32), labels, vocab_dim,
                                      z_loss=Z_LOSS)  # [batch, length]
    count = mtf.reduce_sum(weights)
    return mtf.reduce_sum(per_token * weights) / (count + LOSS_DENOMINATOR_EPSILON), count


# ---------------------------------------------------------------------------------------------
# step-seeded randomness (router jitter, ...): a resumed run replays the same noise


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


# ---------------------------------------------------------------------------------------------
# model_fn


class TrainSetup:
    """Everything `model_fn` needs besides the features (explicit arguments, no globals)."""

    def __init__(self, config, mesh_shape, model_dir, spout_vector="none", dtype="float32",
                 ignore_names=(), clip_gradients=False, seed=0, devices=None, use_tpu=False,
                 init_checkpoint=None, summaries=True, clip_norm=optimization.CLIP_NORM,
                 dynamic_loss_scale=False, frozen_dtype="float32"):
        self.config = config  # GPTSANConfig (model + train)
        self.mesh_shape = mesh_lib.parse_mesh_shape(mesh_shape)
        self.model_dir = model_dir
        self.spout_vector = spout_vector
        self.dtype = dtype  # float32 | bfloat16 | float16 activations
        self.ignore_names = list(ignore_names)
        self.clip_gradients = clip_gradients
        self.clip_norm = clip_norm  # global-norm threshold of clip_gradients
        self.dynamic_loss_scale = dynamic_loss_scale  # float16: adaptive instead of fixed 2^9
        self.seed = seed
        self.devices = devices  # CPU/GPU device names, one per mesh position
        self.use_tpu = use_tpu
        self.init_checkpoint = init_checkpoint  # a checkpoint path to start a fresh run from
        self.summaries = summaries and not use_tpu
        self.frozen_dtype = frozen_dtype  # storage of the frozen (ignored) variables

    def make_loss_scale(self):
        """float16: the published fixed scale 2^9, or a DynamicLossScale if asked; else 1."""
        if self.dtype != "float16":
            return 1.0
        if self.dynamic_loss_scale:
            return optimization.DynamicLossScale()
        return optimization.MIXED_PRECISION_LOSS_SCALE


def model_fn_builder(setup):
    """Returns the (TPU)Estimator `model_fn(features, labels, mode, params)` for training."""

    def model_fn(features, labels, mode, params):
        del labels
        if mode != tf.estimator.ModeKeys.TRAIN:
            raise GPTSANError("the GPTSAN estimator only trains; use gptsan.inference to predict")
        global_step = tf.train.get_global_step()
        graph = mtf.Graph()
        mesh = mtf.Mesh(graph, "mesh")
        mesh_impl = _mesh_impl(setup, params, global_step)
        inputs = _import_features(mesh, features, setup, global_step)
        losses = _build_losses(mesh, inputs, setup)
        loss_scale = setup.make_loss_scale()
        train_ops = optimization.build_train_ops(
            losses.objective, setup.config.train, global_step, ignore_names=setup.ignore_names,
            clip_gradients=setup.clip_gradients, clip_norm=setup.clip_norm, loss_scale=loss_scale,
            order_updates=not setup.use_tpu)

        lowering = mtf.Lowering(graph, {mesh: mesh_impl})
        tf_loss = tf.cast(lowering.export_to_tf_tensor(losses.cross_entropy), tf.float32)
        tf_objective = tf.cast(lowering.export_to_tf_tensor(losses.objective), tf.float32)
        train_op = _train_op(lowering, train_ops, loss_scale, global_step, setup.summaries)
        tf.add_to_collection(LOSS_COLLECTION, tf_loss)  # the reported loss
        tf.add_to_collection(OBJECTIVE_COLLECTION, tf_objective)
        tf.add_to_collection(TOKENS_COLLECTION, tf.constant(inputs.ids.shape.size, tf.int64))
        if setup.summaries:
            _add_summaries(lowering, tf_objective, losses, train_ops)
        if FROZEN_DTYPES[setup.frozen_dtype] != tf.float32:
            _delay_casts(train_ops.frozen, lowering)
        scaffold = None
        if setup.init_checkpoint and setup.use_tpu:
            _init_from_checkpoint(setup.init_checkpoint)
        elif setup.init_checkpoint:
            scaffold = _restoring_scaffold(setup.init_checkpoint)
        hooks = _checkpoint_hooks(lowering, setup)
        if setup.use_tpu:
            return tf.estimator.tpu.TPUEstimatorSpec(mode, loss=tf_loss, train_op=train_op,
                                                     training_hooks=hooks)
        return tf.estimator.EstimatorSpec(mode, loss=tf_loss, train_op=train_op,
                                          training_hooks=hooks, scaffold=scaffold)

    return model_fn


def _mesh_impl(setup, params, global_step):
    """The mesh implementation: TPU (params["context"]) or step-seeded CPU/GPU placement."""
    if setup.use_tpu:
        return mesh_lib.make_mesh_impl(setup.mesh_shape, devices=[""] * setup.mesh_shape.size,
                                       tpu_device_assignment=params["context"].device_assignment)
    devices = setup.devices or mesh_lib.cpu_devices_for(setup.mesh_shape)
    return StepSeededMeshImpl(setup.mesh_shape, mesh_lib.layout_rules(), devices, global_step,
                              setup.seed)


class _Inputs(typing.NamedTuple):
    """One batch's features as mtf tensors."""
    ids: object  # int32 [batch, length]
    targets: object  # int32 [batch, length], -1 = no loss
    num_precontext: object  # int32 [batch]
    spout: object  # float32 [batch, spout] or None


def _import_features(mesh, features, setup, global_step):
    """The features (TFRecord schema: gptsan.records) -> `_Inputs` on `mesh`."""
    num_spout = setup.config.model.num_spout
    x = tf.cast(features["x"], tf.int32)  # [batch, length]
    batch_size, length = x.shape.as_list()
    batch_dim = mtf.Dimension(mesh_lib.BATCH, batch_size)
    tokens = mtf.Shape([batch_dim, mtf.Dimension(mesh_lib.LENGTH, length)])
    ids = mtf.import_tf_tensor(mesh, x, tokens)
    targets = mtf.import_tf_tensor(mesh, tf.cast(features["y"], tf.int32), tokens)
    num_precontext = mtf.import_tf_tensor(
        mesh, tf.reshape(tf.cast(features["num_input"], tf.int32), [batch_size]),
        mtf.Shape([batch_dim]))
    spout = spout_vectors(setup.spout_vector, features["i"], num_spout, global_step, setup.seed)
    if spout is not None:
        spout = mtf.import_tf_tensor(
            mesh, spout, mtf.Shape([batch_dim, mtf.Dimension(mesh_lib.SPOUT, num_spout)]))
    return _Inputs(ids, targets, num_precontext, spout)


class _Losses(typing.NamedTuple):
    """mtf float32 scalars of one step, and the model output."""
    cross_entropy: object  # the reported loss
    aux_loss: object  # load balancing, summed over the Switch layers
    objective: object  # cross_entropy + AUX_LOSS_WEIGHT * aux_loss: what is minimized
    token_count: object  # target tokens of the batch
    output: object  # modeling.ModelOutput


def _build_losses(mesh, inputs, setup):
    """The model on `inputs` (frozen variables stored as setup.frozen_dtype) and its losses."""
    from gptsan.modeling import build_model  # the model (H3) is only needed to build graphs
    from gptsan.plan import TRAIN, execution_plan

    plan = execution_plan(setup.mesh_shape, TRAIN, tpu=setup.use_tpu,
                          # fine-tuning on a frozen backbone: memory before speed
                          recompute_ext_layers=bool(setup.ignore_names))
    getter = _storage_getter(setup.ignore_names, FROZEN_DTYPES[setup.frozen_dtype])
    with tf.variable_scope("", custom_getter=getter):
        output = build_model(setup.config.model, mesh, inputs.ids, inputs.num_precontext,
                             inputs.spout, plan=plan,
                             variable_dtype=mesh_lib.dtype_policy(setup.dtype))
    vocab_dim = output.logits.shape.get_dim_by_name(mesh_lib.VOCAB)
    cross_entropy, token_count = lm_loss(output.logits, inputs.targets, vocab_dim)
    aux_loss = mtf.cast(output.aux_loss, tf.float32)
    return _Losses(cross_entropy, aux_loss, cross_entropy + aux_loss * AUX_LOSS_WEIGHT,
                   token_count, output)


def _train_op(lowering, train_ops, loss_scale, global_step, summaries):
    """The TF train op: the lowered updates (and the dynamic loss scale's), then step + 1."""
    tf_update_ops = [lowering.lowered_operation(op) for op in train_ops.update_ops]
    if train_ops.finite is not None:
        tf_finite = lowering.export_to_tf_tensor(train_ops.finite)
        with tf.control_dependencies(tf_update_ops):  # the step used the old scale
            tf_update_ops.append(loss_scale.update(tf_finite))
        if summaries:
            tf.summary.scalar("train/loss_scale", loss_scale.scale)
    with tf.control_dependencies(tf_update_ops):
        return tf.assign_add(global_step, 1)


def _checkpoint_hooks(lowering, setup):
    """[MtfRestoreHook, CheckpointSaverHook]: the restore hook must come first
    (docs/ARCHITECTURE.md "Stack facts")."""
    train = setup.config.train
    with mtf.utils.outside_all_rewrites():
        restore_hook = mtf.MtfRestoreHook(lowering)
        saver = tf.train.Saver(tf.global_variables(), sharded=True,
                               max_to_keep=train.max_to_keep_save,
                               keep_checkpoint_every_n_hours=train.checkpoint_per_hours,
                               defer_build=False, save_relative_paths=True)
        tf.add_to_collection(tf.GraphKeys.SAVERS, saver)
        saver_hook = tf.train.CheckpointSaverHook(
            setup.model_dir, save_steps=train.checkpoint_per_steps, saver=saver,
            listeners=[mtf.MtfCheckpointSaverListener(lowering)])
    return [restore_hook, saver_hook]


def _add_summaries(lowering, tf_objective, losses, train_ops):
    """TensorBoard scalars: losses, learning rate, grad norm, per-layer router statistics.

    `loss/cross_entropy` is also the Estimator's own `loss` (the reported loss, as published);
    `loss/total` adds the weighted load-balancing loss (the optimized objective).
    """
    export = lowering.export_to_tf_tensor
    tf.summary.scalar("loss/total", tf_objective)
    tf.summary.scalar("loss/cross_entropy", export(losses.cross_entropy))
    tf.summary.scalar("loss/load_balancing", export(losses.aux_loss))
    tf.summary.scalar("train/learning_rate", train_ops.learning_rate)
    tf.summary.scalar("train/gradient_norm", export(train_ops.grad_norm))
    tf.summary.scalar("train/target_tokens", export(losses.token_count))
    for layer, stats in enumerate(losses.output.router_stats):
        tf.summary.scalar(f"router/layer{layer}/entropy",
                          export(mtf.cast(stats.router_entropy, tf.float32)))
        fractions = export(mtf.cast(stats.expert_fraction, tf.float32))  # [experts]
        for expert in range(fractions.shape.as_list()[0]):
            tf.summary.scalar(f"router/layer{layer}/expert{expert}_fraction", fractions[expert])


def _init_from_checkpoint(path):
    """TPU: starts the master variables (and matching optimizer slots) from checkpoint `path`
    through `tf.train.init_from_checkpoint`. Call after lowering; `global_step` starts at 0."""
    tf.train.init_from_checkpoint(path, _restorable(path))


def _restorable(path):
    """{name: variable} of the graph's variables stored in checkpoint `path` (shapes checked):
    the master variables and matching optimizer slots, not `global_step`."""
    stored = tf.train.NewCheckpointReader(path).get_variable_to_shape_map()
    assignment = {}
    for variable in tf.global_variables():
        name = optimization.variable_base_name(variable.name)
        if name == "global_step" or name not in stored:
            continue
        if list(stored[name]) != variable.shape.as_list():
            raise GPTSANError(f"--init_checkpoint {path}: {name} has shape {stored[name]} but the "
                              f"model needs {variable.shape.as_list()}")
        assignment[name] = variable
    return assignment


def _restoring_scaffold(path):
    """A Scaffold that starts a fresh run from checkpoint `path` without a second copy of it.

    The restored variables are left out of the init op and then assigned one at a time
    (`tensorio.restore_variables`: one restored tensor alive at a time, cast to the variable's
    dtype, so a bfloat16 frozen backbone restores from a float32 checkpoint); one op restoring
    everything would let TensorFlow hold every restored tensor at once. Runs only when the
    output directory has no checkpoint (a resumed run restores its own).
    """
    restored = _restorable(path)
    chosen = set(restored.values())
    others = [v for v in tf.global_variables() if v not in chosen]
    with tf.name_scope("init_checkpoint"):
        ops = tensorio.restore_ops(restored, path)
    return tf.train.Scaffold(
        init_op=tf.group(tf.variables_initializer(others), name="init_others"),
        init_fn=lambda scaffold, session: tensorio.run_one_by_one(session, ops))


FROZEN_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}  # --frozen_dtype choices


def _storage_getter(frozen_names, dtype):
    """TF custom getter storing the variables named in `frozen_names` as `dtype`.

    mtf then reads such a variable through a cast to the activation dtype (`Variable.lower`);
    the optimizer never sees it (it is frozen), and the checkpoint holds it as `dtype`.
    """
    frozen = set(frozen_names)

    def storage_getter(getter, name, *args, **kwargs):
        if dtype != tf.float32 and name in frozen:
            kwargs["dtype"] = dtype
        return getter(name, *args, **kwargs)

    return storage_getter


def _delay_casts(frozen, lowering):
    """Makes each cast of a narrow frozen weight wait for the activations it meets.

    A cast depends only on its variable, so TensorFlow would run every one at the start of a
    step and hold a float32 copy of the whole frozen backbone at once. Each cast gets control
    inputs from the activations that the ops computed from its weight alone (reshapes, expert
    slices, ...) meet -- only those that do not themselves depend on the cast, so no cycle is
    made -- and the float32 copies then live about one layer at a time.
    """
    graph = tf.get_default_graph()
    order = {op: k for k, op in enumerate(graph.get_operations())}  # creation order: topological
    edges = []  # decided on the unchanged graph, then added
    for variable in frozen:
        for cast in lowering.tensors[variable.outputs[0]].tensor_list:
            if cast.op.type != "Cast":
                continue
            waits = _activations_met(cast.op)
            if waits:
                after = _descendants(cast.op, max(order[op] for op in waits), order)
                edges.append((cast.op, [op for op in waits if op not in after]))
    for cast_op, waits in edges:
        if waits:
            cast_op._add_control_inputs(waits)  # noqa: SLF001 - the TF1 way to add an edge


def _activations_met(op):
    """Ops feeding the first consumers of `op`'s weight-only descendants that are not derived
    from the weight (nor constants): the activations the weight is combined with."""
    derived, stack, met = {op}, [op], set()
    while stack:
        for consumer in {c for out in stack.pop().outputs for c in out.consumers()}:
            others = [t.op for t in consumer.inputs
                      if t.op not in derived and t.op.type != "Const"]
            if others:
                met.update(others)
            elif consumer not in derived:
                derived.add(consumer)
                stack.append(consumer)
    return met - derived


def _descendants(op, limit, order):
    """Ops reachable from `op` whose creation index is <= `limit` (bounded search)."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for nxt in [c for out in current.outputs for c in out.consumers()] + \
                list(current._control_outputs):  # noqa: SLF001
            if nxt not in seen and order.get(nxt, limit + 1) <= limit:
                seen.add(nxt)
                stack.append(nxt)
    return seen


# ---------------------------------------------------------------------------------------------
# hooks


class StopOnNonFiniteLoss(tf.train.SessionRunHook):
    """Raises TrainingDiverged as soon as the optimized loss (cross entropy + load balancing)
    is NaN/Inf, before any checkpoint hook runs."""

    def __init__(self, model_dir):
        self._model_dir = model_dir

    def begin(self):
        self._loss = tf.get_collection(OBJECTIVE_COLLECTION)[0]
        self._global_step = tf.train.get_global_step()

    def after_create_session(self, session, coord):
        # Counted here, not fetched per step: a fetched global_step races with its assign_add.
        self._step = int(session.run(self._global_step))

    def before_run(self, run_context):
        return tf.train.SessionRunArgs(self._loss)

    def after_run(self, run_context, run_values):
        self._step += 1
        loss = float(run_values.results)
        if not math.isfinite(loss):
            last = tf.train.latest_checkpoint(self._model_dir)
            kept = f"the last good checkpoint {os.path.basename(last)} is kept" if last else \
                "no checkpoint was written"
            raise TrainingDiverged(f"loss became {loss} at step {self._step}; training stopped "
                                   f"and {kept} (lower base_lr or use --clip_gradients)")


class ProgressBar(tf.train.SessionRunHook):
    """A tqdm bar over global steps with the loss and tokens/s of the last steps."""

    def __init__(self, max_steps=None, smoothing=0.9, enabled=True):
        self._max_steps = max_steps
        self._enabled = enabled  # False: only record the losses
        self._smoothing = smoothing  # exponential moving average of the loss shown
        self.losses = []  # (global step, loss) of every step run, for callers and tests

    def begin(self):
        self._loss = tf.get_collection(LOSS_COLLECTION)[0]
        self._tokens = tf.get_collection(TOKENS_COLLECTION)[0]
        self._global_step = tf.train.get_global_step()

    def after_create_session(self, session, coord):
        start = self._step = int(session.run(self._global_step))
        self._tokens_per_step = int(session.run(self._tokens))
        self._bar = tqdm(total=self._max_steps, initial=start, unit="step", dynamic_ncols=True,
                         desc="train", disable=not self._enabled)
        self._average = None
        self._time = time.perf_counter()

    def before_run(self, run_context):
        return tf.train.SessionRunArgs(self._loss)

    def after_run(self, run_context, run_values):
        loss = run_values.results
        now = time.perf_counter()
        elapsed, self._time = now - self._time, now
        self._step += 1
        self.losses.append((self._step, float(loss)))
        if math.isfinite(float(loss)):
            self._average = float(loss) if self._average is None else (
                self._smoothing * self._average + (1 - self._smoothing) * float(loss))
        self._bar.set_postfix(loss=f"{self._average:.4f}" if self._average is not None else loss,
                              tok_s=f"{self._tokens_per_step / max(elapsed, 1e-9):.0f}")
        self._bar.update(1)

    def end(self, session):
        self._bar.close()


# ---------------------------------------------------------------------------------------------
# the training loop


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


# ---------------------------------------------------------------------------------------------
# run preparation: every check happens before anything is written


def vocabulary_size(path):
    """Entries of a ja-swe vocabulary file (docs/ARCHITECTURE.md "Vocabulary files")."""
    return len(fingerprint.vocabulary_text(path).split("\n"))


def slot_names(name, optimizer):
    """Optimizer slot variable names of variable `name` (a resumed run needs them)."""
    if optimizer == "adam":
        return [name + s for s in optimization.ADAM_SLOT_SUFFIXES]
    return [name + "_slot_v", name + "_slot_vr"]  # adafactor: unfactored or factored


def check_resumable(stored, model, ignore_names, optimizer, model_dir):
    """The checkpoint in the output directory must hold the state this run restores.

    That is `global_step` and the `optimizer` slots of every variable not frozen by
    `ignore_names` (the restore needs every variable of the graph; freezing more is fine).
    """
    def has_slots(name, kind):
        return any(slot in stored for slot in slot_names(name, kind))

    trainable = [n for n in variable_shapes(model) if n not in set(ignore_names)]
    for other in ("adam", "adafactor"):
        if other != optimizer and any(has_slots(n, other) for n in trainable):
            raise GPTSANError(f"{model_dir} was trained with --optimizer {other}; resume with the "
                              "same optimizer")
    with_state = [n for n in trainable if has_slots(n, optimizer)]
    if "global_step" not in stored or not with_state:
        raise GPTSANError(f"{model_dir} holds a checkpoint without {optimizer} training state "
                          "(e.g. written by add_layers or convert_checkpoint); train into a new "
                          f"--model_dir with --init_checkpoint {model_dir}")
    missing = [n for n in trainable if n not in with_state]
    if missing:
        raise GPTSANError(f"{model_dir} has no optimizer state for {missing[0]} (+{len(missing) - 1}"
                          " more): it was frozen in that run; resume with the same "
                          "--ignore_parameters, or train into a new --model_dir with "
                          f"--init_checkpoint {model_dir}")


def check_frozen_dtype(model_dir, ignore_names, frozen_dtype):
    """A resumed run must hold its frozen variables in the dtype its checkpoint has them."""
    if not ignore_names:
        return
    reader = tf.train.NewCheckpointReader(find_checkpoint(model_dir))
    stored = reader.get_variable_to_dtype_map()
    name = next((n for n in ignore_names if n in stored), None)
    if name is not None and stored[name] != FROZEN_DTYPES[frozen_dtype]:
        raise GPTSANError(f"{model_dir} holds the frozen variables as {stored[name].name}; resume "
                          f"with --frozen_dtype {stored[name].name}")


def check_ignore_names(names, model):
    """The ignore list must name model variables and leave at least one to train."""
    expected = variable_shapes(model)
    optimization.check_known_names(names, expected)
    if len(set(names)) == len(expected):
        raise GPTSANError("--ignore_parameters freezes every variable: nothing left to train")


def select_devices(mesh_shape, batch_size, model):
    """Device names for the mesh on this machine (GPUs if any, else logical CPUs), checked."""
    shape = mesh_lib.parse_mesh_shape(mesh_shape)
    batch_split = shape.get_dim_by_name(mesh_lib.MESH_BATCH).size
    model.validate_model_parallel(mesh_lib.model_parallel_size(shape))
    if batch_size % batch_split:
        raise GPTSANError(f"batch_size={batch_size} is not divisible by the mesh batch size "
                          f"{batch_split} ({mesh_lib.format_mesh_shape(shape)})")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if shape.size > len(gpus):
            raise GPTSANError(f"mesh {mesh_lib.format_mesh_shape(shape)} needs {shape.size} "
                              f"devices but this machine has {len(gpus)} GPU(s)")
        return [f"/device:GPU:{k}" for k in range(shape.size)]
    return mesh_lib.cpu_devices_for(shape)


def check_training_inputs(config, files, vocabulary, ignore_names, init_checkpoint=None,
                          dtype="float32", dynamic_loss_scale=False, frozen_dtype="float32"):
    """Every check of a run that needs no graph; raises GPTSANError before anything is written.

    Checks the token ids of the TFRecord `files` (found and checked for num_context by
    `records.check_input_files`) against the vocabulary, the vocabulary size, the ignore list,
    and the checkpoint to resume from (`config.train.output_dir`: same model, shapes, training
    state of the same optimizer) or to start from (`init_checkpoint`: shapes). Returns the
    prefix of the init checkpoint or None (None also when the output directory resumes).
    """
    model, train = config.model, config.train
    model_dir = train.output_dir
    if init_checkpoint and fileio.absolute(init_checkpoint) == fileio.absolute(model_dir):
        raise GPTSANError("--init_checkpoint must differ from --model_dir (the output directory)")
    records.check_token_ids(files, model.num_vocabulary)
    model.validate_vocabulary(vocabulary_size(vocabulary), source=vocabulary)
    check_ignore_names(ignore_names, model)
    existing_params = fileio.join(model_dir, PARAMETERS_FILE)
    if (fileio.isfile(existing_params)
            and GPTSANConfig.from_json_file(existing_params).model != model):
        raise GPTSANError(f"{model_dir} holds a different model (its {PARAMETERS_FILE} differs "
                          "from the parameter file); choose another --model_dir")
    prefix = find_checkpoint(model_dir, required=False)
    if prefix is not None:  # resume: the init checkpoint is not used
        stored = check_checkpoint(prefix, model, model_dir)
        check_resumable(stored, model, ignore_names, train.optimizer, model_dir)
        check_frozen_dtype(model_dir, ignore_names, frozen_dtype)
        dynamic_scale = dtype == "float16" and dynamic_loss_scale
        if dynamic_scale and optimization.LOSS_SCALE_VARIABLE not in stored:
            raise GPTSANError(f"{model_dir} was trained without --dynamic_loss_scale (it has "
                              "no loss scale to resume); resume without it, or train into a "
                              f"new --model_dir with --init_checkpoint {model_dir}")
        return None
    if not init_checkpoint:
        return None
    prefix = find_checkpoint(init_checkpoint, required=False)
    if prefix is None:
        raise GPTSANError(f"no checkpoint in --init_checkpoint {init_checkpoint}")
    check_checkpoint(prefix, model, init_checkpoint, complete=False)
    return prefix


def write_model_dir(config, vocabulary, emoji):
    """Creates the output directory with parameters.json (recording the vocabulary's
    fingerprint, config.vocabulary) and the vocabulary/emoji copies it names (atomic)."""
    model_dir = config.train.output_dir
    fileio.makedirs(model_dir)
    if not fileio.exists(fileio.join(model_dir, PARAMETERS_FILE)):
        config.to_json_file(fileio.join(model_dir, PARAMETERS_FILE))
    fingerprint.copy_vocabulary(model_dir, config.vocabulary, vocabulary, emoji)
