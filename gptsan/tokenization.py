"""The Japanese SWE tokenizer: the ja-swe vocabulary, `encode` and `decode`.

Bit-exact with the published `SWEEncoder_ja` (tanreinama/GPTSAN `encode_swe.py`, ported to HF
transformers as `GPTSanJapaneseTokenizer`), see DESIGN.md "Encoding rules", but:

* linear time: the published cleaning regexes backtrack catastrophically (e.g. `'1１' * 16 + 'x'`);
  here the e-mail, western-date and price stages find the same matches as Python's backtracking
  `re` with linear procedures (see `clean_text`);
* 10-25x faster: emoji are found with one scan instead of ~4,300 `str.replace` calls; the
  tokenizer loop reads precomputed decisions per 2-char window (`SWEEncoder._scan`), from
  tables without the ~140k rare variant spellings when the text has none of their rare chars;
  texts of VECTOR_MIN_CHARS or more are decided at all positions at once with numpy
  (`_VectorScanner`).
"""
import json
import os
import re

import numpy as np

from gptsan.errors import GPTSANError

# Ordinary special tokens, in vocabulary order (DESIGN.md "Vocabulary and emoji files").
SPECIAL_TOKENS = ("<BR>", "<SP>", "<TAB>", "<URL>", "<EMAIL>", "<TEL>", "<DATE>", "<PRICE>",
                  "<BLOCK>", "<KIGOU>", "<U2000U2BFF>")
# The 7 control tokens, the last entries of every vocabulary; ids counted from the end.
CONTROL_TOKENS = ("<|startoftext|>", "<|inputmask|>", "<|separator|>", "<|nottoken|>",
                  "<|bagoftoken|>", "<|segmenter|>", "<|endoftext|>")
# <|byte0|>..<|byte254|>: the byte 0xFF never occurs in UTF-8, so the published table stops at 254.
NUM_BYTE_TOKENS = 255
# Bound on the caches of chars without a form (entries of ~100 bytes: ~100 MB at most).
MAX_CACHED_DECISIONS = 1_000_000
_BR = object()  # decode-table marker of <BR>, written as the caller's `breakline`
EMOJI_TOKEN_RE = re.compile(r"<\|emoji([1-9][0-9]*)\|>\Z")
BYTE_TOKEN_RE = re.compile(r"<\|byte([0-9]+)\|>\Z")

# Published step 1 (ordered): whitespace and dashes normalised before anything else.
_PRE_REPLACEMENTS = ((" ", "<SP>"), ("\u3000", "<SP>"), ("\r\n", "<BR>"), ("\n", "<BR>"),
                     ("\r", "<BR>"), ("\t", "<TAB>"), ("\u2014", "\u30fc"), ("\u2212", "\u30fc"))
# What decode writes for tokens that stand for a character class (published `decode`).
_DECODE_SURFACES = {"<SP>": " ", "<TAB>": "\t", "<BLOCK>": "\u2580", "<KIGOU>": "\u01c0",
                    "<U2000U2BFF>": "\u2016"}
# Published `checkkigou`: 2-byte UTF-8 characters mapped to <KIGOU>.
_KIGOU_RANGES = ((0x00A1, 0x00BF), (0x01C0, 0x01C3), (0x02B9, 0x02FF), (0x0300, 0x0362))
# Published `checku2e`: 3-byte characters E2 80 80..E2 AF BF, i.e. U+2000..U+2BFF.
_U2000_RANGE = (0x2000, 0x2BFF)
# Published box-drawing (U+2500..U+257F) and block (U+2580..U+259F) characters -> <BLOCK>.
_BLOCK_CHARS = "".join(chr(c) for c in range(0x2500, 0x25A0))


class VocabularyError(GPTSANError):
    """A vocabulary or emoji file that is missing or not in the ja-swe format."""


class TokenizerInputError(GPTSANError):
    """Text or ids the tokenizer cannot handle (lone surrogates, ids out of range)."""


# ----------------------------------------------------------------------------------------------
# Vocabulary files
# ----------------------------------------------------------------------------------------------

def split_entry(line):
    """Surface forms of one vocabulary entry: `,` alone is the comma token, else comma-separated."""
    return [line] if (line == "," or "," not in line) else line.split(",")


def _strip_final_newline(vocab_lines):
    """A file written with a final newline gives one empty last entry; the format has none."""
    vocab_lines = list(vocab_lines)
    if vocab_lines and vocab_lines[-1] == "":
        vocab_lines.pop()
    return vocab_lines


def check_vocabulary(vocab_lines, allow_duplicate_forms=False):
    """Checks ja-swe vocabulary entries (one string per id); raises VocabularyError on a problem.

    Checks: no empty entry or form; the 11 special tokens in order; `<|emoji1|>`..`<|emojiN|>`
    right after them, then `<|byte0|>`..`<|byte254|>`, then exactly the 7 control tokens at the
    end; and (unless `allow_duplicate_forms`: the published 36k file has 6) no surface form in
    two entries. Returns the entries split into their forms.
    """
    entries = [split_entry(line) for line in _strip_final_newline(vocab_lines)]
    n = len(entries)
    minimum = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS + len(CONTROL_TOKENS) + 1
    if n < minimum:
        raise VocabularyError(f"vocabulary has {n} entries, a ja-swe vocabulary needs at least "
                              f"{minimum} (specials, byte tokens, control tokens)")
    first_id = {}
    for idx, forms in enumerate(entries):
        for form in forms:
            if form == "":
                raise VocabularyError(f"vocabulary entry {idx} has an empty surface form: "
                                      f"{','.join(forms)!r}")
            if form in first_id and not allow_duplicate_forms:
                raise VocabularyError(f"surface form {form!r} is in vocabulary entries "
                                      f"{first_id[form]} and {idx}")
            first_id.setdefault(form, idx)
    canonical = [forms[0] for forms in entries]
    controls = tuple(canonical[n - len(CONTROL_TOKENS):])
    if controls != CONTROL_TOKENS:
        raise VocabularyError(f"the last 7 vocabulary entries must be the control tokens "
                              f"{', '.join(CONTROL_TOKENS)}; found {', '.join(controls)}")
    byte0 = n - len(CONTROL_TOKENS) - NUM_BYTE_TOKENS
    for b in range(NUM_BYTE_TOKENS):
        if canonical[byte0 + b] != f"<|byte{b}|>":
            raise VocabularyError(f"vocabulary entry {byte0 + b} must be <|byte{b}|> (the 255 byte "
                                  f"tokens precede the control tokens); "
                                  f"found {canonical[byte0 + b]!r}")
    if SPECIAL_TOKENS[0] not in first_id:
        raise VocabularyError(f"vocabulary has no {SPECIAL_TOKENS[0]} token")
    start = first_id[SPECIAL_TOKENS[0]]
    for k, token in enumerate(SPECIAL_TOKENS):
        if start + k >= byte0 or canonical[start + k] != token:
            raise VocabularyError(f"vocabulary must hold {', '.join(SPECIAL_TOKENS)} in this order "
                                  f"in consecutive entries; {token} is missing or misplaced")
    for k, idx in enumerate(range(start + len(SPECIAL_TOKENS), byte0)):
        if canonical[idx] != f"<|emoji{k + 1}|>":
            raise VocabularyError(f"vocabulary entry {idx} must be <|emoji{k + 1}|> (emoji class "
                                  f"tokens sit between <U2000U2BFF> and <|byte0|>); "
                                  f"found {canonical[idx]!r}")
    return entries


