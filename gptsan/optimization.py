"""Optimizers on Mesh-TensorFlow: AdamW / Adafactor, learning-rate schedule, clipping, freezing.

Everything here works on mtf tensors and variables of one mesh; the learning rate is a TF scalar
computed from the global step (so a resumed run continues the same schedule).

Name rules (docs/ARCHITECTURE.md "Checkpoint names"; unit-tested in tests/test_optimization.py):
* weight decay skips the LayerNorm gain/bias (`model/an{i}/g`, `model/ln{i}/b`, ...), every
  dense bias (`.../bias`) and the output-logit bias `model/wob`;
* variables named in an ignore list (the published `ignore-params.json`) are frozen: they get no
  gradient, no update and no optimizer slot variables.

float16 training scales the loss: by the published fixed 2^9, or (AdamW) dynamically
(`DynamicLossScale`: a step whose gradients overflow is skipped and the scale halved).
"""
import math
import re

from gptsan.compat import mtf, tf
from gptsan.errors import GPTSANError
from gptsan.fileio import read_json

ADAM_BETA1 = 0.9  # published optimization.py
ADAM_BETA2 = 0.999  # published optimization.py
ADAM_EPSILON = 1e-8  # published optimization.py
DEFAULT_WEIGHT_DECAY = 0.01  # published AdamWeightDecayOptimizer(weight_decay_rate=0.01)
CLIP_NORM = 1.0  # published clip_by_global_norm(clip_norm=1.0) behind --clip_gradients
MIXED_PRECISION_LOSS_SCALE = 2.0 ** 9  # published grad_scale with --use_mixed_precision
DYNAMIC_SCALE_INITIAL = 2.0 ** 15  # dynamic fp16 loss scale: start (TF's LossScaleOptimizer)
DYNAMIC_SCALE_GROWTH_STEPS = 2000  # ... doubled after this many finite steps (TF's default)
LOSS_SCALE_VARIABLE = "training/loss_scale"  # checkpoint name of the dynamic loss scale
NO_DECAY_LEAF_NAMES = ("g", "b", "bias")  # LayerNorm gain/bias and dense biases
NO_DECAY_VARIABLES = ("model/wob",)  # the output-logit bias has no "bias" leaf name
ADAM_SLOT_SUFFIXES = ("/adam_m", "/adam_v")  # slot names of the published checkpoints


def variable_base_name(name):
    """`model/ln0/g:0` -> `model/ln0/g` (TF names carry an output index, mtf names do not)."""
    return re.sub(r":\d+$", "", name)


def uses_weight_decay(name):
    """Whether AdamW decays the variable `name` (False for LayerNorm g/b, biases, `wob`)."""
    name = variable_base_name(name)
    return name.split("/")[-1] not in NO_DECAY_LEAF_NAMES and name not in NO_DECAY_VARIABLES


def learning_rate_schedule(global_step, base_lr, num_warmup_steps):
    """The published schedule: linear warm-up to `base_lr`, then inverse-square-root decay.

    lr(step) = base_lr * min(1, (step + 1) / warmup)               while step < warmup
             = 1 / sqrt(max(step, 1 / base_lr**2))                  afterwards
    The decay keeps `base_lr` until step 1/base_lr**2 (T5's "rsqrt" schedule, which the published
    code uses); the warm-up counts from 1 so the first step already updates the weights.
    Returns a float32 TF scalar.
    """
    step = tf.cast(global_step, tf.float32)
    decay_start = tf.constant(1.0 / base_lr ** 2, tf.float32)
    learning_rate = tf.math.rsqrt(tf.maximum(step, decay_start))
    if num_warmup_steps > 0:
        warmup = base_lr * tf.minimum(1.0, (step + 1.0) / float(num_warmup_steps))
        learning_rate = tf.where(step < float(num_warmup_steps), warmup, learning_rate)
    return learning_rate


def load_ignore_parameters(path):
    """Reads an `ignore-params.json` (a JSON list of variable names) -> list of names."""
    names = read_json(path, "--ignore_parameters file")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise GPTSANError(f"--ignore_parameters {path} must be a JSON list of variable names")
    return [variable_base_name(n) for n in names]


def check_known_names(names, known):
    """GPTSANError naming the first of `names` (ignore list) that are not in `known`."""
    unknown = sorted(set(names) - set(known))
    if unknown:
        shown = ", ".join(unknown[:3])
        if len(unknown) > 3:
            shown += f" (+{len(unknown) - 3} more)"
        raise GPTSANError(f"--ignore_parameters names {len(unknown)} variable(s) the model does "
                          f"not have: {shown}")


def split_frozen(variables, ignore_names):
    """Splits mtf variables into (trainable, frozen) by the names in `ignore_names`.

    Raises GPTSANError naming the first unknown names, so a typo never trains a frozen layer.
    """
    ignore = {variable_base_name(n) for n in ignore_names}
    check_known_names(ignore, [v.name for v in variables])
    trainable = [v for v in variables if v.name not in ignore]
    frozen = [v for v in variables if v.name in ignore]
    return trainable, frozen


