"""Checkpoint formats: GPTSAN model directories (TF checkpoint) and the HF transformers port.

A GPTSAN model directory holds `parameters.json`, a TF checkpoint (`checkpoint` index +
`model.ckpt-<step>.*`) whose variables carry the TF names of docs/ARCHITECTURE.md
"Checkpoint names", and copies of the vocabulary and emoji table (named and fingerprinted in
parameters.json: gptsan/fingerprint.py). The HF format is a transformers 4.40.2
`GPTSanJapaneseForConditionalGeneration` directory (`config.json` + `model.safetensors`).

The name/layout mapping between the two is data (`_LAYER_MAP` ...); both directions and the
shape checks walk the same table, so they cannot drift apart. Layouts:
    copy       same array
    transpose  TF kernel [in, out] <-> HF Linear weight [out, in]
    row        TF [V] <-> HF [1, V] (final_logits_bias)
    qkv        TF [d, 3, H, hd] <-> HF q/k/v_proj.weight [d, d] each (HF = TF[:, j].reshape(d, d).T)
    heads_out  TF [H, hd, d] <-> HF out_proj.weight [d, d] (HF = TF.reshape(d, d).T)
    experts    TF [E, a, b] <-> HF expert_{e} weight [b, a] each (HF = TF[e].T)
Every conversion is a pure transpose/reshape, so round trips are bit-exact.
"""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile

import numpy as np
from tqdm import tqdm

from gptsan.config import PARAMETERS_FILE, SPOUT_DEPTH, GPTSANConfig, ModelConfig, TrainConfig
from gptsan.config import EMOJI_FILE, VOCAB_FILE  # noqa: F401 (published names of the copies)
from gptsan.errors import GPTSANError
from gptsan import fileio
from gptsan import fingerprint
IGNORE_PARAMS_FILE = "ignore-params.json"  # published name: variables frozen when fine-tuning
CHECKPOINT_BASENAME = "model.ckpt"  # checkpoint prefix, as tf.estimator writes it
MODEL_VARIABLE_PREFIXES = ("model/", "pasts/")  # model weights (vs optimizer slots, global_step)
GLOBAL_STEP_NAME = "global_step"  # the step counter tf.train / Estimator keep in a checkpoint

HF_CONFIG_FILE = "config.json"  # transformers config
HF_SAFETENSORS_FILE = "model.safetensors"  # transformers save_pretrained(safe_serialization=True)
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"  # sharded safetensors
HF_TORCH_FILE = "pytorch_model.bin"  # older transformers format (the published HF upload)
HF_VOCAB_FILE = "vocab.txt"  # GPTSanJapaneseTokenizer vocab_file (same format as ja-swe36k.txt)
HF_EMOJI_FILE = "emoji.json"  # GPTSanJapaneseTokenizer emoji_file
HF_MODEL_TYPE = "gptsan-japanese"
HF_ARCHITECTURE = "GPTSanJapaneseForConditionalGeneration"
HF_TIED_HEAD = "lm_head.weight"  # tied to model.embed_tokens.weight; save_pretrained omits it
HF_MISSPELLED_SPOUT = "model.sqout."  # the published HF conversion script's typo for model.spout.
HF_LAYER_NORM_EPSILON = 1e-5  # both implementations (docs/ARCHITECTURE.md "Forward pass")
# HF special-token ids, counted from the end of the vocabulary like the ja-swe control tokens:
# separator_token_id = SEG (n-2), pad_token_id = SEP (n-5), eos_token_id = EOT (n-1).
HF_SEPARATOR_FROM_END, HF_PAD_FROM_END, HF_EOS_FROM_END = 2, 5, 1


# ----------------------------------------------------------------------------------------------
# The TF <-> HF table: (TF name, HF name(s), layout, shape key). {i}: global layer index,
# {e}: expert index, {n}: spout dense index, {hf_n}: its index in HF's nn.Sequential.
_GLOBAL_MAP = [
    ("model/wte", "model.embed_tokens.weight", "copy", "vocab_d"),
    ("model/wpe", "model.position_embeddings.weight", "copy", "ctx_d"),
    ("model/dense/kernel", "model.last_project.weight", "transpose", "d_d"),
    ("model/dense_1/bias", "model.last_project.bias", "copy", "d"),
    ("model/wob", "final_logits_bias", "row", "vocab"),
]
_EXT_EMBEDDING_MAP = [("model/ete", "model.extra_position_embeddings.weight", "copy", "ctx_d")]
_ATTENTION_MAP = [
    ("model/att{i}/qkv/kernel", tuple(f"model.blocks.{{i}}.self_attn.self_attn.{p}_proj.weight"
                                      for p in "qkv"), "qkv", "qkv"),
    ("model/att{i}/o/kernel", "model.blocks.{i}.self_attn.self_attn.out_proj.weight", "heads_out",
     "o"),
    ("model/an{i}/g", "model.blocks.{i}.self_attn.norm.weight", "copy", "d"),
    ("model/an{i}/b", "model.blocks.{i}.self_attn.norm.bias", "copy", "d"),
    ("model/ln{i}/g", "model.blocks.{i}.feed_forward.norm.weight", "copy", "d"),
    ("model/ln{i}/b", "model.blocks.{i}.feed_forward.norm.bias", "copy", "d"),
]
_SWITCH_MAP = [
    ("model/moe{i}/switch_gating/kernel",
     "model.blocks.{i}.feed_forward.mlp.router.classifier.weight", "transpose", "d_experts"),
    ("model/moe{i}/softmlp/kernel", "model.blocks.{i}.feed_forward.soft_bypass_mlp.weight",
     "transpose", "d_d"),
    ("model/moe{i}/wi/kernel", "model.blocks.{i}.feed_forward.mlp.experts.expert_{e}.wi.weight",
     "experts", "wi"),
    ("model/moe{i}/wo/kernel", "model.blocks.{i}.feed_forward.mlp.experts.expert_{e}.wo.weight",
     "experts", "wo"),
]
_EXT_MAP = [
    ("model/mlp{i}/p1/kernel", "model.blocks.{i}.feed_forward.mlp.wi.weight", "transpose", "p1"),
    ("model/mlp{i}/p1/bias", "model.blocks.{i}.feed_forward.mlp.wi.bias", "copy", "ext"),
    ("model/mlp{i}/p2/kernel", "model.blocks.{i}.feed_forward.mlp.wo.weight", "transpose", "p2"),
    ("model/mlp{i}/p2/bias", "model.blocks.{i}.feed_forward.mlp.wo.bias", "copy", "d"),
]
# HF spout is nn.Sequential(Linear, Tanh) x 8 + Linear: the Linears sit at even indices.
_SPOUT_MAP = [("pasts/mlp{n}/kernel", "model.spout.{hf_n}.weight", "transpose", "spout_spout")]
_SPOUT_OUT_MAP = [("pasts/out/kernel", f"model.spout.{2 * SPOUT_DEPTH}.weight", "transpose",
                   "spout_kv")]