def check_emoji_table(emoji_dict, vocab_entries=None):
    """Checks a ja-swe emoji table {"emoji": {surface: class}, "emoji_inv": {class: surface}}."""
    if not isinstance(emoji_dict, dict) or not all(
            isinstance(emoji_dict.get(key), dict) for key in ("emoji", "emoji_inv")):
        raise VocabularyError('emoji table must be a JSON object with "emoji" and "emoji_inv" '
                              'objects')
    for surface, token in emoji_dict["emoji"].items():
        if not isinstance(surface, str) or not surface or not isinstance(token, str):
            raise VocabularyError(f"emoji table entry {surface!r}: {token!r} is not a non-empty "
                                  f"string mapped to a class token")
        if token not in emoji_dict["emoji_inv"]:
            raise VocabularyError(f"emoji class {token!r} (of {surface!r}) is not in emoji_inv")
    if vocab_entries is not None:
        forms = {form for entry in vocab_entries for form in entry}
        classes = {entry[0] for entry in vocab_entries if EMOJI_TOKEN_RE.match(entry[0])}
        for token in set(emoji_dict["emoji"].values()) | classes:
            if token not in forms:
                raise VocabularyError(f"emoji class {token!r} is not in the vocabulary")
            if token not in emoji_dict["emoji_inv"]:
                raise VocabularyError(f"vocabulary emoji class {token!r} is not in emoji_inv")


def read_vocabulary_file(path):
    """The entries of a ja-swe vocabulary file (`read().split('\\n')`)."""
    return _read_text(path, "vocabulary").split("\n")


def read_emoji_file(path):
    """The emoji table of a ja-swe emoji JSON file."""
    text = _read_text(path, "emoji")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise VocabularyError(f"emoji file {path} is not valid JSON: {err}") from None


def _read_text(path, what):
    if not os.path.isfile(path):
        raise VocabularyError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise VocabularyError(f"{what} file {path} is not UTF-8 text") from None
    except OSError as err:
        raise VocabularyError(f"cannot read {what} file {path}: {err.strerror}") from None


# ----------------------------------------------------------------------------------------------
# Step 2: emoji surfaces -> class tokens
# ----------------------------------------------------------------------------------------------

class _EmojiReplacer:
    """Replaces emoji surfaces by their class token exactly like the published loop
    `for k, v in emoji.items(): text = text.replace(k, v)`, without its ~4,300 scans per call.

    When no surface can overlap an inserted class token (checked here; true for the published
    table), a surface absent from the input never appears later, so replacing only the surfaces
    present in the input, in table order, gives the same text. Otherwise the published loop runs.
    """

    def __init__(self, table):
        self.items = list(table.items())
        self.order = {surface: k for k, (surface, _) in enumerate(self.items)}
        self.lengths = {}  # first 2 chars -> distinct lengths of the longer surfaces
        for surface, _ in self.items:
            if len(surface) > 1:
                self.lengths.setdefault(surface[:2], set()).add(len(surface))
        self.lengths = {c: sorted(ls) for c, ls in self.lengths.items()}
        singles = {s for s, _ in self.items if len(s) == 1}
        firsts = {s[0] for s, _ in self.items if len(s) > 1}
        seconds = {s[1] for s, _ in self.items if len(s) > 1}
        # Every position where some surface may start (a superset; checked by dict look-ups):
        # a single-char surface, or a first char followed by a second char. The pattern starts
        # with one class, so `re` scans for it with its fast class loop.
        self.start_re = None
        if self.items:
            self.start_re = re.compile(_bmp_class_or_astral(singles | firsts) + "(?:(?<="
                                       + _bmp_class_or_astral(singles or {"\n"}) + ")|(?="
                                       + _bmp_class_or_astral(seconds or {"\n"}) + "))")
        self.exact = self._no_overlap_with_tokens()

    def _no_overlap_with_tokens(self):
        tokens = set(v for _, v in self.items)
        for surface, _ in self.items:
            for token in tokens:
                if surface in token or token in surface:
                    return False
                for k in range(1, len(token)):
                    # surface starting with a token tail, or ending with a token head
                    if surface.startswith(token[k:]) or surface.endswith(token[:k]):
                        return False
        return True

    def __call__(self, text):
        if self.start_re is None or self.start_re.search(text) is None:
            return text
        if not self.exact:
            for surface, token in self.items:
                if surface in text:
                    text = text.replace(surface, token)
            return text
        found = []  # (start, end, table index) of every occurrence, overlapping ones too
        lengths, order = self.lengths, self.order
        for m in self.start_re.finditer(text):
            p = m.start()
            if text[p] in order:
                found.append((p, p + 1, order[text[p]]))
            for length in lengths.get(text[p:p + 2], ()):
                if text[p:p + length] in order:
                    found.append((p, p + length, order[text[p:p + length]]))
        if not found:
            return text
        if all(a[1] <= b[0] for a, b in zip(found, found[1:])):
            # disjoint occurrences: replacing them one surface after another is one pass
            pieces, pos = [], 0
            for start, end, k in found:
                pieces += (text[pos:start], self.items[k][1])
                pos = end
            pieces.append(text[pos:])
            return "".join(pieces)
        for k in sorted({k for _, _, k in found}):
            surface, token = self.items[k]
            text = text.replace(surface, token)
        return text


