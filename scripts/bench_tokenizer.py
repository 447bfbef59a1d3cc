"""Benchmark: `gptsan.tokenization.SWEEncoder` against the published tokenizer algorithm.

Encodes the same Japanese text with both, as one string and line by line, with clean False and
True; checks the ids are identical and prints ONE JSON object with chars/s of both and the ratio
(best CPU time of --repeats runs; SWEEncoder is rebuilt for every run, so its caches start cold).

    python scripts/bench_tokenizer.py [--text FILE ...] [--vocabulary V --emoji E] [--repeat N]
"""
import argparse
import glob
import gzip
import json
import os
import re
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gptsan.errors import GPTSANError, run_cli  # noqa: E402
from gptsan.tokenization import (SWEEncoder, read_emoji_file,  # noqa: E402
                                 read_vocabulary_file)

REFERENCE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "reference")
SAMPLE_GLOB = os.path.join(ROOT, "data", "sample", "*.txt")
GOLDEN_FILE = "golden_tricky.jsonl.gz"


# ==============================================================================================
# BASELINE: a straightforward re-implementation of the PUBLISHED algorithm (tanreinama/GPTSAN
# encode_swe.py `SWEEncoder_ja.encode`), kept deliberately as published, for comparison only:
# ~4,300 str.replace calls for emoji, the backtracking cleaning regexes, and at every position a
# probe of every window length, collecting candidates and sorting them by id.
# ==============================================================================================

class PublishedBaseline:
    """The published encoder's algorithm, unoptimised (baseline for speed and output)."""

    def __init__(self, vocab_lines, emoji_dict):
        self.entries = [[b] if (b == "," or "," not in b) else b.split(",") for b in vocab_lines]
        self.swe = {}
        for idx, forms in enumerate(self.entries):
            for form in forms:
                self.swe[form] = idx
        self.emoji = emoji_dict
        self.maxlen = int(np.max([len(w) for w in self.swe]))
        self.cleaners = [
            (re.compile(r"(https?|ftp)(:\/\/[-_\.!~*\'()a-zA-Z0-9;\/?:\@&=\+$,%#]+)"), "<URL>"),
            (re.compile(r"[A-Za-z0-9\._+]*@[\-_0-9A-Za-z]+(\.[A-Za-z]+)*"), "<EMAIL>"),
            (re.compile(r"[\(]{0,1}[0-9]{2,4}[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}"),
             "<TEL>"),
            (re.compile(r"([12]\d{3}[/\-年])*(0?[1-9]|1[0-2])[/\-月]((0?[1-9]|[12][0-9]|3[01])日?)*"
                        r"(\d{1,2}|:|\d{1,2}時|\d{1,2}分|\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\)"
                        r"|㈰|㈪|㈫|㈬|㈭|㈮|㈯)*"), "<DATE>"),
            (re.compile(r"(明治|大正|昭和|平成|令和|㍾|㍽|㍼|㍻|\u32ff)\d{1,2}年(0?[1-9]|1[0-2])月"
                        r"(0?[1-9]|[12][0-9]|3[01])日(\d{1,2}|:|\d{1,2}時|\d{1,2}分|\(日\)|\(月\)|\(火\)"
                        r"|\(水\)|\(木\)|\(金\)|\(土\)|㈰|㈪|㈫|㈬|㈭|㈮|㈯)*"), "<DATE>"),
            (re.compile(r"((0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*億)*"
                        r"((0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*万)*"
                        r"((0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*千)*"
                        r"(0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*"
                        r"(千円|万円|千万円|円|千ドル|万ドル|千万ドル|ドル|千ユーロ|万ユーロ|千万ユーロ|ユーロ)+"
                        r"(\(税込\)|\(税抜\)|\+tax)*"), "<PRICE>"),
        ]
        self.blocks = str.maketrans({chr(c): "<BLOCK>" for c in range(0x2500, 0x25A0)})

    def clean_text(self, text):
        for pattern, placeholder in self.cleaners:
            text = pattern.sub(placeholder, text)
        text = text.translate(self.blocks)
        while "<BLOCK><BLOCK>" in text:
            text = text.replace("<BLOCK><BLOCK>", "<BLOCK>")
        return text

    def encode(self, text, clean=False):
        for old, new in ((" ", "<SP>"), ("\u3000", "<SP>"), ("\r\n", "<BR>"), ("\n", "<BR>"),
                         ("\r", "<BR>"), ("\t", "<TAB>"), ("\u2014", "ー"), ("\u2212", "ー")):
            text = text.replace(old, new)
        for surface, token in self.emoji["emoji"].items():
            if surface in text:
                text = text.replace(surface, token)
        if clean:
            text = self.clean_text(text)
        pos, result = 0, []
        while pos < len(text):
            end = min(len(text), pos + self.maxlen + 1) if text[pos] == "<" else pos + 3
            candidates = []
            for e in range(end, pos, -1):
                word = text[pos:e]
                if word in self.swe:
                    if word[0] == "<" and len(word) > 2:
                        candidates = [(self.swe[word], e)]
                        break
                    candidates.append((self.swe[word], e))
            if candidates:
                token_id, pos = sorted(candidates, key=lambda c: c[0])[0]
                result.append(token_id)
                continue
            char = text[pos]
            data = char.encode()  # raises UnicodeEncodeError on a lone surrogate, as published
            code = (data[0] << 8) + data[1] if len(data) == 2 else None
            code3 = (data[0] << 16) + (data[1] << 8) + data[2] if len(data) == 3 else None
            if code is not None and (0xC2A1 <= code <= 0xC2BF or 0xC780 <= code <= 0xC783
                                     or 0xCAB9 <= code <= 0xCBBF or 0xCC80 <= code <= 0xCDA2):
                result.append(self.swe["<KIGOU>"])
            elif code3 is not None and 0xE28080 <= code3 <= 0xE2B07F:
                result.append(self.swe["<U2000U2BFF>"])
            else:
                result.extend(self.swe["<|byte%d|>" % b] for b in data)
            pos += 1
        return result


# ==============================================================================================


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
    baseline = PublishedBaseline(vocab_lines, emoji)
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
