"""Fills [MASK] marks with a GPTSAN model and extracts its internal vectors.

    python run_languagemodel.py --model DIR --context "武田信玄は、[MASK]時代の武将" \
        [--mask "[MASK]"] [--pos_vector -1] [--spout none|uniform|zeros|ID|FILE]
        [--output OUT.json [--force]] [--vectors_all V.npy]

Input `SOT piece MSK piece ...` is read bidirectionally (hybrid/mlm models); as in the
published script the logits at position i predict token i+1 (shifted MLM). Prints the filled
text, output tokens, per-token scores (the logit of each output token) and the shape of the
vector: the hidden state of every layer at `--pos_vector` (published default -1: the last
input token), concatenated (`layers * d` numbers). `--output` writes the published JSON keys
output_text, output_tokens, output_scores, output_vector, input_text, input_tokens (+ new:
output_logprobs, vector_shape, pos_vector); `--vectors_all` saves every position's vectors as
a float32 array [positions, layers, d]. `--spout` conditions the fill on a class as in
run_generate.py (the spout slot comes before SOT and is part of the bidirectional prefix).
"""

from gptsan import fileio
from gptsan.errors import ArgumentParser, GPTSANError, run_cli
from gptsan import generation as gen


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gptsan-backbone-2.8B", help="model directory")
    p.add_argument("--context", default="", help="input text with mask marks")
    p.add_argument("--mask", default="[MASK]", help="the mask marker in --context")
    p.add_argument("--pos_vector", type=int, default=-1,
                   help="token position to pull the internal vector from (-1: the last token)")
    gen.add_spout_arguments(p)
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
    if not args.context:
        raise GPTSANError("the context is empty: give --context")
    if not args.mask:
        raise GPTSANError("--mask must not be empty")
    fileio.check_output_path(args.output, args.force)
    fileio.check_output_path(args.vectors_all, args.force)
    if args.vectors_all and not args.vectors_all.endswith(".npy"):
        raise GPTSANError(f"--vectors_all must name a .npy file, got {args.vectors_all}")
    encoder, config = gen.open_model_files(args.model, args.vocabulary, args.emoji)
    special = gen.SpecialTokens.from_encoder(encoder)
    pieces = [encoder.encode(piece) for piece in args.context.split(args.mask)]
    input_tokens = gen.mask_fill_inputs(special, pieces)
    spout = gen.parse_spout(args.spout, config.model.num_spout, args.seed, args.spout_mode)
    limit = config.model.num_contexts - (0 if spout is None else 1)
    if len(input_tokens) > limit:
        raise GPTSANError(f"the input is {len(input_tokens)} tokens (with SOT) but the model "
                          f"takes at most {limit}{' with a spout' if spout is not None else ''}"
                          "; shorten the context")
    if len(input_tokens) < 2:
        raise GPTSANError("the context encodes to no tokens")
    pos = gen.resolve_position(args.pos_vector, len(input_tokens))
    predictor = gen.open_predictor(args.model, batch_size=1, mesh_shape=args.mesh_shape)
    result = gen.fill_mask(predictor, special, input_tokens,
                           bidirectional=config.model.train_mode != "lm", spout=spout)
    vector = result.vectors[pos]  # [layers, d]
    text = encoder.decode(result.output_tokens)

    print("{OUTPUT TEXTS}")
    print(text)
    print("{OUTPUT TOKENS}")
    print(result.output_tokens)
    print("{OUTPUT SCORES}")
    print(result.output_scores)
    print("{OUTPUT VECTOR SHAPE}")
    print(f"({vector.size},)  # {vector.shape[0]} layers x {vector.shape[1]} at position {pos}")

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
            "spout": args.spout,
        })
    return 0


if __name__ == "__main__":
    run_cli(main)
