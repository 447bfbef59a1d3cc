"""The ja-swe tokenizer's speed machinery: the rules of `gptsan.tokenization_reference`, compiled.

`gptsan.tokenization.SWEEncoder` runs steps 2-4 of the encoding rules through these, with the
same output as `ReferenceEncoder` (tests/test_tokenization.py checks both on the golden outputs
and on generated texts), 10-30x faster and in linear time:

* step 2, `EmojiReplacer`: one scan for the emoji present instead of ~4,300 `str.replace` calls;
* step 3, `clean_text`: the published cleaning regexes backtrack catastrophically (e.g.
  `'1１' * 16 + 'x'`); here the e-mail, western-date and price stages find the same matches as
  Python's backtracking `re` with linear procedures (the price prefix by `_PrefixAutomaton`, a
  small regex-to-NFA compiler run backwards as a lazily built DFA);
* step 4, `Scanner`: precomputed decisions per 2-char window, read by a loop of one Python
  iteration per token, from tables without the ~140k rare variant spellings when the text has
  none of their rare chars; texts of VECTOR_MIN_CHARS or more are decided at all positions at
  once with numpy (`_VectorScanner`: an int64 hash table, then pointer doubling).
"""
import re

import numpy as np

from gptsan.tokenization_reference import (BLOCK_CHARS, DATE_DAYS, DATE_MONTH, DATE_TAIL,
                                           DATE_YEAR, EMAIL_PATTERN, ERA_DATE_PATTERN,
                                           PRICE_PATTERN, PRICE_TAXES, PRICE_UNITS, URL_PATTERN,
                                           replace_emoji)

# Bound on the caches of chars without a form (entries of ~100 bytes: ~100 MB at most).
MAX_CACHED_DECISIONS = 1_000_000
# Texts at least this long use `_VectorScanner` (below it, numpy's per-call cost dominates;
# the two scans break even at ~900 chars of Japanese text).
VECTOR_MIN_CHARS = 1000

# ----------------------------------------------------------------------------------------------
# Step 2: emoji surfaces -> class tokens
# ----------------------------------------------------------------------------------------------

class EmojiReplacer:
    """`tokenization_reference.replace_emoji(text, table)` without its ~4,300 scans per call.

    When no surface can overlap an inserted class token (checked here; true for the published
    table), a surface absent from the input never appears later, so replacing only the surfaces
    present in the input, in table order, gives the same text. Otherwise the plain loop runs.
    """

    def __init__(self, table):
        self.table = table
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
        """True if no surface lies inside a class token or holds one, starts with the tail of
        one or ends with the head of one."""
        tokens = {token for _, token in self.items}
        if "" in tokens:
            return False  # an empty token is in every surface
        inside = {t[i:j] for t in tokens for i in range(len(t)) for j in range(i + 1, len(t) + 1)}
        heads = {t[:k] for t in tokens for k in range(1, len(t))}
        tails = {t[k:] for t in tokens for k in range(1, len(t))}
        by_first_char = {}
        for token in tokens:
            by_first_char.setdefault(token[0], []).append(token)
        for surface, _ in self.items:
            if (surface in inside
                    or any(t in surface for c in set(surface) for t in by_first_char.get(c, ()))
                    or any(surface[:j] in tails or surface[-j:] in heads
                           for j in range(1, len(surface) + 1))):
                return False
        return True

    def __call__(self, text):
        if self.start_re is None or self.start_re.search(text) is None:
            return text
        if not self.exact:
            return replace_emoji(text, self.table)
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
# The stages where Python's `re` is already linear use the published patterns as they are.
_URL_RE = re.compile(URL_PATTERN)
_EMAIL_RE = re.compile(EMAIL_PATTERN)
_ERA_DATE_RE = re.compile(ERA_DATE_PATTERN)
# TEL_PATTERN's matches, tried in the same order, but starting with one class so that `re` scans
# for candidates with its fast class loop: `(` then 2-4 digits, or a digit then 1-3 more.
_TEL_RE = re.compile(r"[\(0-9](?:(?<=\()[0-9]{2,4}|(?<=[0-9])[0-9]{1,3})"
                     r"[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}")

