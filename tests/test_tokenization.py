"""The SWE tokenizer: golden outputs of the published tokenizer (for the definition
`ReferenceEncoder` and the fast `SWEEncoder`), the fast parts equal to the definition on generated
texts, round trips, linear time, vocabulary format checks."""
import gzip
import json
import os
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptsan import tokenization_fast, tokenization_reference
from gptsan.errors import GPTSANError
from gptsan.tokenization import (CONTROL_TOKENS, NUM_BYTE_TOKENS, SPECIAL_TOKENS, SWEEncoder,
                                 TokenizerInputError, VocabularyError, check_emoji_table,
                                 check_vocabulary, clean_text, read_vocabulary_file)
from gptsan.tokenization_reference import ReferenceEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference")
OFFICIAL_VOCAB = os.path.join(REFERENCE, "ja-swe36k.txt")
OFFICIAL_EMOJI = os.path.join(REFERENCE, "emoji.json")
GOLDEN = os.path.join(REFERENCE, "golden_tricky.jsonl.gz")
needs_reference = pytest.mark.skipif(
    not os.path.isfile(OFFICIAL_VOCAB), reason="../shared/reference (official vocabulary and "
    "golden outputs) is not present on this machine")
TIME_BOUND_S = 1.0  # no 10,000-char input may take longer with clean=True
FAST_SETTINGS = settings(max_examples=150, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def official():
    if not os.path.isfile(OFFICIAL_VOCAB):
        pytest.skip("../shared/reference is not present on this machine")
    return SWEEncoder.from_files(OFFICIAL_VOCAB, OFFICIAL_EMOJI)


@pytest.fixture(scope="module")
def reference(official):
    """The definition over the official vocabulary."""
    return ReferenceEncoder(read_vocabulary_file(OFFICIAL_VOCAB), official.emoji)


# ---------------------------------------------------------------------------------------------
# Golden outputs of the published tokenizer
# ---------------------------------------------------------------------------------------------

@pytest.fixture(params=["reference", "loop", "vector"])
def encoder_class(request, monkeypatch):
    """Runs a test with the definition, then with SWEEncoder's per-token loop, then with its
    array scan for every text length."""
    if request.param == "vector":
        monkeypatch.setattr(tokenization_fast, "VECTOR_MIN_CHARS", 0)
    return ReferenceEncoder if request.param == "reference" else SWEEncoder


@needs_reference
def test_every_golden_record(official, reference, encoder_class):
    encoder = reference if encoder_class is ReferenceEncoder else official
    with gzip.open(GOLDEN, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 541
    errors = 0
    for record in records:
        text = record["text"]
        if "error" in record:
            errors += 1
            for clean in (False, True):
                with pytest.raises(TokenizerInputError, match="surrogate"):
                    encoder.encode(text, clean=clean)
            continue
        assert encoder.encode(text) == record["ids"], text
        assert encoder.encode(text, clean=True) == record["ids_clean"], text
        assert encoder.decode(record["ids"]) == record["decoded"], text
    assert errors == 8


@needs_reference
def test_published_examples_and_control_ids(official):
    n = len(official)
    assert n == 36000
    assert (official.sot, official.msk, official.sep, official.not_token, official.bag,
            official.seg, official.eot) == tuple(range(n - 7, n))
    assert [official.id_to_token(i) for i in range(n - 7, n)] == list(CONTROL_TOKENS)
    # HF GPTSanJapaneseTokenizer docstring: both spellings of 慶応 are 17750.
    assert official.encode("慶応") == official.encode("慶應") == [17750]
    assert official.encode("吾輩は猫である🐯。実は慶応(慶應)大学出身") == [
        35993, 35998, 34347, 31459, 30647, 31448, 25, 30659, 35729, 35676, 32417, 30647, 17750,
        35589, 17750, 35590, 321, 1281][2:]
    assert official._emoji_replacer.exact  # the one-scan emoji replacement applies
    assert official.token_to_id("<|endoftext|>") == official.eot
    assert official.token_to_id("ゐ") == 34692  # a form in two entries maps to the later one
    assert official.byte_id(0) == official.token_to_id("<|byte0|>") == n - 7 - NUM_BYTE_TOKENS
    assert official.encode("\U00030000") == [official.byte_id(b) for b in "\U00030000".encode()]
    with pytest.raises(VocabularyError, match="not in the vocabulary"):
        official.token_to_id("no such token")
    with pytest.raises(TokenizerInputError, match="out of range"):
        official.decode([n])


# ---------------------------------------------------------------------------------------------
# Round trips and robustness
# ---------------------------------------------------------------------------------------------

def normalise(text):
    """What decode(encode(text)) gives back for text without special content (no '<', no emoji
    surface, no non-canonical variant form, no char that decodes to a class char): step 1 of the
    encoding rules, seen from the decoder: U+3000 -> ' ', CRLF and CR -> '\\n', U+2014 and U+2212
    -> 'ー'. Everything else (incl. chars without a form, encoded as UTF-8 byte tokens) is kept."""
    for old, new in (("\u3000", " "), ("\r\n", "\n"), ("\r", "\n"), ("\u2014", "ー"),
                     ("\u2212", "ー")):
        text = text.replace(old, new)
    return text


def _round_trip_alphabet(encoder):
    """Chars for which decode(encode(x)) == normalise(x): characters of the vocabulary minus
    any char that could start special content (see `normalise`), plus chars without a form."""
    excluded = set("<")
    for forms in encoder.entries:
        for form in forms[1:]:  # a window equal to a non-canonical form decodes differently
            if len(form) != len(forms[0]):
                excluded.update(form)
            else:
                excluded.update(a for a, b in zip(form, forms[0]) if a != b)
    keep = re.compile(r"[0-9A-Za-z\u3040-\u30ff\u4e00-\u9fff(),.]")
    for surface in encoder.emoji["emoji"]:
        rare = [c for c in surface if not keep.match(c)]
        excluded.update(rare or surface[-1])  # every surface loses at least one char
    single = {form for forms in encoder.entries for form in forms if len(form) == 1}
    alphabet = {c for c in single if c not in excluded}
    alphabet |= {" ", "\u3000", "\t", "\n", "\r", "\u2014", "\u2212"}
    alphabet |= {"\u0e01", "\U0001d11e", "\x00", "\u05d0", "\uac00", "\u03a9"}  # byte tokens
    return sorted(alphabet - excluded)


@pytest.fixture(scope="module")
def round_trip_strategy(official):
    alphabet = _round_trip_alphabet(official)
    chars = st.text(alphabet=st.sampled_from(alphabet), max_size=40)
    allowed = set(alphabet)
    forms = [forms[0] for forms in official.entries
             if 1 < len(forms[0]) <= 3 and allowed.issuperset(forms[0])]
    words = st.lists(st.sampled_from(forms + alphabet), max_size=20).map("".join)
    return st.one_of(chars, words)


@needs_reference
def test_decode_inverts_encode(official, round_trip_strategy):
    @FAST_SETTINGS
    @given(round_trip_strategy)
    def check(text):
        assert official.decode(official.encode(text)) == normalise(text)

    check()


@needs_reference
def test_encode_never_crashes_on_valid_unicode(official):
    @FAST_SETTINGS
    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
    def check(text):
        for clean in (False, True):
            ids = official.encode(text, clean=clean)
            assert all(0 <= i < len(official) for i in ids)
            official.decode(ids)

    check()


# Pieces that make the cleaning and emoji stages fire (and collide) often.
_CLEAN_ATOMS = ["1", "2", "0", "9", "１", "3", ",", ",000", "億", "万", "千", "円", "ドル", "ユーロ",
                "(税込)", "(税抜)", "+tax", "@", "a", "Z", ".", "_", "-", "/", "年", "月", "日", "時",
                "分", ":", "(", ")", "(日)", "㈯", "平成", "令和", "㍻", "http://", "https://x",
                "ftp://", "<", ">", "|", "─", "▀", "<BLOCK>", " ", "\n", "(^^)", "(^_^)", "^", "o",
                "m", "#", "*", "\ufe0f", "\u20e3", "😀", "👍", "🏻", "\u200d", "❤", "☺", "東京"]


@needs_reference
def test_cleaning_and_emoji_match_the_published_code(official, reference):
    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.sampled_from(_CLEAN_ATOMS), max_size=12).map("".join))
    def check(text):
        assert clean_text(text) == tokenization_reference.clean_text(text)
        assert official.encode(text, clean=True) == reference.encode(text, clean=True)
        assert official.encode(text) == reference.encode(text)

    check()


