"""Converts between a GPTSAN model directory (TF checkpoint) and an HF transformers directory.

    python scripts/convert_checkpoint.py --src HF_DIR --dst MODEL_DIR [--vocabulary VOCAB
        --emoji EMOJI] [--force]          # HF GPTSanJapanese -> GPTSAN
    python scripts/convert_checkpoint.py --src MODEL_DIR --dst HF_DIR [--force]   # GPTSAN -> HF

The direction is detected from the source directory (`--from hf|gptsan` forces it). A published
original checkpoint directory (parameters.json + model.ckpt-*) is a GPTSAN model directory.
The vocabulary goes along (default: the source's own copy) and must be the one the source
records (gptsan/fingerprint.py); the published weights need the published vocabulary, never
this repository's ja-swe36k.txt. HF weights may be model.safetensors or pytorch_model.bin
(single or sharded; float32, float16 or bfloat16). Tensors are read, converted and written one
at a time, so memory stays near the largest tensor whatever the model size.
"""


from gptsan.checkpoint import (convert_gptsan_to_hf, convert_hf_to_gptsan,
                               detect_format)
from gptsan.tensorio import use_plain_cpu_allocator
from gptsan.errors import ArgumentParser, GPTSANError, run_cli
from gptsan.tensorio import FLOAT_DTYPES


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source_format", choices=("hf", "gptsan"), default=None,
                        help="source format (default: detected from --src)")
    parser.add_argument("--src", required=True, help="source directory")
    parser.add_argument("--dst", required=True, help="destination directory (must not exist "
                        "or be empty, unless --force)")
    parser.add_argument("--vocabulary", default=None, help="vocabulary file to copy into the "
                        "GPTSAN model directory (HF -> GPTSAN; default: the HF dir's vocab.txt)")
    parser.add_argument("--emoji", default=None, help="emoji table to copy into the GPTSAN model "
                        "directory (HF -> GPTSAN; default: the HF dir's emoji.json)")
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32",
                        help="storage dtype of the written weights (float16/bfloat16 halve the "
                             "files; inference computes in float32)")
    parser.add_argument("--force", action="store_true", help="replace an existing destination")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    use_plain_cpu_allocator()
    source_format = args.source_format or detect_format(args.src)
    if source_format == "hf":
        config = convert_hf_to_gptsan(args.src, args.dst, vocab=args.vocabulary, emoji=args.emoji,
                                      force=args.force, progress=True, dtype=args.dtype)
    else:
        if args.vocabulary or args.emoji:
            raise GPTSANError("--vocabulary/--emoji apply to HF -> GPTSAN only; a GPTSAN model "
                              "directory already holds its own copies")
        config = convert_gptsan_to_hf(args.src, args.dst, force=args.force, progress=True,
                                      dtype=args.dtype)
    model = config.model
    print(f"wrote {args.dst}: {model.num_switch_layers} switch + {model.num_ext_layers} extra "
          f"layers, d_model {model.num_hidden}, {model.num_header} heads, "
          f"vocab {model.num_vocabulary}")
    return 0


if __name__ == "__main__":
    run_cli(main)
