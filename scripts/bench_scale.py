"""Benchmarks memory and time at full scale: conversion, add_layers, fine-tuning, generation.

    python scripts/bench_scale.py [--config configs/gptsan-2.8b.json] [--add_extra_stage 14]
        [--train_steps 2] [--new_tokens 32] [--steps random,to_hf,...] [--work_dir DIR]
        [--output bench_scale.json [--force]]

Each step runs the real command line tool in its own child process and is measured by that
process's peak RSS and wall time (steps the chosen ones need are run and reported too); the
JSON report gives each figure, its ratio to the float32 weights' byte size and the limits of
issue 11:
    baseline     python + TensorFlow + gptsan imported, one session (the fixed overhead)
    random       write a random checkpoint of --config (gptsan.variables.random_variables)
    to_hf        GPTSAN -> HF float32 safetensors        (scripts/convert_checkpoint.py)
    from_hf      HF float32 -> GPTSAN
    to_hf16      GPTSAN -> HF float16 (--dtype float16; the published upload is float16)
    from_hf16    HF float16 -> GPTSAN float32
    add_layers   scripts/add_layers.py --add_extra_stage N --frozen existing
    finetune     run_train.py on the added layers, frozen backbone, --batch_size 1, one
                 num_contexts-token example per step, 1x1 mesh (one device)
    finetune_bf16  the same with --frozen_dtype bfloat16
    generate     run_generate.py: load + greedy generation of --new_tokens tokens
Limits: conversions and add_layers <= largest tensor + 2 GiB; fine-tuning <= 1.15 x (frozen
bytes + 4 x trainable bytes: weights, gradients, two Adam slots); generation <= 1.15 x the
weights. The 2.8B configuration takes about 30 minutes on the 2-core development machine and
needs about 18 GB of free RAM and 35 GB of disk (README "Memory at full scale").
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gptsan import fileio
from gptsan.bench import print_report
from gptsan.config import GPTSANConfig
from gptsan.errors import GPTSANError, run_cli
from gptsan.memory import gib, run_measured, tensor_bytes
from gptsan.tensorio import use_plain_cpu_allocator

STEPS = ("baseline", "random", "to_hf", "from_hf", "to_hf16", "from_hf16", "add_layers",
         "finetune", "finetune_bf16", "generate")
CONVERSION_LIMIT_ABOVE_LARGEST = 2 * 2 ** 30  # issue 11: <= 2 GB above the largest tensor
FINETUNE_LIMIT = 1.15  # issue 11: fine-tuning peak <= 1.15 x the floor
GENERATE_LIMIT = 1.15  # issue 11: generation peak <= 1.15 x the weights
ADAM_COPIES = 4  # a trained variable: weights, gradient, Adam m and v
TRAIN_EXAMPLES = 4  # random examples in the fine-tuning TFRecord
PROMPT = "東京は"  # generation context


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "gptsan-2.8b.json"))
    p.add_argument("--add_extra_stage", type=int, default=14, help="layers added for fine-tuning")
    p.add_argument("--train_steps", type=int, default=2)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " +
                   ", ".join(STEPS))
    p.add_argument("--work_dir", default="", help="where the model directories go (default: a "
                   "temporary directory, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="", help="also write the JSON here")
    p.add_argument("--force", action="store_true")
    # internal: the child of the `random` / `baseline` steps
    p.add_argument("--write_random", help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_random(config_path, path, seed):
    """The `random` step's child: a random checkpoint, one tensor in memory at a time, with
    this repository's vocabulary recorded and copied (the later steps check it)."""
    from gptsan.checkpoint import write_tf_checkpoint
    from gptsan.config import EMOJI_FILE, VOCAB_FILE
    from gptsan.fingerprint import VocabularyFiles
    from gptsan.variables import random_variables

    vocabulary = VocabularyFiles.of(os.path.join(ROOT, VOCAB_FILE), os.path.join(ROOT, EMOJI_FILE))
    record = vocabulary.record()
    config = dataclasses.replace(GPTSANConfig.from_json_file(config_path), vocabulary=record)
    write_tf_checkpoint(path, random_variables(config.model, seed), config,
                        files=vocabulary.model_dir_files(record))