PROJECT_VOCAB = os.path.join(ROOT, "ja-swe36k.txt")
PROJECT_EMOJI = os.path.join(ROOT, "emoji.json")


def _scan_atoms(encoder):
    """Pieces that exercise every decision, as a strategy: canonical forms of 1-3 chars, any
    forms (variants: ties and smallest-id choices between prefixes, rare chars), 2-char heads of
    3-char forms, forms starting with '<' and their prefixes, chars without a form (fallback
    tokens) and the pre-replaced whitespace."""
    canonical = sorted(forms[0] for forms in encoder.entries if len(forms[0]) <= 3)
    forms = sorted(f for f in encoder.vocab if len(f) <= 3)
    forms = forms[::97] + [f[:2] for f in forms[::89] if len(f) == 3]
    tricky = sorted(f for f in encoder.vocab if f[0] == "<")[::37] + [
        "<SP>", "<BR>", "<TAB>", "<", "<S", "<|byte1", "<|", "\u0e01", "\U0001d11e", "\u00b1",
        "\u2100", "\x00", " ", "\n", "々"]
    return st.one_of(st.sampled_from(canonical[::7]), st.sampled_from(forms),
                     st.sampled_from(tricky))


@pytest.mark.parametrize("vocabulary", ["official", "project"])
def test_array_scan_equals_the_loop_and_the_published_rule(vocabulary, monkeypatch):
    """The array scan (long texts) and the per-token loop (with the full tables, or the tables
    without rare chars on texts without them) give the ids of the definition (ReferenceEncoder)
    on dense mixes of tricky pieces."""
    paths = ((OFFICIAL_VOCAB, OFFICIAL_EMOJI) if vocabulary == "official"
             else (PROJECT_VOCAB, PROJECT_EMOJI))
    if not os.path.isfile(paths[0]):
        pytest.skip(f"{paths[0]} is not present on this machine")
    encoder = SWEEncoder.from_files(*paths)
    reference = ReferenceEncoder(read_vocabulary_file(paths[0]), encoder.emoji)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_scan_atoms(encoder), max_size=40).map("".join))
    def check(text):
        expected = reference.encode(text)
        for threshold in (0, 10 ** 9):  # the array scan, the per-token loop
            monkeypatch.setattr(tokenization_fast, "VECTOR_MIN_CHARS", threshold)
            assert encoder.encode(text) == expected
        scanner = encoder._scanner
        loop = scanner.loop(text)
        assert scanner.vector.scan(text) == loop
        if scanner.rare_re.search(text) is None:
            assert scanner.loop(text, hot=True) == loop

    check()