def _bmp_class_or_astral(chars):
    """A regex class with the BMP chars of `chars`, plus ALL astral chars if any is astral:
    `re` tests a class holding astral chars one member at a time, but a BMP class by bitmap."""
    bmp = sorted(c for c in chars if ord(c) <= 0xFFFF)
    astral = r"\U00010000-\U0010FFFF" if len(bmp) < len(chars) else ""
    return "[" + "".join(re.escape(c) for c in bmp) + astral + "]"


# ----------------------------------------------------------------------------------------------
# Step 3: cleaning (URL, e-mail, phone, dates, prices, box drawing) in linear time
# ----------------------------------------------------------------------------------------------
# The published patterns, for reference and for the stages where Python's `re` is already linear.
_URL_RE = re.compile(r"(https?|ftp)(:\/\/[-_\.!~*\'()a-zA-Z0-9;\/?:\@&=\+$,%#]+)")
_EMAIL_RE = re.compile(r"[A-Za-z0-9\._+]*@[\-_0-9A-Za-z]+(\.[A-Za-z]+)*")
_TEL_PATTERN = r"[\(]{0,1}[0-9]{2,4}[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}"
# The same matches, tried in the same order, but starting with one class so that `re` scans
# for candidates with its fast class loop: `(` then 2-4 digits, or a digit then 1-3 more.
_TEL_RE = re.compile(r"[\(0-9](?:(?<=\()[0-9]{2,4}|(?<=[0-9])[0-9]{1,3})"
                     r"[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}")
_DATE_TAIL = (r"(\d{1,2}|:|\d{1,2}時|\d{1,2}分|\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\)"
              r"|㈰|㈪|㈫|㈬|㈭|㈮|㈯)*")
_DATE_PATTERN = (r"([12]\d{3}[/\-年])*(0?[1-9]|1[0-2])[/\-月]((0?[1-9]|[12][0-9]|3[01])日?)*"
                 + _DATE_TAIL)
_ERA_DATE_RE = re.compile(r"(明治|大正|昭和|平成|令和|㍾|㍽|㍼|㍻|\u32ff)\d{1,2}年(0?[1-9]|1[0-2])月"
                          r"(0?[1-9]|[12][0-9]|3[01])日" + _DATE_TAIL)
_PRICE_UNITS = ("千円", "万円", "千万円", "円", "千ドル", "万ドル", "千万ドル", "ドル", "千ユーロ",
                "万ユーロ", "千万ユーロ", "ユーロ")
_PRICE_TAXES = ("(税込)", "(税抜)", "+tax")
_PRICE_PATTERN = (r"((0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*億)*((0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*万)*"
                  r"((0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*千)*(0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)*"
                  r"(" + "|".join(_PRICE_UNITS) + r")+(\(税込\)|\(税抜\)|\+tax)*")

# E-mail: a match's '@' is followed by a domain character; its start is the beginning of the run
# of local-part characters before that '@' (or the search position, if later).
_EMAIL_AT_RE = re.compile(r"@(?=[\-_0-9A-Za-z])")
_EMAIL_LOCAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+")
# Western dates: `Y*M` + tail, Y = one fixed-length year group, M = month + separator.
_DATE_YEAR_RE = re.compile(r"[12]\d{3}[/\-年]")
_DATE_YEAR_LEN = 5
_DATE_MONTH_RE = re.compile(r"(0?[1-9]|1[0-2])[/\-月]")
# Superset of the places where the month part can match (a class first: fast scan in `re`).
_DATE_HINT_RE = re.compile(r"[0-9][0-9]?[/\-月]")
_DATE_REST_RE = re.compile(r"((0?[1-9]|[12][0-9]|3[01])日?)*" + _DATE_TAIL)
_DATE_RUN_RE = re.compile(r"[\d/\-年月]+")  # all characters `Y*M` can consume
_DATE_RUN_CHARS_RE = re.compile(r"[\d/\-年月]")
# The year groups and month of the pattern; runs up to this length go to `re` (its cost is
# quadratic in the run length), longer ones to the linear `best` recursion.
_DATE_HEAD_RE = re.compile(r"([12]\d{3}[/\-年])*(0?[1-9]|1[0-2])[/\-月]")
_DATE_SHORT_RUN = 64
# Prices: the numeric prefix only holds digits, ',', 億, 万, 千, and is followed by a currency.
_PRICE_RE = re.compile(_PRICE_PATTERN)
_PRICE_CURRENCY_RE = re.compile(r"円|ドル|ユーロ")
_PRICE_PREFIX_EXTRA = frozenset(",億万千")
# Numeric prefixes up to this length go to `re` (its backtracking is exponential in it; 2**8 is
# small), longer ones to `_PrefixAutomaton`.
_PRICE_SHORT_PREFIX = 8
_ASCII_DIGIT_RE = re.compile(r"[0-9]")  # in every phone number and western date
_BLOCK_RUN_RE = re.compile(r"(?:<BLOCK>){2,}")
_BLOCK_CHAR_RE = re.compile("[" + _BLOCK_CHARS[0] + "-" + _BLOCK_CHARS[-1] + "]")
# A char that every match of some cleaning stage contains: ':' (URL), '@', an ASCII digit (phone,
# western date), 年 (era date), 円/ド/ユ (prices), a box-drawing or block char.
_CLEAN_TRIGGER_RE = re.compile("[:@0-9年円ドユ" + _BLOCK_CHARS[0] + "-" + _BLOCK_CHARS[-1] + "]")


def _sub_email(text):
    """`_EMAIL_RE.sub('<EMAIL>', text)` in linear time (the pattern is quadratic on long words)."""
    if "@" not in text:
        return text
    pieces, pos = [], 0
    while True:
        at = _EMAIL_AT_RE.search(text, pos)
        if at is None:
            break
        start = at.start()
        while start > pos and text[start - 1] in _EMAIL_LOCAL_CHARS:
            start -= 1
        end = _EMAIL_RE.match(text, start).end()  # succeeds: the run from `start` reaches '@'
        pieces += (text[pos:start], "<EMAIL>")
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces)


