"""Shows GPTSAN TFRecord examples as readable text, with their targets made visible.

    python scripts/show_tfrecord.py lm_0000.tfrecord --index 0 --count 2

Notation: the prefix (bidirectional part, up to num_input) and the LM part (from SEG) are
printed on their own; [MSK→猫] is a masked token with its target, [犬→猫] a random replacement,
[=猫] a picked token left unchanged; ⟨SEP:。⟩ is punctuation fed as SEP (target 。); ⟨SEP:next⟩ /
⟨SEP:not-next⟩ ends a next sentence with its label; ⟨BAG⟩ follows a repeated token; ↵ is a
line break; the NOT padding is counted, not printed.
"""
import os
import sys


from gptsan import fingerprint, records
from gptsan.data import NO_TARGET
from gptsan.errors import ArgumentParser, GPTSANError, run_cli



def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("file", help="a .tfrecord shard written by make_tfrecord.py")
    p.add_argument("--index", type=int, default=0, help="first example to show")
    p.add_argument("--count", type=int, default=1, help="number of examples to show")
    p.add_argument("--vocabulary", default=None,
                   help="vocabulary file (default: the one the shard was made with, named in "
                        "<prefix>.vocabulary.json next to it)")
    p.add_argument("--emoji", default=None, help="emoji table (default: the shard's, or "
                                                 "emoji.json next to --vocabulary)")
    p.add_argument("--ids", action="store_true", help="also print the raw x / y ids")
    return p.parse_args(argv)


class Renderer:
    """Turns one example's ids into annotated text."""

    def __init__(self, encoder):
        self.enc = encoder
        self.names = {encoder.sot: "⟨SOT⟩", encoder.msk: "[MSK]", encoder.sep: "⟨SEP⟩",
                      encoder.not_token: "⟨NOT⟩", encoder.bag: "⟨BAG⟩",
                      encoder.seg: "⟨SEG⟩", encoder.eot: "⟨EOT⟩"}

    def text(self, ids):
        """Plain ids -> text (byte tokens joined); control tokens by name."""
        out, run = [], []
        for token in ids:
            if token in self.names:
                out.append(self._flush(run) + self.names[token])
                run = []
            else:
                run.append(token)
        out.append(self._flush(run))
        return "".join(out)

    def _flush(self, run):
        return self.enc.decode(run).replace("\n", "↵\n") if run else ""

    def example(self, x, y, num_input):
        """Returns (prefix text, LM text, counts)."""
        enc = self.enc
        counts = {"masked": 0, "random": 0, "kept": 0}
        pieces, plain = [], []

        def emit(piece):
            pieces.append(self.text(plain) + piece)
            plain.clear()

        parts = []
        content = len(x)
        while content > 0 and x[content - 1] == enc.not_token:
            content -= 1
        for p in range(content):
            if p == num_input:  # the LM part starts at SEG
                emit("")
                parts.append("".join(pieces))
                pieces.clear()
            token, previous_target = int(x[p]), int(y[p - 1]) if p > 0 else NO_TARGET
            if p < num_input and p > 0 and previous_target != NO_TARGET:
                if token == enc.sep and previous_target in (enc.sep, enc.eot):
                    emit("⟨SEP:next⟩" if previous_target == enc.sep else "⟨SEP:not-next⟩")
                elif token == enc.msk:
                    counts["masked"] += 1
                    emit(f"[MSK→{self.text([previous_target])}]")
                elif token == previous_target:
                    counts["kept"] += 1
                    emit(f"[={self.text([token])}]")
                else:
                    counts["random"] += 1
                    emit(f"[{self.text([token])}→{self.text([previous_target])}]")
            elif p > num_input and token == enc.sep and previous_target not in (enc.sep, NO_TARGET):
                emit(f"⟨SEP:{self.text([previous_target])}⟩")
            elif p > num_input and token != previous_target and previous_target != NO_TARGET \
                    and token not in self.names:
                emit(f"{{{self.text([token])}→{self.text([previous_target])}}}")
            else:
                plain.append(token)
        emit("")
        parts.append("".join(pieces))
        if len(parts) == 1:
            parts.append("")
        last = int(y[content - 1]) if content else NO_TARGET
        if last != NO_TARGET:  # no EOT: the example ends in the middle of the text
            parts[1] += f"  (continues: last target {self.enc.decode([last])!r})"
        counts["padding"] = len(x) - content
        return parts[0], parts[1], counts


def load_encoder(shard, vocabulary, emoji):
    """The SWEEncoder of the vocabulary the shard was made with (checked: gptsan.fingerprint)."""
    from gptsan.tokenization import SWEEncoder

    files = fingerprint.records_files(shard, vocabulary, emoji)
    return SWEEncoder.from_files(files.vocab, files.emoji)


def main(argv=None):
    args = parse_args(argv)
    if args.index < 0 or args.count < 1:
        raise GPTSANError("--index must be >= 0 and --count >= 1")
    renderer = Renderer(load_encoder(args.file, args.vocabulary, args.emoji))
    shown = 0
    for index, ex in records.read_examples(args.file, args.index, args.count):
        x, y = ex[records.X], ex[records.Y]
        num_input = int(ex[records.NUM_INPUT][0])
        if len(x) != len(y) or not 0 < num_input <= len(x):
            raise GPTSANError(f"{args.file}: example {index} is inconsistent "
                              f"(len x {len(x)}, len y {len(y)}, num_input {num_input})")
        if max(x) >= len(renderer.enc) or min(x) < 0:
            raise GPTSANError(f"{args.file}: example {index} has token ids outside the "
                              f"{len(renderer.enc)}-entry vocabulary {args.vocabulary}")
        prefix, lm, counts = renderer.example(x, y, num_input)
        targets = int((y != NO_TARGET).sum())
        print(f"=== example {index}: i={int(ex[records.CLASS_ID][0])} num_input={num_input} "
              f"length={len(x)} padding={counts['padding']} targets={targets} "
              f"masked={counts['masked']} random={counts['random']} kept={counts['kept']}")
        print(f"--- prefix ({num_input} tokens):\n{prefix}")
        print(f"--- lm:\n{lm}")
        if args.ids:
            print(f"--- x: {' '.join(map(str, x))}\n--- y: {' '.join(map(str, y))}")
        shown += 1
    if shown == 0:
        raise GPTSANError(f"{args.file} has no example at --index {args.index}")
    return 0


def main_quiet_pipe(argv=None):
    """`main`, ending quietly when the reader of stdout goes away (`| head`)."""
    try:
        return main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    run_cli(main_quiet_pipe)
