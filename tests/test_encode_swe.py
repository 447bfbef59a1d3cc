"""The corpus CLI `encode_swe.py` and the published `SWEEncoder_ja` name."""
import os

import numpy as np
import pytest

import encode_swe
from gptsan.errors import GPTSANError
from gptsan.tokenization import SWEEncoder, read_emoji_file, read_vocabulary_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference")
VOCAB = os.path.join(REFERENCE, "ja-swe36k.txt")
EMOJI = os.path.join(REFERENCE, "emoji.json")
pytestmark = pytest.mark.skipif(not os.path.isfile(VOCAB), reason="../shared/reference (the "
                                "official vocabulary) is not present on this machine")

TEXTS = {  # relative path -> content
    "a.txt": "吾輩は猫である。名前はまだ無い。\n",
    "b.txt": "2022年9月16日、価格は1,000円(税込)です。連絡先: info@example.com\r\n",
    "sub/c.txt": "どこで生れたかとんと見当がつかぬ。😀",
    "sub/d.txt": "",
}


@pytest.fixture(scope="module")
def encoder():
    return SWEEncoder.from_files(VOCAB, EMOJI)


@pytest.fixture()
def corpus(tmp_path):
    src = tmp_path / "src"
    for name, text in TEXTS.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text, encoding="utf-8", newline="")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "gone.txt").symlink_to(tmp_path / "missing-target")  # listed, but cannot be read
    (src / "notes.md").write_text("not a .txt file", encoding="utf-8")
    return src


def run(src, dst, *extra):
    return encode_swe.main(["--src_dir", str(src), "--dst_file", str(dst), "--vocabulary", VOCAB,
                            "--emoji", EMOJI, *extra])


def expected_arrays(encoder, combine, clean):
    """The published rule: sorted files, each + <|endoftext|>, cut when >= combine chars."""
    arrays, text = [], ""
    for name in sorted(os.path.join("src", n) for n in TEXTS):
        text += TEXTS[os.path.relpath(name, "src")] + "<|endoftext|>"
        if len(text) >= combine:
            arrays.append(encoder.encode(text, clean=clean))
            text = ""
    if text:
        arrays.append(encoder.encode(text, clean=clean))
    return arrays


@pytest.mark.parametrize("combine, clean, processes", [(1, False, 1), (60, True, 2),
                                                       (50000, False, 1)])
def test_encodes_files_and_reports_bad_ones(corpus, tmp_path, capsys, encoder, combine, clean,
                                            processes):
    dst = tmp_path / "out.npz"
    extra = ["--combine", str(combine), "--num_process", str(processes)]
    assert run(corpus, dst, *extra, *(["--clean_text"] if clean else [])) == 0
    with np.load(dst) as data:
        arrays = [data[f"arr_{k}"] for k in range(len(data.files))]
    assert [a.tolist() for a in arrays] == expected_arrays(encoder, combine, clean)
    assert all(a.dtype == np.int64 for a in arrays)  # as published (np.stack of Python ints)
    assert sum(a.tolist().count(encoder.eot) for a in arrays) == len(TEXTS)
    err = capsys.readouterr().err
    assert f"skipped {corpus / 'latin1.txt'}: not UTF-8 (byte 0xe9 at offset 3)" in err
    assert f"skipped {corpus / 'gone.txt'}: cannot read" in err
    assert "encoded 4 files (2 skipped)" in err
    assert sorted(os.listdir(tmp_path)) == ["out.npz", "src"]  # no temporary file left


def test_glob_source_and_suffix(corpus, tmp_path, encoder):
    assert run(os.path.join(corpus, "sub", "*.txt"), tmp_path / "out", "--num_process", "1",
               "--dtype", "int32") == 0
    with np.load(tmp_path / "out.npz") as data:
        assert data["arr_0"].dtype == np.int32
        assert data["arr_0"].tolist() == encoder.encode(TEXTS["sub/c.txt"] + "<|endoftext|>"
                                                        + TEXTS["sub/d.txt"] + "<|endoftext|>")


def test_refuses_to_overwrite_without_force(corpus, tmp_path):
    dst = tmp_path / "out.npz"
    dst.write_bytes(b"keep me")
    with pytest.raises(GPTSANError, match="exists .*--force"):
        run(corpus, dst, "--num_process", "1")
    assert dst.read_bytes() == b"keep me"
    assert run(corpus, dst, "--num_process", "1", "--force") == 0
    with np.load(dst) as data:
        assert len(data.files) == 1


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GPTSANError, match="no .txt files"):
        run(empty, tmp_path / "out.npz")
    (empty / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(GPTSANError, match="none of the 1 files could be read"):
        run(empty, tmp_path / "out.npz", "--num_process", "1")
    with pytest.raises(GPTSANError, match="vocabulary file not found: .*nope.txt"):
        encode_swe.main(["--src_dir", str(empty), "--dst_file", str(tmp_path / "o.npz"),
                         "--vocabulary", str(tmp_path / "nope.txt"), "--emoji", EMOJI])
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_cli_exit_code_and_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        encode_swe.run_cli(encode_swe.main, ["--src_dir", str(tmp_path / "none"), "--dst_file",
                                             str(tmp_path / "o.npz"), "--vocabulary", VOCAB,
                                             "--emoji", EMOJI])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_published_class_name_and_attributes(encoder):
    old = encode_swe.SWEEncoder_ja(read_vocabulary_file(VOCAB), read_emoji_file(EMOJI))
    text = "慶應の学生が1,000円を払った😀"
    assert old.encode(text) == encoder.encode(text)
    assert old.encode(text, clean=True) == encoder.encode(text, clean=True)
    assert old.decode(old.encode(text)) == encoder.decode(encoder.encode(text))
    assert old.swe["慶応"] == old.swe["慶應"] and old.bpe[old.swe["慶應"]][0] == "慶応"
    assert len(old) == len(encoder) == 36000
    assert old.clean_text("1,000円") == "<PRICE>"