def _sub_western_date(text):
    """`re.sub(_DATE_PATTERN, '<DATE>', text)` in linear time (the pattern is quadratic on long
    runs of year groups). The year groups and the month of a match lie in one run of
    [\\d/\\-年月] that contains a hint; the rest of the match can always be empty. Short runs go
    to `re`; in long ones, from a start p `re` takes the most year groups after which a month
    matches, and a year group at p excludes a month at p, so best(p) = best(p+5) or month(p)."""
    if _DATE_HINT_RE.search(text) is None:
        return text
    pieces, pos, scan = [], 0, 0
    while True:
        hint = _DATE_HINT_RE.search(text, scan)
        if hint is None:
            break
        run_end = _DATE_RUN_RE.match(text, hint.start()).end()
        run_start = hint.start()
        while run_start > pos and _DATE_RUN_CHARS_RE.match(text, run_start - 1):
            run_start -= 1
        for start, month_end in _date_starts(text, run_start, run_end):
            if start >= pos:
                pieces += (text[pos:start], "<DATE>")
                pos = _DATE_REST_RE.match(text, month_end).end()
        scan = max(pos, run_end)
    pieces.append(text[pos:])
    return "".join(pieces)


def _date_starts(text, run_start, run_end):
    """Yields (start, end of the month part) of the date matches from each start in the run
    that `re` would try, left to right; the caller skips starts inside a previous match."""
    if run_end - run_start <= _DATE_SHORT_RUN:
        p = run_start
        while True:
            m = _DATE_HEAD_RE.search(text, p, run_end)
            if m is None:
                return
            yield m.start(), m.end()
            p = m.start() + 1
    best = {}  # start -> end of the month part of the match from start
    for p in range(run_end - 1, run_start - 1, -1):
        found = None
        if _DATE_YEAR_RE.match(text, p):
            found = best.get(p + _DATE_YEAR_LEN)
        if found is None:
            m = _DATE_MONTH_RE.match(text, p)
            found = m.end() if m else None
        if found is not None:
            best[p] = found
    for p in range(run_start, run_end):
        if p in best:
            yield p, best[p]


class _PrefixAutomaton:
    """Start positions from which a small regex matches exactly up to one of a set of end
    positions: the regex compiled to an NFA program, run backwards over the text with its state
    sets memoised per character class (a lazily built DFA), so in linear time.

    `classify(char)` maps chars to small ints such that every char test of the regex gives the
    same answer on all chars of a class; `representatives[k]` is one char of class k.
    """

    CHAR, SPLIT, JMP, ACCEPT = range(4)

    def __init__(self, node, classify, representatives):
        self.prog = []
        self._emit(node)
        self.prog.append((self.ACCEPT, None, None))
        self.classify, self.representatives = classify, representatives
        self._sets, self._ids, self._steps = [], {}, {}
        self.empty = self._intern(frozenset())

    def _emit(self, node):
        kind, args = node[0], node[1:]
        prog = self.prog
        if kind == "chars":  # one character passing the test
            prog.append((self.CHAR, args[0], None))
        elif kind == "lit":
            for c in args[0]:
                prog.append((self.CHAR, c.__eq__, None))
        elif kind == "seq":
            for child in args:
                self._emit(child)
        elif kind == "alt":
            jumps = []
            for child in args[:-1]:
                split = len(prog)
                prog.append(None)
                self._emit(child)
                jumps.append(len(prog))
                prog.append(None)
                prog[split] = (self.SPLIT, split + 1, len(prog))
            self._emit(args[-1])
            for j in jumps:
                prog[j] = (self.JMP, len(prog), None)
        elif kind == "star":
            split = len(prog)
            prog.append(None)
            self._emit(args[0])
            prog.append((self.JMP, split, None))
            prog[split] = (self.SPLIT, split + 1, len(prog))
        elif kind == "plus":
            start = len(prog)
            self._emit(args[0])
            prog.append((self.SPLIT, start, len(prog) + 1))
        elif kind == "opt":
            split = len(prog)
            prog.append(None)
            self._emit(args[0])
            prog[split] = (self.SPLIT, split + 1, len(prog))
        else:
            raise ValueError(f"unknown regex node {kind}")

    def _intern(self, states):
        if states not in self._ids:
            self._ids[states] = len(self._sets)
            self._sets.append(states)
        return self._ids[states]

    def _step(self, after, char_class, accept_here):
        """Id of the set of instructions that, at a char of `char_class`, lead to acceptance,
        given the set `after` for the next position."""
        key = (after, char_class, accept_here)
        if key not in self._steps:
            char, later = self.representatives[char_class], self._sets[after]
            states = {pc for pc, (op, test, _) in enumerate(self.prog)
                      if op == self.CHAR and pc + 1 in later and test(char)}
            if accept_here:
                states.add(len(self.prog) - 1)
            grown = True
            while grown:  # epsilon closure, backwards
                grown = False
                for pc, (op, a, b) in enumerate(self.prog):
                    if pc not in states and ((op == self.SPLIT and (a in states or b in states))
                                             or (op == self.JMP and a in states)):
                        states.add(pc)
                        grown = True
            self._steps[key] = self._intern(frozenset(states))
        return self._steps[key]

    def first_start(self, text, start, stop, ends):
        """Smallest p in [start, stop] such that text[p:e] matches for some e in `ends` (all in
        [start, stop]), or None."""
        current, first = self.empty, None
        for i in range(stop, start - 1, -1):
            char_class = self.classify(text[i]) if i < len(text) else None
            current = self._step(current, char_class, i in ends)
            if 0 in self._sets[current]:
                first = i
        return first


def _price_class(char):
    """Classes of chars for the numeric prefix of the price pattern (see _PRICE_REPRESENTATIVES)."""
    if "0" <= char <= "9":
        return 0 if char == "0" else 1
    if char.isdecimal():  # `\d` of a str pattern is exactly str.isdecimal
        return 2
    return _PRICE_SYMBOL_CLASSES.get(char, 7)