# TF names of the model variables (anything else in a checkpoint is optimizer state or counters).
_TF_NAME_PATTERN = re.compile(
    r"^(model/(wte|wpe|ete|wob|dense/kernel|dense_1/bias"
    r"|att\d+/(qkv|o)/kernel|(an|ln)\d+/[gb]"
    r"|moe\d+/(switch_gating|softmlp|wi|wo)/kernel|mlp\d+/p[12]/(kernel|bias))"
    r"|pasts/(mlp\d+|out)/kernel)$")


def expected_variable_shapes(model):
    """{TF name: shape} of every checkpoint variable of a model (docs/ARCHITECTURE.md
    "Checkpoint names" as code)."""
    return {tf_name: shape for tf_name, _, _, shape in _mapping(model)}


def _mapping(model):
    """Yields (tf_name, hf_name or tuple of hf_names, layout, tf_shape) for a ModelConfig."""
    d, v, c = model.num_hidden, model.num_vocabulary, model.num_contexts
    e, moe, ext = model.num_experts, model.num_moe_hidden, model.num_ext_hidden
    spout = model.num_spout
    shapes = {
        "vocab_d": (v, d), "ctx_d": (c, d), "d_d": (d, d), "d": (d,), "vocab": (v,),
        "qkv": (d, 3, model.num_header, model.head_dim), "o": (model.num_header, model.head_dim, d),
        "d_experts": (d, e), "wi": (e, d, moe), "wo": (e, moe, d),
        "p1": (d, ext), "ext": (ext,), "p2": (ext, d),
        "spout_spout": (spout, spout), "spout_kv": (spout, model.num_layers * 2 * d),
    }

    def emit(table, **index):
        for tf_pattern, hf_pattern, layout, shape_key in table:
            if layout == "experts":
                hf = tuple(hf_pattern.format(e=k, **index) for k in range(e))
            elif isinstance(hf_pattern, tuple):
                hf = tuple(p.format(**index) for p in hf_pattern)
            else:
                hf = hf_pattern.format(**index)
            yield tf_pattern.format(**index), hf, layout, shapes[shape_key]

    yield from emit(_GLOBAL_MAP)
    if model.num_ext_layers:
        yield from emit(_EXT_EMBEDDING_MAP)
    for i in range(model.num_layers):
        yield from emit(_ATTENTION_MAP, i=i)
        yield from emit(_SWITCH_MAP if i < model.num_switch_layers else _EXT_MAP, i=i)
    if model.num_spout:
        for n in range(SPOUT_DEPTH):
            yield from emit(_SPOUT_MAP, n=n, hf_n=2 * n)
        yield from emit(_SPOUT_OUT_MAP)


def _hf_shapes(layout, tf_shape):
    """Shape of each HF tensor for one TF variable of `tf_shape`."""
    if layout == "copy":
        return [tf_shape]
    if layout == "transpose":
        return [tf_shape[::-1]]
    if layout == "row":
        return [(1,) + tf_shape]
    if layout == "qkv":  # [d, 3, H, hd] -> 3 x [H*hd, d]
        return [(tf_shape[2] * tf_shape[3], tf_shape[0])] * 3
    if layout == "heads_out":  # [H, hd, d] -> [d, H*hd]
        return [(tf_shape[2], tf_shape[0] * tf_shape[1])]
    if layout == "experts":  # [E, a, b] -> E x [b, a]
        return [(tf_shape[2], tf_shape[1])] * tf_shape[0]
    raise AssertionError(f"unknown layout {layout}")


