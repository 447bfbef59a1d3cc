"""Generates Japanese text with a GPTSAN model, streaming tokens as they are produced.

    python run_generate.py --model DIR --context "織田信長は、" [--prefix TEXT] [--top_k 40]
        [--top_p 1.0] [--temperature 1.0] [--repetition_penalty 1.0] [--beam_width 1]
        [--max_generate 300] [--num_generate 1] [--spout none|uniform|zeros|ID|FILE]
        [--seed N] [--output OUT.json [--force]] [--no_cache] [--truncate none|left]

Published flags keep their meaning (top_k 0 = no limit; the published default 40). The
prompt is `SOT SEG context`, or `SOT prefix SEG context` with `--prefix` (the prefix is read
bidirectionally). Everything (config, vocabulary, emoji) comes from `--model DIR`.
"""
import sys

from gptsan import fileio
from gptsan.errors import ArgumentParser, GPTSANError, run_cli
from gptsan import generation as gen

START, NEXT, END = "====[start generate]====", "====[next generate]====", "====[end generate]===="
REPLACEMENT_CHAR = "\ufffd"  # an incomplete UTF-8 byte run decodes to this: hold it back


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="checkpoints", help="model directory")
    p.add_argument("--context", default="", help="text to continue (the LM part)")
    p.add_argument("--prefix", default="", help="bidirectional prefix text (hybrid prompt)")
    p.add_argument("--top_k", type=int, default=40, help="top-k sampling (0: off, 1: greedy)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (1.0: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="1.0: off")
    p.add_argument("--beam_width", type=int, default=1, help="> 1: beam search")
    p.add_argument("--max_generate", type=int, default=300, help="max tokens to generate")
    p.add_argument("--num_generate", type=int, default=1, help="number of texts to generate")
    gen.add_spout_arguments(p)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--output", default="", help="write texts, token ids and scores to this JSON")
    p.add_argument("--force", action="store_true", help="overwrite --output")
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole sequence every step (slow; for checking)")
    p.add_argument("--truncate", default="none", choices=("none", "left"),
                   help="left: drop the oldest context tokens when the prompt is too long")
    p.add_argument("--vocabulary", default=None, help="vocabulary (default: the model's copy)")
    p.add_argument("--emoji", default=None, help="emoji table (default: the model's copy)")
    p.add_argument("--mesh_shape", default=None, help='mesh, e.g. "batch:1,model:2"')
    p.add_argument("--quiet", action="store_true", help="print only the finished texts")
    return p.parse_args(argv)


class StreamPrinter:
    """Prints the decoded increment of a growing generation (the `on_token` callback)."""

    def __init__(self, encoder, out):
        self.encoder, self.out = encoder, out
        self.printed = None  # text already printed for the current sample

    def __call__(self, index, generation):
        if self.printed is None:
            print(START if index == 0 else NEXT, file=self.out, flush=True)
            self.printed = ""
        text = self.encoder.decode(generation.tokens)
        if generation.finish_reason is None:
            text = text.rstrip(REPLACEMENT_CHAR)  # maybe a UTF-8 byte run still in progress
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.printed = text
        if generation.finish_reason is not None:
            self.out.write("\n")
            self.printed = None
        self.out.flush()


def main(argv=None):
    args = parse_args(argv)
    settings = gen.GenerationSettings(
        max_generate=args.max_generate, num_generate=args.num_generate, top_k=args.top_k,
        top_p=args.top_p, temperature=args.temperature,
        repetition_penalty=args.repetition_penalty, beam_width=args.beam_width, seed=args.seed,
        use_cache=not args.no_cache)
    if not args.context and not args.prefix:
        raise GPTSANError("the context is empty: give --context (or --prefix)")
    fileio.check_output_path(args.output, args.force)
    encoder, config = gen.open_model_files(args.model, args.vocabulary, args.emoji)
    special = gen.SpecialTokens.from_encoder(encoder)
    spout = gen.parse_spout(args.spout, config.model.num_spout, args.seed, args.spout_mode)
    prompt = gen.build_prompt(special, encoder.encode(args.context), encoder.encode(args.prefix),
                              spout, config.model.num_contexts, args.max_generate, args.truncate)
    if prompt.truncated:
        print(f"note: dropped the first {prompt.truncated} context tokens to fit "
              f"num_contexts={config.model.num_contexts}", file=sys.stderr)
    predictor = gen.open_predictor(args.model, batch_size=args.beam_width,
                                   mesh_shape=args.mesh_shape)

    stream = None if (args.quiet or settings.beam_width > 1) else StreamPrinter(encoder, sys.stdout)
    results = gen.generate(predictor, prompt, special, settings, on_token=stream)
    texts = [encoder.decode(r.tokens) for r in results]
    if stream is None:
        for i, text in enumerate(texts):
            print(START if i == 0 else NEXT)
            print(text)
    print(END, flush=True)

    if args.output:
        fileio.write_json_atomic(args.output, {
            "model": args.model, "context": args.context, "prefix": args.prefix,
            "spout": args.spout, "prompt_tokens": prompt.input_ids,
            "num_precontext": prompt.num_precontext, "truncated_tokens": prompt.truncated,
            "settings": {k: v for k, v in vars(settings).items() if k != "allowed_tokens"},
            "generations": [{"text": text, "tokens": r.tokens, "model_tokens": r.model_tokens,
                             "scores": r.scores, "score": r.score,
                             "finish_reason": r.finish_reason}
                            for text, r in zip(texts, results)]})
    return 0


if __name__ == "__main__":
    run_cli(main)
