"""GPTSAN model directories and their TF checkpoints.

A GPTSAN model directory holds `parameters.json`, a TF checkpoint (`checkpoint` index +
`model.ckpt-<step>.*`) whose variables carry the TF names of docs/ARCHITECTURE.md
"Checkpoint names" (the table: gptsan/variables.py), and copies of the vocabulary and emoji
table (named and fingerprinted in parameters.json: gptsan/fingerprint.py). Tensors are read
and written one at a time (gptsan/tensorio.py), so memory stays bounded at any model size.
"""
import os
import re

import numpy as np
from tqdm import tqdm

from gptsan import fileio, fingerprint, tensorio
from gptsan.config import PARAMETERS_FILE, GPTSANConfig, ModelConfig, TrainConfig
from gptsan.errors import GPTSANError
from gptsan.variables import (SHAPE_FIELDS, check_declared, check_variables, infer_model_config,
                              is_model_variable, is_shape_relevant)

CHECKPOINT_BASENAME = "model.ckpt"  # checkpoint prefix, as tf.estimator writes it
GLOBAL_STEP_NAME = "global_step"  # the step counter tf.train / Estimator keep in a checkpoint


def find_checkpoint(path, required=True):
    """Checkpoint prefix of a model directory (its latest checkpoint) or of a prefix path.

    None when there is none and not `required` (else GPTSANError).
    """
    from gptsan.compat import tf

    prefix = None
    if fileio.isdir(path):
        prefix = tf.train.latest_checkpoint(path)
        if not (prefix and fileio.exists(prefix + ".index")):
            # No usable `checkpoint` index file (e.g. copied from another machine): take the
            # highest-numbered `*.index` in the directory.
            candidates = [f[:-len(".index")] for f in fileio.listdir(path) if f.endswith(".index")]
            prefix = (fileio.join(path, max(candidates, key=lambda p: (_step_of(p), p)))
                      if candidates else None)
        if prefix is None and required:
            raise GPTSANError(f"no TF checkpoint in {path} (expected a 'checkpoint' file and "
                              f"{CHECKPOINT_BASENAME}-<step>.index)")
    elif fileio.exists(path + ".index"):
        prefix = path
    elif required:
        raise GPTSANError(f"{path} is neither a model directory nor a TF checkpoint prefix")
    return prefix


def _step_of(prefix):
    match = re.search(r"-(\d+)$", prefix)
    return int(match.group(1)) if match else -1


def check_checkpoint(prefix, model, source=None, complete=True, model_source=None):
    """{name: shape} of every tensor in checkpoint `prefix` (model variables, optimizer slots,
    global_step), after checking its model variables against ModelConfig `model` with
    `variables.check_variables` (`complete`, `model_source`: see there; other tensors are
    allowed). `source` names the checkpoint in messages (default: its prefix)."""
    shapes = {name: ref.shape for name, ref in tensorio.tf_checkpoint_refs(prefix).items()}
    check_variables(shapes, model, source or f"checkpoint {prefix}", complete=complete,
                    others=True, model_source=model_source)
    return shapes


def read_tf_checkpoint(path, progress=False):
    """{name: float32 np.ndarray} of the model variables (TF names) in a checkpoint.

    `path` is a model directory or a checkpoint prefix. Optimizer slots (`*/adam_m`,
    `*/slot_*`, ...), `global_step` and anything else not in the docs/ARCHITECTURE.md
    "Checkpoint names" table are skipped.
    Floating variables are returned as float32 (float16/bfloat16 are widened exactly).
    """
    return _load_all(open_tf_checkpoint(path), progress)


def open_tf_checkpoint(path):
    """{name: TensorRef} of the model variables in a checkpoint (read when loaded)."""
    prefix = find_checkpoint(path)
    refs = {name: ref for name, ref in tensorio.tf_checkpoint_refs(prefix).items()
            if is_model_variable(name)}
    if not refs:
        raise GPTSANError(f"checkpoint {prefix} has no GPTSAN model variables "
                          "(model/..., pasts/...)")
    return refs


def _load_all(refs, progress):
    """{name: array} of {name: TensorRef}; floating arrays (float16, bfloat16) are widened to
    float32 exactly."""
    return {name: tensorio.cast_floating(refs[name].load(), np.dtype(np.float32)) for name in tqdm(
        sorted(refs), desc="reading", unit="var", disable=not progress)}