_PRICE_SYMBOL_CLASSES = {",": 3, "億": 4, "万": 5, "千": 6}
_PRICE_REPRESENTATIVES = {0: "0", 1: "1", 2: "\uff11", 3: ",", 4: "億", 5: "万", 6: "千", 7: "x",
                          None: "x"}


def _price_prefix_automaton():
    """`((N)*億)*((N)*万)*((N)*千)*(N)*` of the price pattern,
    N = 0|[1-9]\\d*|[1-9]\\d{0,2}(,\\d{3})+."""
    digit = ("chars", str.isdecimal)
    nonzero = ("chars", frozenset("123456789").__contains__)
    number = ("alt", ("lit", "0"), ("seq", nonzero, ("star", digit)),
              ("seq", nonzero, ("opt", ("seq", digit, ("opt", digit))),
               ("plus", ("seq", ("lit", ","), digit, digit, digit))))
    groups = [("star", ("seq", ("star", number), ("lit", unit))) for unit in "億万千"]
    return _PrefixAutomaton(("seq", *groups, ("star", number)), _price_class,
                            _PRICE_REPRESENTATIVES)


_PRICE_PREFIX = _price_prefix_automaton()
# From the currency on, a price match is the same whatever unit start the prefix reached:
# the currency word, more units, taxes (each the first alternative that matches, as in `re`).
_PRICE_END_RE = re.compile(r"(?:円|ドル|ユーロ)(" + "|".join(_PRICE_UNITS) + r")*(\(税込\)|\(税抜\)|\+tax)*")


def _sub_price(text):
    """`re.sub(_PRICE_PATTERN, '<PRICE>', text)` in linear time (the pattern is exponential on
    digit runs). A match is a numeric prefix from the run of [\\d,億万千] just before a 円, ドル
    or ユーロ, then a unit starting at the currency or 1-2 chars (千, 万, 千万) before it, then
    more units and taxes. The unit start only decides whether the prefix can end there: the
    match ends at the same place. So the next match starts at the first position of that run
    from which the prefix pattern reaches a unit start; the currency itself always qualifies."""
    pieces, pos = [], 0
    while True:
        currency = _PRICE_CURRENCY_RE.search(text, pos)
        if currency is None:
            break
        stop = currency.start()
        start = stop
        while start > pos and (text[start - 1].isdecimal()
                               or text[start - 1] in _PRICE_PREFIX_EXTRA):
            start -= 1
        if stop - start <= _PRICE_SHORT_PREFIX:
            p = next(p for p in range(start, stop + 1) if _PRICE_RE.match(text, p))
        else:
            units = {stop}
            if text[stop - 1] in "千万":
                units.add(stop - 1)
            if text[stop - 2:stop] == "千万":
                units.add(stop - 2)
            p = _PRICE_PREFIX.first_start(text, start, stop, units)
        pieces += (text[pos:p], "<PRICE>")
        pos = _PRICE_END_RE.match(text, stop).end()
    pieces.append(text[pos:])
    return "".join(pieces)


def clean_text(text):
    """Published `clean_text`: URL, e-mail, phone, date, price and box-drawing placeholders.
    Each stage is skipped when the text lacks what every one of its matches contains."""
    if _CLEAN_TRIGGER_RE.search(text) is None and "<BLOCK><BLOCK>" not in text:
        return text  # none of the stages below can match (one scan instead of ~8)
    if "://" in text:
        text = _URL_RE.sub("<URL>", text)
    text = _sub_email(text)
    if _ASCII_DIGIT_RE.search(text):
        text = _TEL_RE.sub("<TEL>", text)
        text = _sub_western_date(text)
    if "年" in text:
        text = _ERA_DATE_RE.sub("<DATE>", text)
    if "円" in text or "ドル" in text or "ユーロ" in text:
        text = _sub_price(text)
    if _BLOCK_CHAR_RE.search(text):
        text = _BLOCK_CHAR_RE.sub("<BLOCK>", text)
    if "<BLOCK><BLOCK>" in text:
        text = _BLOCK_RUN_RE.sub("<BLOCK>", text)
    return text


# ----------------------------------------------------------------------------------------------
# Step 4 for long texts: the same decisions, looked up for all positions at once with numpy
# ----------------------------------------------------------------------------------------------
# Windows are keyed by their code points in base 0x110001 (a 3-char key < 2**61 fits int64);
# the digit 0x110000 pads windows past the end of the text, so they match no form.
_CP_RADIX = 0x110001
_CP_PAD = 0x110000
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing (2**64 / golden ratio)
_EMPTY_KEY = -1  # keys are >= 0
# Texts at least this long use `_VectorScanner` (below it, numpy's per-call cost dominates;
# the two scans break even at ~900 chars of Japanese text).
VECTOR_MIN_CHARS = 1000


class _IntHashTable:
    """Open-addressing (linear probing) hash table int64 key -> int64 value, at most 1/4 full,
    looked up for a whole array of keys at once."""

    def __init__(self, keys, values):
        keys, values = np.asarray(keys, np.int64), np.asarray(values, np.int64)
        bits = max(4, int(len(keys) * 4).bit_length())
        self.shift, self.mask = np.uint64(64 - bits), (1 << bits) - 1
        self.keys = np.full(1 << bits, _EMPTY_KEY, np.int64)
        self.values = np.zeros(1 << bits, np.int64)
        pending, slots = np.arange(len(keys)), self._hash(keys)
        while len(pending):  # each round: the first claimant of a free slot takes it
            free = self.keys[slots] == _EMPTY_KEY
            taken, first = np.unique(slots[free], return_index=True)
            winners = pending[free][first]
            self.keys[taken], self.values[taken] = keys[winners], values[winners]
            stay = np.ones(len(pending), bool)
            stay[np.flatnonzero(free)[first]] = False
            pending, slots = pending[stay], (slots[stay] + 1) & self.mask

    def _hash(self, keys):
        return ((keys.astype(np.uint64) * _HASH_MULTIPLIER) >> self.shift).astype(np.int64)

    def lookup(self, keys, default):
        """Values of `keys` (int64 array); `default` where a key is absent."""
        out = np.full(len(keys), default, np.int64)
        todo, slots = np.arange(len(keys)), self._hash(keys)
        while len(todo):  # probe until the key or an empty slot
            found = self.keys[slots]
            hit = found == keys[todo]
            out[todo[hit]] = self.values[slots[hit]]
            more = ~hit & (found != _EMPTY_KEY)
            todo, slots = todo[more], (slots[more] + 1) & self.mask
        return out


