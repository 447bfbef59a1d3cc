"""Builds a ja-swe vocabulary (any size 8,000..36,000) and its emoji table from public data.

Inputs (all from package registries or the user):
  * character and n-gram statistics: wordfreq's Japanese word list and/or a corpus directory;
  * variant groups (異体字): Unihan variant fields + NFKC/NFC compatibility forms (Debian
    `unicode-data`: /usr/share/unicode);
  * emoji classes: Unicode's emoji-test.txt (groups/subgroups).

Output order (docs/ARCHITECTURE.md "Vocabulary files"): ordinary tokens (2-3 char tokens,
then single characters), symbols, specials, emoji classes, bytes, 7 control tokens.

The encoder takes, at each position, the SMALLEST id among the matching windows of length
3, 2, 1, so the order of the ordinary tokens is a priority. The builder selects n-grams by
the tokens they save, re-tokenises its training data with the candidate vocabulary to keep
only the n-grams that are really used, and chooses between two orders (longest first, or by
measured usage) the one that needs fewer tokens on its own training data.
"""
import bz2
import collections
import gzip
import html.parser
import io
import itertools
import json
import os
import re
import tempfile
import unicodedata
import zipfile

from tqdm import tqdm

from gptsan.errors import GPTSANError
# Specials, emoji classes, bytes and control tokens follow docs/ARCHITECTURE.md "Vocabulary files";
# their names live in one place.
from gptsan.tokenization import CONTROL_TOKENS, NUM_BYTE_TOKENS, SPECIAL_TOKENS

MIN_VOCAB_SIZE = 8000  # smallest supported vocabulary
MAX_VOCAB_SIZE = 36000  # the published vocabulary size
MAX_TOKEN_CHARS = 3  # the encoder's window: docs/ARCHITECTURE.md "Encoding rules", rule 4
DEFAULT_UNICODE_DIR = "/usr/share/unicode"  # Debian package `unicode-data`

# Single characters: 2,500 at 8k entries growing to 5,500 at 36k (the published 36k file has
# ~4,900 plus its symbols); the rest of the budget goes to 2-3 char tokens.
SINGLE_CHARS_AT_MIN = 2500
SINGLE_CHARS_AT_MAX = 5500
MAX_VARIANT_FORMS = 64  # cap on variant spellings listed for one multi-char token
# Unihan variant fields by strength: Japan's official old/new form pairs, the same character
# written differently, then look-alikes, partial synonyms and Chinese simplified/traditional pairs.
VARIANT_FIELDS = (("kJinmeiyoKanji", "kJoyoKanji"),  # official old forms, e.g. 髮 -> 髪
                  ("kZVariant", "kSemanticVariant"),
                  ("kSpoofingVariant", "kSpecializedSemanticVariant", "kTraditionalVariant",
                   "kSimplifiedVariant"))
CORPUS_WEIGHT = 0.5  # share of the corpus statistics when mixed with wordfreq
REFINE_ROUNDS = 3  # select -> re-tokenise -> replace unused n-grams, this many times
MIN_NGRAM_SAVING = 1e-9  # candidates saving less (per char of data) are ignored
JIS_LEVEL1_ROWS = (16, 47)  # JIS X 0208 rows of the level-1 kanji (kJis0 = row, cell)
WORDFREQ_LIST = "large"  # wordfreq's biggest Japanese list (~215k words)

# Symbols: full-width ASCII, ASCII, Japanese punctuation; in this order after the single chars.
JAPANESE_SYMBOLS = ("、。・‥…「」『』【】〔〕〈〉《》〒○●◎→←↑↓⇒⇔〃△▲▽▼□■◇◆☆★"
                    "♂♀§〓♭♪†‡¶※〜×÷±¥°℃゛゜")
HALFWIDTH_PUNCTUATION = {"｡": "。", "｢": "「", "｣": "」", "､": "、", "･": "・", "ﾞ": "゛", "ﾟ": "゜"}
# Characters that are part of Japanese words (besides kana and kanji).
JAPANESE_MARKS = "々〆〇"