# E-mail: a match's '@' is followed by a domain character; its start is the beginning of the run
# of local-part characters before that '@' (or the search position, if later).
_EMAIL_AT_RE = re.compile(r"@(?=[\-_0-9A-Za-z])")
_EMAIL_LOCAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+")
# Western dates: `Y*M` + tail, Y = one fixed-length year group, M = month + separator.
_DATE_YEAR_RE = re.compile(DATE_YEAR)
_DATE_YEAR_LEN = 5
_DATE_MONTH_RE = re.compile(DATE_MONTH)
# Superset of the places where the month part can match (a class first: fast scan in `re`).
_DATE_HINT_RE = re.compile(r"[0-9][0-9]?[/\-月]")
_DATE_REST_RE = re.compile(DATE_DAYS + DATE_TAIL)
_DATE_RUN_RE = re.compile(r"[\d/\-年月]+")  # all characters `Y*M` can consume
_DATE_RUN_CHARS_RE = re.compile(r"[\d/\-年月]")
# The year groups and month of the pattern; runs up to this length go to `re` (its cost is
# quadratic in the run length), longer ones to the linear `best` recursion.
_DATE_HEAD_RE = re.compile(f"({DATE_YEAR})*{DATE_MONTH}")
_DATE_SHORT_RUN = 64
# Prices: the numeric prefix only holds digits, ',', 億, 万, 千, and is followed by a currency.
_PRICE_RE = re.compile(PRICE_PATTERN)
_PRICE_CURRENCY_RE = re.compile(r"円|ドル|ユーロ")
_PRICE_PREFIX_EXTRA = frozenset(",億万千")
# Numeric prefixes up to this length go to `re` (its backtracking is exponential in it; 2**8 is
# small), longer ones to `_PrefixAutomaton`.
_PRICE_SHORT_PREFIX = 8
_ASCII_DIGIT_RE = re.compile(r"[0-9]")  # in every phone number and western date
_BLOCK_RUN_RE = re.compile(r"(?:<BLOCK>){2,}")
_BLOCK_CHAR_RE = re.compile("[" + BLOCK_CHARS[0] + "-" + BLOCK_CHARS[-1] + "]")
# A char that every match of some cleaning stage contains: ':' (URL), '@', an ASCII digit (phone,
# western date), 年 (era date), 円/ド/ユ (prices), a box-drawing or block char.
_CLEAN_TRIGGER_RE = re.compile("[:@0-9年円ドユ" + BLOCK_CHARS[0] + "-" + BLOCK_CHARS[-1] + "]")


def _sub_email(text):
    """`_EMAIL_RE.sub('<EMAIL>', text)` in linear time (the pattern is quadratic on long words)."""
    if "@" not in text:
        return text
    return _sub_runs(text, _EMAIL_AT_RE, _EMAIL_LOCAL_CHARS.__contains__, _email_span, "<EMAIL>")


def _email_span(text, run_start, at):
    """The match starts at the run: it reaches the '@', which a domain character follows."""
    return run_start, _EMAIL_RE.match(text, run_start).end()


def _sub_runs(text, anchor_re, in_run, span, placeholder):
    """`placeholder` for the matches of a pattern whose every match holds an anchor (found by
    `anchor_re`) and starts in the run of chars (`in_run(char)`) just before it;
    `span(text, run_start, anchor)` gives (start, end) of the match at an anchor. Runs do not
    reach back into the previous match."""
    pieces, pos = [], 0
    while True:
        anchor = anchor_re.search(text, pos)
        if anchor is None:
            break
        run_start = anchor.start()
        while run_start > pos and in_run(text[run_start - 1]):
            run_start -= 1
        start, end = span(text, run_start, anchor)
        pieces += (text[pos:start], placeholder)
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces)