def _to_hf(layout, value):
    """TF array -> list of HF arrays (contiguous)."""
    if layout == "copy":
        out = [value]
    elif layout == "transpose":
        out = [value.T]
    elif layout == "row":
        out = [value[None, :]]
    elif layout == "qkv":  # [d, 3, H, hd]
        d = value.shape[0]
        out = [value[:, j].reshape(d, -1).T for j in range(3)]
    elif layout == "heads_out":  # [H, hd, d]
        out = [value.reshape(-1, value.shape[2]).T]
    elif layout == "experts":  # [E, a, b]
        out = [expert.T for expert in value]
    else:
        raise AssertionError(f"unknown layout {layout}")
    return [np.ascontiguousarray(a) for a in out]


def _to_tf(layout, values, tf_shape):
    """List of HF arrays -> TF array of `tf_shape`."""
    if layout == "copy":
        out = values[0]
    elif layout == "transpose":
        out = values[0].T
    elif layout == "row":
        out = values[0][0]
    elif layout == "qkv":
        d, _, h, hd = tf_shape
        out = np.stack([w.T.reshape(d, h, hd) for w in values], axis=1)  # [d, 3, H, hd]
    elif layout == "heads_out":
        out = values[0].T.reshape(tf_shape)  # [H, hd, d]
    elif layout == "experts":
        out = np.stack([w.T for w in values])  # [E, a, b]
    else:
        raise AssertionError(f"unknown layout {layout}")
    return np.ascontiguousarray(out)


def _shape_str(shape):
    return "[" + ", ".join(str(s) for s in shape) + "]"


# ----------------------------------------------------------------------------------------------
# Config inference and checks


def check_variables(variables, model, source="the checkpoint"):
    """Raises GPTSANError unless `variables` has exactly the names and shapes `model` needs."""
    expected = expected_variable_shapes(model)
    missing = [n for n in expected if n not in variables]
    extra = sorted(n for n in variables if n not in expected)
    layers = f"{model.num_switch_layers} switch + {model.num_ext_layers} extra layers"
    if missing:
        raise GPTSANError(f"{source} lacks variable(s) {_few(missing)} needed by the model "
                          f"({layers})")
    if extra:
        raise GPTSANError(f"{source} has unexpected variable(s) {_few(extra)} for a model with "
                          f"{layers}")
    for name, shape in expected.items():
        actual = tuple(variables[name].shape)
        if actual != shape:
            raise GPTSANError(f"{source}: {name} has shape {_shape_str(actual)} but the model "
                              f"expects {_shape_str(shape)}")


def _few(names, limit=4):
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _layer_indices(names, pattern):
    return sorted({int(m.group(1)) for m in map(re.compile(pattern).match, names) if m})


def _require_var(variables, name, source):
    if name not in variables:
        raise GPTSANError(f"{source} has no variable {name}: not a GPTSAN checkpoint")
    return variables[name].shape


def infer_model_config(variables, source="the checkpoint", **overrides):
    """ModelConfig from TF variable shapes (heads come from the qkv kernel's shape).

    `overrides` set fields shapes cannot give (num_pallarelizm, train_mode). The result is
    checked against every variable (names and shapes).
    """
    names = list(variables)
    vocab, d = _require_var(variables, "model/wte", source)
    contexts = _require_var(variables, "model/wpe", source)[0]
    layers = _layer_indices(names, r"^model/att(\d+)/qkv/kernel$")
    switch = _layer_indices(names, r"^model/moe(\d+)/wi/kernel$")
    ext = _layer_indices(names, r"^model/mlp(\d+)/p1/kernel$")
    if not layers:
        raise GPTSANError(f"{source} has no attention layers (model/att0/qkv/kernel)")
    if layers != list(range(len(layers))) or switch + ext != layers:
        raise GPTSANError(f"{source}: layers must be numbered 0..L-1 with the Switch layers first; "
                          f"found attention {layers}, switch {switch}, extra {ext}")
    qkv_shape = variables["model/att0/qkv/kernel"].shape
    if len(qkv_shape) != 4:
        raise GPTSANError(f"{source}: model/att0/qkv/kernel has shape {_shape_str(qkv_shape)}, "
                          "expected [d_model, 3, heads, head_dim]")
    fields = dict(num_vocabulary=vocab, num_hidden=d, num_contexts=contexts,
                  num_switch_layers=len(switch), num_ext_layers=len(ext), num_header=qkv_shape[2],
                  num_spout=(variables["pasts/mlp0/kernel"].shape[0]
                             if "pasts/mlp0/kernel" in variables else 0))
    if switch:
        fields["num_experts"], _, fields["num_moe_hidden"] = variables["model/moe0/wi/kernel"].shape
    if ext:
        fields["num_ext_hidden"] = variables[f"model/mlp{ext[0]}/p1/kernel"].shape[1]
    fields.update(overrides)
    model = ModelConfig(**{k: (int(v) if not isinstance(v, str) else v) for k, v in fields.items()})
    check_variables(variables, model, source)
    return model


def _check_declared(inferred, declared, source, what):
    """`declared` {field: value} (from parameters.json / config.json) must match the weights."""
    for field, value in declared.items():
        actual = getattr(inferred, field)
        if value != actual:
            raise GPTSANError(f"{source} says {what(field)}={value} but the weights have "
                              f"{field}={actual}; the file does not belong to these weights")


_SHAPE_FIELDS = ("num_contexts", "num_switch_layers", "num_ext_layers", "num_hidden", "num_header",
                 "num_experts", "num_spout", "num_vocabulary", "num_moe_hidden", "num_ext_hidden")


