"""Rebuilds the bundled demo model `models/demo` from scratch with the project's own pipeline.

    python scripts/make_demo_model.py [--output models/demo] [--work_dir build/demo-model] [--force]

Recipe (documented in models/demo/README.md; `make demo-model` runs exactly this):
  1. vocabulary: scripts/build_vocab.py --size 8000 --corpus data/sample (+ wordfreq's Japanese
     word list and Debian's unicode-data, see `make vocab-data`)
  2. TFRecords: scripts/make_tfrecord.py --mode hybrid --hybrid_rate 0.5 on data/sample/classes.csv,
     RECORD_COPIES times with seeds SEED, SEED+1, ... (different prefix lengths and masks)
  3. training: run_train.py with configs/demo.json in stages of STAGE_STEPS steps alternating
     --spout_vector onehot / none, each stage starting from the previous one
     (--init_checkpoint); train_params fix the batch size, learning rate, total step count
     and seed
  4. export: only the model variables (no Adam slots) + parameters.json (recording the
     vocabulary's fingerprint) + vocabulary (DEMO_VOCAB_FILE) + emoji table to --output.
Each step is a subprocess of the real CLI, with its own progress bar.
"""
import argparse
import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gptsan.checkpoint import EMOJI_FILE
from gptsan.errors import GPTSANError, run_cli

CONFIG = os.path.join(ROOT, "configs", "demo.json")  # model + train params of the demo model
SAMPLE_DIR = os.path.join(ROOT, "data", "sample")  # the project's redistributable corpus
CLASSES_CSV = os.path.join(SAMPLE_DIR, "classes.csv")  # filename,fileid: spout class per kind
VOCAB_SIZE = 8000  # smallest size build_vocab.py supports: keeps the model well under 20 MB
# The demo's own vocabulary: named so that no one takes it for a 36k one (the published name
# ja-swe36k.txt is the default of directories that record no vocabulary).
DEMO_VOCAB_FILE = "ja-swe8k-demo.txt"
DEMO_VOCAB_NAME = ("the demo model's own 8k vocabulary (scripts/build_vocab.py --size 8000 "
                   "--corpus data/sample), neither the project's 36k nor the published one")
HYBRID_RATE = 0.5  # half the examples get a bidirectional prefix (MASK fill), half are plain LM
RECORD_COPIES = 4  # passes over the corpus with different seeds -> varied prefixes and masks
SEED = 1  # seed of the TFRecord passes (training uses train_params.seed of configs/demo.json)
README_FILE = "README.md"  # kept when --output is rebuilt
# Training alternates between stages with the spout (one_hot(class id), so that
# `run_generate.py --spout <class id>` steers the text) and stages without it (so that
# generation and [MASK] filling without a spout work too); each stage is one run_train.py run
# starting from the previous stage's weights and Adam moments (--init_checkpoint; only stage 1
# warms up), with seed train_params.seed + stage index (data order, router jitter).
STAGE_SPOUTS = ("onehot", "none")
STAGE_STEPS = 250  # steps per stage


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "models", "demo"),
                        help="model directory to write")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "build", "demo-model"),
                        help="scratch folder (vocabulary, TFRecords, training checkpoints)")
    parser.add_argument("--config", default=CONFIG, help="model/train config")
    parser.add_argument("--unicode_dir", default=None,
                        help="Unicode Character Database folder for build_vocab.py "
                        "(default: its default, Debian's /usr/share/unicode)")
    parser.add_argument("--max_training_step", type=int, default=0,
                        help="override the config's step count (quick checks only)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --output and --work_dir")
    return parser.parse_args(argv)


def run(title, command):
    """Runs one pipeline step as a subprocess, printing the command first."""
    print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
    start = time.time()
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode != 0:
        raise GPTSANError(f"step '{title}' failed (exit code {result.returncode})")
    return time.time() - start