# Emoji classes: (class, emoji-test.txt subgroups or groups in it). Skin tones and hair
# components join the people class; classes are numbered in this order.
EMOJI_CLASSES = (
    ("face-positive", ("face-smiling", "face-affection", "face-tongue", "face-hand",
                       "face-hat", "face-glasses", "cat-face", "monkey-face")),
    ("face-negative", ("face-neutral-skeptical", "face-sleepy", "face-unwell",
                       "face-concerned", "face-negative", "face-costume")),
    ("heart-emotion", ("heart", "emotion")),
    ("hand-body", ("hand-fingers-open", "hand-fingers-partial", "hand-single-finger",
                   "hand-fingers-closed", "hands", "hand-prop", "body-parts")),
    ("people", ("People & Body", "Component")),
    ("animals-nature", ("Animals & Nature",)),
    ("food-drink", ("Food & Drink",)),
    ("travel-places", ("Travel & Places",)),
    ("activities", ("Activities",)),
    ("objects", ("Objects",)),
    ("symbols", ("Symbols",)),
    ("flags", ("Flags",)),
)


# ----------------------------------------------------------------------------- text sources
class _HTMLText(html.parser.HTMLParser):
    """Collects the text of an HTML page, without scripts, styles and preformatted blocks."""
    SKIP = {"script", "style", "pre", "code", "head"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd",
             "title", "table", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.depth = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.depth += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.depth = max(0, self.depth - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data.replace("\n", " ") if data.strip() else data)


def strip_html(text):
    """Plain text of an HTML page."""
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


_ROFF_ESCAPE = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\*(\(..|\[[^\]]*\]|.)|\\s[-+]?\d|\\[&|^%:]")


def strip_roff(text):
    """Plain text of a man page: macro lines give their arguments, escapes are removed."""
    lines = []
    for line in text.split("\n"):
        if line.startswith((".\\\"", "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line.split(None, 1)
            if len(parts) < 2 or parts[0][1:] in ("de", "ds", "nr", "if", "ie", "el", "so", "TH",
                                                   "tr", "ta", "ig", "pc"):
                continue
            line = parts[1].replace('"', " ")
        line = _ROFF_ESCAPE.sub("", line).replace("\\-", "-").replace("\\e", "\\")
        lines.append(line.replace("\\ ", " "))
    # roff joins source lines with a space; between Japanese chars that space is not wanted
    return _WRAPPED_JAPANESE.sub("", "\n".join(lines))


_WRAPPED_JAPANESE = re.compile(
    "(?<=[\u3041-\u30ff\u4e00-\u9fff、。])\n(?=[\u3041-\u30ff\u4e00-\u9fff])")
_KANA = re.compile("[\u3041-\u3096\u30a1-\u30fa]")


def prose_lines(text):
    """The lines of `text` that contain kana (Japanese sentences, not code or English)."""
    return "\n".join(line.strip() for line in text.split("\n") if _KANA.search(line))


_MAN_PAGE = re.compile(r"\.[1-9][a-z]*$")


def read_text_file(path):
    """Text of one corpus file: .txt as is, .html/.htm and man pages without markup (.gz ok)."""
    name = path[:-3] if path.endswith(".gz") else path
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if name.endswith((".html", ".htm")):
        return strip_html(text)
    if _MAN_PAGE.search(name):
        return strip_roff(text)
    return text


def corpus_files(corpus_dir):
    """Sorted readable corpus files under `corpus_dir` (.txt, .html, .htm, man pages; .gz)."""
    if not os.path.isdir(corpus_dir):
        raise GPTSANError(f"corpus directory not found: {corpus_dir}")
    found = []
    for root, dirs, files in os.walk(corpus_dir):
        dirs.sort()
        for name in sorted(files):
            base = name[:-3] if name.endswith(".gz") else name
            if base.endswith((".txt", ".html", ".htm")) or _MAN_PAGE.search(base):
                found.append(os.path.join(root, name))
    if not found:
        raise GPTSANError(f"no .txt/.html/man-page files in corpus directory {corpus_dir}")
    return found


def read_corpus(corpus_dir, show_progress=False):
    """List of texts of every corpus file (sorted by path, so builds are deterministic)."""
    paths = corpus_files(corpus_dir)
    return [read_text_file(p) for p in tqdm(paths, desc="read corpus", disable=not show_progress)]


def load_wordfreq(limit=None):
    """wordfreq's Japanese {word: frequency}, most frequent first (`limit` words at most)."""
    try:
        import wordfreq
    except ImportError as err:
        raise GPTSANError("wordfreq is not installed: pip install -e '.[vocab]' "
                          "(or pass --no_wordfreq with --corpus)") from err
    freqs = wordfreq.get_frequency_dict("ja", WORDFREQ_LIST)
    items = sorted(freqs.items(), key=lambda kv: (-kv[1], kv[0]))
    return dict(items[:limit] if limit else items)


# ----------------------------------------------------------------------------- unicode data
def _open_ucd(unicode_dir, name):
    """Opens a UCD text file as text: plain, .bz2, or inside Unihan.zip."""
    path = os.path.join(unicode_dir, name)
    if os.path.exists(path):
        return open(path, encoding="utf-8")
    if os.path.exists(path + ".bz2"):
        return bz2.open(path + ".bz2", "rt", encoding="utf-8")
    zpath = os.path.join(unicode_dir, "Unihan.zip")
    if os.path.exists(zpath):
        with zipfile.ZipFile(zpath) as z:
            if name in z.namelist():
                return io.StringIO(z.read(name).decode("utf-8"))
    raise GPTSANError(f"Unicode data file {name} not found in {unicode_dir} "
                      "(apt-get install unicode-data)")


def _codepoints(text):
    return [chr(int(cp, 16)) for cp in re.findall(r"U\+([0-9A-F]{4,6})", text)]


class UnicodeData:
    """The parts of the Unicode Character Database the builder needs."""

    def __init__(self, unicode_dir=DEFAULT_UNICODE_DIR):
        tier_of = {field: t for t, fields in enumerate(VARIANT_FIELDS) for field in fields}
        # variants[tier][char] -> Unihan variant chars (relation made symmetric)
        self.variants = [collections.defaultdict(set) for _ in VARIANT_FIELDS]
        for name in ("Unihan_Variants.txt", "Unihan_OtherMappings.txt"):
            with _open_ucd(unicode_dir, name) as f:
                for line in f:
                    fields = line.rstrip("\n").split("\t")
                    if len(fields) == 3 and fields[1] in tier_of:
                        (char,) = _codepoints(fields[0])
                        tier = self.variants[tier_of[fields[1]]]
                        for other in _codepoints(fields[2]):
                            if other != char:
                                tier[char].add(other)
                                tier[other].add(char)
        self.japanese_sets = collections.defaultdict(list)  # kJoyoKanji etc. -> chars
        with _open_ucd(unicode_dir, "Unihan_OtherMappings.txt") as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                if len(fields) == 3 and fields[1] in ("kJoyoKanji", "kJinmeiyoKanji", "kJis0"):
                    (char,) = _codepoints(fields[0])
                    self.japanese_sets[fields[1]].append((fields[2], char))
        # JIS X 0208 level 1 (rows 16-47): the everyday kanji of Japanese text
        self.jis_level1 = {c for code, c in self.japanese_sets["kJis0"]
                           if JIS_LEVEL1_ROWS[0] <= int(code[:2]) <= JIS_LEVEL1_ROWS[1]}
        for key in self.japanese_sets:  # JIS order = reading order for level 1
            self.japanese_sets[key] = [c for _, c in sorted(self.japanese_sets[key])]
        # Distinct Japanese characters: never merged into another char's variant group, even
        # where Unihan links them as Chinese simplified/traditional forms (叶/葉, 云/雲, 只/隻).
        self.protected = set(self.japanese_sets["kJoyoKanji"]) | self.jis_level1
        self.radical_equivalents = {}  # CJK radical -> unified ideograph
        with _open_ucd(unicode_dir, "EquivalentUnifiedIdeograph.txt") as f:
            for line in f:
                line = line.split("#")[0].strip()
                if line:
                    cps, target = [x.strip() for x in line.split(";")]
                    lo, _, hi = cps.partition("..")
                    for cp in range(int(lo, 16), int(hi or lo, 16) + 1):
                        self.radical_equivalents[chr(cp)] = chr(int(target, 16))
        self.emoji = []  # (surface, group, subgroup) in emoji-test.txt order
        with _open_ucd(os.path.join(unicode_dir, "emoji"), "emoji-test.txt") as f:
            group = subgroup = None
            for line in f:
                if line.startswith("# group:"):
                    group = line.split(":", 1)[1].strip()
                elif line.startswith("# subgroup:"):
                    subgroup = line.split(":", 1)[1].strip()
                elif line.strip() and not line.startswith("#"):
                    cps, status = [x.strip() for x in line.split("#")[0].split(";")]
                    surface = "".join(chr(int(cp, 16)) for cp in cps.split())
                    self.emoji.append((surface, status, group, subgroup))


# ----------------------------------------------------------------------------- characters
def is_kana(ch):
    """Hiragana or katakana letters, prolonged sound mark and iteration marks."""
    return "\u3041" <= ch <= "\u3096" or "\u309d" <= ch <= "\u309e" or \
        "\u30a1" <= ch <= "\u30fa" or "\u30fc" <= ch <= "\u30fe"


def is_kanji(ch):
    """CJK unified ideographs (BMP, extension A, planes 2-3)."""
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" or \
        "\U00020000" <= ch <= "\U0003134f"


def is_japanese(ch):
    """Characters that may form ordinary (word) tokens."""
    return is_kana(ch) or is_kanji(ch) or ch in JAPANESE_MARKS


def emoji_chars(udata):
    """Single code points that are emoji by themselves (kept out of the vocabulary forms)."""
    return {s for s, status, _, _ in udata.emoji
            if len(s) == 1 and status in ("fully-qualified", "component")}


def kana_variant_forms(ch):
    """Extra spellings of one kana: dakuten/handakuten sequences, half-width forms."""
    forms = []
    decomposed = unicodedata.normalize("NFD", ch)
    if len(decomposed) == 2 and decomposed[1] in "\u3099\u309a":
        base, mark = decomposed
        forms.append(base + ("\u309b" if mark == "\u3099" else "\u309c"))  # か゛
        forms.append(decomposed)  # base + combining mark
    return forms


def halfwidth_kana():
    """{full-width katakana (with voicing marks): half-width spelling}."""
    table = {}
    for cp in range(0xFF66, 0xFF9E):
        half = chr(cp)
        table[unicodedata.normalize("NFKC", half)] = half
    for full in list(table):
        for mark, half_mark in (("\u3099", "ﾞ"), ("\u309a", "ﾟ")):
            voiced = unicodedata.normalize("NFC", full + mark)
            if len(voiced) == 1:
                table[voiced] = table[full] + half_mark
    return table


def compatibility_forms(udata):
    """{unified char: [compatibility chars]}: Kangxi/CJK radicals, CJK compatibility
    ideographs, circled/parenthesised ideographs, circled katakana (NFKC/NFC + UCD)."""
    forms = collections.defaultdict(list)
    ranges = [(0x2F00, 0x2FD5), (0xF900, 0xFAD9), (0x2F800, 0x2FA1D), (0x3220, 0x3243),
              (0x3280, 0x32B0), (0x32D0, 0x32FE), (0x1F210, 0x1F23B)]
    for lo, hi in ranges:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            core = unicodedata.normalize("NFKC", ch).strip("()")
            if len(core) == 1 and core != ch and (is_kanji(core) or is_kana(core)):
                forms[core].append(ch)
    for radical, target in sorted(udata.radical_equivalents.items()):
        if radical not in forms[target] and unicodedata.normalize("NFKC", radical) == radical:
            forms[target].append(radical)
    return forms


def symbol_groups():
    """Symbol entries (lists of forms): full-width ASCII with circled/parenthesised forms,
    ASCII, Japanese punctuation with half-width forms."""
    enclosed = collections.defaultdict(list)  # fullwidth char -> enclosed forms
    for cp in list(range(0x2460, 0x2500)) + list(range(0x1F100, 0x1F1AD)):
        ch = chr(cp)
        core = unicodedata.normalize("NFKC", ch).strip("().")
        if len(core) == 1 and core.isascii() and core.isalnum():
            enclosed[chr(ord(core) + 0xFEE0)].append(ch)
    groups = [[chr(cp)] + enclosed.get(chr(cp), []) for cp in range(0xFF01, 0xFF5F)]
    groups += [[chr(cp)] for cp in range(0x21, 0x7F)]
    inverse_half = {v: k for k, v in HALFWIDTH_PUNCTUATION.items()}
    groups += [[ch] + ([inverse_half[ch]] if ch in inverse_half else [])
               for ch in JAPANESE_SYMBOLS]
    return groups


# ----------------------------------------------------------------------------- statistics
class NgramStats:
    """Weighted counts of 1-3 char substrings of Japanese runs, per data source."""

    def __init__(self):
        self.sources = []  # [(runs Counter, total chars)]

    def add_texts(self, texts):
        runs = collections.Counter()
        for text in texts:
            runs.update(_JAPANESE_RUN.findall(text))
        self._add(runs)

    def add_words(self, word_freqs):
        runs = collections.Counter()
        for word, freq in word_freqs.items():
            for run in _JAPANESE_RUN.findall(word):
                runs[run] += freq
        self._add(runs)

    def _add(self, runs):
        total = sum(len(r) * w for r, w in runs.items())
        if total:
            self.sources.append((runs, total))

    def weighted_runs(self, mapping=None):
        """{run: weight}: every source normalised to weight 1 in total, mixed with
        CORPUS_WEIGHT (first source = corpus when there are two); `mapping` canonicalises."""
        mixed = collections.Counter()
        shares = [1.0] if len(self.sources) == 1 else [CORPUS_WEIGHT, 1.0 - CORPUS_WEIGHT]
        for (runs, total), share in zip(self.sources, shares):
            for run, w in runs.items():
                key = run.translate(mapping) if mapping else run
                mixed[key] += share * w / total
        return mixed


_JAPANESE_RUN = re.compile(
    "[\u3041-\u3096\u309d\u309e\u30a1-\u30fa\u30fc-\u30fe\u4e00-\u9fff\u3400-\u4dbf"
    "\U00020000-\U0003134f" + JAPANESE_MARKS + "]+")


def count_ngrams(runs, lengths):
    """{ngram: weight} over `runs` ({run: weight}) for the given lengths."""
    counts = collections.Counter()
    for run, w in runs.items():
        for n in lengths:
            for i in range(len(run) - n + 1):
                counts[run[i:i + n]] += w
    return counts


# ----------------------------------------------------------------------------- builder
def num_single_chars(size):
    """Single-char budget for a vocabulary of `size` entries (linear in size)."""
    span = MAX_VOCAB_SIZE - MIN_VOCAB_SIZE
    return SINGLE_CHARS_AT_MIN + (size - MIN_VOCAB_SIZE) * (
        SINGLE_CHARS_AT_MAX - SINGLE_CHARS_AT_MIN) // span


def _neighbours(udata, ch):
    """Unihan variants of `ch`, all tiers."""
    return [v for tier in udata.variants for v in sorted(tier.get(ch, ()))]


def choose_characters(char_counts, udata, budget):
    """All kana and marks, then kanji by frequency, then Joyo/Jinmeiyo/JIS X 0208 kanji.

    A kanji within two variant links of a kanji already chosen is left out (it joins that
    kanji's group: 會 -> 会, 髙 -> 高, 斈 -> 學 -> 学) unless it is protected (Joyo or JIS
    level 1)."""
    chosen = [chr(cp) for cp in range(0x3041, 0x30FF) if is_kana(chr(cp))]
    chosen += list(JAPANESE_MARKS)
    seen = set(chosen)
    ranked = sorted((c for c in char_counts if is_kanji(c)), key=lambda c: (-char_counts[c], c))
    fallback = udata.japanese_sets["kJoyoKanji"] + udata.japanese_sets["kJinmeiyoKanji"] + \
        udata.japanese_sets["kJis0"]
    for ch in ranked + fallback:
        if len(chosen) >= budget:
            break
        if ch in seen or not is_kanji(ch):
            continue
        if ch not in udata.protected:
            near = _neighbours(udata, ch)
            near += [w for v in near if v not in udata.protected for w in _neighbours(udata, v)]
            if any(v in seen for v in near):
                continue
        chosen.append(ch)
        seen.add(ch)
    return chosen


def variant_groups(chosen, udata, taken):
    """{chosen char: [variant chars]}: an unchosen, unprotected variant joins the first chosen
    char (in `chosen` order) linked to it: direct links first (strong Unihan fields before weak
    ones), then links through a variant already claimed; compatibility forms (Kangxi radicals,
    CJK compatibility ideographs, circled forms) follow their unified char."""
    compat = compatibility_forms(udata)
    chosen_set = set(chosen)
    owner = {}
    groups = {c: [] for c in chosen}

    def claim(ch, forms):
        for v in forms:
            if v not in chosen_set and v not in owner and v not in taken and "," not in v \
                    and v not in udata.protected:
                owner[v] = ch
                groups[ch].append(v)

    for tier in udata.variants:  # direct Unihan variants, strongest relation first
        for ch in chosen:
            claim(ch, sorted(tier.get(ch, ())))
    for ch in chosen:  # variants of claimed variants
        for v in list(groups[ch]):
            claim(ch, _neighbours(udata, v))
    for ch in chosen:  # compatibility forms of the char and of its variants
        claim(ch, compat.get(ch, []))
        for v in list(groups[ch]):
            claim(ch, compat.get(v, []))
    return groups


def _is_enclosed(ch):
    """Circled/parenthesised/squared forms: single-char spellings only, never in n-grams."""
    return "\u3200" <= ch <= "\u33ff" or "\U0001f100" <= ch <= "\U0001f2ff"


def expand_forms(token, groups):
    """Variant spellings of a multi-char token: product of its kanji's variant groups
    (ideograph variants only, canonical spelling first, at most MAX_VARIANT_FORMS)."""
    choices = [[c] + [v for v in groups.get(c, ()) if len(v) == 1 and not _is_enclosed(v)]
               if is_kanji(c) else [c] for c in token]
    return ["".join(p) for p in itertools.islice(itertools.product(*choices), MAX_VARIANT_FORMS)]


def greedy_usage(runs, rank):
    """Tokenises `runs` ({text: weight}) with the encoder rule (smallest id among windows of
    3, 2, 1) -> ({token: weighted uses}, total weighted tokens)."""
    usage = collections.Counter()
    total = 0.0
    get = rank.get
    for run, w in runs.items():
        i, n = 0, len(run)
        while i < n:
            best, best_rank = run[i], get(run[i], 1 << 30)
            for length in (2, 3):
                if i + length <= n:
                    r = get(run[i:i + length])
                    if r is not None and r < best_rank:
                        best, best_rank = run[i:i + length], r
            usage[best] += w
            total += w
            i += len(best)
    return usage, total


def _order(tokens, usage, longest_first):
    key = (lambda t: (-len(t), -usage.get(t, 0.0), t)) if longest_first else \
        (lambda t: (-usage.get(t, 0.0), -len(t), t))
    return sorted(tokens, key=key)


def select_ngrams(runs, chars, budget, show_progress=False):
    """Chooses and orders `budget` 2-3 char tokens over `chars` for the data `runs`.

    At one position there is one window of each length, so what the order decides is only
    whether a 3-gram beats its 2-char prefix; a 3-gram placed after its prefix is never used.
    Start from the n-grams with the largest estimated saving (count x (length - 1)); then
    re-tokenise with the encoder rule and swap n-grams that really save little for the best
    unused candidates; finally keep whichever order needs fewer tokens on the data: longest
    first, or by measured usage.
    """
    lengths = tuple(range(2, MAX_TOKEN_CHARS + 1))
    counts = count_ngrams(runs, lengths)
    char_set = set(chars)
    estimate = {g: w * (len(g) - 1) for g, w in counts.items()
                if w * (len(g) - 1) > MIN_NGRAM_SAVING and all(c in char_set for c in g)}
    candidates = sorted(estimate, key=lambda g: (-estimate[g], g))
    if len(candidates) < budget:
        raise GPTSANError(f"not enough data: {len(candidates)} candidate n-grams for "
                          f"{budget} multi-char entries (give a bigger corpus or a smaller size)")
    single_rank = {c: budget for c in chars}  # single chars come after every n-gram

    def tokenise(order):
        rank = dict(single_rank)
        rank.update((t, i) for i, t in enumerate(order))
        return greedy_usage(runs, rank)

    selected, pool = candidates[:budget], candidates[budget:]
    usage = {g: counts[g] for g in selected}
    bar = tqdm(total=REFINE_ROUNDS + 3, desc="select n-grams", disable=not show_progress)
    for round_ in range(REFINE_ROUNDS + 1):
        measured, _ = tokenise(_order(selected, usage, longest_first=True))
        usage = {t: measured.get(t, 0.0) for t in selected}
        bar.update(1)
        if round_ == REFINE_ROUNDS:
            break
        # Swap the n-grams that save less than half of what the best unused ones promise.
        benefit = {t: usage[t] * (len(t) - 1) for t in selected}
        weakest = sorted(selected, key=lambda t: (benefit[t], t))
        swaps = 0
        while swaps < min(len(pool), len(weakest)) and \
                benefit[weakest[swaps]] < 0.5 * estimate[pool[swaps]]:
            swaps += 1
        dropped = weakest[:swaps]
        for t in dropped:
            estimate[t] = benefit[t]  # measured, so a dropped n-gram does not come straight back
        dropped_set = set(dropped)
        selected = [t for t in selected if t not in dropped_set] + pool[:swaps]
        pool = sorted(pool[swaps:] + dropped, key=lambda g: (-estimate[g], g))
        usage.update((t, counts[t]) for t in selected if t not in usage)
    best_total, best_order = None, None
    for longest_first in (True, False):
        order = _order(selected, usage, longest_first)
        _, total = tokenise(order)
        if best_total is None or total < best_total:
            best_total, best_order = total, order
        bar.update(1)
    bar.close()
    return best_order


def emoji_table(udata):
    """{"emoji": {surface: class}, "emoji_inv": {class: surface}}; longest surfaces first so
    that a sequence is replaced before its parts; text-default symbols need their FE0F."""
    class_of = {}
    for k, (_, keys) in enumerate(EMOJI_CLASSES, start=1):
        for key in keys:
            class_of[key] = f"<|emoji{k}|>"
    entries, seen = [], set()
    for index, (surface, status, group, subgroup) in enumerate(udata.emoji):
        token = class_of.get(subgroup) or class_of.get(group)
        if token is None or surface in seen or "," in surface:
            continue
        if len(surface) == 1 and status == "unqualified":
            continue  # e.g. © ™ ♀ without FE0F are ordinary text symbols
        seen.add(surface)
        entries.append((surface, token, index))
    inv = {}
    for surface, token, _ in entries:  # class representative: its first fully-qualified emoji
        inv.setdefault(token, surface)
    entries.sort(key=lambda e: (-len(e[0]), e[2]))
    ordered_inv = {f"<|emoji{k}|>": inv[f"<|emoji{k}|>"] for k in range(1, len(EMOJI_CLASSES) + 1)}
    return {"emoji": {s: t for s, t, _ in entries}, "emoji_inv": ordered_inv}


def build_vocabulary(size, udata, texts=(), word_freqs=None, show_progress=False):
    """Builds (vocabulary lines, emoji table) with exactly `size` entries.

    texts: corpus texts; word_freqs: {word: frequency} (e.g. wordfreq); at least one needed.
    """
    if not MIN_VOCAB_SIZE <= size <= MAX_VOCAB_SIZE:
        raise GPTSANError(f"vocabulary size must be in {MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE}, "
                          f"got {size}")
    stats = NgramStats()
    if texts:
        stats.add_texts(texts)
    if word_freqs:
        stats.add_words(word_freqs)
    if not stats.sources:
        raise GPTSANError("no Japanese text in the input data")
    emoji = emoji_table(udata)
    n_emoji = len(emoji["emoji_inv"])
    symbols = symbol_groups()
    fixed = len(symbols) + len(SPECIAL_TOKENS) + n_emoji + NUM_BYTE_TOKENS + len(CONTROL_TOKENS)

    raw_runs = stats.weighted_runs()
    char_counts = count_ngrams(raw_runs, (1,))
    chars = choose_characters(char_counts, udata, num_single_chars(size))
    taken = {f for g in symbols for f in g} | emoji_chars(udata)
    groups = variant_groups(chars, udata, taken)
    canonical = {ord(v): c for c, vs in groups.items() for v in vs if len(v) == 1}
    runs = stats.weighted_runs(canonical)
    budget = size - fixed - len(chars)
    ngrams = select_ngrams(runs, chars, budget, show_progress)

    half = halfwidth_kana()
    lines = [",".join(expand_forms(t, groups)) for t in ngrams]
    single_entries = []
    for ch in chars:
        forms = [ch] + kana_variant_forms(ch) + ([half[ch]] if ch in half else []) + groups[ch]
        single_entries.append((ch, forms))
    # Entries with 2-char spellings (が: か゛, ｶﾞ) must come before their first char's entry.
    single_entries.sort(key=lambda e: (all(len(f) == 1 for f in e[1]),
                                       -char_counts.get(e[0], 0.0), e[0]))
    lines += [",".join(forms) for _, forms in single_entries]
    lines += ["," if g == [","] else ",".join(g) for g in symbols]
    lines += list(SPECIAL_TOKENS)
    lines += [f"<|emoji{k}|>" for k in range(1, n_emoji + 1)]
    lines += [f"<|byte{b}|>" for b in range(NUM_BYTE_TOKENS)]
    lines += list(CONTROL_TOKENS)
    assert len(lines) == size, (len(lines), size)
    surfaces = [f for line in lines for f in ([line] if line == "," else line.split(","))]
    assert len(surfaces) == len(set(surfaces)), "duplicate surface form"
    return lines, emoji


def serialize(lines, emoji):
    """(vocabulary bytes, emoji bytes) exactly as written to disk."""
    return "\n".join(lines).encode("utf-8"), json.dumps(emoji).encode("utf-8")


def write_atomic(path, data, force=False):
    """Writes bytes to `path` through a temp file + os.replace; refuses to overwrite."""
    if os.path.exists(path) and not force:
        raise GPTSANError(f"{path} exists (use --force to overwrite)")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
