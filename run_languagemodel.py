"""Fills [MASK] marks with a GPTSAN model and extracts its internal vectors.

    python run_languagemodel.py --model DIR --context "武田信玄は、[MASK]時代の武将" \
        [--mask "[MASK]"] [--pos_vector -1] [--fill_mode published|prefix]
        [--spout none|uniform|zeros|ID|FILE] [--output OUT.json [--force]] [--vectors_all V.npy]

By default the published script's rules (HEAD run_languagemodel.py; `gptsan.fill_mask`): a
hybrid model reads `SOT piece MSK piece ...` bidirectionally except the last token, a MSK takes
the argmax of the logits at the position before it (shifted MLM), and each output score is the
logit of the input token there. Prints the filled text, output tokens, scores and the shape of
the vector: the hidden state of every layer at `--pos_vector` (-1: the last input token),
concatenated (`layers * d` numbers). `--output` writes ASCII-escaped JSON whose first keys are
the published output_text, output_tokens, output_scores, output_vector, input_text,
input_tokens (then: output_logprobs, vector_shape, pos_vector, fill_mode, spout); `--vectors_all`
saves every position's vectors as a float32 array [positions, layers, d]. `--spout` (a project
addition) conditions the fill on a class as in run_generate.py.
"""

from gptsan import fileio
from gptsan import fill_mask as fm
from gptsan import generation as gen
from gptsan.data import SpecialTokens
from gptsan.errors import ArgumentParser, GPTSANError, run_cli
from gptsan.prompts import add_spout_arguments, parse_spout


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gptsan-backbone-2.8B", help="model directory")
    p.add_argument("--context", default="", help="input text with mask marks")
    p.add_argument("--mask", default="[MASK]", help="the mask marker in --context")
    p.add_argument("--pos_vector", type=int, default=-1,
                   help="token position to pull the internal vector from (-1: the last token)")
    p.add_argument("--fill_mode", default="published", choices=fm.FILL_MODES,
                   help="published: HEAD's rules; prefix: every token bidirectional, masks "
                        "always split, fills never control ids (see gptsan/fill_mask.py)")
    add_spout_arguments(p)
    p.add_argument("--seed", type=int, default=None, help="seed of --spout uniform")
    p.add_argument("--output", default="", help="output JSON file")
    p.add_argument("--force", action="store_true", help="overwrite --output / --vectors_all")
    p.add_argument("--vectors_all", default="", help="save all positions' vectors (.npy)")
    p.add_argument("--vocabulary", default=None, help="vocabulary (default: the model's copy)")
    p.add_argument("--emoji", default=None, help="emoji table (default: the model's copy)")
    p.add_argument("--mesh_shape", default=None, help='mesh, e.g. "batch:1,model:2"')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.mask:
        raise GPTSANError("--mask must not be empty")
    fileio.check_output_path(args.output, args.force)
    fileio.check_output_path(args.vectors_all, args.force)
    if args.vectors_all and not args.vectors_all.endswith(".npy"):
        raise GPTSANError(f"--vectors_all must name a .npy file, got {args.vectors_all}")
    encoder, config = gen.open_model_files(args.model, args.vocabulary, args.emoji)
    special = SpecialTokens.from_encoder(encoder)
    input_tokens, bidirectional = fm.fill_inputs(special, encoder.encode, args.context,
                                                 args.mask, config.model.train_mode,
                                                 args.fill_mode)
    spout = parse_spout(args.spout, config.model.num_spout, 1, args.seed, args.spout_mode)
    spout_slots = 0 if spout is None else 1
    limit = config.model.num_contexts - spout_slots
    if len(input_tokens) > limit:
        raise GPTSANError(f"the input is {len(input_tokens)} tokens (with SOT) but the model "
                          f"takes at most {limit}{' with a spout' if spout_slots else ''}"
                          "; shorten the context")
    pos = fm.resolve_position(args.pos_vector, len(input_tokens))
    precontext = fm.num_precontext(len(input_tokens), spout_slots, bidirectional, args.fill_mode)
    with gen.open_predictor(args.model, mesh_shape=args.mesh_shape) as predictor:
        result = fm.fill_mask(predictor, special, input_tokens, precontext, spout, args.fill_mode)
    vector = result.vectors[pos]  # [layers, d]
    text = encoder.decode(result.output_tokens)

    print("{OUTPUT TEXTS}")
    print(text)
    print("{OUTPUT TOKENS}")
    print(result.output_tokens)
    print("{OUTPUT SCORES}")
    print(result.output_scores)
    print("{OUTPUT VECTOR SHAPE}")
    print((vector.size,))

    if args.vectors_all:
        fileio.save_npy_atomic(args.vectors_all, result.vectors.astype("float32"))
    if args.output:
        fileio.write_json_atomic(args.output, {
            "output_text": text,
            "output_tokens": result.output_tokens,
            "output_scores": result.output_scores,
            "output_vector": vector.astype(float).reshape(-1).tolist(),
            "input_text": args.context,
            "input_tokens": result.input_tokens,
            "output_logprobs": result.output_logprobs,
            "vector_shape": list(vector.shape),
            "pos_vector": pos,
            "fill_mode": args.fill_mode,
            "spout": args.spout,
        }, ascii_only=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