def _overlaps_a_token(table):
    """Whether some emoji surface lies inside a class token or holds one, or starts with a
    token's tail or ends with a token's head (by brute force)."""
    return any(surface in token or token in surface
               or any(surface.startswith(token[k:]) or surface.endswith(token[:k])
                      for k in range(1, len(token)))
               for surface in table for token in table.values())


_EMOJI_PIECES = st.text(alphabet="<|e1>ab", min_size=1, max_size=4)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_EMOJI_PIECES, st.sampled_from(["<|e1|>", "<|e2|>", "b<", "a"]),
                       max_size=5),
       st.text(alphabet="<|e1>abc", max_size=30))
def test_emoji_replacer_equals_the_table_loop(table, text):
    """The one-scan replacement (or its fallback when a surface overlaps a class token) gives
    the text of the plain loop over the table."""
    replacer = tokenization_fast.EmojiReplacer(table)
    assert replacer.exact == (not _overlaps_a_token(table))
    assert replacer(text) == tokenization_reference.replace_emoji(text, table)


_PRICE_ATOMS = ["0", "1", "5", "9", "１", "٣", ",", ",000", ",12", "億", "万", "千", "千万", "円", "ドル",
                "ユーロ", "(税込)", "+tax", "x"]
_DATE_ATOMS = ["0", "1", "2", "3", "9", "12", "2020", "１", "/", "-", "年", "月", "日", "時", "分", ":",
               "(月)", "㈯", "x", " "]


