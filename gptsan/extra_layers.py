"""Growing a model by extra dense layers (published tools/run_modelconvert.py --add_extra_stage).

`add_extra_layers` appends layers to a {name: tensor} dict lazily; `add_layers_to_model_dir`
streams a whole model directory into a new one with the fine-tuning lists the published tool
writes next to it.
"""
import dataclasses
import functools
import json
import os

from gptsan import fileio, tensorio
from gptsan.checkpoint import open_source_dir, write_tf_checkpoint
from gptsan.config import GPTSANConfig
from gptsan.errors import GPTSANError
from gptsan.fileio import read_json
from gptsan.tensorio import TensorRef
from gptsan.variables import check_variables, filled_ref, normal_ref, variable_shapes

ADD_INIT_STD = 0.02  # published run_modelconvert: standard_normal * 0.02 for every random tensor
ADD_INITS = ("published", "fan_in")  # --init: N(0, 0.02) | N(0, fan_in^-0.5) and zero biases
SPOUT_OUTS = ("reinit", "extend")  # --spout_out: pasts/out/kernel drawn anew | zero-extended
FROZEN_LISTS = ("source", "existing")  # --frozen: the source's ignore-params.json | generated
IGNORE_PARAMS_FILE = "ignore-params.json"  # published name: variables frozen when fine-tuning
TRANSFORMER_PARAMS_FILE = "transformer-params.json"  # published: the variables kept
ALL_PARAMS_FILE = "all-params.json"  # published: kept + added variables
SPOUT_OUT = "pasts/out/kernel"  # [spout, L*2*d]: the one kept variable whose shape grows


def add_extra_layers(variables, model, num_new, seed=0, init="published", spout_out="reinit"):
    """Appends `num_new` dense layers after the existing ones, lazily.

    `variables`: {name: array or TensorRef}. Returns ({name: array or TensorRef}, new
    ModelConfig, kept names, added names); nothing is drawn or read until loaded, and each
    new tensor is drawn from its own generator (seed, crc32(name)), so the result does not
    depend on the order of loading. New layers use the GLOBAL index L..L+num_new-1.

    init="published" (the published tool): every random tensor ~ N(0, 1) * 0.02 -- the four
    kernels of each layer AND its two MLP biases; LayerNorm g=1, b=0.
    init="fan_in": kernels ~ N(0, fan_in^-0.5), zero biases (the training init of
    gptsan.modeling). `model/ete` is zero when the model had no extra layers (both).
    spout_out="reinit" (published): `pasts/out/kernel` [spout, (L+N)*2*d] is drawn anew like
    the kernels. spout_out="extend": its old columns are kept (column block l*2*d..(l+1)*2*d is
    layer l's spout K/V) and the new layers' block is zero -- a zero key and value leave the
    new layers' spout slot neutral until fine-tuning learns it.
    """
    if num_new <= 0:
        raise GPTSANError(f"the number of layers to add must be > 0, got {num_new}")
    if init not in ADD_INITS or spout_out not in SPOUT_OUTS:
        raise GPTSANError(f"init must be one of {ADD_INITS} and spout_out one of {SPOUT_OUTS}")
    check_variables(variables, model)
    new_model = dataclasses.replace(model, num_ext_layers=model.num_ext_layers + num_new)
    shapes = variable_shapes(new_model)
    normal = functools.partial(_normal, shapes, seed, init)
    added = {}
    for layer in range(model.num_layers, new_model.num_layers):
        added.update(_new_layer(layer, shapes, normal, init, model.num_hidden,
                                new_model.num_ext_hidden))
    if "model/ete" not in variables:
        added["model/ete"] = filled_ref(shapes["model/ete"], 0.0)
    if model.num_spout and spout_out == "reinit":
        added[SPOUT_OUT] = normal(SPOUT_OUT, model.num_spout)
    elif model.num_spout:
        added[SPOUT_OUT] = TensorRef(shapes[SPOUT_OUT], variables[SPOUT_OUT].dtype,
                                     functools.partial(_zero_extend, variables[SPOUT_OUT],
                                                       shapes[SPOUT_OUT]))
    kept = sorted(n for n in variables if n not in added)
    out = {**{n: variables[n] for n in kept}, **added}
    check_variables(out, new_model, "the extended model")
    return out, new_model, kept, list(added)


