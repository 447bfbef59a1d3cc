"""Benchmarks one training step: GPTSAN (Mesh-TF, AdamW) vs HF PyTorch (torch AdamW), same config.

    python scripts/bench_train.py [--config configs/small.json] [--batch_size 8] [--steps 10]
        [--warmup 3] [--mesh_shape batch:1,model:1] [--output bench_train.json [--force]]

Each engine runs in its own process (no thread-pool sharing between TensorFlow and PyTorch),
float32, on the same random token batch (batch x num_contexts, every position a target):
GPTSAN builds the real training graph of `gptsan.model_fn.model_fn_builder` (CE + z-loss +
load-balancing loss, AdamW updates, global-step increment) and runs it in a plain session;
HF runs `GPTSanJapaneseForConditionalGeneration` forward + CE loss + backward + `AdamW.step()`.
Prints one JSON object with the median step time and tokens/s of each engine and the ratio
GPTSAN / HF (target >= 1.0).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gptsan.config import GPTSANConfig
from gptsan.errors import GPTSANError, run_cli
from gptsan.bench import print_report
from gptsan.fileio import check_output_path

TARGET_RATIO = 1.0  # the brief's target: GPTSAN tokens/s >= HF PyTorch tokens/s
ENGINES = ("gptsan", "hf")
LEARNING_RATE = 1e-4  # any small value: the step cost does not depend on it


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "small.json"))
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per engine")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--mesh_shape", default="batch:1,model:1", help="GPTSAN mesh")
    p.add_argument("--output", default="", help="also write the JSON here")
    p.add_argument("--force", action="store_true", help="overwrite --output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


def batch_arrays(model, batch_size, seed):
    """Random ids [b, s] and next-token targets [b, s] (last position: EOT)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.num_vocabulary, size=(batch_size, model.num_contexts))
    targets = np.concatenate([ids[:, 1:], np.full((batch_size, 1), model.num_vocabulary - 1)], 1)
    return ids.astype(np.int32), targets.astype(np.int32)


def time_steps(step, warmup, steps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def bench_gptsan(config, args):
    from gptsan import model_fn, preflight
    from gptsan.compat import session_config, tf
    from gptsan import mesh as mesh_lib

    model = config.model
    ids, targets = batch_arrays(model, args.batch_size, args.seed)
    mesh = mesh_lib.parse_mesh_shape(args.mesh_shape)
    devices = preflight.select_devices(mesh, args.batch_size, model)
    with tempfile.TemporaryDirectory() as model_dir, tf.Graph().as_default():
        tf.set_random_seed(args.seed)
        setup = model_fn.TrainSetup(config, mesh, model_dir, devices=devices, summaries=False,
                                    seed=args.seed)
        tf.train.get_or_create_global_step()
        features = {"x": tf.constant(ids), "y": tf.constant(targets),
                    "i": tf.zeros([args.batch_size, 1], tf.int32),
                    "num_input": tf.zeros([args.batch_size, 1], tf.int32)}
        spec = model_fn.model_fn_builder(setup)(features, None, tf.estimator.ModeKeys.TRAIN, {})
        restore = spec.training_hooks[0]  # MtfRestoreHook: masters -> slices
        restore.begin()
        with tf.Session(config=session_config(mesh.size)) as sess:
            sess.run(tf.global_variables_initializer())
            restore.after_create_session(sess, None)
            losses = []
            times = time_steps(lambda: losses.append(sess.run([spec.train_op, spec.loss])[1]),
                               args.warmup, args.steps)
    return times, losses


def bench_hf(config, args):
    import torch
    from transformers import GPTSanJapaneseConfig, GPTSanJapaneseForConditionalGeneration

    from gptsan.hf_format import hf_config_dict

    model = config.model
    ids, targets = batch_arrays(model, args.batch_size, args.seed)
    torch.manual_seed(args.seed)
    hf_config = {k: v for k, v in hf_config_dict(model).items()
                 if k not in ("architectures", "model_type", "torch_dtype", "num_layers")}
    net = GPTSanJapaneseForConditionalGeneration(GPTSanJapaneseConfig(**hf_config))
    # both flags, or HF keeps its cache (docs/ARCHITECTURE.md "Differences from the HF port")
    net.config.use_cache = net.model.config.use_cache = False
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE)
    input_ids, labels = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(
        targets, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = net(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss))

    return time_steps(step, args.warmup, args.steps), losses


def run_engine(engine, argv):
    """Runs this script for one engine in a fresh process; returns its JSON result."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--engine", engine],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise GPTSANError(f"{engine} benchmark failed: "
                          f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = GPTSANConfig.from_json_file(args.config)
    check_output_path(args.output, args.force)
    tokens = args.batch_size * config.model.num_contexts
    if args.engine:
        times, losses = (bench_gptsan if args.engine == "gptsan" else bench_hf)(config, args)
        median = statistics.median(times)
        print(json.dumps({"step_s": round(median, 4), "tokens_per_s": round(tokens / median, 1),
                          "first_loss": round(float(losses[0]), 4),
                          "last_loss": round(float(losses[-1]), 4)}))
        return 0
    results = {engine: run_engine(engine, argv) for engine in ENGINES}
    ratio = results["gptsan"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    report = {"config": os.path.relpath(args.config, ROOT), "batch_size": args.batch_size,
              "length": config.model.num_contexts, "tokens_per_step": tokens,
              "mesh_shape": args.mesh_shape, "steps": args.steps, "dtype": "float32",
              "cpu_threads": os.cpu_count(), "gptsan": results["gptsan"],
              "hf_pytorch": results["hf"], "ratio": round(ratio, 3), "target": TARGET_RATIO,
              "meets_target": ratio >= TARGET_RATIO}
    print_report(report, args.output)
    return 0


if __name__ == "__main__":
    run_cli(main)