def clip_by_global_norm(grads, clip_norm):
    """Scales all gradients by clip_norm / max(global_norm, clip_norm). Returns (grads, norm)."""
    norm = global_norm(grads)
    multiplier = clip_norm / mtf.maximum(norm, clip_norm)
    clipped = [None if g is None else mtf.cast(mtf.cast(g, tf.float32) * multiplier, g.dtype)
               for g in grads]
    return clipped, norm


def global_norm(grads):
    """sqrt(sum of squares) over every gradient, as a float32 mtf scalar."""
    squares = [mtf.reduce_sum(mtf.square(mtf.cast(g, tf.float32))) for g in grads if g is not None]
    return mtf.sqrt(mtf.add_n(squares))


class AdamWeightDecay(mtf.optimize.Optimizer):
    """Adam with bias correction and decoupled weight decay (AdamW), on mtf ops.

    var -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * var)   [decay only if
    `uses_weight_decay(var.name)`]. Slots `<var>/adam_m`, `<var>/adam_v` (the published names).
    `learning_rate` and `step` (1-based update count) are mtf scalars.
    """

    def __init__(self, learning_rate, step, weight_decay=DEFAULT_WEIGHT_DECAY, beta1=ADAM_BETA1,
                 beta2=ADAM_BETA2, epsilon=ADAM_EPSILON, apply=None):
        self.learning_rate = learning_rate
        self.apply = apply  # optional float mtf scalar: 1 updates, 0 leaves weights and slots
        self.weight_decay = weight_decay
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        # Bias corrections 1 - beta^t, as mtf scalars shared by every variable.
        self._correction1 = 1.0 - mtf.exp(step * math.log(beta1))
        self._correction2 = 1.0 - mtf.exp(step * math.log(beta2))

    @staticmethod
    def slots(var):
        """The (m, v) slot variables of `var` (created on first use)."""
        return [mtf.get_variable(var.mesh, var.name + suffix, var.shape, dtype=tf.float32,
                                 initializer=tf.zeros_initializer(), trainable=False)
                for suffix in ADAM_SLOT_SUFFIXES]

    def apply_grad(self, grad, var):
        if grad is None:
            return []
        grad = mtf.cast(grad, tf.float32)
        m, v = self.slots(var)
        next_m = m * self.beta1 + grad * (1.0 - self.beta1)
        next_v = v * self.beta2 + mtf.square(grad) * (1.0 - self.beta2)
        m_hat, v_hat = next_m / self._correction1, next_v / self._correction2
        update = m_hat / (mtf.sqrt(v_hat) + self.epsilon)
        if self.weight_decay and uses_weight_decay(var.name):
            update += mtf.cast(var.value, tf.float32) * self.weight_decay
        if self.apply is not None:  # a skipped step keeps everything as it was
            next_m = m + (next_m - m) * self.apply
            next_v = v + (next_v - v) * self.apply
            update *= self.apply
        # assign_sub (not assign) keeps bf16 slices from being re-rounded every step (mtf note).
        return [mtf.assign_sub(var, update * self.learning_rate),
                mtf.assign(m, next_m), mtf.assign(v, next_v)]


def make_optimizer(name, mesh, learning_rate, global_step, weight_decay=DEFAULT_WEIGHT_DECAY,
                   apply=None):
    """`adam` (AdamWeightDecay) or `adafactor` (mtf's AdafactorOptimizer, absolute lr, no decay).

    `learning_rate`, `global_step`: TF scalars; `apply`: see AdamWeightDecay (adam only).
    """
    if name == "adam":
        mtf_lr = mtf.import_tf_tensor(mesh, tf.cast(learning_rate, tf.float32), [])
        step = mtf.import_tf_tensor(mesh, tf.cast(global_step, tf.float32) + 1.0, [])
        return AdamWeightDecay(mtf_lr, step, weight_decay=weight_decay, apply=apply)
    if name == "adafactor":
        # Absolute step size = our schedule (no parameter scaling); slots <var>_slot_v[r|c].
        return mtf.optimize.AdafactorOptimizer(multiply_by_parameter_scale=False,
                                               learning_rate=tf.cast(learning_rate, tf.float32))
    raise GPTSANError(f"unknown optimizer {name!r}; expected adam or adafactor")


def create_slots(optimizer, var):
    """Creates `var`'s optimizer slots without updating it.

    For variables without a gradient in this run (the spout's `pasts/*` under
    `--spout_vector none`): every checkpoint then holds every slot, so a run can resume with
    or without a spout. mtf's Adafactor has no slot-only API: its update for a zero gradient
    is built for the slots it creates and then dropped (nothing ever runs it).
    """
    if isinstance(optimizer, AdamWeightDecay):
        optimizer.slots(var)
    else:
        optimizer.apply_grad(mtf.zeros_like(var.outputs[0]), var)


