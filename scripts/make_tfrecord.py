"""Text files -> GPTSAN TFRecord training shards (flags of the published make_tfrecord_simple).

    python scripts/make_tfrecord.py --input_files 'data/sample/*.txt' --mode hybrid \
        --num_context 1280 --output_prefix out/hybrid --seed 0

--input_files takes glob patterns, list files (one path, or `path id`, per line) and class CSVs
(header `filename,fileid`: each file's examples get that id as feature `i`; without ids `i` is a
running example number). The same --seed gives byte-identical shards for any --num_process.
"""
import argparse
import os
import shutil
import sys
import tempfile


from tqdm import tqdm

from gptsan import data, fingerprint, records
from gptsan.errors import ArgumentParser, GPTSANError, run_cli



def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input_files", nargs="+", required=True,
                   help="input text files (like 'data/*.txt'), a list file or a "
                        "'filename,fileid' CSV")
    p.add_argument("--mode", default="lm", choices=data.MODES,
                   help="'lm' language model, 'mlm' masked language model, 'hybrid' both")
    p.add_argument("--no_offset_mlm", action="store_true",
                   help="mlm only: shift x left by one so masks sit at their target position")
    p.add_argument("--vocabulary", default=None,
                   help="vocabulary file (no default: the project's ja-swe36k.txt and the "
                        "published one share the name)")
    p.add_argument("--emoji", default=None, help="emoji table (default: emoji.json next to "
                                                 "--vocabulary)")
    p.add_argument("--num_process", type=int, default=8, help="worker processes")
    p.add_argument("--num_context", type=int, default=1280, help="context token length")
    p.add_argument("--num_mask", type=float, default=0.08,
                   help="mask insertion rate for the masked language model")
    p.add_argument("--max_mask", type=int, default=100, help="max masks per example")
    p.add_argument("--use_nextsent", action="store_true",
                   help="next-sentence training in mlm/hybrid examples")
    p.add_argument("--nextsent_rate", type=float, default=1.0,
                   help="share of mlm/hybrid examples given a next sentence (with --use_nextsent)")
    p.add_argument("--hybrid_rate", type=float, default=1.0,
                   help="mode hybrid: share of examples with a prefix (the rest are lm)")
    p.add_argument("--data_per_file", type=int, default=1000000, help="examples per shard")
    p.add_argument("--output_prefix", "--output", default=None,
                   help="shards are <prefix>_0000.tfrecord, ... (default: the mode name)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--clean_text", action=argparse.BooleanOptionalAction, default=True,
                   help="replace URLs, e-mails, phone numbers, dates and prices by placeholder "
                        "tokens (--no_clean_text keeps them)")
    p.add_argument("--split_on_blank", action="store_true",
                   help="blank lines separate documents (default: one file is one document)")
    p.add_argument("--force", action="store_true", help="overwrite existing shards")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    options = data.ExampleOptions(
        mode=args.mode, num_context=args.num_context, num_mask=args.num_mask,
        max_mask=args.max_mask, use_nextsent=args.use_nextsent, nextsent_rate=args.nextsent_rate,
        hybrid_rate=args.hybrid_rate, clean_text=args.clean_text,
        split_on_blank=args.split_on_blank, no_offset_mlm=args.no_offset_mlm)
    if args.num_process < 1:
        raise GPTSANError(f"--num_process must be >= 1, got {args.num_process}")
    files = data.resolve_input_files(args.input_files)
    prefix = args.output_prefix or args.mode
    vocab = fingerprint.data_tool_files(args.vocabulary, args.emoji)
    writer = records.ShardWriter(prefix, args.data_per_file, force=args.force)
    from gptsan.tokenization import SWEEncoder

    encoder = SWEEncoder.from_files(vocab.vocab, vocab.emoji)
    fingerprint.announce(vocab)
    special = data.SpecialTokens.from_encoder(encoder)
    tasks = data.order_files(files, args.seed)

    spill_dir = tempfile.mkdtemp(prefix=".make_tfrecord-", dir=os.path.dirname(prefix) or ".")
    summary = data.Summary(options.num_context, special.not_token)
    try:
        results = data.process_files(tasks, encoder, special, options, args.seed, spill_dir,
                                     args.num_process)
        for result in tqdm(results, total=len(tasks), unit="file", desc="make_tfrecord"):
            if result.error:
                tqdm.write(f"skipped: {result.error}", file=sys.stderr)
                summary.skipped += 1
                continue
            if result.spill:
                rows = data.load_spill(result.spill)
                os.remove(result.spill)
                for x, y, num_input, given in zip(rows["x"], rows["y"], rows["num_input"],
                                                  rows["class_id"]):
                    class_id = int(given) if given >= 0 else writer.count  # else a running id
                    writer.write(records.serialize_example(x, y, class_id, num_input))
                    summary.add(x, y, int(given))
        if writer.count == 0:
            raise GPTSANError(f"no examples made from {len(tasks)} file(s) "
                              f"({summary.skipped} skipped); nothing written")
        paths = writer.commit()
        fingerprint.write_records_vocabulary(prefix, vocab)  # <prefix>.vocabulary.json
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
    print(summary.report(paths, len(tasks)))
    return 0


if __name__ == "__main__":
    run_cli(main)
