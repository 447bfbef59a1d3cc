"""The model's variables as one table: TF checkpoint names, shapes, HF names and layouts.

Everything else is derived from the table: `variable_shapes` (docs/ARCHITECTURE.md "Checkpoint
names" as code), `count_parameters`, which names are model variables (`MODEL_VARIABLE_PREFIXES`,
`is_model_variable`; anything else in a checkpoint is optimizer state or a counter), the HF
names and layouts `gptsan.hf_format` converts with, the one validator `check_variables`, and
`infer_model_config` (a ModelConfig from TF shapes). Layouts (TF variable <-> HF tensors):
    copy       same array
    transpose  TF kernel [in, out] <-> HF Linear weight [out, in]
    row        TF [V] <-> HF [1, V] (final_logits_bias)
    qkv        TF [d, 3, H, hd] <-> HF q/k/v_proj.weight [d, d] each (HF = TF[:, j].reshape(d, d).T)
    heads_out  TF [H, hd, d] <-> HF out_proj.weight [d, d] (HF = TF.reshape(d, d).T)
    experts    TF [E, a, b] <-> HF expert_{e} weight [b, a] each (HF = TF[e].T)
Every conversion is a pure transpose/reshape, so round trips are bit-exact.
"""
import functools
import math
import re
import typing
import zlib

import numpy as np

from gptsan import tensorio
from gptsan.config import SPOUT_DEPTH, ModelConfig
from gptsan.errors import GPTSANError
from gptsan.tensorio import TensorRef

# ----------------------------------------------------------------------------------------------
# The table: (TF name, HF name(s), layout, shape key). {i}: global layer index, {e}: expert
# index, {n}: spout dense index, {hf_n}: its index in HF's nn.Sequential.
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
_ALL_MAPS = (_GLOBAL_MAP + _EXT_EMBEDDING_MAP + _ATTENTION_MAP + _SWITCH_MAP + _EXT_MAP
             + _SPOUT_MAP + _SPOUT_OUT_MAP)

# The first name component of every model variable: the published scopes "model" and "pasts"
# (the spout adapter); optimizer slots and global_step carry other names.
MODEL_VARIABLE_PREFIXES = tuple(sorted({row[0].split("/")[0] + "/" for row in _ALL_MAPS}))
SPOUT_PREFIX = "pasts/"  # the spout adapter's variables (not part of the published "backbone")
# Any model variable of any config: the table's names with every {index} a number.
_MODEL_VARIABLE_NAME = re.compile("^(" + "|".join(
    re.sub(r"\\\{\w+\\\}", r"\\d+", re.escape(row[0])) for row in _ALL_MAPS) + ")$")
VOCABULARY_VARIABLES = ("model/wte", "model/wob")  # [V, D] and [V]: dim 0 is num_vocabulary


class Variable(typing.NamedTuple):
    """One row of the table for a given model."""
    name: str  # TF checkpoint name
    hf_names: tuple  # the HF tensor(s) it becomes (several for the qkv and experts layouts)
    layout: str  # how the HF tensors are cut from it (module docstring)
    shape: tuple  # TF shape


def is_model_variable(name):
    """True for a model weight's TF name (not an optimizer slot, global_step, ...)."""
    return _MODEL_VARIABLE_NAME.match(name) is not None


def variable_table(model):
    """Yields a `Variable` for every model variable of ModelConfig `model`, in table order."""
    d, v, c = model.num_hidden, model.num_vocabulary, model.num_contexts
    e, moe, ext, spout = (model.num_experts, model.num_moe_hidden, model.num_ext_hidden,
                          model.num_spout)
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
                hf = (hf_pattern.format(**index),)
            yield Variable(tf_pattern.format(**index), hf, layout, shapes[shape_key])

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


def variable_shapes(model):
    """{TF name: shape tuple} of every checkpoint variable of ModelConfig `model`."""
    return {row.name: row.shape for row in variable_table(model)}


