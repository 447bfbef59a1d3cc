"""Generates Japanese text with a GPTSAN model.

    python run_generate.py --model DIR --context "織田信長は、" [--prefix TEXT]
        [--decoder published|sample|beam] [--top_k 120] [--beam_width 4] [--max_generate 300]
        [--num_generate 1] [--spout none|uniform|zeros|ID|FILE] [--seed N]
        [--output OUT.json [--force]] [--no_cache] [--truncate none|left]

By default this is the published script (HEAD run_generate.py): the prompt `SOT SEG context`,
`--beam_width` rows (4) each sampling top-k (120) tokens, a row that reaches EOT kept and
replaced by the best unfinished row, every row printed between HEAD's markers (see
gptsan/generation.py). `--decoder sample` is the project's sampler (`--top_p`,
`--temperature`, `--repetition_penalty`, one row that streams its tokens), `--decoder beam` a
deterministic beam search. Everything (config, vocabulary, emoji) comes from `--model DIR`.
"""
import sys

from gptsan import fileio
from gptsan import generation as gen
from gptsan.data import SpecialTokens
from gptsan.errors import ArgumentParser, run_cli
from gptsan.prompts import add_spout_arguments, build_prompt, parse_spout
from gptsan.sampling import PUBLISHED_TOP_K_FLOOR

