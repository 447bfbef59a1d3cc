"""Trains (or fine-tunes) a GPTSAN model on TFRecords made by scripts/make_tfrecord.py.

    python run_train.py --parameter_file configs/tiny.json --input_files 'data/*.tfrecord' \
        --model_dir out/tiny [--mesh_shape batch:2,model:2] [--max_training_step 1000]

Rerunning the same command resumes from the last checkpoint in --model_dir (global step,
optimizer state and input position). Fine-tuning after scripts/add_layers.py:

    python run_train.py --init_checkpoint NEW_DIR --ignore_parameters NEW_DIR/ignore-params.json \
        --input_files ... --model_dir FINETUNED_DIR [--frozen_dtype bfloat16]

The init checkpoint is restored one variable at a time (no second copy of the backbone);
frozen variables get no gradient and no optimizer slots, and with --frozen_dtype bfloat16 they
are held (and saved) in half the memory. With --ignore_parameters, TensorFlow's oneDNN CPU
allocator returns freed memory to the system instead of pooling it
(TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 unless set; gptsan.memory.use_system_allocator).
"""
import dataclasses
import sys

from gptsan import fileio
from gptsan.config import PUBLISHED_CLIP_NORM
from gptsan.errors import ArgumentParser, GPTSANError, run_cli
from gptsan.memory import use_system_allocator


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    # published flags
    parser.add_argument("--parameter_file", default="",
                        help="parameters.json / config (default: the one in --model_dir or "
                             "--init_checkpoint)")
    parser.add_argument("--input_files", required=True,
                        help="TFRecord glob pattern(s), comma-separated")
    parser.add_argument("--spout_vector", default="none",
                        help="none | uniform | stateless_uniform | onehot | half_onehot "
                             "(spout input built from each example's class id)")
    parser.add_argument("--tpu_nodes", default="", help="TPU name/address (train on TPU)")
    parser.add_argument("--use_bfloat16", action="store_true", help="bfloat16 activations")
    parser.add_argument("--use_mixed_precision", action="store_true",
                        help="float16 activations with the published fixed loss scale 2^9 (GPU)")
    parser.add_argument("--clip_gradients", action="store_true",
                        help="clip the gradients to global norm --clip_norm (fine-tuning)")
    parser.add_argument("--ignore_parameters", default="",
                        help="JSON list of variable names to freeze (ignore-params.json)")
    parser.add_argument("--max_training_step", type=int, default=-1,
                        help="stop at this global step (<= 0: train_params.max_training_step, "
                             "or forever; the published script trained in runs of "
                             "100 x checkpoint_per_steps steps)")
    # new flags
    parser.add_argument("--model_dir", default="",
                        help="output model directory (default: train_params.output_dir)")
    parser.add_argument("--mesh_shape", default="",
                        help="e.g. batch:2,model:2 (default batch:1,model:num_pallarelizm)")
    parser.add_argument("--vocabulary", default="",
                        help="ja-swe vocabulary copied into the model dir (default: the model "
                             "dir's, the init checkpoint's, or the one the TFRecords were made "
                             "with; it must match all of them)")
    parser.add_argument("--emoji", default="", help="emoji table (default: next to --vocabulary)")
    parser.add_argument("--init_checkpoint", default="",
                        help="model directory or checkpoint to start a new run from")
    parser.add_argument("--frozen_dtype", choices=("float32", "bfloat16"), default="float32",
                        help="storage of the --ignore_parameters variables: bfloat16 halves the "
                             "frozen backbone's memory (computation stays in the activation dtype)")
    parser.add_argument("--optimizer", choices=("adam", "adafactor"), default=None,
                        help="override train_params.optimizer (default adam: the published AdamW)")
    parser.add_argument("--clip_norm", type=float, default=PUBLISHED_CLIP_NORM,
                        help="threshold of --clip_gradients (published 0.01; 1.0 in the first "
                             "published version); with the fixed float16 loss scale it bounds "
                             "the scaled gradients, i.e. the true ones at clip_norm / 512, "
                             "as published")
    parser.add_argument("--dynamic_loss_scale", action="store_true",
                        help="with --use_mixed_precision (adam): an adaptive loss scale from "
                             "2^15 (an overflowing step is skipped and the scale halved) "
                             "instead of the fixed 2^9")
    parser.add_argument("--batch_size", type=int, default=0, help="override train_params")
    parser.add_argument("--seed", type=int, default=None, help="override train_params.seed")
    parser.add_argument("--summary_steps", type=int, default=100,
                        help="TensorBoard summaries every N steps")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def load_config(args):
    """The run's GPTSANConfig: --parameter_file, else the model dir's, else --init_checkpoint's.

    Returns (config, whether the file sets model_params.num_vocabulary).
    """
    from gptsan.config import PARAMETERS_FILE, GPTSANConfig

    candidates = [args.parameter_file] if args.parameter_file else [
        fileio.join(d, PARAMETERS_FILE) for d in (args.model_dir, args.init_checkpoint)
        if d and fileio.isdir(d)]
    path = next((p for p in candidates if fileio.isfile(p)), None)
    if path is None:
        raise GPTSANError(args.parameter_file and f"parameter file not found: {args.parameter_file}"
                          or "no --parameter_file given and no parameters.json in --model_dir "
                             "or --init_checkpoint")
    config = GPTSANConfig.from_json_file(path)
    train = config.train
    overrides = {"batch_size": args.batch_size or train.batch_size,
                 "seed": train.seed if args.seed is None else args.seed,
                 "optimizer": args.optimizer or train.optimizer}
    model_dir = args.model_dir or train.output_dir
    if not model_dir:
        raise GPTSANError("no output directory: pass --model_dir (or set train_params.output_dir)")
    overrides["output_dir"] = fileio.absolute(model_dir)
    sets_vocabulary = "num_vocabulary" in fileio.read_json(path, "config file")["model_params"]
    return dataclasses.replace(config, train=dataclasses.replace(train, **overrides)), \
        sets_vocabulary