class _VectorScanner:
    """`SWEEncoder._scan` for long texts: the decision of EVERY position (the same tables: the
    2-char window, else the first char; a winning 3-char form; '<' rules) is looked up with
    array operations, then the token starts are the path 0 -> p + length(p) -> ..., found by
    pointer doubling (log2(tokens) array passes); the ids are the decisions at those starts.
    Exact: a token's decision depends only on the text from its start, never on the tokens
    before it."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.chars = self._table({(ord(c),): v for c, v in encoder._char_codes.items()})
        self.pairs = self._table({tuple(map(ord, k)): v for k, v in encoder._pair_codes.items()})
        self.triples = self._table({tuple(map(ord, k)): v
                                    for k, v in encoder._triple_codes.items()})
        # 4-char specials that no longer form extends (<SP>, <BR>): decided without Python
        self.short_specials = [(tuple(map(ord, f[1:])), i)
                               for f, i in encoder._short_specials.items()]

    @staticmethod
    def _table(items):
        keys = [_window_key(cps) for cps in items]
        return _IntHashTable(keys, list(items.values()))

    def scan(self, text):
        """Token ids of `text` (after steps 1-3), equal to `SWEEncoder._scan(text)`."""
        try:
            cps = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        except UnicodeEncodeError:  # lone surrogate: the loop raises the published error
            return self.encoder._scan(text)
        n = len(cps)
        padded = np.concatenate([cps, np.full(3, _CP_PAD, np.int64)])
        ids, lengths = self._decide_all(text, padded, n)
        return self._follow(text, ids, lengths)

    def _decide_all(self, text, padded, n):
        """(id, length) of the token starting at every position; id -1: the char's fallback."""
        c0, c1, c2 = padded[:n], padded[1:n + 1], padded[2:n + 2]
        pair_keys = c0 * _CP_RADIX + c1
        code = self.pairs.lookup(pair_keys, 0)  # codes are never 0
        miss = np.flatnonzero(code == 0)
        code[miss] = self.chars.lookup(c0[miss], SWEEncoder._UNKNOWN_CHAR)
        extended = np.flatnonzero(code <= SWEEncoder._LOOK_AT_3)
        if len(extended):
            own = code[extended]
            own = np.where(own == SWEEncoder._LOOK_AT_3, SWEEncoder._UNKNOWN_CHAR, -own >> 2)
            triple = self.triples.lookup(pair_keys[extended] * _CP_RADIX + c2[extended], 0)
            code[extended] = np.where(triple != 0, triple, own)
        ids, lengths = code >> 2, code & 3
        unknown = code == SWEEncoder._UNKNOWN_CHAR
        ids[unknown], lengths[unknown] = -1, 1
        self._decide_lt(text, padded, np.flatnonzero(code == SWEEncoder._AT_LT), ids, lengths)
        return ids, lengths

    def _decide_lt(self, text, padded, at_lt, ids, lengths):
        """Decisions at '<' positions: the short specials by array comparison, others in Python."""
        rest = np.ones(len(at_lt), bool)
        for (a, b, c), token_id in self.short_specials:
            match = ((padded[at_lt + 1] == a) & (padded[at_lt + 2] == b)
                     & (padded[at_lt + 3] == c))
            ids[at_lt[match]], lengths[at_lt[match]] = token_id, 4
            rest &= ~match
        for pos in at_lt[rest].tolist():
            (token_id,), end = self.encoder._lt_decision(text, pos)  # always one token at '<'
            ids[pos], lengths[pos] = token_id, end - pos

    def _follow(self, text, ids, lengths):
        """Ids at the token starts 0, 0 + lengths[0], ...; fallback tokens expanded."""
        n = len(ids)
        jump = np.minimum(np.arange(n + 1) + np.append(lengths, 0), n)  # n: the end (a sink)
        path = np.zeros(1, np.int64)
        while path[-1] != n:  # path: the first 2**k starts; jump: 2**k steps at once
            path = np.concatenate([path, jump[path]])
            jump = jump[jump]
        starts = path[:np.searchsorted(path, n)]
        out = ids[starts]
        unknown = np.flatnonzero(out < 0)
        out = out.tolist()
        if not len(unknown):
            return out
        pieces, last = [], 0
        for k, pos in zip(unknown.tolist(), starts[unknown].tolist()):
            pieces += (out[last:k], self.encoder._unknown_chars.get(text[pos])
                       or self.encoder._fallback(text[pos]))
            last = k + 1
        pieces.append(out[last:])
        return [i for piece in pieces for i in piece]


def _window_key(code_points):
    """The int key of a window of 1-3 code points (`_CP_RADIX` digits)."""
    key = 0
    for cp in code_points:
        key = key * _CP_RADIX + cp
    return key


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------