def _sub_western_date(text):
    """`re.sub(DATE_PATTERN, '<DATE>', text)` in linear time (the pattern is quadratic on long
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
_PRICE_END_RE = re.compile(f"(?:円|ドル|ユーロ)({'|'.join(PRICE_UNITS)})*{PRICE_TAXES}*")


def _sub_price(text):
    """`re.sub(PRICE_PATTERN, '<PRICE>', text)` in linear time (the pattern is exponential on
    digit runs). A match is a numeric prefix from the run of [\\d,億万千] just before a 円, ドル
    or ユーロ, then a unit starting at the currency or 1-2 chars (千, 万, 千万) before it, then
    more units and taxes. The unit start only decides whether the prefix can end there: the
    match ends at the same place. So the next match starts at the first position of that run
    from which the prefix pattern reaches a unit start; the currency itself always qualifies."""
    return _sub_runs(text, _PRICE_CURRENCY_RE, _in_price_prefix, _price_span, "<PRICE>")


def _in_price_prefix(char):
    return char.isdecimal() or char in _PRICE_PREFIX_EXTRA


def _price_span(text, run_start, currency):
    stop = currency.start()
    if stop - run_start <= _PRICE_SHORT_PREFIX:
        start = next(p for p in range(run_start, stop + 1) if _PRICE_RE.match(text, p))
    else:
        units = {stop}
        if text[stop - 1] in "千万":
            units.add(stop - 1)
        if text[stop - 2:stop] == "千万":
            units.add(stop - 2)
        start = _PRICE_PREFIX.first_start(text, run_start, stop, units)
    return start, _PRICE_END_RE.match(text, stop).end()


def clean_text(text):
    """Step 3 (URL, e-mail, phone, date, price and box-drawing placeholders), equal to
    `tokenization_reference.clean_text` in linear time. Each stage is skipped when the text
    lacks what every one of its matches contains."""
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
# Step 4: decisions per window, compiled from `ReferenceEncoder.match_at`
# ----------------------------------------------------------------------------------------------
# A decision is an int: id * 4 + length (1..3) for one token, else one of these markers.
AT_LT = -1  # the window starts with '<': see `Scanner.lt_decision`
UNKNOWN_CHAR = -2  # no form starts here: the char's fallback tokens, length 1
LOOK_AT_3 = -3  # a winning 3-char form extends this 2-char window, which has no form
# A 2-char window that a winning 3-char form extends and whose own decision is the positive
# code c is stored as -4 * c (<= -4): the triple if present, else c (see `_build_codes`).


class Scanner:
    """Step 4 of a `ReferenceEncoder` from precomputed decisions: at a position, the 2-char
    window decides unless a 3-char form extends it; a 2-char window that is not a form: its
    first char decides; '<' by the rule for specials. Exact because the token starting at a
    position depends only on the text from there: the 1-3 chars after it, or the specials."""

    def __init__(self, encoder):
        self.encoder = encoder  # the ReferenceEncoder whose rules are compiled
        self.unknown_chars = {}  # char -> its fallback ids
        self.char_codes, self.pair_codes, self.triple_codes = self._build_codes()
        self.hot_pair_codes, self.hot_triple_codes, self.rare_re = self._split_rare_forms()
        # 4-char forms starting with '<' that no longer form extends (<SP>, <BR>): fast path.
        specials = [f for f in encoder.vocab if f[0] == "<"]
        self.short_specials = {f: encoder.vocab[f] for f in specials if len(f) == 4
                               and not any(g != f and g.startswith(f) for g in specials)}
        self.vector = _VectorScanner(self)

    def scan(self, text):
        """Token ids of `text` (after steps 1-3), equal to `ReferenceEncoder.scan(text)`."""
        if len(text) >= VECTOR_MIN_CHARS:
            return self.vector.scan(text)
        if self.rare_re.search(text) is None:
            return self.loop(text, hot=True)
        return self.loop(text)

    def loop(self, text, hot=False):
        """One Python iteration per token, so the common cases are inlined here. `hot`: use
        the tables without rare chars (`_split_rare_forms`; `text` must hold no rare char)."""
        ids = []
        append = ids.append
        pairs, triples = ((self.hot_pair_codes, self.hot_triple_codes) if hot
                          else (self.pair_codes, self.triple_codes))
        get_pair, get_char = pairs.get, self.char_codes.get
        get_triple, get_special = triples.get, self.short_specials.get
        new_char = self._new_char
        pos, n = 0, len(text)
        while pos < n:
            # codes are never 0 (id * 4 + length >= 1, markers < 0), so `or` only skips None
            code = get_pair(text[pos:pos + 2]) or get_char(text[pos]) or new_char(text[pos])
            if code > 0:
                append(code >> 2)
                pos += code & 3
            elif code <= -4:  # the winning triple, else this pair's own decision
                code = get_triple(text[pos:pos + 3]) or (-code >> 2)
                append(code >> 2)
                pos += code & 3
            elif code == AT_LT and get_special(text[pos:pos + 4]) is not None:  # <SP>, <BR>
                append(get_special(text[pos:pos + 4]))
                pos += 4
            else:
                pos = self._loop_slow(text, pos, code, ids)
        return ids

    def _loop_slow(self, text, pos, code, ids):
        """Appends the tokens at `pos` for a marker decision; returns the next position."""
        if code == LOOK_AT_3:
            code = self.triple_codes.get(text[pos:pos + 3], UNKNOWN_CHAR)
        elif code == AT_LT:
            token_ids, end = self.lt_decision(text, pos)
            ids.extend(token_ids)
            return end
        if code > 0:
            ids.append(code >> 2)
            return pos + (code & 3)
        ids.extend(self.fallback(text[pos]))
        return pos + 1

    def lt_decision(self, text, pos):
        """(ids, end) at a '<' that does not start a short special (always one id: '<' is one
        byte)."""
        match = self.encoder.match_at(text, pos)
        if match is None:
            return self.fallback("<"), pos + 1
        return (match[0],), match[1]

    def fallback(self, char):
        """The encoder's fallback ids of a char without a form, cached (bounded)."""
        ids = self.unknown_chars.get(char)
        if ids is None:
            ids = self.encoder.fallback(char)
            if len(self.unknown_chars) < MAX_CACHED_DECISIONS:
                self.unknown_chars[char] = ids
        return ids

    def _build_codes(self):
        """Decisions of every 1-char and 2-char form, and of every 3-char form that wins over its
        prefixes (a 3-char form with a larger id than a prefix never wins); a 2-char window that
        a winning 3-char form extends gets -4 * its own decision (LOOK_AT_3 if it has none)."""
        # Canonical forms first, in id order (the published ids follow frequency), each key a
        # fresh string: the common keys and codes end up close together in memory (cache hits).
        entries = self.encoder.entries
        canonical = [forms[0] for forms in entries]
        variants = [form for forms in entries for form in forms[1:]]
        forms = [f[:1] + f[1:] for f in dict.fromkeys(canonical + variants) if f[0] != "<"]
        chars = {f: self._decide(f) for f in forms if len(f) == 1}
        chars["<"] = AT_LT
        triples = {}
        for triple in (f for f in forms if len(f) == 3):
            code = self._decide(triple)
            if code > 0 and code & 3 == 3:
                triples[triple] = code
        pairs = {f: self._decide(f) for f in forms if len(f) == 2}
        for pair in {t[:2] for t in triples}:
            # the pair's own decision: its form, or its first char's (never '<' here)
            own = self._decide(pair)
            pairs[pair] = -4 * own if own > 0 else LOOK_AT_3
        return chars, pairs, triples

    def _split_rare_forms(self):
        """(pair and triple decisions without rare chars, regex finding a rare char). The
        published table has ~140k variant spellings of 2-char forms (中囯, 𠁦国, ...) next to ~18k
        canonical ones; dict look-ups in the full tables miss the CPU caches. Every variant pair
        or triple gets one char in the rare set (the one in the fewest canonical forms), so on a
        text without rare chars the windows holding one never occur, and the smaller tables give
        the same decisions."""
        entries = self.encoder.entries
        canonical = {forms[0] for forms in entries}
        variants = {f for forms in entries for f in forms[1:] if len(f) in (2, 3)} - canonical
        uses = {}  # char -> number of canonical forms containing it
        for form in canonical:
            for char in set(form):
                uses[char] = uses.get(char, 0) + 1
        rare = set()
        for form in sorted(variants):
            if not rare.intersection(form):
                rare.add(min(form, key=lambda c: (uses.get(c, 0), c)))
        pairs, triples = ({key: code for key, code in table.items() if not rare.intersection(key)}
                          for table in (self.pair_codes, self.triple_codes))
        rare_re = re.compile(_bmp_class_or_astral(rare)) if rare else re.compile(r"(?!)")
        return pairs, triples, rare_re

    def _new_char(self, char):
        """Decision for a char that is not a form (its fallback), cached (bounded)."""
        code = self._decide(char)
        if len(self.char_codes) < MAX_CACHED_DECISIONS:
            self.char_codes[char] = code
        return code

    def _decide(self, window):
        """Decision at a window of 1-3 chars: the rule at a char other than '<' only looks at
        the forms of 1-3 chars starting there."""
        if window[0] == "<":
            return AT_LT
        match = self.encoder.match_at(window, 0)
        if match is None:
            self.fallback(window[0])  # cached, and a lone surrogate raises here
            return UNKNOWN_CHAR
        token_id, end = match
        return token_id * 4 + end