def count_parameters(model):
    """Parameter counts by part, from the table (nothing is allocated).

    Returns {"backbone", "spout", "total"}; "backbone" is everything but the spout adapter,
    the figure the published model card gives (2,776,248,480 for GPTSAN-2.8B).
    """
    sizes = {name: math.prod(shape) for name, shape in variable_shapes(model).items()}
    spout = sum(size for name, size in sizes.items() if name.startswith(SPOUT_PREFIX))
    total = sum(sizes.values())
    return {"backbone": total - spout, "spout": spout, "total": total}


# ----------------------------------------------------------------------------------------------
# Layouts: one TF array <-> its HF arrays


def hf_shapes(layout, tf_shape):
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


def hf_piece(layout, value, k):
    """The k-th HF array (contiguous) of TF array `value`."""
    if layout == "copy":
        out = value
    elif layout == "transpose":
        out = value.T
    elif layout == "row":
        out = value[None, :]
    elif layout == "qkv":  # [d, 3, H, hd] -> k-th of q, k, v [H*hd, d]
        out = value[:, k].reshape(value.shape[0], -1).T
    elif layout == "heads_out":  # [H, hd, d] -> [d, H*hd]
        out = value.reshape(-1, value.shape[2]).T
    elif layout == "experts":  # [E, a, b] -> expert k [b, a]
        out = value[k].T
    else:
        raise AssertionError(f"unknown layout {layout}")
    return np.ascontiguousarray(out)


def to_tf(layout, values, tf_shape, dtype=None):
    """List of HF arrays -> TF array of `tf_shape` and `dtype` (default: the arrays'), written
    into TF-aligned memory (float16/bfloat16 -> float32 is exact)."""
    out = tensorio.aligned_empty(tf_shape, dtype or values[0].dtype)
    if layout == "copy":
        out[...] = values[0]
    elif layout == "transpose":
        out[...] = values[0].T
    elif layout == "row":
        out[...] = values[0][0]
    elif layout == "qkv":  # 3 x [H*hd, d] -> [d, 3, H, hd]
        d, _, h, hd = tf_shape
        for j, w in enumerate(values):
            out[:, j] = w.T.reshape(d, h, hd)
    elif layout == "heads_out":  # [d, H*hd] -> [H, hd, d]
        out[...] = values[0].T.reshape(tf_shape)
    elif layout == "experts":  # E x [b, a] -> [E, a, b]
        for e, w in enumerate(values):
            out[e] = w.T
    else:
        raise AssertionError(f"unknown layout {layout}")
    return out


# ----------------------------------------------------------------------------------------------
# The validator


def check_variables(variables, model, source="the checkpoint", complete=True, others=False,
                    model_source=None):
    """Raises a one-line GPTSANError unless `variables` fits ModelConfig `model`.

    `variables`: {name: shape, or anything with a `.shape` (arrays, TensorRefs)}. The cases:
      complete=True   every variable of the model is there (False: a partial source such as an
                      --init_checkpoint; only the variables present are checked);
      others=False    nothing else is there (True: a training checkpoint, which also holds
                      optimizer slots and global_step, or one of a bigger model).
    Names are checked before shapes. `model_source` names the file the model's shapes come
    from (parameters.json) when that file, not the variables, may be what is wrong.
    """
    expected = variable_shapes(model)
    owner = model_source or "the model"
    layers = f"{model.num_switch_layers} switch + {model.num_ext_layers} extra layers"
    hint = f"; {model_source} does not match the checkpoint" if model_source else ""
    missing = [n for n in expected if n not in variables] if complete else []
    if missing:
        raise GPTSANError(f"{source} lacks {few(missing)} needed by {owner} ({layers}){hint}")
    unexpected = [] if others else sorted(n for n in variables if n not in expected)
    if unexpected:
        raise GPTSANError(f"{source} has unexpected variable(s) {few(unexpected)} for "
                          f"{owner} ({layers}){hint}")
    for name, shape in expected.items():
        if name not in variables:
            continue
        actual = tuple(getattr(variables[name], "shape", variables[name]))
        if actual != shape:
            verb = "implies" if model_source else "expects"
            vocabulary = (" (the vocabulary size differs)" if name in VOCABULARY_VARIABLES
                          and actual[:1] != shape[:1] else "")
            raise GPTSANError(f"{source}: {name} has shape {shape_str(actual)} but {owner} "
                              f"{verb} {shape_str(shape)}{vocabulary}{hint}")