class DynamicLossScale:
    """float16 loss scale that adapts (TF variables under `training/`, so it is checkpointed).

    After the gradients are unscaled: if any is inf/NaN the step is skipped (weights and Adam
    slots unchanged) and the scale halved (not below 1); after `growth_steps` finite steps
    in a row it doubles. Call `update(finite)` with the step's TF bool after lowering.
    """

    def __init__(self, initial=DYNAMIC_SCALE_INITIAL, growth_steps=DYNAMIC_SCALE_GROWTH_STEPS):
        self.growth_steps = growth_steps
        scope, name = LOSS_SCALE_VARIABLE.split("/")
        with tf.variable_scope(scope, reuse=tf.AUTO_REUSE):
            self.scale = tf.get_variable(name, initializer=float(initial), trainable=False)
            self.good_steps = tf.get_variable("loss_scale_good_steps", shape=[],
                                              dtype=tf.int64, trainable=False,
                                              initializer=tf.zeros_initializer())

    def update(self, finite):
        """TF op: the next scale and good-step count after a step with `finite` gradients."""
        grow = self.good_steps + 1 >= self.growth_steps
        scale = tf.where(finite, tf.where(grow, self.scale * 2.0, self.scale),
                         tf.maximum(self.scale * 0.5, 1.0))
        good = tf.where(tf.logical_and(finite, tf.logical_not(grow)), self.good_steps + 1,
                        tf.zeros_like(self.good_steps))
        return tf.group(self.scale.assign(scale), self.good_steps.assign(good))


class TrainOps:
    """What `build_train_ops` returns: the mtf update ops plus scalars worth logging."""

    def __init__(self, update_ops, learning_rate, grad_norm, trainable, frozen, finite=None):
        self.update_ops = update_ops  # list of mtf Operations
        self.learning_rate = learning_rate  # TF float32 scalar
        self.grad_norm = grad_norm  # mtf float32 scalar (before clipping)
        self.trainable = trainable  # mtf Variables that are updated
        self.frozen = frozen  # mtf Variables that are left alone
        self.finite = finite  # dynamic loss scale: mtf bool scalar, all gradients finite


def build_train_ops(loss, train_config, global_step, ignore_names=(), clip_gradients=False,
                    loss_scale=1.0, order_updates=True):
    """Gradients of the mtf scalar `loss` and the optimizer updates for every non-frozen variable.

    `loss_scale` multiplies the loss before differentiation and divides the gradients after
    (float16 activations): a float (static), or a `DynamicLossScale` (adam only), with which
    non-finite gradients become zeros and the step is skipped. AdamW's decay rate is
    `train_config.weight_decay` (the published runs used DEFAULT_WEIGHT_DECAY).

    `order_updates`: every update waits for ALL gradients (through the global norm, which
    depends on each of them). mtf reads float32 variables by reference, so without this an
    early `assign_sub` can race with another gradient's read of the same weight and make
    training nondeterministic. Needs control dependencies: pass False for `SimdMeshImpl` (TPU).
    With `clip_gradients` the clipped gradients already depend on the norm.
    """
    mesh = loss.mesh
    trainable, frozen = split_frozen(mesh.graph.trainable_variables, ignore_names)
    if not trainable:
        raise GPTSANError("--ignore_parameters freezes every variable: nothing left to train")
    dynamic = isinstance(loss_scale, DynamicLossScale)
    if dynamic and train_config.optimizer != "adam":
        raise GPTSANError("dynamic loss scaling (float16) needs --optimizer adam")
    scale = mtf.import_tf_tensor(mesh, loss_scale.scale, []) if dynamic else loss_scale
    scaled = loss * scale if dynamic or loss_scale != 1.0 else loss
    grads = mtf.gradients([scaled], [v.outputs[0] for v in trainable])
    if dynamic or loss_scale != 1.0:
        inverse = mtf.reciprocal(scale) if dynamic else 1.0 / loss_scale
        grads = [None if g is None else mtf.cast(g, tf.float32) * inverse for g in grads]
    finite = apply = None
    if dynamic:
        finite = mtf.less(global_norm(grads), float("inf"))  # False for inf and NaN
        grads = [None if g is None else _zero_unless(finite, g) for g in grads]
        apply = mtf.cast(finite, tf.float32)
    if clip_gradients:
        grads, norm = clip_by_global_norm(grads, CLIP_NORM)
    else:
        norm = global_norm(grads)
        if order_updates:
            grads = [None if g is None else mtf.depend(g, [norm]) for g in grads]
    learning_rate = learning_rate_schedule(global_step, train_config.base_lr,
                                           train_config.num_warmup_steps)
    optimizer = make_optimizer(train_config.optimizer, mesh, learning_rate, global_step,
                               weight_decay=train_config.weight_decay, apply=apply)
    update_ops = optimizer.apply_grads(grads, trainable)
    for grad, var in zip(grads, trainable):
        if grad is None:
            create_slots(optimizer, var)
    return TrainOps(update_ops, learning_rate, norm, trainable, frozen, finite)


def _zero_unless(condition, x):
    """x where the bool mtf scalar `condition` holds, else zeros (also replaces inf/NaN)."""
    return mtf.slicewise(lambda c, value: tf.where(c, value, tf.zeros_like(value)),
                         [condition, x], output_shape=x.shape, output_dtype=x.dtype,
                         splittable_dims=x.shape.dims, grad_function=0, name="zero_unless")
