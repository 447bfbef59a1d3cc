"""Session hooks of a training run: stop on a non-finite loss, a tqdm progress bar.

`model_fn` puts the tensors the hooks read into the graph collections named here.
"""
import math
import os
import time

from tqdm import tqdm

from gptsan.compat import tf
from gptsan.errors import GPTSANError


LOSS_COLLECTION = "gptsan_train_loss"  # hooks find the reported loss tensor here
OBJECTIVE_COLLECTION = "gptsan_train_objective"  # ... and the optimized total (NaN check)
TOKENS_COLLECTION = "gptsan_tokens_per_step"


class TrainingDiverged(GPTSANError):
    """The loss became NaN/Inf; training stopped without saving the broken weights."""


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
