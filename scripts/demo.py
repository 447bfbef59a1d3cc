"""`make demo`: shows GPTSAN working on the embedded default, each step labelled with its command.

Runs the real CLIs (`run_generate.py`, `run_languagemodel.py`) on the bundled demo model
`models/demo` (a small Switch Transformer trained on data/sample by `make demo-model`):
generation with the published defaults, streaming generation with the project sampler,
spout-steered generation, hybrid generation with a prefix, [MASK]
filling and a hidden-vector dump to JSON. Without `models/demo` it shows only the tokenizer.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gptsan.errors import GPTSANError, run_cli
from gptsan.tokenization import PROJECT_EMOJI, PROJECT_VOCABULARY, SWEEncoder

DEMO_MODEL = os.path.join("models", "demo")  # relative to ROOT: the path a user types
SAMPLE_TEXTS = (
    "明日の天気は晴れ時々くもり、最高気温は２５度の予想です。",
    "髙島屋と高島屋、會社と会社は同じトークンになります。",
    "詳しくは https://www.example.jp/news まで。お問い合わせ: info@example.com 🙂👍",
    "2024年4月1日(月) 10:30開始、参加費は1,500円(税込)です。",
)
SEED = 1  # sampling seed: the demo prints the same texts on every run
MAX_GENERATE = 60  # tokens per generated text: enough to read, quick on a CPU
SPOUT_CLASSES = ((2, "recipe / レシピ"), (1, "weather / 天気予報"))  # data/sample/classes.csv ids


def banner(title, command):
    print(f"\n=== {title}\n$ {command}", flush=True)


def demo_tokenizer():
    encoder = SWEEncoder.from_files(PROJECT_VOCABULARY, PROJECT_EMOJI)
    banner("Tokenizer: the project's own ja-swe36k vocabulary (not the published one)",
           "python -c \"from gptsan.tokenization import SWEEncoder; "
           "e = SWEEncoder.from_files('ja-swe36k.txt', 'emoji.json'); print(e.encode('...'))\"")
    print(f"vocabulary: {len(encoder)} entries")
    for text in SAMPLE_TEXTS:
        ids = encoder.encode(text, clean=True)
        print(f"\ntext    : {text}")
        print(f"ids     : {ids}")
        print(f"tokens  : {' | '.join(encoder.id_to_token(i) for i in ids)}")
        print(f"decoded : {encoder.decode(ids)}")


def run_cli_step(title, args):
    """Prints `title` and the command a user would type, then runs it (output streams through)."""
    banner(title, shlex.join(["python"] + args))
    start = time.time()
    result = subprocess.run([sys.executable] + args, cwd=ROOT)
    if result.returncode != 0:
        raise GPTSANError(f"demo step '{title}' failed (exit code {result.returncode})")
    print(f"({time.time() - start:.1f} s)", flush=True)


def demo_model(model, work_dir):
    run_cli_step("Text generation with the published defaults (4 rows sampled from the top 120; "
                 "every row printed)",
                 ["run_generate.py", "--model", model, "--context", "今日は", "--max_generate",
                  str(MAX_GENERATE), "--seed", str(SEED), "--quiet"])
    sampling = ["--decoder", "sample", "--top_k", "40", "--max_generate", str(MAX_GENERATE),
                "--seed", str(SEED)]
    run_cli_step("Text generation from a prompt with the project sampler (tokens stream as "
                 "they are sampled)",
                 ["run_generate.py", "--model", model, "--context", "今日は"] + sampling)
    for class_id, name in SPOUT_CLASSES:
        run_cli_step(f"Generation steered by the spout: class {class_id} = {name}",
                     ["run_generate.py", "--model", model, "--context", "まず、",
                      "--spout", str(class_id)] + sampling)
    run_cli_step("Hybrid generation: a bidirectional --prefix, then the causal --context",
                 ["run_generate.py", "--model", model,
                  "--prefix", "梅雨前線が停滞しているため、九州北部では雨が降るでしょう。",
                  "--context", "明日の天気は"] + sampling)
    vectors = os.path.join(work_dir, "vectors.json")
    run_cli_step("[MASK] filling + the hidden vectors of the last token, saved to JSON",
                 ["run_languagemodel.py", "--model", model,
                  "--context", "材料はシンプルですが、少しのコツで[MASK]崩れせず、味のしみたおいしい一品になります。",
                  "--pos_vector", "-1", "--output", vectors])
    with open(vectors, encoding="utf-8") as f:
        dump = json.load(f)
    banner("Reading the hidden-vector dump",
           f"python -c \"import json; d = json.load(open('{vectors}')); "
           "print(d['vector_shape'], d['output_vector'][:4])\"")
    print(f"keys: {', '.join(sorted(dump))}")
    print(f"vector_shape (layers, d_model): {dump['vector_shape']} at position "
          f"{dump['pos_vector']}; first values: "
          f"{[round(v, 4) for v in dump['output_vector'][:4]]}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEMO_MODEL,
                        help="model directory (relative to the project root)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    demo_tokenizer()
    if not os.path.isfile(os.path.join(ROOT, args.model, "parameters.json")):
        print(f"\n{args.model} is missing, so the model demos are skipped. Build it with "
              "`make demo-model` (about 25 minutes on a 2-core CPU), then run `make demo` again.")
        return 0
    with tempfile.TemporaryDirectory(prefix="gptsan-demo-") as work_dir:
        demo_model(args.model, work_dir)
    print(f"\ndemo finished in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