def baseline():
    """The `baseline` step's child: what every step pays before touching a weight."""
    import gptsan.extra_layers  # noqa: F401
    import gptsan.hf_format  # noqa: F401
    from gptsan.compat import tf

    with tf.Session(config=tf.ConfigProto(device_count={"GPU": 0})) as session:
        session.run(tf.constant(0))


def write_records(path, model, seed):
    """A TFRecord of TRAIN_EXAMPLES random LM examples of num_contexts tokens."""
    from gptsan.compat import tf
    from gptsan.records import serialize_example

    rng = np.random.default_rng(seed)
    with tf.io.TFRecordWriter(path) as writer:
        for _ in range(TRAIN_EXAMPLES):
            ids = rng.integers(0, model.num_vocabulary - 8, model.num_contexts)  # no control ids
            writer.write(serialize_example(ids, np.append(ids[1:], -1), 0, 0))


def _script(name):
    return [sys.executable, os.path.join(ROOT, name)]


class Bench:
    """Runs the steps in order and collects their figures."""

    def __init__(self, args, config, work):
        self.args, self.config, self.work = args, config, work
        self.report = {}
        self.env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    def path(self, name):
        return os.path.join(self.work, name)

    def run(self, step, cmd):
        print(f"[bench_scale] {step} ...", file=sys.stderr, flush=True)
        result = run_measured(cmd, env=self.env, cwd=ROOT)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["?"])[-1]
            raise GPTSANError(f"step {step} failed (exit {result.returncode}): {tail}")
        figures = {"seconds": round(result.seconds, 1), "peak_rss_gib": gib(result.peak_rss),
                   "peak_rss_bytes": result.peak_rss}
        self.report[step] = figures
        print(f"[bench_scale] {step}: {figures['peak_rss_gib']} GiB, {figures['seconds']} s",
              file=sys.stderr, flush=True)
        return figures

    def remove(self, *names):
        for name in names:
            shutil.rmtree(self.path(name), ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    if args.write_random:
        use_plain_cpu_allocator()
        write_random(args.config, args.write_random, args.seed)
        return 0
    if args.baseline:
        use_plain_cpu_allocator()  # the conversions' setting
        baseline()
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise GPTSANError(f"unknown --steps {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if args.output:
        fileio.check_output_path(args.output, args.force)
    config = GPTSANConfig.from_json_file(args.config)
    if args.work_dir:
        os.makedirs(args.work_dir, exist_ok=True)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_scale-")
    try:
        report = run_steps(args, config, steps, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report, args.output)
    return 0


def run_steps(args, config, steps, work):
    from gptsan.config import EMOJI_FILE, VOCAB_FILE
    from gptsan.extra_layers import IGNORE_PARAMS_FILE
    from gptsan.variables import variable_shapes

    model = config.model
    weights, largest = tensor_bytes(variable_shapes(model))
    report = {"config": os.path.relpath(os.path.abspath(args.config), ROOT),
              "weights_gib": gib(weights), "weights_bytes": weights,
              "largest_tensor_gib": gib(largest), "largest_tensor_bytes": largest,
              "cpu_count": os.cpu_count()}
    bench = Bench(args, config, work)
    bench.report = report
    vocab = os.path.join(ROOT, VOCAB_FILE)
    if "baseline" in steps:
        bench.run("baseline", _script("scripts/bench_scale.py") + ["--baseline"])
    if any(s != "baseline" for s in steps):
        # every later step reads the random model
        bench.remove("model")
        figures = bench.run("random", _script("scripts/bench_scale.py") + [
            "--config", args.config, "--write_random", bench.path("model"),
            "--seed", str(args.seed)])
        figures["ratio_to_weights"] = round(figures["peak_rss_bytes"] / weights, 3)
    _run_conversions(bench, steps, weights, largest)
    if {"add_layers", "finetune", "finetune_bf16"} & set(steps):
        bench.remove("ft")
        figures = bench.run("add_layers", _script("scripts/add_layers.py") + [
            "--src", bench.path("model"), "--dst", bench.path("ft"), "--add_extra_stage",
            str(args.add_extra_stage), "--frozen", "existing", "--force"])
        _conversion_figures(figures, weights, largest)
    for step, extra in (("finetune", []), ("finetune_bf16", ["--frozen_dtype", "bfloat16"])):
        if step not in steps:
            continue
        records = bench.path("train.tfrecord")
        write_records(records, model, args.seed)
        bench.remove("tuned")
        figures = bench.run(step, _script("run_train.py") + [
            "--init_checkpoint", bench.path("ft"),
            "--ignore_parameters", bench.path(os.path.join("ft", IGNORE_PARAMS_FILE)),
            "--input_files", records, "--model_dir", bench.path("tuned"), "--batch_size", "1",
            "--max_training_step", str(args.train_steps), "--mesh_shape", "batch:1,model:1",
            "--vocabulary", vocab, "--no_progress", *extra])
        _finetune_figures(figures, bench.path("ft"), extra)
        bench.remove("tuned")
    if "generate" in steps:
        out = bench.path("generated.json")
        figures = bench.run("generate", _script("run_generate.py") + [
            "--model", bench.path("model"), "--context", PROMPT, "--max_generate",
            str(args.new_tokens), "--top_k", "1", "--vocabulary", vocab, "--emoji",
            os.path.join(ROOT, EMOJI_FILE), "--mesh_shape",
            "batch:1,model:1", "--output", out, "--force", "--quiet"])
        figures["ratio_to_weights"] = round(figures["peak_rss_bytes"] / weights, 3)
        figures["limit_ratio"] = GENERATE_LIMIT
        figures["within_limit"] = figures["ratio_to_weights"] <= GENERATE_LIMIT
    return report


def _run_conversions(bench, steps, weights, largest):
    """The to_hf / from_hf / to_hf16 / from_hf16 steps asked for (a from_ step needs its to_)."""
    conversions = (("to_hf", "model", "hf", []), ("from_hf", "hf", "back", []),
                   ("to_hf16", "model", "hf16", ["--dtype", "float16"]),
                   ("from_hf16", "hf16", "back16", []))
    convert = _script("scripts/convert_checkpoint.py")
    for step, src, dst, extra in conversions:
        needed = step in steps or (step in ("to_hf", "to_hf16") and
                                   f"from_{step[3:]}" in steps)
        if not needed:
            continue
        bench.remove(dst)
        figures = bench.run(step, convert + ["--src", bench.path(src), "--dst", bench.path(dst),
                                             "--force", *extra])
        _conversion_figures(figures, weights, largest)
        if step.startswith("from_"):
            bench.remove(src, dst)


def _conversion_figures(figures, weights, largest):
    above = figures["peak_rss_bytes"] - largest
    figures.update(ratio_to_weights=round(figures["peak_rss_bytes"] / weights, 3),
                   above_largest_gib=gib(above),
                   within_limit=above <= CONVERSION_LIMIT_ABOVE_LARGEST)


def _finetune_figures(figures, ft_dir, extra):
    """Floor = frozen weights (at their storage width) + 4 x the trained weights (float32)."""
    from gptsan.checkpoint import open_model_dir
    from gptsan.extra_layers import IGNORE_PARAMS_FILE
    from gptsan.variables import variable_shapes

    _, config = open_model_dir(ft_dir)
    shapes = variable_shapes(config.model)
    with open(os.path.join(ft_dir, IGNORE_PARAMS_FILE), encoding="utf-8") as f:
        frozen = set(json.load(f))
    frozen_itemsize = 2 if "bfloat16" in extra else 4
    frozen_bytes, _ = tensor_bytes({n: s for n, s in shapes.items() if n in frozen},
                                   frozen_itemsize)
    trained_bytes, _ = tensor_bytes({n: s for n, s in shapes.items() if n not in frozen})
    floor = frozen_bytes + ADAM_COPIES * trained_bytes
    ratio = figures["peak_rss_bytes"] / floor
    figures.update(frozen_gib=gib(frozen_bytes), trained_gib=gib(trained_bytes),
                   floor_gib=gib(floor), ratio_to_floor=round(ratio, 3),
                   limit_ratio=FINETUNE_LIMIT, within_limit=ratio <= FINETUNE_LIMIT)


if __name__ == "__main__":
    run_cli(main)