# ----------------------------------------------------------------------------------------------
# TF <-> HF conversion of variable dicts


def tf_to_hf_variables(tf_vars, model, include_tied_head=False):
    """{TF name: array} -> {HF name: array} for GPTSanJapaneseForConditionalGeneration.

    `model` is the ModelConfig (a GPTSANConfig is accepted too). The tied `lm_head.weight` is
    left out like `save_pretrained` does, unless `include_tied_head`.
    """
    model = getattr(model, "model", model)
    check_variables(tf_vars, model)
    hf = {}
    for tf_name, hf_names, layout, _ in _mapping(model):
        hf_names = hf_names if isinstance(hf_names, tuple) else (hf_names,)
        for name, value in zip(hf_names, _to_hf(layout, tf_vars[tf_name])):
            hf[name] = value
    if include_tied_head:
        hf[HF_TIED_HEAD] = hf["model.embed_tokens.weight"]
    return hf


def infer_hf_model_config(hf_state, num_heads, source="the HF weights"):
    """ModelConfig from HF tensor shapes; heads cannot be seen in HF shapes and are given."""
    def shape(name):
        if name not in hf_state:
            raise GPTSANError(f"{source} has no tensor {name}: not a GPTSanJapanese model")
        return tuple(hf_state[name].shape)

    names = list(hf_state)
    vocab, d = shape("model.embed_tokens.weight")
    blocks = _layer_indices(names, r"^model\.blocks\.(\d+)\.")
    switch = _layer_indices(names, r"^model\.blocks\.(\d+)\.feed_forward\.mlp\.router\.")
    ext = [i for i in blocks if i not in switch]
    if not blocks or blocks != list(range(len(blocks))) or switch != blocks[:len(switch)]:
        raise GPTSANError(f"{source}: blocks must be numbered 0..L-1 with the Switch layers first; "
                          f"found blocks {blocks}, switch {switch}")
    fields = dict(num_vocabulary=vocab, num_hidden=d, num_header=int(num_heads),
                  num_contexts=shape("model.position_embeddings.weight")[0],
                  num_switch_layers=len(switch), num_ext_layers=len(ext),
                  num_spout=(shape("model.spout.0.weight")[0]
                             if "model.spout.0.weight" in hf_state else 0))
    if switch:
        fields["num_experts"] = len(_layer_indices(
            names, r"^model\.blocks\.0\.feed_forward\.mlp\.experts\.expert_(\d+)\.wi\.weight$"))
        fields["num_moe_hidden"] = shape(
            "model.blocks.0.feed_forward.mlp.experts.expert_0.wi.weight")[0]
    if ext:
        fields["num_ext_hidden"] = shape(f"model.blocks.{ext[0]}.feed_forward.mlp.wi.weight")[0]
    if d % fields["num_header"]:
        raise GPTSANError(f"{source}: num_heads={num_heads} does not divide d_model={d}")
    return ModelConfig(**{k: int(v) for k, v in fields.items()})


def hf_to_tf_variables(hf_state, num_heads, source="the HF weights"):
    """{HF name: array} -> ({TF name: float32 array}, ModelConfig inferred from shapes).

    `num_heads` comes from the HF config.json (shapes cannot tell it). Accepts the tied
    `lm_head.weight` (must equal the embedding) and the published typo `model.sqout.*`.
    """
    state = {}
    for name, value in hf_state.items():
        if name.startswith(HF_MISSPELLED_SPOUT):
            name = "model.spout." + name[len(HF_MISSPELLED_SPOUT):]
        state[name] = np.asarray(value)
    if HF_TIED_HEAD in state:
        head = state.pop(HF_TIED_HEAD)
        embed = state.get("model.embed_tokens.weight")
        if embed is None or head.shape != embed.shape or not np.array_equal(head, embed):
            raise GPTSANError(f"{source}: lm_head.weight differs from model.embed_tokens.weight; "
                              "GPTSAN ties them, an untied head cannot be converted")
    model = infer_hf_model_config(state, num_heads, source)
    tf_vars, used = {}, set()
    for tf_name, hf_names, layout, tf_shape in _mapping(model):
        hf_names = hf_names if isinstance(hf_names, tuple) else (hf_names,)
        values = []
        for name, want in zip(hf_names, _hf_shapes(layout, tf_shape)):
            if name not in state:
                raise GPTSANError(f"{source} lacks tensor {name} needed by the model")
            if tuple(state[name].shape) != want:
                raise GPTSANError(f"{source}: {name} has shape {_shape_str(state[name].shape)} but "
                                  f"the model expects {_shape_str(want)}")
            values.append(_as_float32(state[name], name, source))
            used.add(name)
        tf_vars[tf_name] = _to_tf(layout, values, tf_shape)
    extra = sorted(set(state) - used)
    if extra:
        raise GPTSANError(f"{source} has tensor(s) GPTSAN does not know: {_few(extra)}")
    return tf_vars, model


def _as_float32(value, name, source):
    if not np.issubdtype(value.dtype, np.floating):
        raise GPTSANError(f"{source}: {name} has dtype {value.dtype}, expected floating point")
    return value.astype(np.float32, copy=False)  # float16/bfloat16 -> float32 is exact


# ----------------------------------------------------------------------------------------------
# TF checkpoints