def frozen_names(args, use_tpu, mesh):
    """The variables --ignore_parameters freezes ([] without it); --frozen_dtype needs some."""
    from gptsan import optimization

    ignore = (optimization.load_ignore_parameters(args.ignore_parameters)
              if args.ignore_parameters else [])
    if args.frozen_dtype != "float32" and not ignore:
        raise GPTSANError("--frozen_dtype applies to frozen variables: pass --ignore_parameters")
    if args.frozen_dtype != "float32" and (use_tpu or mesh.size != 1):
        raise GPTSANError("--frozen_dtype bfloat16 is for one-device fine-tuning: use "
                          "--mesh_shape batch:1,model:1 (no TPU)")
    return ignore


def main(argv=None):
    args = parse_args(argv)
    config, sets_vocabulary = load_config(args)
    if args.ignore_parameters:  # fine-tuning on a frozen backbone: memory first
        use_system_allocator()
    # TensorFlow loads here
    from gptsan import estimator, fingerprint, mesh as mesh_lib, preflight, records, spout
    from gptsan.model_fn import TrainSetup

    model, train = config.model, config.train
    model_dir = train.output_dir
    if args.use_bfloat16 and args.use_mixed_precision:
        raise GPTSANError("--use_bfloat16 and --use_mixed_precision cannot be used together")
    dtype = ("bfloat16" if args.use_bfloat16 else
             "float16" if args.use_mixed_precision else "float32")
    spout.check_spout_vector(args.spout_vector, model.num_spout)
    mesh_shape = args.mesh_shape or f"batch:1,model:{model.num_pallarelizm}"
    mesh = mesh_lib.parse_mesh_shape(mesh_shape)
    use_tpu = bool(args.tpu_nodes)
    devices = None if use_tpu else preflight.select_devices(mesh, train.batch_size, model)

    if args.dynamic_loss_scale and not (args.use_mixed_precision and train.optimizer == "adam"):
        raise GPTSANError("--dynamic_loss_scale needs --use_mixed_precision and --optimizer adam")
    if args.clip_norm <= 0:
        raise GPTSANError(f"--clip_norm must be > 0, got {args.clip_norm}")
    record_files = records.check_input_files(args.input_files, model.num_contexts)
    vocab, record = fingerprint.training_vocabulary(
        config, args.vocabulary, args.emoji, model_dir, args.init_checkpoint, record_files,
        args.parameter_file)
    fingerprint.announce(vocab)
    config = dataclasses.replace(config, vocabulary=record)
    if not sets_vocabulary:  # as published: the vocabulary file gives num_vocabulary
        model = dataclasses.replace(model, num_vocabulary=preflight.vocabulary_size(vocab.vocab))
        config = dataclasses.replace(config, model=model)
    ignore = frozen_names(args, use_tpu, mesh)
    init_checkpoint = preflight.check_training_inputs(
        config, record_files, vocab.vocab, ignore, args.init_checkpoint, dtype,
        dynamic_loss_scale=args.dynamic_loss_scale, frozen_dtype=args.frozen_dtype)

    preflight.write_model_dir(config, vocab.vocab, vocab.emoji)
    setup = TrainSetup(config, mesh, model_dir, spout_vector=args.spout_vector,
                                 dtype=dtype, ignore_names=ignore,
                                 clip_gradients=args.clip_gradients, clip_norm=args.clip_norm,
                                 dynamic_loss_scale=args.dynamic_loss_scale, seed=train.seed,
                                 devices=devices, use_tpu=use_tpu, init_checkpoint=init_checkpoint,
                                 frozen_dtype=args.frozen_dtype)
    input_fn = records.make_input_fn(record_files, model.num_contexts, train.batch_size, True,
                                     train.seed)
    max_steps = args.max_training_step if args.max_training_step > 0 else (
        train.max_training_step or None)
    tpu_cluster = None
    if use_tpu:
        from gptsan.compat import tf
        tpu_cluster = tf.distribute.cluster_resolver.TPUClusterResolver(args.tpu_nodes)
    losses = estimator.train(setup, input_fn, max_steps=max_steps, tpu_cluster=tpu_cluster,
                             summary_steps=args.summary_steps, progress=not args.no_progress)
    print(f"trained {model_dir} to step {estimator.latest_global_step(model_dir)}"
          f"{estimator.describe_losses(losses)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
