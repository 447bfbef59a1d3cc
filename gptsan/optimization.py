"""Optimizers on Mesh-TensorFlow: AdamW / Adafactor, learning-rate schedule, clipping, freezing.

Everything here works on mtf tensors and variables of one mesh; the learning rate is a TF scalar
computed from the global step (so a resumed run continues the same schedule).

Defaults are those of the published optimization.py (tanreinama/GPTSAN at HEAD); each
departure is an opt-in `train_params` key or run_train.py flag (named in parentheses):
* AdamW (beta 0.9/0.999, eps 1e-8) WITHOUT bias correction (`adam_bias_correction`), decay
  rate 0.01 (`weight_decay`) on every variable whose name does not match
  "LayerNorm|layer_norm|bias" (`no_decay_pattern`; with our names only the dense biases
  `.../bias` escape decay, LayerNorm g/b and `model/wob` are decayed);
* linear warm-up `base_lr * step / warmup` from step 0, so the first update has lr 0
  (`warmup_from_one`), then `1 / sqrt(max(step, 1 / base_lr**2))`;
* `--clip_gradients`: global norm 0.01 (`--clip_norm`; the first published version used 1.0);
* float16 (`--use_mixed_precision`): fixed loss scale 2^9 (`--dynamic_loss_scale`).
Checkpoint names: docs/ARCHITECTURE.md "Checkpoint names". Variables named in an ignore list
(`ignore-params.json`) are frozen: they get no gradient, no update and no optimizer slots.
"""
import math
import re

from gptsan.compat import mtf, tf
from gptsan.config import PUBLISHED_CLIP_NORM, PUBLISHED_NO_DECAY_PATTERN, PUBLISHED_WEIGHT_DECAY
from gptsan.errors import GPTSANError
from gptsan.fileio import read_json

ADAM_BETA1 = 0.9  # published optimization.py
ADAM_BETA2 = 0.999  # published optimization.py
ADAM_EPSILON = 1e-8  # published optimization.py (create_optimizer passes epsilon=1e-8)
DEFAULT_WEIGHT_DECAY = PUBLISHED_WEIGHT_DECAY
CLIP_NORM = PUBLISHED_CLIP_NORM
MIXED_PRECISION_LOSS_SCALE = 2.0 ** 9  # published grad_scale with --use_mixed_precision
DYNAMIC_SCALE_INITIAL = 2.0 ** 15  # dynamic fp16 loss scale: start (TF's LossScaleOptimizer)
DYNAMIC_SCALE_GROWTH_STEPS = 2000  # ... doubled after this many finite steps (TF's default)
LOSS_SCALE_VARIABLE = "training/loss_scale"  # checkpoint name of the dynamic loss scale
# opt-in `no_decay_pattern`: also skip the LayerNorm gain/bias (an{i}/g, ln{i}/b) and `model/wob`
NORM_AND_BIAS_NO_DECAY_PATTERN = r"bias|(^|/)(an|ln)\d+/[gb]$|^model/wob$"
ADAM_SLOT_SUFFIXES = ("/adam_m", "/adam_v")  # slot names of the published checkpoints


def variable_base_name(name):
    """`model/ln0/g:0` -> `model/ln0/g` (TF names carry an output index, mtf names do not)."""
    return re.sub(r":\d+$", "", name)


def uses_weight_decay(name, no_decay_pattern=PUBLISHED_NO_DECAY_PATTERN):
    """Whether AdamW decays the variable `name`: unless `no_decay_pattern` is found in it."""
    return re.search(no_decay_pattern, variable_base_name(name)) is None


def learning_rate_schedule(global_step, base_lr, num_warmup_steps, warmup_from_one=False):
    """The published schedule: linear warm-up to `base_lr`, then inverse-square-root decay.

    lr(step) = base_lr * step / warmup                    while step < warmup (published)
             = base_lr * min(1, (step + 1) / warmup)      ... with `warmup_from_one`
             = 1 / sqrt(max(step, 1 / base_lr**2))         afterwards
    `step` is the global step before the update it drives, so the published warm-up gives the
    first update lr 0 (Adam's moments still move); `warmup_from_one` makes it base_lr / warmup.
    The decay keeps `base_lr` until step 1/base_lr**2 (T5's "rsqrt" schedule).
    Returns a float32 TF scalar.
    """
    step = tf.cast(global_step, tf.float32)
    decay_start = tf.constant(1.0 / base_lr ** 2, tf.float32)
    learning_rate = tf.math.rsqrt(tf.maximum(step, decay_start))
    if num_warmup_steps > 0:
        counted = step + 1.0 if warmup_from_one else step
        warmup = base_lr * tf.minimum(1.0, counted / float(num_warmup_steps))
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
    """Adam with decoupled weight decay (AdamW), on mtf ops; the published update by default.

    var -= lr * (m / (sqrt(v) + eps) + weight_decay * var)   [decay unless the name matches
    `no_decay_pattern`]; with `corrections` (opt-in bias correction: the mtf scalars
    1 - beta1^t, 1 - beta2^t, see `bias_corrections`) m and v are divided by them first.
    Slots `<var>/adam_m`, `<var>/adam_v` (the published names). `learning_rate`: mtf scalar.
    """

    def __init__(self, learning_rate, corrections=None, weight_decay=DEFAULT_WEIGHT_DECAY,
                 no_decay_pattern=PUBLISHED_NO_DECAY_PATTERN, beta1=ADAM_BETA1,
                 beta2=ADAM_BETA2, epsilon=ADAM_EPSILON, apply=None):
        self.learning_rate = learning_rate
        self.apply = apply  # optional float mtf scalar: 1 updates, 0 leaves weights and slots
        self.weight_decay = weight_decay
        self.no_decay_pattern = no_decay_pattern
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self._corrections = corrections

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
        m_var, v_var = self.slots(var)
        m, v, value = [mtf.depend(x, [grad]) for x in (m_var, v_var, var.value)]
        next_m = m * self.beta1 + grad * (1.0 - self.beta1)
        next_v = v * self.beta2 + mtf.square(grad) * (1.0 - self.beta2)
        m_hat, v_hat = next_m, next_v
        if self._corrections is not None:
            m_hat, v_hat = next_m / self._corrections[0], next_v / self._corrections[1]
        update = m_hat / (mtf.sqrt(v_hat) + self.epsilon)
        if self.weight_decay and uses_weight_decay(var.name, self.no_decay_pattern):
            update += mtf.cast(value, tf.float32) * self.weight_decay
        if self.apply is not None:  # a skipped step keeps everything as it was
            next_m = m + (next_m - m) * self.apply
            next_v = v + (next_v - v) * self.apply
            update *= self.apply
        # assign_sub (not assign) keeps bf16 slices from being re-rounded every step (mtf note).
        return [mtf.assign_sub(var, update * self.learning_rate),
                mtf.assign(m_var, next_m), mtf.assign(v_var, next_v)]


