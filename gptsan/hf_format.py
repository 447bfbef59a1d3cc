"""The HF transformers port: directories, and conversions to and from GPTSAN model directories.

The HF format is a transformers 4.40.2 `GPTSanJapaneseForConditionalGeneration` directory
(`config.json` + `model.safetensors`). Which HF tensors each TF variable becomes, and how
(layouts), is the table of gptsan/variables.py; both directions walk it. Conversions stream
one tensor at a time, so peak memory is about the largest tensor whatever the model size.
"""
import dataclasses
import functools
import json
import os

import numpy as np
from tqdm import tqdm

from gptsan import fileio, fingerprint, tensorio
from gptsan.checkpoint import open_source_dir, write_tf_checkpoint
from gptsan.config import PARAMETERS_FILE, GPTSANConfig, ModelConfig, TrainConfig
from gptsan.errors import GPTSANError
from gptsan.fileio import read_json
from gptsan.tensorio import TensorRef
from gptsan.variables import (check_declared, check_variables, few, hf_piece, hf_shapes,
                              is_shape_relevant, layer_indices, shape_str, to_tf, variable_table)

HF_CONFIG_FILE = "config.json"  # transformers config
HF_SAFETENSORS_FILE = "model.safetensors"  # transformers save_pretrained(safe_serialization=True)
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"  # sharded safetensors
HF_TORCH_FILE = "pytorch_model.bin"  # older transformers format (the published HF upload)
HF_TORCH_INDEX = "pytorch_model.bin.index.json"  # sharded pytorch_model-0000k-of-0000n.bin
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
# TF <-> HF conversion of variable dicts


def tf_to_hf_refs(tf_vars, model, dtype=np.float32):
    """{TF name: array or TensorRef} -> {HF name: TensorRef} computed when loaded, as `dtype`.

    A TF tensor feeding several HF tensors (q/k/v, the experts) is read once when they are
    loaded in name order: a two-tensor cache covers the interleaved names of one block
    (expert_0.wi, expert_0.wo, expert_1.wi, ...; k_proj, out_proj, q_proj, v_proj).
    """
    check_variables(tf_vars, model)
    dtype = np.dtype(dtype)
    cache = tensorio.LoadCache(capacity=2)

    def load(tf_name, layout, k):
        value = cache.get(tf_name, lambda: tensorio.value_of(tf_vars[tf_name]))
        return tensorio.cast_floating(hf_piece(layout, value, k), dtype)

    refs = {}
    for row in variable_table(model):
        for k, (name, shape) in enumerate(zip(row.hf_names, hf_shapes(row.layout, row.shape))):
            refs[name] = TensorRef(tuple(shape), dtype,
                                   functools.partial(load, row.name, row.layout, k))
    return refs