@pytest.mark.parametrize("stage, short_limit, atoms, pattern, placeholder", [
    ("_sub_price", "_PRICE_SHORT_PREFIX", _PRICE_ATOMS, tokenization_reference.PRICE_PATTERN,
     "<PRICE>"),
    ("_sub_western_date", "_DATE_SHORT_RUN", _DATE_ATOMS, tokenization_reference.DATE_PATTERN,
     "<DATE>"),
])
def test_linear_stages_match_the_published_regex(monkeypatch, stage, short_limit, atoms, pattern,
                                                 placeholder):
    """The linear procedures (used beyond the short-run limits, where `re` would blow up)
    give the matches of the published pattern; and so does the short-run path."""
    published = re.compile(pattern)
    substitute = getattr(tokenization_fast, stage)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(atoms), max_size=10).map("".join))
    def check(text):
        assert substitute(text) == published.sub(placeholder, text)

    check()
    monkeypatch.setattr(tokenization_fast, short_limit, -1)
    check()


@pytest.mark.parametrize("clean", [clean_text, tokenization_reference.clean_text],
                         ids=["fast", "reference"])
def test_cleaning_keeps_published_corner_cases(clean):
    """Outputs of the published regexes."""
    assert clean("a@b.c1@x") == "<EMAIL><EMAIL>"
    assert clean("9月16日12時") == "<DATE>時"  # `\d{1,2}` is tried before `\d{1,2}時`
    assert clean("2022/9/1612時30分") == "<DATE>時30分"
    assert clean("1,000円(税込)と千円と円") == "<PRICE>と<PRICE>と<PRICE>"
    assert clean("5億3000万円(税抜)") == clean("1１1１円") == "<PRICE>"
    assert clean("──▀<BLOCK>x") == "<BLOCK>x"
    assert clean("03-1234-5678, (03)1234-5678") == "<TEL>, <TEL>"


ADVERSARIAL = {
    "mixed digit run": "1１" * 5000,
    "mixed digits then yen": "1１" * 4999 + "1円",
    "long digit run": "1" * 10000,
    "digits and commas": "1," * 5000,
    "many <": "<" * 10000,
    "URL-like run": ("http://a" * 1250),
    "word before @": "a" * 9999 + "@",
    "many @": "a@" * 5000,
    "dates": "2020/" * 2000,
    "year groups": "2020年" * 2000,
    "short dates": "12/" * 3333 + "1",
    "prices": "5千" * 4999 + "円",
    "price units": "1億1万1千" * 1667 + "円",
    "kaomoji parts": "(^" * 5000,
    "boxes": "─" * 10000,
}


@needs_reference
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_clean_encode_is_linear_time(official, name):
    text = ADVERSARIAL[name]
    assert len(text) >= 9999
    start = time.perf_counter()
    official.encode(text, clean=True)
    assert time.perf_counter() - start < TIME_BOUND_S, name


# ---------------------------------------------------------------------------------------------
# Vocabulary and emoji files (small synthetic vocabularies)
# ---------------------------------------------------------------------------------------------

def make_vocab(ordinary, emoji_classes=1):
    """Lines of a minimal ja-swe vocabulary around `ordinary` entries."""
    return (list(ordinary) + list(SPECIAL_TOKENS)
            + [f"<|emoji{k}|>" for k in range(1, emoji_classes + 1)]
            + [f"<|byte{b}|>" for b in range(NUM_BYTE_TOKENS)] + list(CONTROL_TOKENS))


TINY_EMOJI = {"emoji": {"😀": "<|emoji1|>", "😀😀": "<|emoji1|>"}, "emoji_inv": {"<|emoji1|>": "😀"}}


def test_min_id_rule_and_decode_on_a_tiny_vocabulary(encoder_class):
    enc = encoder_class(make_vocab(["b", "abc", "ab", "a", "中国,中國", "x,xy"]), TINY_EMOJI)
    # smallest id wins, not the longest: "b" (0) < "abc" (1) but "abc" does not start at "b"
    assert enc.encode("abc") == [1]
    assert enc.encode("ab") == [2]
    assert enc.encode("中國") == [4] and enc.decode([4]) == "中国"
    assert enc.encode("xy") == [5]  # same id for "x" and "xy": the longer window wins
    emoji, space = enc.token_to_id("<|emoji1|>"), enc.token_to_id("<SP>")
    assert enc.encode("😀 😀😀") == [emoji, space, emoji, emoji]  # table order: "😀" goes first
    assert enc.decode(enc.encode("q\tb\r\n")) == "q\tb\n"
    assert enc.decode(enc.encode("é")) == "é"  # two byte tokens joined
    assert enc.decode([enc.byte_id(0xC3)]) == "\ufffd"
    assert enc.decode(enc.encode("\u00b1\u2100")) == "\u01c0\u2016"  # <KIGOU>, <U2000U2BFF>
    assert enc.decode(enc.encode("<|endoftext|>")) == "<|endoftext|>"
    assert enc.decode(enc.encode("x\ny"), breakline="<BR>") == "x<BR>y"