START, NEXT, END = "====[start generate]====", "====[next generate]====", "====[end generate]===="
MARKER_COLOUR = "\033[32m{}\033[0m"  # HEAD prints its markers in green (on a terminal here)
REPLACEMENT_CHAR = "\ufffd"  # an incomplete UTF-8 byte run decodes to this: hold it back


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gptsan-backbone-2.8B", help="model directory")
    p.add_argument("--context", default="", help="text to continue (may be empty)")
    p.add_argument("--prefix", default="", help="bidirectional prefix text (hybrid prompt)")
    p.add_argument("--decoder", default="published", choices=gen.DECODERS,
                   help="published: HEAD's rows; sample: the project sampler; beam: beam search")
    p.add_argument("--top_k", type=int, default=gen.PUBLISHED_TOP_K,
                   help="top-k sampling (0: no limit)")
    p.add_argument("--top_k_floor", type=float, default=PUBLISHED_TOP_K_FLOOR,
                   help="published decoder: probability kept by every id outside the top k "
                        "(0: exact top-k)")
    p.add_argument("--top_p", type=float, default=1.0, help="sample/beam: nucleus (1.0: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="sample: 0 is greedy")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="sample/beam: 1.0 off")
    p.add_argument("--beam_width", type=int, default=None,
                   help=f"rows (published, default {gen.PUBLISHED_ROWS}) or hypotheses (beam); "
                        "sample: 1")
    p.add_argument("--max_generate", type=int, default=gen.PUBLISHED_MAX_GENERATE,
                   help="max tokens to generate")
    p.add_argument("--num_generate", type=int, default=1,
                   help="runs (published), samples (sample) or best hypotheses (beam)")
    add_spout_arguments(p)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--output", default="", help="write texts, token ids and scores to this JSON")
    p.add_argument("--force", action="store_true", help="overwrite --output")
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole padded sequence every step (HEAD's algorithm; slow)")
    p.add_argument("--truncate", default="none", choices=("none", "left"),
                   help="left: drop the oldest context tokens when the prompt is too long")
    p.add_argument("--vocabulary", default=None, help="vocabulary (default: the model's copy)")
    p.add_argument("--emoji", default=None, help="emoji table (default: the model's copy)")
    p.add_argument("--mesh_shape", default=None, help='mesh, e.g. "batch:1,model:2"')
    p.add_argument("--quiet", action="store_true", help="print only the finished texts")
    return p.parse_args(argv)


def settings_from(args):
    width = args.beam_width
    if width is None:
        width = 1 if args.decoder == "sample" else gen.PUBLISHED_ROWS
    return gen.GenerationSettings(
        decoder=args.decoder, max_generate=args.max_generate, num_generate=args.num_generate,
        top_k=args.top_k, top_k_floor=args.top_k_floor, beam_width=width, top_p=args.top_p,
        temperature=args.temperature, repetition_penalty=args.repetition_penalty,
        seed=args.seed, use_cache=not args.no_cache)


class Markers:
    """HEAD's start / next / end lines (green on a terminal)."""

    def __init__(self, out):
        colour = out.isatty()
        self.start, self.next, self.end = (MARKER_COLOUR.format(m) if colour else m
                                           for m in (START, NEXT, END))


class StreamPrinter:
    """Prints the decoded increment of a growing one-row generation (the `on_token` callback)."""

    def __init__(self, encoder, out, markers, runs):
        self.encoder, self.out, self.markers, self.runs = encoder, out, markers, runs
        self.printed = None  # text already printed for the current run

    def __call__(self, index, generation):
        if self.printed is None:
            if index == 0:
                print(self.markers.start, file=self.out, flush=True)
            self.printed = ""
        text = self.encoder.decode(generation.tokens)
        if generation.finish_reason is None:
            text = text.rstrip(REPLACEMENT_CHAR)  # maybe a UTF-8 byte run still in progress
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.printed = text
        if generation.finish_reason is not None:
            self.out.write("\n")
            last = index == self.runs - 1
            print(self.markers.end if last else self.markers.next, file=self.out)
            self.printed = None
        self.out.flush()


def print_runs(texts, runs, markers, out):
    """HEAD's layout: every text of run 0 opens with the start line; each text closes with the
    end line in the last run and the next line otherwise."""
    for run, text in zip(runs, texts):
        if run == 0:
            print(markers.start, file=out)
        print(text, file=out)
        print(markers.end if run == runs[-1] else markers.next, file=out)
    out.flush()


def main(argv=None):
    args = parse_args(argv)
    settings = settings_from(args)
    fileio.check_output_path(args.output, args.force)
    encoder, config = gen.open_model_files(args.model, args.vocabulary, args.emoji)
    special = SpecialTokens.from_encoder(encoder)
    spout = parse_spout(args.spout, config.model.num_spout, settings.rows, args.seed,
                        args.spout_mode)
    prompt = build_prompt(special, encoder.encode(args.context), encoder.encode(args.prefix),
                          spout, config.model.num_contexts, args.max_generate, args.truncate,
                          as_training=not settings.published)
    if prompt.truncated:
        print(f"note: dropped the first {prompt.truncated} context tokens to fit "
              f"num_contexts={config.model.num_contexts}", file=sys.stderr)
    markers = Markers(sys.stdout)
    stream = None
    if settings.rows == 1 and not args.quiet:
        stream = StreamPrinter(encoder, sys.stdout, markers, settings.num_generate)
    with gen.open_predictor(args.model, mesh_shape=args.mesh_shape) as predictor:
        results = gen.generate(predictor, prompt, special, settings, on_token=stream,
                               progress=stream is None and not args.quiet)
    texts = [encoder.decode(r.tokens) for r in results]
    if stream is None:
        print_runs(texts, [r.run for r in results], markers, sys.stdout)
    if args.output:
        fileio.write_json_atomic(args.output, {
            "model": args.model, "context": args.context, "prefix": args.prefix,
            "spout": args.spout, "prompt_tokens": prompt.input_ids,
            "num_precontext": prompt.num_precontext, "truncated_tokens": prompt.truncated,
            "settings": {k: v for k, v in vars(settings).items() if k != "allowed_tokens"},
            "generations": [{"text": text, "run": r.run, "tokens": r.tokens,
                             "model_tokens": r.model_tokens, "scores": r.scores,
                             "score": r.score, "finish_reason": r.finish_reason}
                            for text, r in zip(texts, results)]})
    return 0


if __name__ == "__main__":
    run_cli(main)
