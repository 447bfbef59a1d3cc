"""Compares the token counts of two ja-swe vocabularies on real Japanese prose; prints JSON.

    python scripts/bench_vocab.py [--vocab_file ja-swe36k.txt --emoji_file emoji.json]
        [--reference_dir ../shared/reference] [--text PATH ...]

Default text: the Japanese prose lines of Debian's Japanese manuals (debian-reference-ja,
aptitude-doc-ja, debian-edu-doc-ja, maint-guide-ja, debian-faq-ja: apt-get install them).
None of them is used to build the project vocabulary (that uses manpages-ja + wordfreq).
Both vocabularies are tokenised by the same class, gptsan.tokenization.SWEEncoder.
"""
import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gptsan import vocab_builder
from gptsan.errors import GPTSANError, run_cli
from gptsan.tokenization import SWEEncoder

# (Debian package, file pattern) of the default evaluation text.
DEFAULT_TEXTS = (
    ("debian-reference-ja", "/usr/share/debian-reference/*.ja.html"),
    ("aptitude-doc-ja", "/usr/share/doc/aptitude/html/ja/*.html"),
    ("debian-edu-doc-ja", "/usr/share/doc/debian-edu-doc-ja/debian-edu-bookworm-manual.html"),
    ("maint-guide-ja", "/usr/share/doc/maint-guide-ja/html/*.ja.html"),
    ("debian-faq-ja", "/usr/share/doc/debian/FAQ/ja/*.ja.html"),
)
MIN_TEXT_BYTES = 1_000_000  # the benchmark is meaningful on >= 1 MB of prose


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab_file", default=os.path.join(ROOT, "ja-swe36k.txt"))
    parser.add_argument("--emoji_file", default=os.path.join(ROOT, "emoji.json"))
    parser.add_argument("--reference_dir", default=os.path.join(ROOT, "..", "shared", "reference"),
                        help="folder with the official ja-swe36k.txt and emoji.json")
    parser.add_argument("--text", action="append", default=None,
                        help="evaluation file or directory (repeatable); default: Debian manuals")
    parser.add_argument("--min_bytes", type=int, default=MIN_TEXT_BYTES,
                        help="refuse to report on less UTF-8 text than this")
    return parser.parse_args(argv)


def evaluation_files(paths):
    """Sorted evaluation files: the given files/directories, or the default Debian manuals."""
    if paths:
        files = []
        for path in paths:
            if os.path.isdir(path):
                files += vocab_builder.corpus_files(path)
            elif os.path.isfile(path):
                files.append(path)
            else:
                raise GPTSANError(f"evaluation text not found: {path}")
        return files
    files, missing = [], []
    for package, pattern in DEFAULT_TEXTS:
        found = sorted(glob.glob(pattern))
        files += found
        if not found:
            missing.append(package)
    if missing:
        raise GPTSANError("evaluation text missing: apt-get install -y " + " ".join(missing))
    return files


def count_tokens(encoder_class, vocab_file, emoji_file, text):
    """Number of ids of `text` (clean=False) with one vocabulary."""
    for path in (vocab_file, emoji_file):
        if not os.path.isfile(path):
            raise GPTSANError(f"file not found: {path}")
    return len(encoder_class.from_files(vocab_file, emoji_file).encode(text))


def main(argv=None):
    args = parse_args(argv)
    files = evaluation_files(args.text)
    text = "\n".join(vocab_builder.prose_lines(vocab_builder.read_text_file(f)) for f in files)
    size = len(text.encode("utf-8"))
    if size < args.min_bytes:
        raise GPTSANError(f"only {size} bytes of Japanese prose (need {args.min_bytes})")
    official = count_tokens(SWEEncoder, os.path.join(args.reference_dir, "ja-swe36k.txt"),
                            os.path.join(args.reference_dir, "emoji.json"), text)
    project = count_tokens(SWEEncoder, args.vocab_file, args.emoji_file, text)
    report = {
        "files": len(files),
        "bytes": size,
        "chars": len(text),
        "official": {"tokens": official, "tokens_per_char": round(official / len(text), 4)},
        "project": {"tokens": project, "tokens_per_char": round(project / len(text), 4)},
        "ratio": round(project / official, 4),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
