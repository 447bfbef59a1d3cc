"""Training examples from text: token sequences -> (x, y, i, num_input) rows (NumPy, seeded).

One example (length `num_context`, docs/ARCHITECTURE.md "Training data"):

    x: SOT [next-sentence ... SEP] [prefix ...] SEG [LM tokens ...] [EOT] NOT NOT ...
    y: -1 where there is no loss; LM positions hold the NEXT real token; a masked prefix token's
       target sits one position BEFORE it (shifted MLM).
    num_input = 1 + len(next sentence) + len(prefix): the bidirectional region (num_precontext),
       so the SEG token is the first causal position.

LM part: sentence-final punctuation is fed as SEP (its target keeps the real token) and a run of
3+ identical tokens is fed and predicted as `token BAG`. Prefix part: `num_mask` of its tokens
(at most `max_mask`) are picked; 80% become MSK, 10% a random token, 10% stay.

Differences from the published `tools/make_tfrecord_simple.py`, all deliberate:
* one --clean_text setting for all parts (published: the LM part and the next sentence are
  cleaned, the prefix is not);
* a dot character without a token of its own (encoded as bytes) is not a dot: the published
  code would feed those byte tokens as SEP wherever they occur;
* every input file is processed on its own with a generator seeded by (seed, file index), so the
  output does not depend on the number of worker processes;
* the last LM token is trained to predict EOT (the published code gives it no target and trains
  EOT -> EOT instead);
* text that does not fit into an example is carried over to the next one (the published code
  drops the rest of the line), and the part of a line after the prefix gets the LM treatment;
* a prefix never outgrows the document: in `mlm` and `hybrid` mode the drawn prefix length is
  capped by the text left, so short documents still make examples;
* the "not next" sentence of next-sentence training is a line of one of a few other files drawn
  for each input file (published: of any other file); with a single input file it comes from
  another document, or another place, of the same file.
"""
import collections
import dataclasses
import glob
import multiprocessing
import os

from typing import Optional

import numpy as np

from gptsan.errors import GPTSANError
from gptsan.tokenization import CONTROL_TOKENS, NUM_BYTE_TOKENS

