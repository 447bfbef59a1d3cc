"""Encodes a corpus of UTF-8 `.txt` files into a compressed `.npz` of token arrays.

The published `encode_swe.py` CLI and its flags: the files are concatenated, each followed by
`<|endoftext|>`, and cut into one array whenever the text reaches `--combine` characters;
the arrays are int64 as published (`--dtype int32` halves the file).
`SWEEncoder_ja(bpe_lines, emoji_dict)` stays available for old scripts.

    python encode_swe.py --src_dir DIR_OR_GLOB --dst_file corpus.npz [--clean_text]
        --vocabulary ja-swe36k.txt [--emoji emoji.json] [--num_process 8] [--combine 50000]
        [--dtype int64]

Differences from the published script: files are read in sorted path order (the output does
not depend on the number of processes); a file that cannot be read or is not UTF-8 is reported
on stderr and skipped; arrays are cut by `--combine` only (the published script also ends one
at the end of every directory, without `--clean_text`, and keeps its text, which is encoded
again at the start of the next array); the output is written atomically.
"""
import glob
import os
import sys
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from gptsan import fingerprint
from gptsan.errors import ArgumentParser, GPTSANError, run_cli
from gptsan.tokenization import (CONTROL_TOKENS, SWEEncoder, read_emoji_file,
                                 read_vocabulary_file)

END_OF_TEXT = CONTROL_TOKENS[-1]  # appended after every file, as published
DEFAULT_COMBINE = 50000  # published default: minimum characters per array
DEFAULT_NUM_PROCESS = 8  # published default
TOKEN_DTYPES = ("int64", "int32")  # first: published (np.stack of Python ints)


class SWEEncoder_ja(SWEEncoder):  # noqa: N801 (the published name)
    """The published encoder class: `SWEEncoder_ja(bpe_lines, emoji_dict)`, with its `bpe`
    (forms per id) and `swe` (form -> id) attributes (and `clean_text`, as every SWEEncoder)."""

    def __init__(self, bpe, emoji):
        super().__init__(bpe, emoji)

    @property
    def bpe(self):
        return self.entries

    @property
    def swe(self):
        return self.vocab


def list_text_files(src):
    """Sorted `.txt` files under a directory (recursively), or the files a glob matches."""
    if os.path.isdir(src):
        paths = [os.path.join(d, f) for d, _, files in os.walk(src)
                 for f in files if f.endswith(".txt")]
    else:
        paths = [p for p in glob.glob(src, recursive=True) if not os.path.isdir(p)]
    if not paths:
        raise GPTSANError(f"no .txt files in {src}" if os.path.isdir(src)
                          else f"--src_dir {src} is neither a directory nor a glob matching files")
    return sorted(paths)