def _normal(shapes, seed, init, name, fan_in):
    """A new random tensor `name`: N(0, 0.02) (published) or N(0, fan_in^-0.5) (fan_in)."""
    std = ADD_INIT_STD if init == "published" else fan_in ** -0.5
    return normal_ref(seed, name, shapes[name], std)


def _new_layer(layer, shapes, normal, init, d, hidden):
    """{name: TensorRef} of extra layer `layer` (see `add_extra_layers` for the init)."""
    tensors = {}
    for name, fan_in in ((f"model/att{layer}/qkv/kernel", d), (f"model/att{layer}/o/kernel", d),
                         (f"model/mlp{layer}/p1/kernel", d),
                         (f"model/mlp{layer}/p2/kernel", hidden)):
        tensors[name] = normal(name, fan_in)
    for norm in ("an", "ln"):
        tensors[f"model/{norm}{layer}/g"] = filled_ref(shapes[f"model/{norm}{layer}/g"], 1.0)
        tensors[f"model/{norm}{layer}/b"] = filled_ref(shapes[f"model/{norm}{layer}/b"], 0.0)
    for bias, fan_in in ((f"model/mlp{layer}/p1/bias", d), (f"model/mlp{layer}/p2/bias", hidden)):
        tensors[bias] = normal(bias, fan_in) if init == "published" else \
            filled_ref(shapes[bias], 0.0)
    return tensors


def _zero_extend(old, shape):
    old = tensorio.value_of(old)  # [spout, L*2*d]
    grown = tensorio.aligned_empty(shape, old.dtype)  # [spout, (L+N)*2*d]
    grown[:, :old.shape[1]] = old
    grown[:, old.shape[1]:] = 0
    return grown


def add_layers_to_model_dir(src, dst, num_new, seed=0, force=False, progress=False,
                            init="published", spout_out="reinit", frozen="source"):
    """Model directory `src` + `num_new` extra layers -> model directory `dst`, streamed.

    Writes the extended checkpoint (model variables and global_step 0, no optimizer slots:
    `run_train.py --init_checkpoint` starts a fresh optimizer), `parameters.json`
    (num_ext_layers + N, train_params.output_dir = basename(dst) as published), the
    vocabulary/emoji copies, `ignore-params.json`, and the published `transformer-params.json`
    (kept variables) / `all-params.json` (kept + added). `frozen="source"` (published) copies
    the source's ignore-params.json unchanged; `frozen="existing"` writes every variable the
    source had except `pasts/out/kernel`. Returns the new GPTSANConfig.
    """
    if frozen not in FROZEN_LISTS:
        raise GPTSANError(f"frozen must be one of {FROZEN_LISTS}, got {frozen!r}")
    fileio.check_separate_dirs(src, dst)
    fileio.check_output_dir(os.path.abspath(dst), force)
    source_ignore = os.path.join(src, IGNORE_PARAMS_FILE)
    if frozen == "source" and not os.path.isfile(source_ignore):
        raise GPTSANError(f"{src} has no {IGNORE_PARAMS_FILE} (the published tool copies it); "
                          "pass --frozen existing to freeze every variable of the source")
    variables, config, vocab = open_source_dir(src)
    new_vars, new_model, kept, added = add_extra_layers(variables, config.model, num_new, seed,
                                                        init=init, spout_out=spout_out)
    if frozen == "source":
        names = read_json(source_ignore, IGNORE_PARAMS_FILE)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise GPTSANError(f"{source_ignore} must be a JSON list of variable names")
        files = {IGNORE_PARAMS_FILE: source_ignore}
    else:
        files = {IGNORE_PARAMS_FILE: _json_bytes(sorted(n for n in variables if n != SPOUT_OUT))}
    files[TRANSFORMER_PARAMS_FILE] = _json_bytes(kept)
    files[ALL_PARAMS_FILE] = _json_bytes(kept + added)
    record = None
    if vocab is not None:
        record = vocab.record(keep=config.vocabulary)
        files.update(vocab.model_dir_files(record))
    train = dataclasses.replace(config.train, output_dir=os.path.basename(os.path.abspath(dst)))
    new_config = GPTSANConfig(model=new_model, train=train, vocabulary=record)
    write_tf_checkpoint(dst, new_vars, new_config, force=force, progress=progress, files=files)
    return new_config


def _json_bytes(names):
    return (json.dumps(names, indent=1) + "\n").encode("utf-8")