def find_checkpoint(path):
    """Checkpoint prefix for a model directory (latest checkpoint) or a prefix path."""
    from gptsan.compat import tf

    if fileio.isdir(path):
        prefix = tf.train.latest_checkpoint(path)
        if prefix and fileio.exists(prefix + ".index"):
            return prefix
        # No usable `checkpoint` index file (e.g. copied from another machine): take the
        # highest-numbered `*.index` in the directory.
        candidates = [f[:-len(".index")] for f in fileio.listdir(path) if f.endswith(".index")]
        if not candidates:
            raise GPTSANError(f"no TF checkpoint in {path} (expected a 'checkpoint' file and "
                              f"{CHECKPOINT_BASENAME}-<step>.index)")
        best = max(candidates, key=lambda p: (_step_of(p), p))
        return fileio.join(path, best)
    if fileio.exists(path + ".index"):
        return path
    raise GPTSANError(f"{path} is neither a model directory nor a TF checkpoint prefix")


def _step_of(prefix):
    match = re.search(r"-(\d+)$", prefix)
    return int(match.group(1)) if match else -1


def read_tf_checkpoint(path, progress=False):
    """{name: np.ndarray} of the model variables (TF names) in a checkpoint.

    `path` is a model directory or a checkpoint prefix. Optimizer slots (`*/adam_m`,
    `*/slot_*`, ...), `global_step` and anything else not in the docs/ARCHITECTURE.md
    "Checkpoint names" table are skipped.
    Floating variables are returned as float32 (bfloat16 masters are widened exactly).
    """
    from gptsan.compat import tf

    prefix = find_checkpoint(path)
    try:
        reader = tf.train.NewCheckpointReader(prefix)
        names = sorted(n for n in reader.get_variable_to_shape_map() if _TF_NAME_PATTERN.match(n))
        variables = {}
        for name in tqdm(names, desc="reading", unit="var", disable=not progress):
            variables[name] = _widen(np.asarray(reader.get_tensor(name)))
    except tf.errors.OpError as err:
        reason = err.message.splitlines()[0]
        raise GPTSANError(f"cannot read checkpoint {prefix}: {reason}") from None
    if not variables:
        raise GPTSANError(f"checkpoint {prefix} has no GPTSAN model variables "
                          "(model/..., pasts/...)")
    return variables


def _widen(value):
    """Floating arrays (float16, bfloat16) -> float32, exactly; float32 is returned as is."""
    if value.dtype != np.float32 and (value.dtype.kind == "f" or value.dtype.name == "bfloat16"):
        return value.astype(np.float32)
    return value


def read_model_dir(model_dir, progress=False):
    """(variables, GPTSANConfig) of a model directory, checked against each other.

    Without `parameters.json` (a bare checkpoint) the config is inferred from the shapes.
    """
    if not os.path.isdir(model_dir):
        raise GPTSANError(f"model directory not found: {model_dir}")
    variables = read_tf_checkpoint(model_dir, progress=progress)
    params_path = os.path.join(model_dir, PARAMETERS_FILE)
    if not os.path.exists(params_path):
        return variables, GPTSANConfig(model=infer_model_config(variables, model_dir))
    declared = GPTSANConfig.from_json_file(params_path)
    inferred = infer_model_config(variables, model_dir,
                                  num_pallarelizm=declared.model.num_pallarelizm,
                                  train_mode=declared.model.train_mode)
    _check_declared(inferred, {f: getattr(declared.model, f) for f in _SHAPE_FIELDS
                               if _is_shape_relevant(inferred, f)},
                    params_path, lambda f: f"model_params.{f}")
    return variables, declared


def _is_shape_relevant(model, field):
    """Widths of absent parts (no Switch / no extra layers) cannot be seen in the weights."""
    if field in ("num_experts", "num_moe_hidden"):
        return model.num_switch_layers > 0
    if field == "num_ext_hidden":
        return model.num_ext_layers > 0
    return True


def write_tf_checkpoint(model_dir, variables, config, step=0, force=False, progress=False,
                        files=None):
    """Writes a complete model directory atomically.

    Contents: `parameters.json` (config: GPTSANConfig or ModelConfig), a TF checkpoint
    `model.ckpt-<step>` holding exactly `variables` (checked against the config's names and
    shapes) plus `global_step`, the `checkpoint` index (relative paths), and `files`
    ({name in dir: source path or bytes}). Refuses a non-empty `model_dir` unless `force`.
    """
    config = _as_gptsan_config(config)
    check_variables(variables, config.model, "the variables to write")
    with _atomic_output_dir(model_dir, force) as tmp:
        _save_variables(tmp, variables, step, progress)
        config.to_json_file(os.path.join(tmp, PARAMETERS_FILE))
        _write_files(tmp, files or {})


def _write_files(directory, files):
    """Writes {name: bytes or source path} into `directory`."""
    for name, content in files.items():
        target = os.path.join(directory, name)
        if isinstance(content, bytes):
            with open(target, "wb") as f:
                f.write(content)
        else:
            shutil.copyfile(content, target)


def _as_gptsan_config(config):
    if isinstance(config, GPTSANConfig):
        return config
    if isinstance(config, ModelConfig):
        return GPTSANConfig(model=config, train=TrainConfig())
    raise TypeError(f"expected GPTSANConfig or ModelConfig, got {type(config).__name__}")