def bias_corrections(global_step, beta1=ADAM_BETA1, beta2=ADAM_BETA2):
    """TF float32 scalars 1 - beta^t for update t = global_step + 1 (expm1 keeps full float32
    precision for small t, where 1 - exp(t log beta) loses about half of the digits)."""
    step = tf.cast(global_step, tf.float32) + 1.0
    return [-tf.math.expm1(step * math.log(beta)) for beta in (beta1, beta2)]


def make_optimizer(train_config, mesh, learning_rate, global_step, apply=None):
    """`adam` (AdamWeightDecay) or `adafactor` (mtf's AdafactorOptimizer, absolute lr, no decay).

    The optimizer name and AdamW settings come from `train_config` (TrainConfig);
    `learning_rate`, `global_step`: TF scalars; `apply`: see AdamWeightDecay (adam only).
    """
    name = train_config.optimizer
    if name == "adam":
        mtf_lr = mtf.import_tf_tensor(mesh, tf.cast(learning_rate, tf.float32), [])
        corrections = None
        if train_config.adam_bias_correction:
            corrections = [mtf.import_tf_tensor(mesh, c, [])
                           for c in bias_corrections(global_step)]
        return AdamWeightDecay(mtf_lr, corrections, weight_decay=train_config.weight_decay,
                               no_decay_pattern=train_config.no_decay_pattern, apply=apply)
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
    """Opt-in float16 loss scale that adapts (`--dynamic_loss_scale`; the published scripts use
    the fixed MIXED_PRECISION_LOSS_SCALE). TF variables under `training/`, so it is checkpointed.

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

    def __init__(self, update_ops, learning_rate, grad_norm, frozen, finite=None):
        self.update_ops = update_ops  # list of mtf Operations
        self.learning_rate = learning_rate  # TF float32 scalar
        self.grad_norm = grad_norm  # mtf float32 scalar (before clipping)
        self.frozen = frozen  # mtf Variables that are left alone
        self.finite = finite  # dynamic loss scale: mtf bool scalar, all gradients finite


def build_train_ops(loss, train_config, global_step, ignore_names=(), clip_gradients=False,
                    clip_norm=CLIP_NORM, loss_scale=1.0, order_updates=True):
    """Gradients of the mtf scalar `loss` and the optimizer updates for every non-frozen variable.

    `loss_scale` multiplies the loss before differentiation and divides the gradients after
    (float16 activations): a float (static), or a `DynamicLossScale` (adam only), with which
    non-finite gradients become zeros and the step is skipped. The optimizer and its settings
    come from `train_config` (TrainConfig).

    `clip_gradients`: scale the gradients to global norm <= `clip_norm`. As published, a static
    scale clips the gradients of the SCALED loss (before they are divided by the scale), so the
    true gradients are clipped at clip_norm / loss_scale; a dynamic scale clips the true
    gradients at clip_norm.

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
        # = clipping the scaled gradients at clip_norm, then unscaling them (published order)
        threshold = clip_norm if dynamic else clip_norm / loss_scale
        grads, norm = clip_by_global_norm(grads, threshold)
    else:
        norm = global_norm(grads)
        if order_updates:
            grads = [None if g is None else mtf.depend(g, [norm]) for g in grads]
    learning_rate = learning_rate_schedule(global_step, train_config.base_lr,
                                           train_config.num_warmup_steps,
                                           train_config.warmup_from_one)
    optimizer = make_optimizer(train_config, mesh, learning_rate, global_step, apply=apply)
    update_ops = optimizer.apply_grads(grads, trainable)
    for grad, var in zip(grads, trainable):
        if grad is None:
            create_slots(optimizer, var)
    return TrainOps(update_ops, learning_rate, norm, frozen, finite)


def _zero_unless(condition, x):
    """x where the bool mtf scalar `condition` holds, else zeros (also replaces inf/NaN)."""
    return mtf.slicewise(lambda c, value: tf.where(c, value, tf.zeros_like(value)),
                         [condition, x], output_shape=x.shape, output_dtype=x.dtype,
                         splittable_dims=x.shape.dims, grad_function=0, name="zero_unless")
