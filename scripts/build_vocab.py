"""Builds a ja-swe vocabulary and emoji table from public Japanese data.

    python scripts/build_vocab.py --size 36000 --vocab_file ja-swe36k.txt \
        --emoji_file emoji.json [--corpus DIR] [--no_wordfreq] [--force]

Data: wordfreq's Japanese word list (pip install -e '.[vocab]') and/or --corpus DIR
(.txt, .html, man pages, optionally .gz); Unicode data from --unicode_dir (Debian unicode-data).
Format: docs/ARCHITECTURE.md "Vocabulary files".
"""
import os
import time


from gptsan import vocab_builder
from gptsan.errors import ArgumentParser, GPTSANError, run_cli


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    sizes = f"{vocab_builder.MIN_VOCAB_SIZE}..{vocab_builder.MAX_VOCAB_SIZE}"
    parser.add_argument("--size", type=int, required=True, help=f"entries, {sizes}")
    parser.add_argument("--vocab_file", required=True, help="output vocabulary file")
    parser.add_argument("--emoji_file", required=True, help="output emoji table (JSON)")
    parser.add_argument("--corpus", default=None, help="directory of Japanese text files")
    parser.add_argument("--no_wordfreq", action="store_true",
                        help="use only --corpus, not wordfreq's Japanese word list")
    parser.add_argument("--unicode_dir", default=vocab_builder.DEFAULT_UNICODE_DIR,
                        help="Unicode Character Database folder (Unihan, emoji/emoji-test.txt)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    size_ok = vocab_builder.MIN_VOCAB_SIZE <= args.size <= vocab_builder.MAX_VOCAB_SIZE
    if not size_ok:
        raise GPTSANError(f"--size must be in {vocab_builder.MIN_VOCAB_SIZE}.."
                          f"{vocab_builder.MAX_VOCAB_SIZE}, got {args.size}")
    if args.no_wordfreq and not args.corpus:
        raise GPTSANError("--no_wordfreq needs --corpus DIR")
    for path in (args.vocab_file, args.emoji_file):
        if os.path.exists(path) and not args.force:
            raise GPTSANError(f"{path} exists (use --force to overwrite)")
    start = time.time()
    texts = vocab_builder.read_corpus(args.corpus, show_progress=True) if args.corpus else ()
    words = None if args.no_wordfreq else vocab_builder.load_wordfreq()
    udata = vocab_builder.UnicodeData(args.unicode_dir)
    lines, emoji = vocab_builder.build_vocabulary(args.size, udata, texts, words,
                                                  show_progress=True)
    vocab_bytes, emoji_bytes = vocab_builder.serialize(lines, emoji)
    vocab_builder.write_atomic(args.vocab_file, vocab_bytes, args.force)
    vocab_builder.write_atomic(args.emoji_file, emoji_bytes, args.force)
    print(f"wrote {args.vocab_file} ({len(lines)} entries, {len(vocab_bytes)} bytes) and "
          f"{args.emoji_file} ({len(emoji['emoji'])} emoji in {len(emoji['emoji_inv'])} classes) "
          f"in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
