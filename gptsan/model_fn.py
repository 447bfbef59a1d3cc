"""The training step as an Estimator `model_fn`.

The graph of one step: TFRecord features -> mtf model (gptsan.modeling.build_model) ->
gptsan.losses -> optimizer updates (gptsan.optimization) -> lowering on the mesh ->
`control_dependencies(updates) -> assign_add(global_step, 1)`. `PlacementMeshImpl` on CPU/GPU
(gptsan.seeded_mesh), `SimdMeshImpl` on TPU. Checkpoints hold the full master variables plus the
optimizer slots and `global_step`, so a killed run resumes where its last checkpoint left off;
`--init_checkpoint` starts a new run from another model's weights.
"""
import typing

from gptsan import mesh as mesh_lib
from gptsan import optimization, tensorio
from gptsan.compat import mtf, tf
from gptsan.errors import GPTSANError
from gptsan.spout import spout_vectors
from gptsan.frozen_storage import FROZEN_DTYPES, delay_casts, frozen_storage_getter
from gptsan.hooks import LOSS_COLLECTION, OBJECTIVE_COLLECTION, TOKENS_COLLECTION
from gptsan.losses import AUX_LOSS_WEIGHT, lm_loss
from gptsan.seeded_mesh import StepSeededMeshImpl


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
            delay_casts(train_ops.frozen, lowering)
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
    getter = frozen_storage_getter(setup.ignore_names, FROZEN_DTYPES[setup.frozen_dtype])
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