class SWEEncoder:
    """Japanese sub-word encoder over a ja-swe vocabulary and emoji table.

    Args:
      vocab_lines: one string per token id (`open(path).read().split('\\n')`); an entry holds
        one or more comma-separated surface forms, the first is canonical.
      emoji_dict: {"emoji": {surface: "<|emojiK|>"}, "emoji_inv": {"<|emojiK|>": surface}}.
    """

    def __init__(self, vocab_lines, emoji_dict):
        self.entries = check_vocabulary(vocab_lines, allow_duplicate_forms=True)
        check_emoji_table(emoji_dict, self.entries)
        self.emoji = emoji_dict
        self.vocab = {}
        for idx, forms in enumerate(self.entries):
            for form in forms:
                self.vocab[form] = idx  # a form in two entries maps to the later (published)
        self.canonical = [forms[0] for forms in self.entries]
        self.maxlen = max(len(form) for form in self.vocab)
        n = len(self.entries)
        (self.sot, self.msk, self.sep, self.not_token, self.bag, self.seg,
         self.eot) = range(n - len(CONTROL_TOKENS), n)
        self.byte_offset = n - len(CONTROL_TOKENS) - NUM_BYTE_TOKENS  # id of <|byte0|>
        self._kigou = self.vocab["<KIGOU>"]
        self._u2000 = self.vocab["<U2000U2BFF>"]
        self._replace_emoji = _EmojiReplacer(emoji_dict["emoji"])
        # Forms that start with '<' and are longer than 2 chars win at once, longest first.
        specials = sorted((f for f in self.vocab if f[0] == "<" and len(f) > 2), key=len,
                          reverse=True)
        self._special_re = (re.compile("|".join(re.escape(f) for f in specials)) if specials
                            else None)
        self._unknown_chars = {}  # char -> its fallback ids
        self._char_codes, self._pair_codes, self._triple_codes = self._build_codes()
        self._hot_pair_codes, self._hot_triple_codes, self._rare_re = self._split_rare_forms()
        # 4-char forms starting with '<' that no longer form extends (<SP>, <BR>): fast path.
        self._short_specials = {f: i for f, i in self.vocab.items() if f[0] == "<" and len(f) == 4
                                and not any(g != f and g.startswith(f) for g in specials)}
        self._decode_table = self._build_decode_table()
        self._vector_scanner = _VectorScanner(self)

    @classmethod
    def from_files(cls, vocab_path, emoji_path):
        """Loads a ja-swe vocabulary file and its emoji JSON table."""
        vocab_lines = read_vocabulary_file(vocab_path)
        emoji = read_emoji_file(emoji_path)
        try:
            return cls(vocab_lines, emoji)
        except VocabularyError as err:
            raise VocabularyError(f"{vocab_path} / {emoji_path}: {err}") from None

    def __len__(self):
        return len(self.entries)

    def __contains__(self, surface):
        return surface in self.vocab

    def token_to_id(self, surface):
        """Id of a surface form (any form of a variant group)."""
        try:
            return self.vocab[surface]
        except KeyError:
            raise VocabularyError(f"{surface!r} is not in the vocabulary") from None

    def id_to_token(self, token_id):
        """Canonical (first) surface form of an id."""
        return self.canonical[self._check_id(token_id)]

    def byte_id(self, byte):
        """Id of `<|byteN|>` for 0 <= byte < 255."""
        if not 0 <= byte < NUM_BYTE_TOKENS:
            raise TokenizerInputError(f"no byte token for byte {byte}")
        return self.byte_offset + byte

    def _check_id(self, token_id):
        token_id = int(token_id)
        if not 0 <= token_id < len(self.entries):
            raise TokenizerInputError(
                f"token id {token_id} is out of range [0, {len(self.entries)})")
        return token_id

    # -- encode ------------------------------------------------------------------------------

    def encode(self, text, clean=False):
        """Token ids of `text` (DESIGN.md "Encoding rules"); `clean` adds the placeholder step."""
        if not isinstance(text, str):
            raise TokenizerInputError(f"encode expects str, got {type(text).__name__}")
        if not text:
            return []
        for old, new in _PRE_REPLACEMENTS:
            if old in text:
                text = text.replace(old, new)
        text = self._replace_emoji(text)
        if clean:
            text = clean_text(text)
        if len(text) >= VECTOR_MIN_CHARS:
            return self._vector_scanner.scan(text)
        if self._rare_re.search(text) is None:
            return self._scan(text, hot=True)
        return self._scan(text)

    # `_scan` decisions are ints: id * 4 + step (step 1..3) for one token, else one of these.
    _AT_LT = -1  # the window starts with '<': see `_encode_lt`
    _UNKNOWN_CHAR = -2  # no form starts here: the char's fallback tokens, step 1
    _LOOK_AT_3 = -3  # a winning 3-char form extends this 2-char window, which has no form
    # A 2-char window that a winning 3-char form extends and whose own decision is the positive
    # code c is stored as -4 * c (<= -4): the triple if present, else c (see `_build_codes`).

    def _scan(self, text, hot=False):
        """Published rule 4 from precomputed decisions: the 2-char window decides unless a
        3-char form extends it; a 2-char window that is not a form: its first char decides.
        One Python iteration per token, so the common cases are inlined here. `hot`: use the
        tables without rare chars (`_split_rare_forms`; `text` must hold no rare char)."""
        ids = []
        append = ids.append
        pairs, triples = ((self._hot_pair_codes, self._hot_triple_codes) if hot
                          else (self._pair_codes, self._triple_codes))
        get_pair, get_char = pairs.get, self._char_codes.get
        get_triple, get_special = triples.get, self._short_specials.get
        new_char = self._new_char
        pos, n = 0, len(text)
        while pos < n:
            # codes are never 0 (id * 4 + step >= 1, markers < 0), so `or` only skips None
            code = get_pair(text[pos:pos + 2]) or get_char(text[pos]) or new_char(text[pos])
            if code > 0:
                append(code >> 2)
                pos += code & 3
            elif code <= -4:  # the winning triple, else this pair's own decision
                code = get_triple(text[pos:pos + 3]) or (-code >> 2)
                append(code >> 2)
                pos += code & 3
            elif code == -1 and get_special(text[pos:pos + 4]) is not None:  # <SP>, <BR>
                append(get_special(text[pos:pos + 4]))
                pos += 4
            else:
                pos = self._encode_slow(text, pos, code, ids)
        return ids

    def _encode_slow(self, text, pos, code, ids):
        """Appends the tokens at `pos` for a marker decision; returns the next position."""
        if code == self._LOOK_AT_3:
            code = self._triple_codes.get(text[pos:pos + 3], self._UNKNOWN_CHAR)
        elif code == self._AT_LT:
            return self._encode_lt(text, pos, ids)
        if code > 0:
            ids.append(code >> 2)
            return pos + (code & 3)
        ids.extend(self._unknown_chars.get(text[pos]) or self._fallback(text[pos]))
        return pos + 1

    def _build_codes(self):
        """Decisions of every 1-char and 2-char form, and of every 3-char form that wins over its
        prefixes (a 3-char form with a larger id than a prefix never wins); a 2-char window that
        a winning 3-char form extends gets -4 * its own decision (LOOK_AT_3 if it has none)."""
        # Canonical forms first, in id order (the published ids follow frequency), each key a
        # fresh string: the common keys and codes end up close together in memory (cache hits).
        canonical = [forms[0] for forms in self.entries]
        variants = [form for forms in self.entries for form in forms[1:]]
        forms = [f[:1] + f[1:] for f in dict.fromkeys(canonical + variants) if f[0] != "<"]
        chars = {f: self._decide(f) for f in forms if len(f) == 1}
        chars["<"] = self._AT_LT
        triples = {}
        for triple in (f for f in forms if len(f) == 3):
            code = self._decide(triple)
            if code > 0 and code & 3 == 3:
                triples[triple] = code
        pairs = {f: self._decide(f) for f in forms if len(f) == 2}
        for pair in {t[:2] for t in triples}:
            # the pair's own decision: its form, or its first char's (never '<' here)
            own = self._decide(pair)
            pairs[pair] = -4 * own if own > 0 else self._LOOK_AT_3
        return chars, pairs, triples

    def _split_rare_forms(self):
        """(pair and triple decisions without rare chars, regex finding a rare char). The
        published table has ~140k variant spellings of 2-char forms (中囯, 𠁦国, ...) next to ~18k
        canonical ones; dict look-ups in the full tables miss the CPU caches. Every variant pair
        or triple gets one char in the rare set (the one in the fewest canonical forms), so on a
        text without rare chars the windows holding one never occur, and the smaller tables give
        the same decisions."""
        canonical = {forms[0] for forms in self.entries}
        variants = {f for forms in self.entries for f in forms[1:] if len(f) in (2, 3)} - canonical
        uses = {}  # char -> number of canonical forms containing it
        for form in canonical:
            for char in set(form):
                uses[char] = uses.get(char, 0) + 1
        rare = set()
        for form in sorted(variants):
            if not rare.intersection(form):
                rare.add(min(form, key=lambda c: (uses.get(c, 0), c)))
        pairs, triples = ({key: code for key, code in table.items() if not rare.intersection(key)}
                          for table in (self._pair_codes, self._triple_codes))
        rare_re = re.compile(_bmp_class_or_astral(rare)) if rare else re.compile(r"(?!)")
        return pairs, triples, rare_re

    def _new_char(self, char):
        """Decision for a char that is not a form (its fallback), cached (bounded)."""
        code = self._decide(char)
        if len(self._char_codes) < MAX_CACHED_DECISIONS:
            self._char_codes[char] = code
        return code

    def _decide(self, window):
        """Decision at a window of 1-3 chars (published rule 4 at a char other than '<'): among
        its prefixes in the vocabulary the smallest id wins (the longer one on a tie); no match:
        the fallback tokens of the first char."""
        if window[0] == "<":
            return self._AT_LT
        best = self._smallest_id(window)
        if best is not None:
            return best[0] * 4 + best[1]
        if window[0] not in self._unknown_chars and len(self._unknown_chars) < MAX_CACHED_DECISIONS:
            self._unknown_chars[window[0]] = self._fallback(window[0])
        return self._UNKNOWN_CHAR

    def _smallest_id(self, window):
        """(id, length) of the prefix of `window` in the vocabulary with the smallest id."""
        best = None
        for length in range(len(window), 0, -1):
            token_id = self.vocab.get(window[:length])
            if token_id is not None and (best is None or token_id < best[0]):
                best = (token_id, length)
        return best

    def _encode_lt(self, text, pos, ids):
        """At '<': appends the token(s) of `_lt_decision`; returns the next position."""
        token_ids, end = self._lt_decision(text, pos)
        ids.extend(token_ids)
        return end

    def _lt_decision(self, text, pos):
        """(ids, end) at a '<': the longest form longer than 2 chars wins at once, else the
        2/1-char rule (smallest id), else the byte token of '<'."""
        code = self._short_specials.get(text[pos:pos + 4])
        if code is not None:
            return (code,), pos + 4
        if self._special_re is not None:
            m = self._special_re.match(text, pos)
            if m is not None:
                return (self.vocab[m.group()],), m.end()
        best = self._smallest_id(text[pos:pos + 2])
        if best is None:
            return self._fallback("<"), pos + 1
        return (best[0],), pos + best[1]

    def _fallback(self, char):
        """<KIGOU>, <U2000U2BFF> or one byte token per UTF-8 byte of an unknown character."""
        code = ord(char)
        if any(lo <= code <= hi for lo, hi in _KIGOU_RANGES):
            return (self._kigou,)
        if _U2000_RANGE[0] <= code <= _U2000_RANGE[1]:
            return (self._u2000,)
        try:
            data = char.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenizerInputError(
                f"cannot encode the lone surrogate U+{code:04X} (not valid Unicode text; "
                f"decode the source with errors='replace' or fix it)") from None
        return tuple(self.byte_offset + b for b in data)

    # -- decode ------------------------------------------------------------------------------

    def decode(self, ids, breakline="\n"):
        """Text of token ids: canonical forms; byte tokens joined and decoded as UTF-8 (invalid
        bytes -> U+FFFD); emoji classes -> their emoji; <SP>, <BR>, <TAB> and the character-class
        tokens -> their character; other special and control tokens as written."""
        table = self._decode_table
        words, pending = [], bytearray()
        for token_id in ids:
            word = table[self._check_id(token_id)]
            if word.__class__ is int:
                pending.append(word)
                continue
            if pending:
                words.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            words.append(breakline if word is _BR else word)
        if pending:
            words.append(pending.decode("utf-8", errors="replace"))
        return "".join(words)

    def _build_decode_table(self):
        """Per id: a byte value (int), the line-break marker, or the text it decodes to."""
        table = []
        for word in self.canonical:
            byte = BYTE_TOKEN_RE.match(word)
            if byte is not None and int(byte.group(1)) < 256:
                table.append(int(byte.group(1)))
            elif word == "<BR>":
                table.append(_BR)
            elif word in _DECODE_SURFACES:
                table.append(_DECODE_SURFACES[word])
            elif word.startswith("<|emoji") and word.endswith("|>"):
                table.append(self.emoji["emoji_inv"].get(word, word))
            else:
                table.append(word)
        return table