def test_check_vocabulary_accepts_the_format():
    lines = make_vocab(["a", "b,B", ","])
    entries = check_vocabulary(lines)
    assert entries[1] == ["b", "B"] and entries[2] == [","]
    assert check_vocabulary(lines + [""]) == entries  # one final newline is tolerated


BASE = ["a", "b", "c"]


@pytest.mark.parametrize("lines, message", [
    (make_vocab(BASE)[:-1], "control tokens"),
    (make_vocab(BASE)[:-8] + make_vocab(BASE)[-7:], "byte tokens precede"),
    ([line for line in make_vocab(BASE) if line != "<DATE>"], "<DATE> is missing"),
    (make_vocab(BASE + ["a,d"]), "'a' is in vocabulary entries 0 and 3"),
    (make_vocab(BASE + ["", "d"]), "empty surface form"),
    (make_vocab(BASE + ["d,,e"]), "empty surface form"),
    (make_vocab(BASE, 0)[:14] + ["<|emoji2|>"] + make_vocab(BASE, 0)[14:], "<|emoji1|>"),
    (["a", "b"], "at least"),
])
def test_check_vocabulary_rejects(lines, message):
    with pytest.raises(VocabularyError, match=re.escape(message)):
        check_vocabulary(lines)


@needs_reference
def test_official_vocabulary_format():
    lines = read_vocabulary_file(OFFICIAL_VOCAB)
    entries = check_vocabulary(lines, allow_duplicate_forms=True)
    assert len(entries) == 36000
    with pytest.raises(VocabularyError, match="'きぃ' is in vocabulary entries 30400 and 30405"):
        check_vocabulary(lines)  # the published file repeats 6 forms
    check_emoji_table(json.load(open(OFFICIAL_EMOJI, encoding="utf-8")), entries)


def test_bad_files_give_one_line_errors(tmp_path):
    vocab, emoji = tmp_path / "v.txt", tmp_path / "e.json"
    vocab.write_text("\n".join(make_vocab(["a"])), encoding="utf-8")
    emoji.write_text(json.dumps(TINY_EMOJI), encoding="utf-8")
    assert len(SWEEncoder.from_files(str(vocab), str(emoji))) == len(make_vocab(["a"]))
    cases = [
        (str(tmp_path / "missing.txt"), str(emoji), "vocabulary file not found"),
        (str(vocab), str(tmp_path / "missing.json"), "emoji file not found"),
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json", encoding="utf-8")
    cases.append((str(vocab), str(bad_json), "not valid JSON"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("\n".join(make_vocab(["é"])).encode("latin-1"))
    cases.append((str(latin1), str(emoji), "not UTF-8"))
    no_inv = tmp_path / "noinv.json"
    no_inv.write_text(json.dumps({"emoji": {"😀": "<|emoji1|>"}, "emoji_inv": {}}), encoding="utf-8")
    cases.append((str(vocab), str(no_inv), "not in emoji_inv"))
    no_controls = tmp_path / "nocontrols.txt"
    no_controls.write_text("\n".join(make_vocab(BASE + ["d"] * 0 + list("defghij"))[:-7]),
                           encoding="utf-8")
    cases.append((str(no_controls), str(emoji), "control tokens"))
    for vocab_path, emoji_path, message in cases:
        with pytest.raises(GPTSANError, match=message) as err:
            SWEEncoder.from_files(vocab_path, emoji_path)
        assert "\n" not in str(err.value)


def test_lone_surrogate_is_a_clear_value_error(encoder_class):
    enc = encoder_class(make_vocab(["a"]), TINY_EMOJI)
    with pytest.raises(ValueError, match="lone surrogate U\\+D800"):
        enc.encode("a\ud800")
    with pytest.raises(TokenizerInputError, match="expects str"):
        enc.encode(b"a")