def _save_variables(directory, variables, step, progress):
    """tf.train.Saver checkpoint of `variables` (fed through placeholders: no 2 GB graph limit)."""
    from gptsan.compat import tf

    graph = tf.Graph()
    with graph.as_default():
        feeds, saveables = [], {}
        for name in sorted(variables):
            value = np.asarray(variables[name])
            placeholder = tf.placeholder(tf.as_dtype(value.dtype), value.shape)
            var = tf.Variable(placeholder, name=name, trainable=False)
            feeds.append((var.initializer, placeholder, value))
            saveables[name] = var
        saveables[GLOBAL_STEP_NAME] = tf.Variable(np.int64(step), name=GLOBAL_STEP_NAME,
                                                  trainable=False)
        saver = tf.train.Saver(saveables, save_relative_paths=True, max_to_keep=None)
        with tf.Session(graph=graph, config=tf.ConfigProto(device_count={"GPU": 0})) as sess:
            sess.run(saveables[GLOBAL_STEP_NAME].initializer)
            for init, placeholder, value in tqdm(feeds, desc="writing", unit="var",
                                                 disable=not progress):
                sess.run(init, {placeholder: value})
            saver.save(sess, os.path.join(directory, CHECKPOINT_BASENAME), global_step=step,
                       write_meta_graph=False)


@contextlib.contextmanager
def _atomic_output_dir(dst, force):
    """Yields a temp dir next to `dst`; on success it becomes `dst` (old one removed if force)."""
    dst = os.path.abspath(dst)
    check_output_dir(dst, force)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
        old = None
        if os.path.isdir(dst):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
            os.rename(dst, os.path.join(old, "dir"))
        os.rename(tmp, dst)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(dst, force):
    """GPTSANError if `dst` cannot be (re)written: a file, or a non-empty dir without force."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise GPTSANError(f"output {dst} exists and is not a directory")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise GPTSANError(f"output directory {dst} exists and is not empty "
                          "(use --force to replace it)")


def _check_distinct(src, dst):
    src, dst = os.path.realpath(src), os.path.realpath(dst)
    if src == dst or src.startswith(dst + os.sep) or dst.startswith(src + os.sep):
        raise GPTSANError(f"source {src} and destination {dst} must be separate directories")


# ----------------------------------------------------------------------------------------------
# HF directories


def read_hf_dir(hf_dir):
    """({HF name: np.ndarray}, config dict) of a transformers GPTSanJapanese directory."""
    if not os.path.isdir(hf_dir):
        raise GPTSANError(f"HF model directory not found: {hf_dir}")
    config_path = os.path.join(hf_dir, HF_CONFIG_FILE)
    if not os.path.exists(config_path):
        raise GPTSANError(f"{hf_dir} has no {HF_CONFIG_FILE}: not an HF model directory (the "
                          "number of attention heads cannot be inferred from the weights)")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GPTSANError(f"{config_path} is not valid JSON: {err}") from None
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if model_type != HF_MODEL_TYPE:
        raise GPTSANError(f"{config_path}: model_type is {model_type!r}, "
                          f"expected {HF_MODEL_TYPE!r}")
    return _read_hf_weights(hf_dir), hf_config


def _read_hf_weights(hf_dir):
    single = os.path.join(hf_dir, HF_SAFETENSORS_FILE)
    index = os.path.join(hf_dir, HF_SAFETENSORS_INDEX)
    torch_file = os.path.join(hf_dir, HF_TORCH_FILE)
    if os.path.exists(single):
        return _load_safetensors(single)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        state = {}
        for shard in shards:
            state.update(_load_safetensors(os.path.join(hf_dir, shard)))
        return state
    if os.path.exists(torch_file):
        try:
            import torch
        except ImportError:
            raise GPTSANError(f"reading {torch_file} needs PyTorch (pip install torch), or "
                              "convert it to safetensors first") from None
        state = torch.load(torch_file, map_location="cpu", weights_only=True)
        return {k: _torch_to_numpy(v) for k, v in state.items()}
    raise GPTSANError(f"{hf_dir} has no {HF_SAFETENSORS_FILE}, {HF_SAFETENSORS_INDEX} or "
                      f"{HF_TORCH_FILE}")


def _torch_to_numpy(tensor):
    import torch

    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _load_safetensors(path):
    safetensors_numpy = _import_safetensors()
    try:
        return safetensors_numpy.load_file(path)
    except (TypeError, ValueError) as err:  # e.g. bfloat16, which numpy cannot hold
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise GPTSANError(f"cannot read {path}: {err}") from None
        return {k: _torch_to_numpy(v) for k, v in load_file(path).items()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise GPTSANError(f"cannot read {path}: {err}") from None


def _import_safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise GPTSANError("HF conversion needs the safetensors package (pip install safetensors)") \
            from None
    return safetensors.numpy


def hf_config_dict(model):
    """config.json contents for transformers' GPTSanJapaneseConfig."""
    v = model.num_vocabulary
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": v,
        "max_position_embeddings": model.num_contexts,
        "d_model": model.num_hidden,
        "d_ff": model.num_moe_hidden,
        "d_ext": model.num_ext_hidden,
        "d_spout": model.num_spout,
        "num_switch_layers": model.num_switch_layers,
        "num_ext_layers": model.num_ext_layers,
        "num_layers": model.num_layers,
        "num_heads": model.num_header,
        "num_experts": model.num_experts,
        "layer_norm_epsilon": HF_LAYER_NORM_EPSILON,
        "separator_token_id": v - HF_SEPARATOR_FROM_END,
        "pad_token_id": v - HF_PAD_FROM_END,
        "eos_token_id": v - HF_EOS_FROM_END,
        "torch_dtype": "float32",
    }


