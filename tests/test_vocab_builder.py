"""The vocabulary builder and the project's generated ja-swe36k.txt / emoji.json."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import require_debian_data
from gptsan import vocab_builder
from gptsan.errors import GPTSANError
from gptsan.tokenization import (CONTROL_TOKENS, SPECIAL_TOKENS, SWEEncoder, check_emoji_table,
                                 check_vocabulary)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(ROOT, "ja-swe36k.txt")
EMOJI = os.path.join(ROOT, "emoji.json")
REFERENCE = os.path.join(ROOT, "..", "shared", "reference")
SMALL_WORDS = 30000  # wordfreq words in the small-sample build
UNICODE_DATA = os.path.join(vocab_builder.DEFAULT_UNICODE_DIR, "emoji")  # Debian unicode-data
# Real prose (written for this test): a paragraph of plain modern Japanese.
PROSE = ("昨日は朝から雨が降っていたので、私は一日中家で本を読んで過ごしました。"
         "午後になると雨が止んで、近くの公園まで散歩に出かけることにしました。"
         "公園では子供たちが楽しそうに遊んでいて、とても穏やかな気持ちになりました。"
         "帰り道に新しいパン屋を見つけたので、明日の朝ご飯のためにクロワッサンを二つ買いました。"
         "日本の経済は今年も緩やかに回復しており、政府は来年度の予算案を発表する予定です。")


@pytest.fixture(scope="module")
def project():
    return SWEEncoder.from_files(VOCAB, EMOJI)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")


def test_committed_files_follow_the_format(project):
    lines = read_lines(VOCAB)
    assert len(lines) == vocab_builder.MAX_VOCAB_SIZE and lines[-1] != ""
    entries = check_vocabulary(lines)  # no duplicate surface form either
    with open(EMOJI, encoding="utf-8") as f:
        check_emoji_table(json.load(f), entries)
    canonical = [e[0] for e in entries]
    first_special = canonical.index(SPECIAL_TOKENS[0])
    assert canonical[first_special:first_special + len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert canonical[-len(CONTROL_TOKENS):] == list(CONTROL_TOKENS)
    # Ordinary tokens: 2-3 Japanese chars first, then single chars, then the symbol block.
    symbols = vocab_builder.symbol_groups()
    first_symbol = first_special - len(symbols)
    assert lines[first_symbol:first_special] == [",".join(g) for g in symbols]
    lengths = [len(t) for t in canonical[:first_symbol]]
    first_single = lengths.index(1)
    assert set(lengths[:first_single]) == {2, 3} and set(lengths[first_single:]) == {1}
    assert all(vocab_builder.is_japanese(c) for t in canonical[:first_symbol] for c in t)
    assert "," in lines[first_symbol:first_special]


def test_control_token_ids_count_from_the_end(project):
    n = len(project)
    assert (project.sot, project.msk, project.sep, project.not_token, project.bag, project.seg,
            project.eot) == tuple(range(n - 7, n))
    assert [project.id_to_token(i) for i in range(n - 7, n)] == list(CONTROL_TOKENS)


def test_variant_groups_share_one_id(project):
    for canonical, variant in [("高", "髙"), ("会社", "會社"), ("ガ", "ｶﾞ"), ("が", "か゛"),
                               ("一", "\u2f00"), ("株", "㈱"), ("１", "①"), ("ア", "ｱ"),
                               ("学", "學"), ("国", "國"), ("髪", "髮"), ("吉", "𠮷")]:
        assert project.token_to_id(variant) == project.token_to_id(canonical), variant
        assert project.id_to_token(project.token_to_id(variant)) == canonical
    assert project.encode("髙橋さんの會社") == project.encode("高橋さんの会社")


def test_japanese_round_trip(project):
    text = PROSE + "\nDebian 12 の apt-get は\tタブも 空白も扱える。한글"  # Hangul: byte tokens
    ids = project.encode(text)
    assert project.decode(ids) == text
    assert project.byte_id(0xED) in ids  # 한 = ED 95 9C went through byte tokens
    assert len(ids) < 0.7 * len(text)  # 2-3 char tokens really are used


def test_common_emoji_map_to_classes(project):
    with open(EMOJI, encoding="utf-8") as f:
        table = json.load(f)["emoji"]
    assert table["😀"] == table["😂"] == table["😊"]
    assert table["👍"] == table["👍🏽"] == table["👋🏿"]
    assert len({table["😀"], table["🐶"], table["🍣"], table["🇯🇵"], table["❤️"]}) == 5
    # a skin-toned or ZWJ sequence is one class token, not a base plus leftovers
    assert project.encode("👍🏽") == [project.token_to_id(table["👍"])]
    assert project.encode("👨‍👩‍👧") == [project.token_to_id(table["👨‍👩‍👧"])]


def test_prose_is_not_longer_than_with_the_official_vocabulary(project):
    if not os.path.isdir(REFERENCE):
        pytest.skip(f"official vocabulary folder {REFERENCE} is absent")
    official = SWEEncoder.from_files(os.path.join(REFERENCE, "ja-swe36k.txt"),
                                     os.path.join(REFERENCE, "emoji.json"))
    assert len(project.encode(PROSE)) <= 1.15 * len(official.encode(PROSE))


@pytest.fixture(scope="module")
def small_words():
    pytest.importorskip("wordfreq", reason="wordfreq not installed (pip install -e '.[vocab]')")
    return vocab_builder.load_wordfreq(SMALL_WORDS)


@pytest.fixture(scope="module")
def udata():
    require_debian_data(UNICODE_DATA, "unicode-data")
    return vocab_builder.UnicodeData()


def _digest(lines, emoji):
    vocab_bytes, emoji_bytes = vocab_builder.serialize(lines, emoji)
    return hashlib.sha256(vocab_bytes + b"\0" + emoji_bytes).hexdigest()


def test_small_build_is_valid_and_deterministic(udata, small_words):
    texts = [PROSE * 3]
    lines, emoji = vocab_builder.build_vocabulary(8000, udata, texts, small_words)
    again = vocab_builder.build_vocabulary(8000, udata, texts, small_words)
    assert _digest(lines, emoji) == _digest(*again)
    assert len(lines) == 8000
    check_emoji_table(emoji, check_vocabulary(lines))
    encoder = SWEEncoder(lines, emoji)
    assert encoder.eot == 7999 and encoder.sot == 7993
    assert encoder.token_to_id("髙") == encoder.token_to_id("高")
    assert encoder.decode(encoder.encode(PROSE)) == PROSE


SEED_SCRIPT = """
import hashlib, sys
from gptsan import vocab_builder as vb
lines, emoji = vb.build_vocabulary(8000, vb.UnicodeData(), [sys.argv[1] * 3], vb.load_wordfreq({n}))
v, e = vb.serialize(lines, emoji)
print(hashlib.sha256(v + b"\\0" + e).hexdigest())
"""


def test_build_does_not_depend_on_the_hash_seed(udata, small_words):
    lines, emoji = vocab_builder.build_vocabulary(8000, udata, [PROSE * 3], small_words)
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", SEED_SCRIPT.format(n=SMALL_WORDS), PROSE],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == _digest(lines, emoji)


def test_build_rejects_bad_sizes_and_no_data(udata):
    with pytest.raises(GPTSANError, match="size"):
        vocab_builder.build_vocabulary(7999, udata, [PROSE])
    with pytest.raises(GPTSANError, match="no Japanese text"):
        vocab_builder.build_vocabulary(8000, udata, ["only ASCII here"])
    with pytest.raises(GPTSANError, match="not enough data"):
        vocab_builder.build_vocabulary(8000, udata, [PROSE])


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_vocab.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    (["--size", "36001"], "--size must be in 8000..36000"),
    (["--size", "8000", "--corpus", "/nonexistent/corpus"], "corpus directory not found"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, message):
    vocab, emoji = tmp_path / "v.txt", tmp_path / "e.json"
    out = run_cli(*args, "--vocab_file", str(vocab), "--emoji_file", str(emoji))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in out.stderr
    assert not vocab.exists() and not emoji.exists()


def test_cli_refuses_to_overwrite_without_force(tmp_path):
    vocab, emoji = tmp_path / "v.txt", tmp_path / "e.json"
    vocab.write_text("keep me")
    out = run_cli("--size", "8000", "--vocab_file", str(vocab), "--emoji_file", str(emoji))
    assert out.returncode == 2 and "--force" in out.stderr
    assert vocab.read_text() == "keep me" and not emoji.exists()


def test_empty_corpus_directory_is_an_error(tmp_path):
    with pytest.raises(GPTSANError, match="no .txt"):
        vocab_builder.corpus_files(str(tmp_path))


def test_markup_is_stripped(tmp_path):
    page = tmp_path / "a.html"
    page.write_text("<html><head><title>x</title></head><body><p>日本語の<b>文章</b>です。</p>"
                    "<pre>ls -l</pre><script>var a;</script></body></html>", encoding="utf-8")
    man = tmp_path / "ls.1"
    man.write_text('.\\" comment\n.TH LS 1\n.SH 説明\n\\fBls\\fP はディレクトリの\n内容を表示する。\n',
                   encoding="utf-8")
    assert vocab_builder.prose_lines(vocab_builder.read_text_file(str(page))) == "日本語の文章です。"
    assert vocab_builder.prose_lines(vocab_builder.read_text_file(str(man))) == \
        "ls はディレクトリの内容を表示する。"
    assert [os.path.basename(p) for p in vocab_builder.corpus_files(str(tmp_path))] == \
        ["a.html", "ls.1"]


MAKE_VOCAB_DEBS = ("manpages-ja", "manpages-ja-dev")  # the corpus of `make vocab`
MAN_JA = ("/usr/share/man/ja/man1", "/usr/share/man/ja/man3")  # manpages-ja, manpages-ja-dev


def make_vocab_corpus(directory):
    """The corpus folder `make vocab` builds: links to the Japanese man pages of MAKE_VOCAB_DEBS."""
    require_debian_data(MAN_JA, " and ".join(MAKE_VOCAB_DEBS))
    listed = subprocess.run(["dpkg", "-L", *MAKE_VOCAB_DEBS], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    pages = sorted(p for p in listed.stdout.split("\n")
                   if p.startswith("/usr/share/man/ja/") and p.endswith(".gz"))
    for page in pages:
        os.symlink(page, os.path.join(directory, os.path.basename(page)))
    return str(directory)


def test_committed_files_are_what_make_vocab_builds(tmp_path, udata):
    pytest.importorskip("wordfreq", reason="wordfreq not installed (pip install -e '.[vocab]')")
    texts = vocab_builder.read_corpus(make_vocab_corpus(tmp_path))
    lines, emoji = vocab_builder.build_vocabulary(vocab_builder.MAX_VOCAB_SIZE, udata, texts,
                                                  vocab_builder.load_wordfreq())
    vocab_bytes, emoji_bytes = vocab_builder.serialize(lines, emoji)
    with open(VOCAB, "rb") as f:
        assert f.read() == vocab_bytes
    with open(EMOJI, "rb") as f:
        assert f.read() == emoji_bytes


def test_bench_refuses_too_little_text(tmp_path):
    sample = tmp_path / "sample.txt"
    sample.write_text(PROSE, encoding="utf-8")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_vocab.py"),
                          "--text", str(sample)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "only" in out.stderr and "bytes of Japanese prose" in out.stderr


def test_bench_reports_both_vocabularies(tmp_path):
    if not os.path.isdir(REFERENCE):
        pytest.skip(f"official vocabulary folder {REFERENCE} is absent")
    sample = tmp_path / "sample.txt"
    sample.write_text(PROSE, encoding="utf-8")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_vocab.py"),
                          "--text", str(sample), "--min_bytes", "100"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    report = json.loads(out.stdout)
    assert report["chars"] == len(PROSE)
    assert report["ratio"] == round(report["project"]["tokens"] / report["official"]["tokens"], 4)
    assert report["ratio"] <= 1.15