# ----------------------------------------------------------------------------------------------
# Step 4 for long texts: the same decisions, looked up for all positions at once with numpy
# ----------------------------------------------------------------------------------------------
# Windows are keyed by their code points in base 0x110001 (a 3-char key < 2**61 fits int64);
# the digit 0x110000 pads windows past the end of the text, so they match no form.
_CP_RADIX = 0x110001
_CP_PAD = 0x110000
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing (2**64 / golden ratio)
_EMPTY_KEY = -1  # keys are >= 0


class _IntHashTable:
    """Open-addressing (linear probing) hash table int64 key -> int64 value, at most 1/4 full,
    looked up for a whole array of keys at once."""

    def __init__(self, keys, values):
        keys, values = np.asarray(keys, np.int64), np.asarray(values, np.int64)  # [n], [n]
        bits = max(4, int(len(keys) * 4).bit_length())
        self.shift, self.mask = np.uint64(64 - bits), (1 << bits) - 1
        self.keys = np.full(1 << bits, _EMPTY_KEY, np.int64)  # [slots]
        self.values = np.zeros(1 << bits, np.int64)  # [slots]
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
        """Values of `keys` (int64 array [m]); `default` where a key is absent. Returns [m]."""
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
    """`Scanner.loop` for long texts: the decision of EVERY position (the same tables: the
    2-char window, else the first char; a winning 3-char form; '<' rules) is looked up with
    array operations, then the token starts are the path 0 -> p + length(p) -> ..., found by
    pointer doubling (log2(tokens) array passes); the ids are the decisions at those starts."""

    def __init__(self, scanner):
        self.scanner = scanner
        self.chars = self._table({(ord(c),): v for c, v in scanner.char_codes.items()})
        self.pairs = self._table({tuple(map(ord, k)): v for k, v in scanner.pair_codes.items()})
        self.triples = self._table({tuple(map(ord, k)): v
                                    for k, v in scanner.triple_codes.items()})
        # 4-char specials that no longer form extends (<SP>, <BR>): decided without Python
        self.short_specials = [(tuple(map(ord, f[1:])), i)
                               for f, i in scanner.short_specials.items()]

    @staticmethod
    def _table(items):
        keys = [_window_key(cps) for cps in items]
        return _IntHashTable(keys, list(items.values()))

    def scan(self, text):
        """Token ids of `text` (after steps 1-3), equal to `Scanner.loop(text)`."""
        try:
            cps = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)  # [n]
        except UnicodeEncodeError:  # lone surrogate: the loop raises the error
            return self.scanner.loop(text)
        n = len(cps)
        padded = np.concatenate([cps, np.full(3, _CP_PAD, np.int64)])  # [n + 3]
        ids, lengths = self._decide_all(text, padded, n)
        return self._follow(text, ids, lengths)

    def _decide_all(self, text, padded, n):
        """(id, length) of the token starting at every position, [n] each; id -1: the char's
        fallback."""
        c0, c1, c2 = padded[:n], padded[1:n + 1], padded[2:n + 2]  # [n] each
        pair_keys = c0 * _CP_RADIX + c1
        code = self.pairs.lookup(pair_keys, 0)  # codes are never 0
        miss = np.flatnonzero(code == 0)
        code[miss] = self.chars.lookup(c0[miss], UNKNOWN_CHAR)
        extended = np.flatnonzero(code <= LOOK_AT_3)
        if len(extended):
            own = code[extended]
            own = np.where(own == LOOK_AT_3, UNKNOWN_CHAR, -own >> 2)
            triple = self.triples.lookup(pair_keys[extended] * _CP_RADIX + c2[extended], 0)
            code[extended] = np.where(triple != 0, triple, own)
        ids, lengths = code >> 2, code & 3
        unknown = code == UNKNOWN_CHAR
        ids[unknown], lengths[unknown] = -1, 1
        self._decide_lt(text, padded, np.flatnonzero(code == AT_LT), ids, lengths)
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
            (token_id,), end = self.scanner.lt_decision(text, pos)
            ids[pos], lengths[pos] = token_id, end - pos

    def _follow(self, text, ids, lengths):
        """Ids at the token starts 0, 0 + lengths[0], ...; fallback tokens expanded."""
        n = len(ids)
        jump = np.minimum(np.arange(n + 1) + np.append(lengths, 0), n)  # [n + 1]; n: the end
        path = np.zeros(1, np.int64)
        while path[-1] != n:  # path: the first 2**k starts; jump: 2**k steps at once
            path = np.concatenate([path, jump[path]])
            jump = jump[jump]
        starts = path[:np.searchsorted(path, n)]  # [tokens before expanding fallbacks]
        out = ids[starts]
        unknown = np.flatnonzero(out < 0)
        out = out.tolist()
        if not len(unknown):
            return out
        pieces, last = [], 0
        for k, pos in zip(unknown.tolist(), starts[unknown].tolist()):
            pieces += (out[last:k], self.scanner.fallback(text[pos]))
            last = k + 1
        pieces.append(out[last:])
        return [i for piece in pieces for i in piece]


def _window_key(code_points):
    """The int key of a window of 1-3 code points (`_CP_RADIX` digits)."""
    key = 0
    for cp in code_points:
        key = key * _CP_RADIX + cp
    return key