MODES = ("lm", "mlm", "hybrid")
NO_TARGET = -1  # y value of positions without loss
MIN_NUM_CONTEXT = 8  # SOT, SEG, EOT and a next sentence of ctx//2 must leave room for text
DOT_TEXT = "。｡．.？！?!:：;；"  # published DOT_TOKENS: fed as SEP in the LM part
BAG_MIN_RUN = 3  # published: three equal tokens in a row become `token BAG`
MASK_TOKEN_SHARE = 0.8  # BERT recipe: 80% MSK ...
RANDOM_TOKEN_SHARE = 0.5  # ... then half of the rest a random token, the other half unchanged
NEXTSENT_POSITIVE_SHARE = 0.5  # published: half the next sentences are real continuations
BYTE0_TOKEN = "<|byte0|>"  # first byte token: ids below it are ordinary tokens and emoji
MAX_LISTED_CLASSES = 20  # the run summary lists at most this many class counts
LIST_HEAD_CHARS = 4096  # an input file is a list/CSV if its first line (this long at most) says so


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Control ids and the token sets the LM rewrite needs (the constants of the published
    tools/make_tfrecord_simple.py); shared by the example builder and generation."""
    sot: int
    msk: int
    sep: int
    not_token: int
    bag: int
    seg: int
    eot: int  # the last id of the vocabulary (docs/ARCHITECTURE.md "Vocabulary files")
    nl: Optional[int]  # <BR>: appended after every line (None: a synthetic vocabulary without)
    dots: frozenset  # fed as SEP in the LM part
    last_token: int  # published LAST_TOKEN = id(<|byte0|>) - 1: BAG only for ids <= it,
    #                  random replacements are drawn from [0, last_token)

    @classmethod
    def from_encoder(cls, encoder):
        """Reads the ids from a `gptsan.tokenization.SWEEncoder`."""
        return cls(sot=encoder.sot, msk=encoder.msk, sep=encoder.sep,
                   not_token=encoder.not_token, bag=encoder.bag, seg=encoder.seg,
                   eot=encoder.eot, nl=encoder.encode("\n")[0],
                   dots=frozenset(ids[0] for ids in map(encoder.encode, DOT_TEXT)
                                  if len(ids) == 1),
                   last_token=encoder.token_to_id(BYTE0_TOKEN) - 1)

    @classmethod
    def from_vocab_size(cls, vocab_size, dots=(), nl=None):
        """A vocabulary known only by its size: the 7 control ids are its last ids, the 255
        byte tokens precede them (docs/ARCHITECTURE.md "Vocabulary files"); `dots`/`nl` as given
        (tests, benchmarks)."""
        sot = vocab_size - len(CONTROL_TOKENS)
        return cls(sot, sot + 1, sot + 2, sot + 3, sot + 4, sot + 5, sot + 6, nl,
                   frozenset(int(t) for t in dots), sot - NUM_BYTE_TOKENS - 1)

    @property
    def vocab_size(self):
        return self.eot + 1

    @property
    def controls(self):
        return (self.sot, self.msk, self.sep, self.not_token, self.bag, self.seg, self.eot)

    def is_control(self, token):
        return token in self.controls


@dataclasses.dataclass(frozen=True)
class ExampleOptions:
    """How examples are cut and masked (the make_tfrecord.py flags)."""
    mode: str = "lm"
    num_context: int = 1280
    num_mask: float = 0.08  # share of prefix tokens picked for MLM
    max_mask: int = 100  # at most this many per example
    use_nextsent: bool = False
    nextsent_rate: float = 1.0  # share of mlm/hybrid examples that get a next sentence
    hybrid_rate: float = 1.0  # hybrid mode: share of examples with a prefix (else plain lm)
    clean_text: bool = True  # replace URLs, e-mails, dates, ... by placeholder tokens
    split_on_blank: bool = False  # blank lines separate documents (else one file = one document)
    no_offset_mlm: bool = False  # published --no_offset_mlm: x shifted left by one (mlm only)

    def __post_init__(self):
        if self.mode not in MODES:
            raise GPTSANError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.num_context < MIN_NUM_CONTEXT:
            raise GPTSANError(f"--num_context must be >= {MIN_NUM_CONTEXT}, got {self.num_context}")
        for name in ("num_mask", "nextsent_rate", "hybrid_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise GPTSANError(f"--{name} must be in [0, 1], got {value}")
        if self.max_mask < 0:
            raise GPTSANError(f"--max_mask must be >= 0, got {self.max_mask}")
        if self.no_offset_mlm and self.mode != "mlm":
            raise GPTSANError("--no_offset_mlm only applies to --mode mlm")


@dataclasses.dataclass
class Example:
    """One training row before serialization."""
    x: np.ndarray  # [num_context] int32 tokens
    y: np.ndarray  # [num_context] int32 targets, NO_TARGET = no loss
    num_input: int  # bidirectional prefix length incl. SOT and next sentence
    class_id: int = -1  # from the class CSV; -1: the writer gives a running example id


def lm_transform(tokens, special):
    """The LM part's feed/target rewrite of raw tokens.

    Returns `(fed, target, start)`, three equal-length int arrays: a run of >= 3 equal tokens
    (ids <= last_token, never NL, so runs stay inside a line) becomes the two items
    `token, BAG` in both fed and target; a dot token is fed as SEP. `start[k]` is the raw index
    where item k's raw span begins (both items of a run share the run's start).
    """
    tokens = np.asarray(tokens, dtype=np.int32)  # [n]
    n = len(tokens)
    run_starts = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]]) if n else \
        np.zeros(0, dtype=np.int64)
    run_lengths = np.diff(np.r_[run_starts, n])
    run_tokens = tokens[run_starts]
    bagged = (run_lengths >= BAG_MIN_RUN) & (run_tokens <= special.last_token) \
        & (run_tokens != special.nl)
    items_per_token = np.ones(n, dtype=np.int64)  # 1 item per token, 2 at a bagged run's start
    items_per_token[run_starts[bagged]] = 2
    inside = np.repeat(bagged, run_lengths)  # [n] inside a bagged run ...
    inside[run_starts[bagged]] = False  # ... but not its first token
    items_per_token[inside] = 0
    start = np.repeat(np.arange(n), items_per_token)  # [items]
    second = np.zeros(len(start), dtype=bool)  # the BAG item of a pair
    second[1:] = start[1:] == start[:-1]
    target = tokens[start]
    fed = np.where(np.isin(target, list(special.dots)), special.sep, target).astype(np.int32)
    fed[second] = special.bag
    target[second] = special.bag
    return fed, target, start


@dataclasses.dataclass
class Document:
    """A document's raw tokens: every line encoded, followed by NL."""
    tokens: np.ndarray  # [n] int32 raw token ids
    line_starts: list  # raw index where each line begins
    line_ids: list = None  # file-wide line numbers (for "not next" sentences)