def main(argv=None):
    args = parse_args(argv)
    from gptsan.config import GPTSANConfig

    config = GPTSANConfig.from_json_file(args.config)
    if args.max_training_step > 0:
        config.train.max_training_step = args.max_training_step
    if config.train.max_training_step <= 0:
        raise GPTSANError(f"{args.config}: train_params.max_training_step must be > 0")
    if config.model.num_vocabulary != VOCAB_SIZE:
        raise GPTSANError(f"{args.config}: num_vocabulary must be {VOCAB_SIZE}")
    for path in (args.output, args.work_dir):
        if os.path.exists(path) and not args.force:
            raise GPTSANError(f"{path} exists (use --force to rebuild)")
    shutil.rmtree(args.work_dir, ignore_errors=True)
    records_dir = os.path.join(args.work_dir, "records")
    train_dir = os.path.join(args.work_dir, "train")
    os.makedirs(records_dir)
    vocab = os.path.join(args.work_dir, DEMO_VOCAB_FILE)
    emoji = os.path.join(args.work_dir, EMOJI_FILE)
    py = sys.executable
    timings = {}

    unicode_dir = ["--unicode_dir", args.unicode_dir] if args.unicode_dir else []
    timings["vocabulary"] = run(
        f"1/4 vocabulary ({VOCAB_SIZE} entries)",
        [py, "scripts/build_vocab.py", "--size", str(VOCAB_SIZE), "--vocab_file", vocab,
         "--emoji_file", emoji, "--corpus", SAMPLE_DIR] + unicode_dir)
    start = time.time()
    for copy in range(RECORD_COPIES):
        run(f"2/4 TFRecords, pass {copy + 1}/{RECORD_COPIES}",
            [py, "scripts/make_tfrecord.py", "--input_files", CLASSES_CSV, "--mode", "hybrid",
             "--hybrid_rate", str(HYBRID_RATE), "--vocabulary", vocab, "--emoji", emoji,
             "--num_context", str(config.model.num_contexts), "--seed", str(SEED + copy),
             "--num_process", "1", "--output_prefix", os.path.join(records_dir, f"pass{copy}")])
    timings["tfrecords"] = time.time() - start
    start = time.time()
    total = config.train.max_training_step
    stages = training_stages(total)
    previous = None
    for number, (spout_vector, steps) in enumerate(stages):
        stage_dir = os.path.join(train_dir, f"stage{number + 1}")
        stage_config = os.path.join(args.work_dir, f"stage{number + 1}.json")
        write_stage_config(config, stage_config, steps, warmup=previous is None)
        init = ["--init_checkpoint", previous] if previous else []
        run(f"3/4 training, stage {number + 1}/{len(stages)}: {steps} steps, spout {spout_vector}",
            [py, "run_train.py", "--parameter_file", stage_config,
             "--input_files", os.path.join(records_dir, "*.tfrecord"),
             "--spout_vector", spout_vector, "--model_dir", stage_dir,
             "--vocabulary", vocab, "--emoji", emoji, "--seed", str(config.train.seed + number)]
            + init)
        previous = stage_dir
    timings["training"] = time.time() - start
    print(f"\n=== 4/4 export model variables (no optimizer slots) -> {args.output}", flush=True)
    step = export_model(previous, stages[-1][1], args.output, config, vocab, emoji)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(args.output, "*")))
    print(f"\nwrote {args.output}: step {step}, {size / 2 ** 20:.1f} MiB; " + ", ".join(
        f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    return 0


def training_stages(total_steps):
    """[(spout_vector, steps)]: STAGE_SPOUTS alternating, STAGE_STEPS each, `total_steps` in all."""
    stages, done = [], 0
    while done < total_steps:
        steps = min(STAGE_STEPS, total_steps - done)
        stages.append((STAGE_SPOUTS[len(stages) % len(STAGE_SPOUTS)], steps))
        done += steps
    return stages


def write_stage_config(config, path, steps, warmup):
    """The config of one stage: `steps` steps; later stages continue without a new warm-up."""
    from gptsan.config import GPTSANConfig

    train = dataclasses.replace(config.train, max_training_step=steps,
                                num_warmup_steps=config.train.num_warmup_steps if warmup else 0)
    GPTSANConfig(model=config.model, train=train).to_json_file(path)


def export_model(stage_dir, stage_steps, output, config, vocab, emoji):
    """Copies the model variables of the last stage's final checkpoint to `output`.

    The exported checkpoint is numbered with the total step count of all stages; parameters.json
    records the vocabulary (name DEMO_VOCAB_NAME).
    """
    from gptsan.checkpoint import find_checkpoint, read_tf_checkpoint, write_tf_checkpoint
    from gptsan.fingerprint import VocabularyFiles

    prefix = find_checkpoint(stage_dir)
    if int(prefix.rsplit("-", 1)[-1]) != stage_steps:  # model.ckpt-<step>
        raise GPTSANError(f"the last training stage stopped at {prefix}, expected step "
                          f"{stage_steps}")
    step = config.train.max_training_step
    variables = read_tf_checkpoint(prefix, progress=True)
    vocabulary = VocabularyFiles.of(vocab, emoji)
    record = vocabulary.record(name=DEMO_VOCAB_NAME)
    config = dataclasses.replace(config, vocabulary=record)
    files = vocabulary.model_dir_files(record)
    readme = os.path.join(output, README_FILE)
    if os.path.isfile(readme):  # the recipe's documentation stays with the rebuilt model
        with open(readme, "rb") as f:
            files[README_FILE] = f.read()
    write_tf_checkpoint(output, variables, config, step=step, force=True, progress=True,
                        files=files)
    return step


if __name__ == "__main__":
    run_cli(main)
