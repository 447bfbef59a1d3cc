"""Checks of a training run before anything is written: input files, vocabulary, ignore list,
devices, and the checkpoint to resume or start from; then the output directory is made."""
from gptsan import fileio
from gptsan import fingerprint
from gptsan import mesh as mesh_lib
from gptsan import optimization, records
from gptsan.checkpoint import check_checkpoint, find_checkpoint
from gptsan.compat import tf
from gptsan.config import PARAMETERS_FILE, GPTSANConfig
from gptsan.errors import GPTSANError
from gptsan.variables import variable_shapes
from gptsan.frozen_storage import FROZEN_DTYPES


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