def infer_hf_model_config(hf_state, num_heads, source="the HF weights"):
    """ModelConfig from HF tensor shapes; heads cannot be seen in HF shapes and are given."""
    def shape(name):
        if name not in hf_state:
            raise GPTSANError(f"{source} has no tensor {name}: not a GPTSanJapanese model")
        return tuple(hf_state[name].shape)

    names = list(hf_state)
    vocab, d = shape("model.embed_tokens.weight")
    blocks = layer_indices(names, r"^model\.blocks\.(\d+)\.")
    switch = layer_indices(names, r"^model\.blocks\.(\d+)\.feed_forward\.mlp\.router\.")
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
        fields["num_experts"] = len(layer_indices(
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
    refs, model = hf_to_tf_refs(hf_state, num_heads, source)
    return {name: ref.load() for name, ref in refs.items()}, model


def hf_to_tf_refs(hf_state, num_heads, source="the HF weights", dtype=np.float32):
    """{HF name: array or TensorRef} -> ({TF name: TensorRef as `dtype`}, ModelConfig).

    Names, shapes and dtypes are checked here; each TF tensor is built from its HF tensors
    when loaded (float16/bfloat16 inputs are cast tensor by tensor).
    """
    state = _untied_state(hf_state, source)
    model = infer_hf_model_config(state, num_heads, source)
    dtype = np.dtype(dtype)
    refs, used = {}, set()
    for row in variable_table(model):
        for name, want in zip(row.hf_names, hf_shapes(row.layout, row.shape)):
            _check_hf_tensor(state, name, want, source)
            used.add(name)
        refs[row.name] = TensorRef(row.shape, dtype, functools.partial(
            _tf_from_hf, [state[n] for n in row.hf_names], row.layout, row.shape, dtype))
    extra = sorted(set(state) - used)
    if extra:
        raise GPTSANError(f"{source} has tensor(s) GPTSAN does not know: {few(extra)}")
    return refs, model


def _untied_state(hf_state, source):
    """{HF name: TensorRef} with the published typo `model.sqout.*` fixed and the tied
    `lm_head.weight` checked against the embedding and dropped."""
    state = {}
    for name, value in hf_state.items():
        if name.startswith(HF_MISSPELLED_SPOUT):
            name = "model.spout." + name[len(HF_MISSPELLED_SPOUT):]
        state[name] = value if isinstance(value, TensorRef) else tensorio.array_ref(value)
    if HF_TIED_HEAD in state:
        head = state.pop(HF_TIED_HEAD)
        embed = state.get("model.embed_tokens.weight")
        if embed is None or head.shape != embed.shape or not np.array_equal(head.load(),
                                                                            embed.load()):
            raise GPTSANError(f"{source}: lm_head.weight differs from model.embed_tokens.weight; "
                              "GPTSAN ties them, an untied head cannot be converted")
    return state


def _check_hf_tensor(state, name, shape, source):
    """HF tensor `name` must be in `state` with `shape` and a floating dtype."""
    if name not in state:
        raise GPTSANError(f"{source} lacks tensor {name} needed by the model")
    if tuple(state[name].shape) != shape:
        raise GPTSANError(f"{source}: {name} has shape {shape_str(state[name].shape)} but "
                          f"the model expects {shape_str(shape)}")
    if not tensorio.is_floating(state[name].dtype):
        raise GPTSANError(f"{source}: {name} has dtype {state[name].dtype}, expected "
                          "floating point")


def _tf_from_hf(hf_refs, layout, tf_shape, dtype):
    """One TF array of `dtype` from its HF tensors."""
    return to_tf(layout, [ref.load() for ref in hf_refs], tf_shape, dtype)


# ----------------------------------------------------------------------------------------------
# HF directories


def read_hf_dir(hf_dir):
    """({HF name: np.ndarray}, config dict) of a transformers GPTSanJapanese directory."""
    refs, hf_config = open_hf_dir(hf_dir)
    return {name: ref.load() for name, ref in refs.items()}, hf_config


def open_hf_dir(hf_dir):
    """({HF name: TensorRef}, config dict) of a transformers GPTSanJapanese directory.

    Weights: `model.safetensors`, its sharded `.index.json`, or `pytorch_model.bin` (and its
    shards); nothing is read until a tensor is loaded.
    """
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
    return _open_hf_weights(hf_dir), hf_config


# weight files of an HF directory, in the order transformers prefers them:
# (single file, sharded index, reader)
_HF_WEIGHT_FILES = ((HF_SAFETENSORS_FILE, HF_SAFETENSORS_INDEX, tensorio.read_safetensors),
                    (HF_TORCH_FILE, HF_TORCH_INDEX, tensorio.read_torch_bin))


def _open_hf_weights(hf_dir):
    for single, index, reader in _HF_WEIGHT_FILES:
        if os.path.exists(os.path.join(hf_dir, single)):
            return reader(os.path.join(hf_dir, single))
        if os.path.exists(os.path.join(hf_dir, index)):
            weight_map = read_json(os.path.join(hf_dir, index), "weight index").get(
                "weight_map", {})
            refs = {}
            for shard in sorted(set(weight_map.values())):
                refs.update(reader(os.path.join(hf_dir, shard)))
            return refs
    raise GPTSANError(f"{hf_dir} has no {HF_SAFETENSORS_FILE}, {HF_SAFETENSORS_INDEX}, "
                      f"{HF_TORCH_FILE} or {HF_TORCH_INDEX}")


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
                         train_config=None, dtype="float32"):
    """HF GPTSanJapanese directory -> GPTSAN model directory. Returns the GPTSANConfig.

    One tensor at a time: peak memory is about the largest TF tensor, whatever the model size.
    `dtype` is the checkpoint's storage dtype (float32 | float16 | bfloat16; float16/bfloat16
    inputs are cast tensor by tensor). `vocab`/`emoji` are copied into the model directory;
    when not given, the HF tokenizer's `vocab.txt`/`emoji.json` in `hf_dir` are used if present.
    """
    fileio.check_separate_dirs(hf_dir, model_dir)
    fileio.check_output_dir(os.path.abspath(model_dir), force)
    hf_state, hf_config = open_hf_dir(hf_dir)
    if "num_heads" not in hf_config:
        raise GPTSANError(f"{os.path.join(hf_dir, HF_CONFIG_FILE)} has no num_heads")
    tf_vars, model = hf_to_tf_refs(hf_state, hf_config["num_heads"], source=hf_dir,
                                   dtype=tensorio.storage_dtype(dtype))
    check_declared(model, {field: hf_config[key] for key, field in _HF_CONFIG_FIELDS.items()
                           if key in hf_config and is_shape_relevant(model, field)},
                   os.path.join(hf_dir, HF_CONFIG_FILE), _hf_key)
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


def convert_gptsan_to_hf(model_dir, hf_dir, force=False, progress=False, dtype="float32"):
    """GPTSAN model directory -> HF directory (`config.json`, `model.safetensors`, and the
    tokenizer's `vocab.txt`/`emoji.json` when the model directory has them). Returns the config.

    One tensor at a time (peak memory about two TF tensors); `dtype` is the safetensors' dtype.
    """
    fileio.check_separate_dirs(model_dir, hf_dir)
    fileio.check_output_dir(os.path.abspath(hf_dir), force)
    variables, config, vocab = open_source_dir(model_dir)
    hf_config, files = hf_config_dict(config.model), {}
    hf_config["torch_dtype"] = dtype
    if vocab is not None:  # config.json records the vocabulary too (HF ignores the key)
        record = dataclasses.replace(vocab.record(keep=config.vocabulary),
                                     vocab_file=HF_VOCAB_FILE, emoji_file=HF_EMOJI_FILE)
        hf_config[fingerprint.HF_RECORD_KEY] = dataclasses.asdict(record)
        files = vocab.model_dir_files(record)
    hf_state = tf_to_hf_refs(variables, config.model, tensorio.storage_dtype(dtype))
    with fileio.atomic_output_dir(hf_dir, force) as tmp, tqdm(
            total=len(hf_state), desc="writing", unit="tensor", disable=not progress) as bar:
        tensorio.write_safetensors(os.path.join(tmp, HF_SAFETENSORS_FILE), hf_state,
                                   metadata=tensorio.SAFETENSORS_FORMAT,
                                   progress=lambda _: bar.update(1))
        with open(os.path.join(tmp, HF_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        fileio.write_files(tmp, files)
    return config


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