def read_text_file(path):
    """(text, None) or (None, reason) for a file that cannot be read or is not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return None, f"cannot read ({err.strerror or err})"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})"


def combine_files(paths, combine, on_skip):
    """Yields (text, number_of_files): files joined with <|endoftext|> after each, cut whenever
    the text reaches `combine` chars (the published rule). Unreadable files go to `on_skip`."""
    parts, length, count = [], 0, 0
    for path in paths:
        text, problem = read_text_file(path)
        if problem is not None:
            on_skip(path, problem)
            continue
        parts += (text, END_OF_TEXT)
        length += len(text) + len(END_OF_TEXT)
        count += 1
        if length >= combine:
            yield "".join(parts), count
            parts, length, count = [], 0, 0
    if parts:
        yield "".join(parts), count


_worker_encoder = None


def _init_worker(vocab_lines, emoji, clean, dtype, encoder=None):
    global _worker_encoder
    _worker_encoder = (encoder or SWEEncoder(vocab_lines, emoji), clean, dtype)


def _encode_chunk(item):
    text, count = item
    encoder, clean, dtype = _worker_encoder
    return np.asarray(encoder.encode(text, clean=clean), dtype=dtype), count


def encode_corpus(paths, vocab_lines, emoji, clean=False, combine=DEFAULT_COMBINE,
                  num_process=DEFAULT_NUM_PROCESS, on_skip=None, encoder=None,
                  dtype=TOKEN_DTYPES[0]):
    """Token arrays (`dtype`) of the files, combined as the published script does; `encoder`
    (built from the vocabulary) saves building one again when `num_process` is 1.

    Returns (arrays, skipped) where skipped lists (path, reason) of files left out.
    """
    skipped = []

    def skip(path, reason):
        skipped.append((path, reason))
        if on_skip is not None:
            on_skip(path, reason)

    chunks = combine_files(paths, combine, skip)
    arrays = []
    with tqdm(total=len(paths), unit="file", desc="encode") as bar:
        if num_process <= 1:
            _init_worker(vocab_lines, emoji, clean, dtype, encoder)
            for array, count in map(_encode_chunk, chunks):
                arrays.append(array)
                bar.update(count)
        else:
            with Pool(num_process, _init_worker, (vocab_lines, emoji, clean, dtype)) as pool:
                for array, count in pool.imap(_encode_chunk, chunks):
                    arrays.append(array)
                    bar.update(count)
        bar.update(len(paths) - bar.n)
    return arrays, skipped


def save_npz_atomic(path, arrays, force=False):
    """`np.savez_compressed(path, *arrays)` through a temporary file and `os.replace`."""
    if os.path.exists(path) and not force:
        raise GPTSANError(f"{path} exists (pass --force to overwrite)")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "xb") as f:
            np.savez_compressed(f, *arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src_dir", required=True,
                        help="directory of .txt files (recursive) or a glob")
    parser.add_argument("--dst_file", required=True,
                        help="output .npz (the suffix is added if missing)")
    parser.add_argument("--vocabulary", default=None,
                        help="ja-swe vocabulary file (no default: the project's ja-swe36k.txt "
                             "and the published one share the name)")
    parser.add_argument("--emoji", default=None,
                        help="emoji table of the vocabulary (default: emoji.json next to it)")
    parser.add_argument("--num_process", type=int, default=DEFAULT_NUM_PROCESS,
                        help="worker processes")
    parser.add_argument("--combine", type=int, default=DEFAULT_COMBINE,
                        help="concatenate files with <|endoftext|> separator into chunks of this "
                             "minimum size (characters)")
    parser.add_argument("--clean_text", action="store_true",
                        help="replace URLs, e-mails, phone numbers, dates, prices by placeholders")
    parser.add_argument("--dtype", choices=TOKEN_DTYPES, default=TOKEN_DTYPES[0],
                        help="integer type of the arrays (int64 as published; int32 halves "
                             "the file)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --dst_file")
    parser.add_argument("--tmp_dir", help="accepted for old command lines; unused (no temp folder)")
    parser.add_argument("--tmpsilze", type=int, help="accepted for old command lines; unused")
    args = parser.parse_args(argv)
    if args.num_process < 1 or args.combine < 1:
        raise GPTSANError("--num_process and --combine must be positive")
    dst = args.dst_file if args.dst_file.endswith(".npz") else args.dst_file + ".npz"
    if os.path.exists(dst) and not args.force:
        raise GPTSANError(f"{dst} exists (pass --force to overwrite)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(dst))):
        raise GPTSANError(f"the folder of --dst_file {dst} does not exist")
    vocab = fingerprint.data_tool_files(args.vocabulary, args.emoji)
    paths = list_text_files(args.src_dir)
    vocab_lines, emoji = read_vocabulary_file(vocab.vocab), read_emoji_file(vocab.emoji)
    encoder = SWEEncoder(vocab_lines, emoji)  # fails fast on a bad vocabulary
    fingerprint.announce(vocab)

    def report_skip(path, reason):
        tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)

    arrays, skipped = encode_corpus(paths, vocab_lines, emoji, clean=args.clean_text,
                                    combine=args.combine, num_process=args.num_process,
                                    on_skip=report_skip, encoder=encoder, dtype=args.dtype)
    if not arrays:
        raise GPTSANError(f"none of the {len(paths)} files could be read; nothing written")
    save_npz_atomic(dst, arrays, force=args.force)
    tokens = sum(len(a) for a in arrays)
    print(f"encoded {len(paths) - len(skipped)} files ({len(skipped)} skipped) into "
          f"{len(arrays)} arrays, {tokens} tokens: {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
