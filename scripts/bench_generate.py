"""Benchmarks generation speed: cached decoding vs full recomputation vs HF `generate`.

    python scripts/bench_generate.py [--config configs/small.json] [--new_tokens 256]
        [--window 32] [--repeats 2] [--output bench_generate.json [--force]]
        [--skip_full] [--skip_hf]

Builds a model directory with random weights for the config, converts it to HF with
`gptsan.checkpoint.convert_gptsan_to_hf`, then times each engine in its own process (no
thread-pool sharing between TensorFlow and PyTorch): greedy decoding, batch 1, float32, EOT
disabled so every run produces exactly `--new_tokens` tokens. Prints one JSON object:
tokens/s, the median per-token latency, and the median latency of the first and last
`--window` new tokens per engine (best of `--repeats` runs), and the speed ratios against
the targets (cached >= 1.0x HF, >= 5x full recomputation; checked on median latency).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gptsan import fileio
from gptsan.bench import print_report
from gptsan import generation as gen
from gptsan.data import SpecialTokens
from gptsan.prompts import build_prompt, feed_token
from gptsan.config import GPTSANConfig
from gptsan.errors import GPTSANError, run_cli

PROMPT_LENGTH = 8  # SOT SEG + 6 context tokens
TARGET_VS_HF, TARGET_VS_FULL = 1.0, 5.0  # the brief's speed targets for cached decoding
ENGINES = ("cached", "full", "hf")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "small.json"))
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--window", type=int, default=32, help="tokens at the start and the end")
    p.add_argument("--repeats", type=int, default=1, help="runs per engine (best is kept)")
    p.add_argument("--output", default="", help="also write the JSON here")
    p.add_argument("--force", action="store_true")
    p.add_argument("--skip_full", action="store_true", help="skip full recomputation")
    p.add_argument("--skip_hf", action="store_true", help="skip HF transformers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for every engine (TF session and torch); 0: defaults")
    # internal: time one engine in this process
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def random_model_dir(config, path, seed):
    """A model directory with random weights, written one tensor at a time."""
    from gptsan import checkpoint as ck

    ck.write_tf_checkpoint(path, ck.random_variables(config.model, seed), config)


def latency_stats(stamps, start, window):
    """Per-token latencies from the times at which each new token was ready."""
    times = np.diff(np.concatenate([[start], stamps])) * 1e3  # [new_tokens] ms
    total = float(np.sum(times)) / 1e3
    return {"new_tokens": int(len(times)), "total_s": round(total, 3),
            "tokens_per_s": round(len(times) / total, 2),
            "first_token_ms": round(float(times[0]), 2),
            "median_ms": round(float(np.median(times[1:])), 2),  # steady state, after the 1st
            f"first{window}_median_ms": round(float(np.median(times[:window])), 2),
            f"last{window}_median_ms": round(float(np.median(times[-window:])), 2)}


def _prompt(config, seed):
    special = SpecialTokens.from_vocab_size(config.model.num_vocabulary)
    context = np.random.default_rng(seed).integers(0, special.sot, PROMPT_LENGTH - 2).tolist()
    return special, build_prompt(special, context, max_length=config.model.num_contexts,
                                 as_training=True)


def run_engine(args):
    """Times one engine in this process; prints {"stats", "tokens", ...} as JSON."""
    config = GPTSANConfig.from_json_file(args.model_dir)
    special, prompt = _prompt(config, args.seed)
    if args.engine == "hf":
        stats, tokens = _time_hf(os.path.join(os.path.dirname(args.model_dir), "hf"),
                                 prompt.input_ids, args.threads,
                                 args.new_tokens, args.window)
        print(json.dumps({"stats": stats, "tokens": tokens}))
        return
    from gptsan.inference import Predictor

    predictor = Predictor(args.model_dir)
    use_cache = args.engine == "cached"
    no_eot = [t for t in range(special.vocab_size) if t != special.eot]
    greedy = dict(decoder="sample", beam_width=1, top_k=1, use_cache=use_cache)
    # Graph builds / first-run costs: the prefill program of this run's routing length (it
    # follows max_generate, as the published padding does), then the step program.
    for warm in (gen.GenerationSettings(max_generate=args.new_tokens, **greedy,
                                        allowed_tokens=[special.eot]),
                 gen.GenerationSettings(max_generate=4, **greedy)):
        gen.generate(predictor, prompt, special, warm)
    settings = gen.GenerationSettings(max_generate=args.new_tokens, allowed_tokens=no_eot,
                                      **greedy)
    stamps = []
    start = time.perf_counter()
    result = gen.generate(predictor, prompt, special, settings,
                          on_token=lambda i, g: stamps.append(time.perf_counter()))[0]
    stats = latency_stats(np.array(stamps), start, args.window)
    # Tokens a full (padded) pass over the final sequence drops for expert capacity: single-
    # token steps never drop, so a non-zero count explains cached != full recomputation.
    fed = prompt.input_ids + [feed_token(t, special, True) for t in result.model_tokens[:-1]]
    padded = np.full([1, predictor.max_length], special.eot, np.int32)
    padded[0, :len(fed)] = fed
    kept = predictor.forward(padded)["expert_kept"]
    stats["full_pass_dropped_tokens"] = int(sum((~k[0, :len(fed)]).sum() for k in kept))
    print(json.dumps({"stats": stats, "tokens": result.model_tokens}))


def _time_hf(hf_dir, prompt_ids, threads, new_tokens, window):
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    model = transformers.GPTSanJapaneseForConditionalGeneration.from_pretrained(hf_dir).eval()
    stamps = []

    class Stamp(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return False

    ids = torch.tensor([prompt_ids])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  use_cache=True, stopping_criteria=transformers.StoppingCriteriaList([Stamp()]))
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        stamps.clear()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
    stats = latency_stats(np.array(stamps[:new_tokens]), start, window)
    stats["torch_threads"] = torch.get_num_threads()
    return stats, out[0, len(prompt_ids):].tolist()


def _speedups(ours, theirs):
    """Speed ratios: by tokens/s over the whole run, and by median per-token latency (robust
    to load spikes on a shared machine; the targets are checked on the latter)."""
    return {"tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
            "median": round(theirs["median_ms"] / ours["median_ms"], 2)}


def _spawn(engine, model_dir, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--model_dir",
           model_dir, "--new_tokens", str(args.new_tokens), "--window", str(args.window),
           "--seed", str(args.seed), "--threads", str(args.threads)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if args.threads:  # TensorFlow's thread pools (its session config leaves them 0)
        env.update(TF_NUM_INTRAOP_THREADS=str(args.threads),
                   TF_NUM_INTEROP_THREADS=str(args.threads))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise GPTSANError(f"{engine} benchmark failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.engine:
        run_engine(args)
        return 0
    if args.output:
        fileio.check_output_path(args.output, args.force)
    if args.new_tokens < 2 * args.window:
        raise GPTSANError(f"--new_tokens must be >= 2 * --window ({2 * args.window})")
    config = GPTSANConfig.from_json_file(args.config)
    needed = PROMPT_LENGTH + args.new_tokens - 1  # the last new token is never fed back
    report = {"config": os.path.relpath(args.config, ROOT),
              "num_contexts": config.model.num_contexts}
    if needed > config.model.num_contexts:  # make room: positions only, same compute per token
        config.model.num_contexts = needed
        report["num_contexts"] = needed
        report["note"] = (f"num_contexts raised to {needed} so that a {PROMPT_LENGTH}-token "
                          f"prompt plus {args.new_tokens} new tokens fit")
    report.update(prompt_tokens=PROMPT_LENGTH, new_tokens=args.new_tokens,
                  decoding="greedy, EOT disabled, batch 1, float32, CPU, one process per engine",
                  cpu_count=os.cpu_count(), threads=args.threads or "library defaults",
                  repeats=args.repeats)
    engines = [e for e in ENGINES if not (e == "full" and args.skip_full)
               and not (e == "hf" and args.skip_hf)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        random_model_dir(config, model_dir, args.seed)
        if "hf" in engines:
            from gptsan.checkpoint import convert_gptsan_to_hf

            convert_gptsan_to_hf(model_dir, os.path.join(tmp, "hf"))
        runs, tokens = {}, {}
        report["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
        for _ in range(args.repeats):
            for engine in engines:  # interleaved, so background load hits every engine
                out = _spawn(engine, model_dir, args)
                if engine not in runs or out["stats"]["total_s"] < runs[engine]["total_s"]:
                    runs[engine], tokens[engine] = out["stats"], out["tokens"]
        report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["cached"] = runs["cached"]
    if "full" in runs:
        report["full_recomputation"] = runs["full"]
        report["full_same_tokens_as_cached"] = tokens["full"] == tokens["cached"]
        report["speedup_cached_vs_full"] = _speedups(runs["cached"], runs["full"])
        report["target_vs_full_met"] = report["speedup_cached_vs_full"]["median"] >= TARGET_VS_FULL
    if "hf" in runs:
        report["hf_generate"] = runs["hf"]
        report["speedup_cached_vs_hf"] = _speedups(runs["cached"], runs["hf"])
        report["target_vs_hf_met"] = report["speedup_cached_vs_hf"]["median"] >= TARGET_VS_HF
        # HF neither masks control tokens nor feeds SEP for punctuation, and it drops/passes
        # over-capacity tokens differently: equal tokens are not expected in general.
        report["hf_same_tokens_as_cached"] = tokens["hf"] == tokens["cached"]
    print_report(report, args.output)
    return 0


if __name__ == "__main__":
    run_cli(main)
