"""Benchmark: `gptsan.tokenization.SWEEncoder` against the straightforward algorithm.

The baseline is `gptsan.tokenization_reference.ReferenceEncoder`, the tokenizer's definition
(the published algorithm stated plainly: ~4,300 emoji substring scans, the backtracking cleaning
regexes, several dict probes per char). Encodes the same Japanese text with both, as one string
and line by line, with clean False and True; checks the ids are identical and prints ONE JSON
object with chars/s of both and the ratio (best CPU time of --repeats runs; SWEEncoder is
rebuilt for every run, so its caches start cold).

    python scripts/bench_tokenizer.py [--text FILE ...] [--vocabulary V --emoji E] [--repeat N]
"""
import argparse
import glob
import gzip
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gptsan.errors import GPTSANError, run_cli
from gptsan.tokenization import SWEEncoder, read_emoji_file, read_vocabulary_file
from gptsan.tokenization_reference import ReferenceEncoder

REFERENCE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "reference")
SAMPLE_GLOB = os.path.join(ROOT, "data", "sample", "*.txt")
GOLDEN_FILE = "golden_tricky.jsonl.gz"


def default_vocabulary():
    """The official 36k files when the shared reference folder is present, else the project's."""
    official = (os.path.join(REFERENCE_DIR, "ja-swe36k.txt"),
                os.path.join(REFERENCE_DIR, "emoji.json"))
    if all(os.path.isfile(p) for p in official):
        return official
    return os.path.join(ROOT, "ja-swe36k.txt"), os.path.join(ROOT, "emoji.json")


def load_texts(paths, repeat):
    """The benchmark text: the given files, else data/sample/*.txt, else the golden texts."""
    if paths:
        texts = []
        for path in paths:
            try:
                with open(path, encoding="utf-8") as f:
                    texts.append(f.read())
            except (OSError, UnicodeDecodeError) as err:
                raise GPTSANError(f"cannot read --text {path}: {err}") from None
        source = paths
    elif glob.glob(SAMPLE_GLOB):
        source = sorted(glob.glob(SAMPLE_GLOB))
        texts = [open(p, encoding="utf-8").read() for p in source]
    else:
        golden = os.path.join(REFERENCE_DIR, GOLDEN_FILE)
        if not os.path.isfile(golden):
            raise GPTSANError("no text: pass --text FILE (no data/sample/*.txt, no golden file)")
        with gzip.open(golden, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        texts = [r["decoded"] for r in records if "decoded" in r and len(r["text"]) < 200]
        source = [golden]
    text = "\n".join(texts) * repeat
    return text, source


def time_encode(make_encoder, inputs, clean, repeats):
    """Best CPU time of `repeats` runs, each with a fresh encoder (SWEEncoder caches decisions,
    so every run starts cold); the ids of the last run."""
    best = float("inf")
    for _ in range(repeats):
        encoder = make_encoder()
        start = time.process_time()
        ids = [encoder.encode(t, clean=clean) for t in inputs]
        best = min(best, time.process_time() - start)
    return best, ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", nargs="+", help="UTF-8 text files (default: data/sample/*.txt)")
    parser.add_argument("--vocabulary", help="vocabulary file (default: the official 36k file)")
    parser.add_argument("--emoji", help="emoji table (default: the one of the vocabulary)")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the text this many times")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (best is kept)")
    args = parser.parse_args(argv)
    vocab_path, emoji_path = default_vocabulary()
    vocab_path, emoji_path = args.vocabulary or vocab_path, args.emoji or emoji_path
    vocab_lines, emoji = read_vocabulary_file(vocab_path), read_emoji_file(emoji_path)
    baseline = ReferenceEncoder(vocab_lines, emoji)
    text, source = load_texts(args.text, args.repeat)
    report = {"vocabulary": vocab_path, "text": source, "chars": len(text),
              "lines": text.count("\n") + 1, "cases": {}}
    for mode, inputs in (("whole", [text]), ("lines", text.split("\n"))):
        for clean in (False, True):
            base_time, base_ids = time_encode(lambda: baseline, inputs, clean, args.repeats)
            fast_time, fast_ids = time_encode(lambda: SWEEncoder(vocab_lines, emoji), inputs, clean,
                                              args.repeats)
            if fast_ids != base_ids:
                raise GPTSANError(f"outputs differ ({mode}, clean={clean})")
            report["cases"][f"{mode}_clean_{clean}".lower()] = {
                "baseline_chars_per_s": round(len(text) / base_time),
                "swe_encoder_chars_per_s": round(len(text) / fast_time),
                "speedup": round(base_time / fast_time, 1),
                "tokens": sum(len(i) for i in fast_ids),
            }
    print(json.dumps(report, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