def read_model_dir(model_dir, progress=False):
    """({name: float32 array}, GPTSANConfig) of a model directory (see `open_model_dir`)."""
    refs, config = open_model_dir(model_dir)
    return _load_all(refs, progress), config


def open_model_dir(model_dir):
    """({name: TensorRef}, GPTSANConfig) of a model directory, checked against each other.

    Without `parameters.json` (a bare checkpoint) the config is inferred from the shapes.
    """
    if not os.path.isdir(model_dir):
        raise GPTSANError(f"model directory not found: {model_dir}")
    variables = open_tf_checkpoint(model_dir)
    params_path = os.path.join(model_dir, PARAMETERS_FILE)
    if not os.path.exists(params_path):
        return variables, GPTSANConfig(model=infer_model_config(variables, model_dir))
    declared = GPTSANConfig.from_json_file(params_path)
    inferred = infer_model_config(variables, model_dir,
                                  num_pallarelizm=declared.model.num_pallarelizm,
                                  train_mode=declared.model.train_mode)
    check_declared(inferred, {f: getattr(declared.model, f) for f in SHAPE_FIELDS
                              if is_shape_relevant(inferred, f)},
                   params_path, lambda f: f"model_params.{f}")
    return variables, declared


def open_source_dir(model_dir):
    """({name: TensorRef}, config, checked vocabulary or None) of a model directory a tool
    reads from. With a parameters.json the vocabulary is checked before the weights are read
    (fails fast); the weights are read one at a time later."""
    named = os.path.isfile(os.path.join(model_dir, PARAMETERS_FILE))
    vocab = fingerprint.model_vocabulary(model_dir, required=False) if named else None
    variables, config = open_model_dir(model_dir)
    if not named:  # a bare checkpoint: its config comes from the weights
        vocab = fingerprint.model_vocabulary(model_dir, config, required=False)
    fingerprint.announce(vocab)
    return variables, config, vocab


def write_tf_checkpoint(model_dir, variables, config, step=0, force=False, progress=False,
                        files=None, dtype=None):
    """Writes a complete model directory atomically, one bounded group of tensors at a time.

    Contents: `parameters.json` (config: GPTSANConfig or ModelConfig), a TF checkpoint
    `model.ckpt-<step>` holding exactly `variables` ({name: array or TensorRef}, checked
    against the config's names and shapes, loaded one by one) plus `global_step`, the
    `checkpoint` index (relative paths), and `files` ({name in dir: source path or bytes}).
    `dtype` (float32 | float16 | bfloat16) casts the floating variables; None keeps theirs.
    Refuses a non-empty `model_dir` unless `force`.
    """
    config = _as_gptsan_config(config)
    check_variables(variables, config.model, "the variables to write")
    dtype = tensorio.storage_dtype(dtype) if dtype else None
    with fileio.atomic_output_dir(model_dir, force) as tmp:
        _save_variables(tmp, variables, step, progress, dtype)
        config.to_json_file(os.path.join(tmp, PARAMETERS_FILE))
        fileio.write_files(tmp, files or {})


def _as_gptsan_config(config):
    if isinstance(config, GPTSANConfig):
        return config
    if isinstance(config, ModelConfig):
        return GPTSANConfig(model=config, train=TrainConfig())
    raise TypeError(f"expected GPTSANConfig or ModelConfig, got {type(config).__name__}")


def _save_variables(directory, variables, step, progress, dtype=None):
    """TF checkpoint `model.ckpt-<step>` of `variables` + `global_step`, streamed in groups."""
    name = f"{CHECKPOINT_BASENAME}-{step}"
    writer = tensorio.CheckpointWriter(os.path.join(directory, name))
    for var_name in tqdm(sorted(variables), desc="writing", unit="var", disable=not progress):
        value = tensorio.value_of(variables[var_name])
        writer.add(var_name, value, dtype if dtype and tensorio.is_floating(value.dtype) else None)
        del value
    writer.add(GLOBAL_STEP_NAME, np.int64(step))
    writer.close()
    tensorio.write_checkpoint_state(directory, name)