def shape_str(shape):
    """[a, b] for messages."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def few(names, limit=4):
    """The first `limit` names for messages, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------
# Config inference from TF shapes

# ModelConfig fields the weights' shapes determine
SHAPE_FIELDS = ("num_contexts", "num_switch_layers", "num_ext_layers", "num_hidden", "num_header",
                "num_experts", "num_spout", "num_vocabulary", "num_moe_hidden", "num_ext_hidden")


def layer_indices(names, pattern):
    """Sorted distinct integers of group 1 of regex `pattern` over `names`."""
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
    layers = layer_indices(names, r"^model/att(\d+)/qkv/kernel$")
    switch = layer_indices(names, r"^model/moe(\d+)/wi/kernel$")
    ext = layer_indices(names, r"^model/mlp(\d+)/p1/kernel$")
    if not layers:
        raise GPTSANError(f"{source} has no attention layers (model/att0/qkv/kernel)")
    if layers != list(range(len(layers))) or switch + ext != layers:
        raise GPTSANError(f"{source}: layers must be numbered 0..L-1 with the Switch layers first; "
                          f"found attention {layers}, switch {switch}, extra {ext}")
    qkv_shape = variables["model/att0/qkv/kernel"].shape
    if len(qkv_shape) != 4:
        raise GPTSANError(f"{source}: model/att0/qkv/kernel has shape {shape_str(qkv_shape)}, "
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


def is_shape_relevant(model, field):
    """Widths of absent parts (no Switch / no extra layers) cannot be seen in the weights."""
    if field in ("num_experts", "num_moe_hidden"):
        return model.num_switch_layers > 0
    if field == "num_ext_hidden":
        return model.num_ext_layers > 0
    return True


def check_declared(inferred, declared, source, what):
    """`declared` {field: value} (from parameters.json / config.json) must match the weights;
    `what(field)` is the field's name in that file."""
    for field, value in declared.items():
        actual = getattr(inferred, field)
        if value != actual:
            raise GPTSANError(f"{source} says {what(field)}={value} but the weights have "
                              f"{field}={actual}; the file does not belong to these weights")


# ----------------------------------------------------------------------------------------------
# Lazy tensors: drawn or filled when loaded, one at a time

RANDOM_WEIGHT_STD = 0.05  # random_variables: small enough that activations stay in range


def random_variables(model, seed=0, std=RANDOM_WEIGHT_STD):
    """{TF name: TensorRef} of random weights (LayerNorm gains 1, the rest N(0, std)): benchmarks
    write any model size with one tensor in memory at a time."""
    return {name: filled_ref(shape, 1.0) if name.endswith("/g") else
            normal_ref(seed, name, shape, std) for name, shape in variable_shapes(model).items()}


def normal_ref(seed, name, shape, std):
    """TensorRef of N(0, std) float32 drawn when loaded from its own generator (seed,
    crc32(name)): the values do not depend on the order of loading."""
    return TensorRef(tuple(shape), np.dtype(np.float32),
                     functools.partial(_draw_normal, seed, name, shape, std))


def filled_ref(shape, fill):
    """TensorRef of a float32 constant, filled when loaded."""
    return TensorRef(tuple(shape), np.dtype(np.float32), functools.partial(_filled, shape, fill))


def _draw_normal(seed, name, shape, std):
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    value = rng.standard_normal(dtype=np.float32, out=tensorio.aligned_empty(shape, np.float32))
    value *= np.float32(std)  # in place: one array of the tensor's size
    return value


def _filled(shape, fill):
    value = tensorio.aligned_empty(shape, np.float32)
    value.fill(fill)
    return value