# HF config.json key -> ModelConfig field (checked against the weights when converting from HF)
_HF_CONFIG_FIELDS = {
    "vocab_size": "num_vocabulary", "max_position_embeddings": "num_contexts",
    "d_model": "num_hidden", "d_ff": "num_moe_hidden", "d_ext": "num_ext_hidden",
    "d_spout": "num_spout", "num_switch_layers": "num_switch_layers",
    "num_ext_layers": "num_ext_layers", "num_experts": "num_experts",
}


# ----------------------------------------------------------------------------------------------
# Whole-directory conversions


def convert_hf_to_gptsan(hf_dir, model_dir, vocab=None, emoji=None, force=False, progress=False,
                         train_config=None):
    """HF GPTSanJapanese directory -> GPTSAN model directory. Returns the GPTSANConfig.

    `vocab`/`emoji` are copied into the model directory; when not given, the HF tokenizer's
    `vocab.txt`/`emoji.json` in `hf_dir` are used if present.
    """
    _check_distinct(hf_dir, model_dir)
    check_output_dir(os.path.abspath(model_dir), force)
    hf_state, hf_config = read_hf_dir(hf_dir)
    if "num_heads" not in hf_config:
        raise GPTSANError(f"{os.path.join(hf_dir, HF_CONFIG_FILE)} has no num_heads")
    tf_vars, model = hf_to_tf_variables(hf_state, hf_config["num_heads"], source=hf_dir)
    del hf_state
    _check_declared(model, {field: hf_config[key] for key, field in _HF_CONFIG_FIELDS.items()
                            if key in hf_config and _is_shape_relevant(model, field)},
                    os.path.join(hf_dir, HF_CONFIG_FILE), lambda f: _hf_key(f))
    record, files = _hf_vocabulary(model, hf_dir, hf_config, vocab, emoji)
    config = GPTSANConfig(model=model, train=train_config or TrainConfig(), vocabulary=record)
    write_tf_checkpoint(model_dir, tf_vars, config, force=force, progress=progress, files=files)
    return config


def _hf_key(field):
    return next(k for k, f in _HF_CONFIG_FIELDS.items() if f == field)


def _hf_vocabulary(model, hf_dir, hf_config, vocab, emoji):
    """(record, {name: content}) of the vocabulary an HF directory goes with: `vocab`/`emoji` or
    its vocab.txt/emoji.json, checked against the record in its config.json (gptsan.fingerprint).
    (None, {}) when there is none: the model directory gets the weights only."""
    config_path = os.path.join(hf_dir, HF_CONFIG_FILE)
    record = fingerprint.hf_record(hf_config, config_path)
    files = fingerprint.resolve(hf_dir, record, os.path.join(hf_dir, HF_VOCAB_FILE),
                                os.path.join(hf_dir, HF_EMOJI_FILE), vocab, emoji, required=False,
                                model=model, owner=config_path)
    if files is None:
        return None, {}
    fingerprint.announce(files)
    record = files.record(name=record.vocab_name if record else None)
    return record, files.model_dir_files(record)