def split_documents(text, split_on_blank):
    """Text -> list of documents, each a list of stripped lines (blank edges dropped)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the file does not start a line
    documents, current = [], []
    for line in lines:
        line = line.strip()
        if not line and split_on_blank:
            if current:
                documents.append(current)
            current = []
        else:
            current.append(line)
    if current:
        documents.append(current)
    result = []
    for doc in documents:  # drop blank lines at the edges of a document
        while doc and not doc[0]:
            doc.pop(0)
        while doc and not doc[-1]:
            doc.pop()
        if doc:
            result.append(doc)
    return result


def encode_documents(documents, encode, special):
    """Lists of lines -> `Document`s, with `encode(line) -> ids`."""
    result, line_number = [], 0
    nl = np.array([special.nl], dtype=np.int32)
    for lines in documents:
        parts, starts, ids, length = [], [], [], 0
        for line in lines:
            starts.append(length)
            ids.append(line_number)
            line_number += 1
            parts += [np.asarray(encode(line), dtype=np.int32), nl]
            length += len(parts[-2]) + 1
        result.append(Document(np.concatenate(parts), starts, ids))
    return result


class ExampleBuilder:
    """Cuts the documents of one file into examples with one seeded generator."""

    def __init__(self, options, special, rng, other_sentences=None):
        self.options = options
        self.special = special
        self.rng = rng
        self.other_sentences = other_sentences  # OtherFileSentences: "not next" from other files
        self.documents, self.lines, self.nonempty = [], [], None

    def build(self, documents, class_id=-1):
        """All examples of one file's documents (list of `Document`)."""
        self.documents = documents
        self.lines = []  # per file-wide line number: (document index, start, end without NL)
        for d, doc in enumerate(documents):
            ends = doc.line_starts[1:] + [len(doc.tokens)]
            self.lines.extend((d, start, end - 1) for start, end in zip(doc.line_starts, ends))
        self.nonempty = np.array([k for k, (_, start, end) in enumerate(self.lines) if end > start],
                                 dtype=np.int64)  # line numbers usable as "not next" sentences
        examples = []
        for d, doc in enumerate(documents):
            examples.extend(self._document_examples(d, doc, class_id))
        return examples

    def _draw_parts(self, doc_index, doc, line_ends, cursor, item_at):
        """The random choices of one example starting at raw index `cursor`: (next sentence
        tokens ending in SEP or [], its label or None, the cursor after it, prefix length)."""
        opt, sp, rng, ctx = self.options, self.special, self.rng, self.options.num_context
        hybrid_lm = opt.mode == "hybrid" and rng.random() >= opt.hybrid_rate
        nextsent, label = [], None
        if (opt.use_nextsent and opt.mode != "lm" and not hybrid_lm
                and rng.random() < opt.nextsent_rate):
            nextsent, label, cursor = self._next_sentence(doc_index, doc, line_ends, cursor)
        if nextsent:
            nextsent = list(nextsent[:ctx // 2 - 1]) + [sp.sep]
        rest = len(doc.tokens) - cursor
        limit = ctx - len(nextsent) - 3
        if opt.mode == "lm" or hybrid_lm:
            prefix_len = 0
        elif opt.mode == "mlm":
            prefix_len = min(limit, rest)
        else:
            prefix_len = int(rng.integers(0, min(limit, rest) + 1))
        while item_at[cursor + prefix_len] < 0:  # never cut a BAG run in two
            prefix_len -= 1
        return nextsent, label, cursor, prefix_len

    def _document_examples(self, doc_index, doc, class_id):
        """The examples of one document, in order (docs/ARCHITECTURE.md "Training data")."""
        opt, sp = self.options, self.special
        ctx = opt.num_context
        raw = doc.tokens  # [n]
        fed, target, item_start = lm_transform(raw, sp)  # [items]
        item_at = np.full(len(raw) + 1, -1, dtype=np.int64)  # item starting at a raw index
        first_items = np.flatnonzero(np.r_[True, item_start[1:] != item_start[:-1]]) \
            if len(item_start) else item_start
        item_at[item_start[first_items]] = first_items  # -1 inside a BAG run
        item_at[len(raw)] = len(fed)
        line_ends = np.array(doc.line_starts[1:] + [len(raw)], dtype=np.int64)
        cursor = 0
        while cursor < len(raw):
            nextsent, label, cursor, prefix_len = self._draw_parts(doc_index, doc, line_ends,
                                                                   cursor, item_at)
            prefix = raw[cursor:cursor + prefix_len]
            cursor += prefix_len
            num_input = 1 + len(nextsent) + prefix_len
            room = ctx - num_input - 1  # slots after SEG: LM tokens + EOT
            first = int(item_at[cursor])
            left = len(fed) - first
            finished = left <= room  # the rest of the document fits
            take = left if finished else room
            if not finished and take > 0 and fed[first + take - 1] != sp.bag \
                    and fed[first + take] == sp.bag:
                take -= 1  # keep `token BAG` together
            x = np.full(ctx, sp.not_token, dtype=np.int32)  # NOT padding ...
            y = np.full(ctx, NO_TARGET, dtype=np.int32)  # ... without loss
            x[0], x[1:1 + len(nextsent)] = sp.sot, nextsent
            x[1 + len(nextsent):num_input] = prefix
            x[num_input] = sp.seg
            x[num_input + 1:num_input + 1 + take] = fed[first:first + take]
            y[num_input:num_input + take] = target[first:first + take]
            end = num_input + take  # the last LM position
            if finished:
                y[end] = sp.eot  # the last token predicts EOT ...
                if end + 1 < ctx:
                    x[end + 1] = sp.eot  # ... and EOT itself, when it fits, predicts nothing
                cursor = len(raw)
            else:
                y[end] = target[first + take]  # the next real token, first of the next example
                cursor = int(item_start[first + take])
            start = 1 + len(nextsent)
            num_masks = min(int(opt.num_mask * prefix_len), opt.max_mask)
            if label is not None:
                y[start - 2] = label  # the sentence's last token predicts SEP (next) or EOT (not)
                num_masks = max(num_masks - 1, 0)
            self._mask(x, y, start, prefix_len, num_masks)
            if opt.no_offset_mlm:
                x = np.concatenate([x[:1], x[2:], [sp.eot]]).astype(np.int32)
            yield Example(x=x, y=y, num_input=num_input, class_id=class_id)

    def _next_sentence(self, doc_index, doc, line_ends, cursor):
        """(sentence tokens, label, new cursor); label SEP = real continuation, EOT = not."""
        sp, rng = self.special, self.rng
        line = int(np.searchsorted(line_ends, cursor, side="right"))  # line holding the cursor
        if rng.random() < NEXTSENT_POSITIVE_SHARE:
            end = int(line_ends[line])
            if end >= len(doc.tokens) or end - 1 <= cursor:  # no following line / empty sentence
                return [], None, cursor
            return list(doc.tokens[cursor:end - 1]), sp.sep, end
        if self.other_sentences is not None:
            sentence = self.other_sentences.draw(rng)
            if sentence:
                return sentence, sp.eot, cursor
        here = doc.line_ids[line]
        pick = self._pick_line(doc.line_ids[0], doc.line_ids[-1])  # from another document
        if pick is None:  # a one-document file: neither this line nor the one before it
            pick = self._pick_line(here - 1, here)
        if pick is None:
            return [], None, cursor
        d, start, end = self.lines[pick]
        return list(self.documents[d].tokens[start:end]), sp.eot, cursor

    def _pick_line(self, first, last):
        """A uniformly drawn non-empty line number outside [first, last], or None."""
        lo = int(np.searchsorted(self.nonempty, first, side="left"))
        hi = int(np.searchsorted(self.nonempty, last, side="right"))
        allowed = len(self.nonempty) - (hi - lo)
        if allowed <= 0:
            return None
        r = int(self.rng.integers(allowed))
        return int(self.nonempty[r if r < lo else r + hi - lo])

    def _mask(self, x, y, start, prefix_len, num_masks):
        """Shifted MLM over x[start:start+prefix_len]: the target goes to position - 1."""
        sp, rng = self.special, self.rng
        if num_masks <= 0:
            return
        for pos in rng.permutation(prefix_len)[:num_masks] + start:
            if x[pos] >= sp.sot:  # control tokens are never masked
                continue
            y[pos - 1] = x[pos]
            if rng.random() < MASK_TOKEN_SHARE:
                x[pos] = sp.msk
            elif rng.random() < RANDOM_TOKEN_SHARE:
                x[pos] = int(rng.integers(sp.last_token))


# ---------------------------------------------------------------------------------------------
# Input files

@dataclasses.dataclass
class FileTask:
    index: int  # position in the (seeded, shuffled) file order
    path: str
    class_id: int  # -1 when no class ids were given


@dataclasses.dataclass
class FileResult:
    index: int
    path: str
    error: str = None  # why the file was skipped
    spill: str = None  # .npz with the examples (x, y, num_input, class_id)
    examples: int = 0


def read_text(path):
    """The file's text, or raises GPTSANError naming why it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise GPTSANError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise GPTSANError(f"{path} is not UTF-8 (byte {err.start})") from None


def resolve_input_files(specs):
    """Glob patterns, list files and class CSVs -> sorted list of (path, class_id).

    * a CSV whose first line is `filename,fileid` gives each file a class id;
    * a file whose lines name existing files (optionally `path id`) is a list file;
    * any other existing file is a text file; anything else is a glob pattern.
    Relative paths in a list are taken as given, or relative to the list's folder.
    """
    found = {}
    for spec in specs:
        if os.path.isfile(spec):
            for path, class_id in _read_list_file(spec):
                found[os.path.normpath(path)] = class_id
        else:
            for path in glob.glob(spec, recursive=True):
                if os.path.isfile(path):
                    found.setdefault(os.path.normpath(path), -1)
    if not found:
        raise GPTSANError(f"no input files matched {' '.join(specs)}")
    return sorted(found.items())


def _read_list_file(spec):
    """(path, class_id) rows of a class CSV or list file; [(spec, -1)] for a text file."""
    try:
        with open(spec, encoding="utf-8-sig") as f:
            head = f.readline(LIST_HEAD_CHARS).strip()
    except (OSError, UnicodeDecodeError):
        return [(spec, -1)]  # not a readable list: treat as a text file (reported when read)
    base = os.path.dirname(spec)

    def locate(name):
        if os.path.isfile(name) or os.path.isabs(name):
            return name
        return os.path.join(base, name)

    first = head.split()
    is_csv = head.replace(" ", "") == "filename,fileid"
    if not is_csv and not (first and os.path.isfile(locate(first[0]))
                           and os.path.abspath(locate(first[0])) != os.path.abspath(spec)):
        return [(spec, -1)]  # a text file
    try:
        with open(spec, encoding="utf-8-sig") as f:
            rest = f.read().splitlines()[1:]
    except (OSError, UnicodeDecodeError) as err:
        raise GPTSANError(f"cannot read the file list {spec}: {err}") from None
    if is_csv:
        rows = []
        for number, line in enumerate(rest, start=2):
            if not line.strip():
                continue
            name, sep, fileid = line.rpartition(",")
            try:
                rows.append((locate(name.strip().strip('"')), int(fileid)))
            except ValueError:
                raise GPTSANError(f"{spec}:{number}: expected 'filename,fileid' with an integer "
                                  f"id, got {line!r}") from None
            if not sep or rows[-1][1] < 0:
                raise GPTSANError(f"{spec}:{number}: expected 'filename,fileid' with an id "
                                  f">= 0, got {line!r}")
        return rows
    rows = []
    for number, line in enumerate([head] + rest, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise GPTSANError(f"{spec}:{number}: expected 'path' or 'path id' with an id >= 0, "
                              f"got {line!r}")
        rows.append((locate(parts[0]), int(parts[1]) if len(parts) == 2 else -1))
    return rows


def order_files(files, seed):
    """The seeded processing order (published: the file list is shuffled)."""
    order = np.random.default_rng(seed).permutation(len(files))
    return [FileTask(index=k, path=files[j][0], class_id=files[j][1])
            for k, j in enumerate(order)]


NEGATIVE_FILES = 4  # other files read per input file as the source of "not next" sentences


class OtherFileSentences:
    """Random lines of a few other input files (read on first use) as "not next" sentences."""

    def __init__(self, paths, own_index, encode, rng):
        others = [k for k in range(len(paths)) if k != own_index]
        picked = rng.permutation(len(others))[:NEGATIVE_FILES] if others else []
        self.paths = [paths[others[k]] for k in picked]
        self.encode = encode
        self.lines = None

    def draw(self, rng):
        """Tokens of a random non-empty line of the other files, or None when there is none."""
        if self.lines is None:
            self.lines = []
            for path in self.paths:
                try:
                    text = read_text(path)
                except GPTSANError:
                    continue  # reported when that file itself is processed
                self.lines += [line for doc in split_documents(text, True) for line in doc]
        if not self.lines:
            return None
        return list(self.encode(self.lines[int(rng.integers(len(self.lines)))]))


_WORKER = {}  # encoder, special tokens, options, seed, spill folder, all paths: set before forking


def _init_worker(encoder, special, options, seed, spill_dir, paths):
    _WORKER.update(encoder=encoder, special=special, options=options, seed=seed,
                   spill_dir=spill_dir, paths=paths)


def process_file(task):
    """Worker: one input file -> FileResult (examples spilled to an .npz)."""
    w = _WORKER
    try:
        text = read_text(task.path)
    except GPTSANError as err:
        return FileResult(task.index, task.path, error=str(err))
    options, special = w["options"], w["special"]
    rng = np.random.default_rng([w["seed"], task.index])

    def encode(line):
        return w["encoder"].encode(line, clean=options.clean_text)

    documents = encode_documents(split_documents(text, options.split_on_blank), encode, special)
    others = None
    if options.use_nextsent and len(w["paths"]) > 1:
        others = OtherFileSentences(w["paths"], task.index, encode,
                                    np.random.default_rng([w["seed"], task.index, 1]))
    examples = ExampleBuilder(options, special, rng, others).build(documents, task.class_id)
    result = FileResult(task.index, task.path, examples=len(examples))
    if examples:
        result.spill = os.path.join(w["spill_dir"], f"{task.index:08d}.npz")
        np.savez(result.spill,
                 x=np.stack([e.x for e in examples]), y=np.stack([e.y for e in examples]),
                 num_input=np.array([e.num_input for e in examples], dtype=np.int32),
                 class_id=np.array([e.class_id for e in examples], dtype=np.int64))
    return result


def process_files(tasks, encoder, special, options, seed, spill_dir, num_process=1):
    """Yields a FileResult per task, in task order, using `num_process` forked workers."""
    args = (encoder, special, options, seed, spill_dir, [task.path for task in tasks])
    if num_process <= 1 or len(tasks) <= 1:
        _init_worker(*args)
        for task in tasks:
            yield process_file(task)
        return
    context = multiprocessing.get_context("fork")  # workers inherit the loaded encoder
    workers = min(num_process, len(tasks))
    with context.Pool(workers, initializer=_init_worker, initargs=args) as pool:
        yield from pool.imap(process_file, tasks)


def load_spill(path):
    """The examples of one FileResult: dict of arrays x, y [n, ctx], num_input, class_id [n]."""
    with np.load(path) as arrays:
        return {key: arrays[key] for key in arrays.files}


class Summary:
    """Counts for the end-of-run report."""

    def __init__(self, num_context, not_token):
        self.num_context, self.not_token = num_context, not_token
        self.examples = self.tokens = self.targets = self.skipped = 0
        self.classes = collections.Counter()

    def add(self, x, y, class_id):
        """One example; class_id < 0: no class given (not counted per class)."""
        self.examples += 1
        self.tokens += int(np.count_nonzero(x != self.not_token))
        self.targets += int(np.count_nonzero(y != NO_TARGET))
        if class_id >= 0:
            self.classes[class_id] += 1

    def report(self, paths, num_files):
        """Lines for the end of a run: shards, examples, tokens, padding, per-class counts."""
        positions = self.examples * self.num_context
        padding = 1.0 - self.tokens / positions
        shards = paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"
        lines = [f"wrote {len(paths)} shard(s): {shards}",
                 f"{self.examples:,} examples from {num_files - self.skipped} file(s), "
                 f"{self.tokens:,} tokens, {self.targets:,} loss targets, "
                 f"padding {padding:.1%}"]
        if self.classes:
            shown = sorted(self.classes.items())[:MAX_LISTED_CLASSES]
            more = len(self.classes) - len(shown)
            lines.append("per class: " + ", ".join(f"{c}: {n:,}" for c, n in shown)
                         + (f", ... ({more} more)" if more else ""))
        if self.skipped:
            lines.append(f"skipped {self.skipped} bad file(s)")
        return "\n".join(lines)