def convert_gptsan_to_hf(model_dir, hf_dir, force=False, progress=False):
    """GPTSAN model directory -> HF directory (`config.json`, `model.safetensors`, and the
    tokenizer's `vocab.txt`/`emoji.json` when the model directory has them). Returns the config.
    """
    _check_distinct(model_dir, hf_dir)
    check_output_dir(os.path.abspath(hf_dir), force)
    safetensors_numpy = _import_safetensors()
    variables, config, vocab = _read_source(model_dir, progress)
    hf_config, files = hf_config_dict(config.model), {}
    if vocab is not None:  # config.json records the vocabulary too (HF ignores the key)
        record = dataclasses.replace(vocab.record(keep=config.vocabulary),
                                     vocab_file=HF_VOCAB_FILE, emoji_file=HF_EMOJI_FILE)
        hf_config[fingerprint.HF_RECORD_KEY] = dataclasses.asdict(record)
        files = vocab.model_dir_files(record)
    hf_state = tf_to_hf_variables(variables, config.model)
    with _atomic_output_dir(hf_dir, force) as tmp:
        # metadata "format": "pt" is what transformers' from_pretrained requires.
        safetensors_numpy.save_file(hf_state, os.path.join(tmp, HF_SAFETENSORS_FILE),
                                    metadata={"format": "pt"})
        with open(os.path.join(tmp, HF_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        _write_files(tmp, files)
    return config


def _read_source(model_dir, progress):
    """(variables, config, checked vocabulary or None) of a source model directory. With a
    parameters.json the vocabulary is checked before the weights are read (fails fast)."""
    named = os.path.isfile(os.path.join(model_dir, PARAMETERS_FILE))
    vocab = fingerprint.model_vocabulary(model_dir, required=False) if named else None
    variables, config = read_model_dir(model_dir, progress=progress)
    if not named:  # a bare checkpoint: its config comes from the weights
        vocab = fingerprint.model_vocabulary(model_dir, config, required=False)
    fingerprint.announce(vocab)
    return variables, config, vocab


def detect_format(directory):
    """"gptsan" (parameters.json / TF checkpoint) or "hf" (config.json + weights)."""
    if not os.path.isdir(directory):
        raise GPTSANError(f"source directory not found: {directory}")
    names = set(os.listdir(directory))
    if names & {PARAMETERS_FILE, "checkpoint"} or any(n.endswith(".index") for n in names):
        return "gptsan"
    weights = {HF_SAFETENSORS_FILE, HF_SAFETENSORS_INDEX, HF_TORCH_FILE}
    if HF_CONFIG_FILE in names and names & weights:
        return "hf"
    raise GPTSANError(f"{directory} is neither a GPTSAN model directory (parameters.json + TF "
                      f"checkpoint) nor an HF one ({HF_CONFIG_FILE} + {HF_SAFETENSORS_FILE})")


# ----------------------------------------------------------------------------------------------
# Adding extra dense layers (published run_modelconvert --add_extra_stage)


def add_extra_layers(variables, model, num_new, seed=0):
    """Appends `num_new` dense layers after the existing ones.

    Returns (new variables, new ModelConfig, frozen names). Existing arrays are kept as they
    are (same objects, bitwise); new layers use the GLOBAL index L..L+num_new-1 and get the
    training init of `gptsan.modeling` (kernels ~ N(0, fan_in ** -0.5), zero biases, LayerNorm
    g=1, b=0; the published tool used N(0, 0.02) for everything random); `model/ete` is
    zero-initialised if the model had no extra layers (so the first extra layer starts with no
    position shift). With a spout, `pasts/out/kernel` [spout, L*2*d] grows to
    [spout, (L+N)*2*d]: its column block l*2*d..(l+1)*2*d is layer l's spout K/V, so the old
    columns are kept and the new layers' block is zero -- a zero key gives score 0 and a zero
    value adds nothing, so the spout slot starts neutral in the new layers instead of
    injecting random K/V; fine-tuning then learns it. `frozen` (for ignore-params.json) lists
    every variable that existed before EXCEPT the grown `pasts/out/kernel`, which must stay
    trainable or the new columns would stay zero for ever (the published tool re-initialises
    and trains it as well).
    """
    model = getattr(model, "model", model)
    if num_new <= 0:
        raise GPTSANError(f"the number of layers to add must be > 0, got {num_new}")
    check_variables(variables, model)
    new_model = dataclasses.replace(model, num_ext_layers=model.num_ext_layers + num_new)
    rng = np.random.default_rng(seed)
    d, hidden = model.num_hidden, new_model.num_ext_hidden
    out = dict(variables)
    shapes = expected_variable_shapes(new_model)
    for layer in range(model.num_layers, new_model.num_layers):
        for name, fan_in in ((f"model/att{layer}/qkv/kernel", d), (f"model/att{layer}/o/kernel", d),
                             (f"model/mlp{layer}/p1/kernel", d),
                             (f"model/mlp{layer}/p2/kernel", hidden)):
            out[name] = (rng.standard_normal(shapes[name]) * fan_in ** -0.5).astype(np.float32)
        for norm in ("an", "ln"):
            out[f"model/{norm}{layer}/g"] = np.ones([d], np.float32)
            out[f"model/{norm}{layer}/b"] = np.zeros([d], np.float32)
        out[f"model/mlp{layer}/p1/bias"] = np.zeros([hidden], np.float32)
        out[f"model/mlp{layer}/p2/bias"] = np.zeros([d], np.float32)
    if "model/ete" not in out:
        out["model/ete"] = np.zeros(shapes["model/ete"], np.float32)
    if model.num_spout:
        old = variables["pasts/out/kernel"]  # [spout, L*2*d]
        grown = np.zeros(shapes["pasts/out/kernel"], old.dtype)  # [spout, (L+N)*2*d]
        grown[:, :old.shape[1]] = old
        out["pasts/out/kernel"] = grown
    check_variables(out, new_model, "the extended model")
    frozen = sorted(n for n in variables if n != "pasts/out/kernel")
    return out, new_model, frozen


def add_layers_to_model_dir(src, dst, num_new, seed=0, force=False, progress=False):
    """Model directory `src` + `num_new` extra layers -> model directory `dst`.

    Writes the extended checkpoint, `parameters.json` (num_ext_layers updated), the
    vocabulary/emoji copies and `ignore-params.json` (variables to freeze). Returns the config.
    """
    _check_distinct(src, dst)
    check_output_dir(os.path.abspath(dst), force)
    variables, config, vocab = _read_source(src, progress)
    new_vars, new_model, frozen = add_extra_layers(variables, config.model, num_new, seed)
    train = config.train
    if train.output_dir:  # never keep training into the source directory
        train = dataclasses.replace(train, output_dir=os.path.abspath(dst))
    files = {IGNORE_PARAMS_FILE: (json.dumps(frozen, indent=1) + "\n").encode("utf-8")}
    record = None
    if vocab is not None:
        record = vocab.record(keep=config.vocabulary)
        files.update(vocab.model_dir_files(record))
    new_config = GPTSANConfig(model=new_model, train=train, vocabulary=record)
    write_tf_checkpoint(dst, new_vars, new_config, force=force, progress=progress, files=files)
    return new_config
