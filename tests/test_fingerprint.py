"""Which vocabulary goes with which model (gptsan.fingerprint).

Every entry point is given a model (or TFRecords) and a foreign vocabulary and must stop with
one line naming both files. The foreign vocabulary is the demo model's own with two entries
swapped: same size and format, other ids -- the project/published 36k hazard in miniature.
"""
import dataclasses
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from gptsan import fingerprint as fp
from gptsan.config import GPTSANConfig, ModelConfig
from gptsan.errors import GPTSANError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "..", "shared", "reference")
PROJECT_VOCAB = os.path.join(ROOT, "ja-swe36k.txt")
PROJECT_EMOJI = os.path.join(ROOT, "emoji.json")
DEMO = os.path.join(ROOT, "models", "demo")
DEMO_VOCAB = os.path.join(DEMO, "ja-swe8k-demo.txt")
DEMO_EMOJI = os.path.join(DEMO, "emoji.json")
SAMPLE_TEXT = os.path.join(ROOT, "data", "sample", "news_01.txt")
DEMO_CONTEXT = 128  # num_contexts of models/demo


def published_files():
    vocab, emoji = os.path.join(REFERENCE, "ja-swe36k.txt"), os.path.join(REFERENCE, "emoji.json")
    if not (os.path.isfile(vocab) and os.path.isfile(emoji)):
        pytest.skip(f"the published vocabulary is not in {REFERENCE}")
    return vocab, emoji


def load_script(relative):
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(relative))[0], os.path.join(ROOT, relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(capsys, script, *args):
    """Runs a CLI through errors.run_cli in this process: (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(load_script(script).main, [str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def assert_refused(result, *names):
    """Exit 2, one `error:` line that names every one of `names`."""
    code, lines = result
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """(vocab, emoji): the demo vocabulary with its first two entries swapped, and an emoji
    table without its first emoji (each a file with another fingerprint)."""
    folder = tmp_path_factory.mktemp("foreign")
    with open(DEMO_VOCAB, encoding="utf-8") as f:
        entries = f.read().split("\n")
    entries[0], entries[1] = entries[1], entries[0]
    (folder / "ja-swe8k-demo.txt").write_text("\n".join(entries), encoding="utf-8")
    with open(DEMO_EMOJI, encoding="utf-8") as f:
        table = json.load(f)
    del table["emoji"][next(iter(table["emoji"]))]
    (folder / "emoji.json").write_text(json.dumps(table), encoding="utf-8")
    return str(folder / "ja-swe8k-demo.txt"), str(folder / "emoji.json")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """TFRecords of one sample file: made with the demo vocabulary, and with the project's."""
    folder = tmp_path_factory.mktemp("records")
    make = load_script("scripts/make_tfrecord.py")
    prefixes = {}
    for name, vocab in (("demo", DEMO_VOCAB), ("project", PROJECT_VOCAB)):
        prefixes[name] = str(folder / name)
        assert make.main(["--input_files", SAMPLE_TEXT, "--vocabulary", vocab, "--num_context",
                          str(DEMO_CONTEXT), "--output_prefix", prefixes[name],
                          "--num_process", "1"]) == 0
    return prefixes


def copy_demo(destination, keep_record=True, keep_copies=True):
    """models/demo copied to `destination`, optionally without its record / vocabulary copies."""
    shutil.copytree(DEMO, destination)
    if not keep_record:
        config = GPTSANConfig.from_json_file(str(destination))
        dataclasses.replace(config, vocabulary=None).to_json_file(
            os.path.join(destination, "parameters.json"))
    if not keep_copies:
        os.remove(os.path.join(destination, "ja-swe8k-demo.txt"))
        os.remove(os.path.join(destination, "emoji.json"))
    return str(destination)


# ------------------------------------------------------------------------ the fingerprints
def test_constants_are_the_fingerprints_of_the_project_files():
    files = fp.VocabularyFiles.of(PROJECT_VOCAB, PROJECT_EMOJI)
    assert (files.vocab_sha256, files.emoji_sha256) == (fp.PROJECT_VOCAB_SHA256,
                                                          fp.PROJECT_EMOJI_SHA256)
    assert files.name == fp.PROJECT_NAME and not files.is_published


def test_published_vocabulary_is_recognised_in_the_hf_upload_format(tmp_path):
    """The published files, and the same vocabulary as HF's tokenizer saves it (vocab.txt with
    a newline after every entry, emoji.json with \\u escapes), have the published fingerprints."""
    vocab, emoji = published_files()
    files = fp.VocabularyFiles.of(vocab, emoji)
    assert (files.vocab_sha256, files.emoji_sha256) == (fp.PUBLISHED_VOCAB_SHA256,
                                                          fp.PUBLISHED_EMOJI_SHA256)
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.GPTSanJapaneseTokenizer(vocab_file=vocab, emoji_file=emoji)
    saved_vocab, saved_emoji = tokenizer.save_vocabulary(str(tmp_path))
    with open(saved_vocab, "rb") as f:
        assert f.read().endswith(b"\n")  # not byte-identical to the published file ...
    hf = fp.VocabularyFiles.of(saved_vocab, saved_emoji)
    assert hf.is_published and hf.emoji_sha256 == fp.PUBLISHED_EMOJI_SHA256  # ... same content
    assert hf.entries == 36000 and hf.name == fp.PUBLISHED_NAME


def test_fingerprint_covers_content_not_formatting(tmp_path, foreign):
    base = fp.VocabularyFiles.of(DEMO_VOCAB, DEMO_EMOJI)
    with open(DEMO_VOCAB, encoding="utf-8") as f:
        (tmp_path / "v.txt").write_text(f.read() + "\n", encoding="utf-8")  # a final newline
    with open(DEMO_EMOJI, encoding="utf-8") as f:
        table = json.load(f)
    (tmp_path / "e.json").write_text(json.dumps(table, indent=1), encoding="utf-8")  # \u escapes
    same = fp.VocabularyFiles.of(str(tmp_path / "v.txt"), str(tmp_path / "e.json"))
    assert (same.vocab_sha256, same.emoji_sha256, same.entries) == (
        base.vocab_sha256, base.emoji_sha256, base.entries)
    reordered = dict(table, emoji=dict(reversed(list(table["emoji"].items()))))
    (tmp_path / "r.json").write_text(json.dumps(reordered), encoding="utf-8")
    assert fp.VocabularyFiles.of(DEMO_VOCAB, str(tmp_path / "r.json")).emoji_sha256 != \
        base.emoji_sha256  # emoji are replaced in table order: the order counts
    other = fp.VocabularyFiles.of(*foreign)
    assert other.vocab_sha256 != base.vocab_sha256 and other.entries == base.entries


def test_parameters_json_section(tmp_path):
    published_style = GPTSANConfig.from_json_file(os.path.join(ROOT, "configs", "tiny.json"))
    assert published_style.vocabulary is None
    assert "vocabulary_params" not in published_style.to_dict()
    demo = GPTSANConfig.from_json_file(DEMO)
    assert demo.vocabulary.vocab_file == "ja-swe8k-demo.txt"
    demo.to_json_file(str(tmp_path / "parameters.json"))
    assert GPTSANConfig.from_json_file(str(tmp_path)) == demo
    data = demo.to_dict()
    data["vocabulary_params"]["vocab_sha256"] = "abc"
    with pytest.raises(GPTSANError, match="vocab_sha256 must be a SHA-256"):
        GPTSANConfig.from_dict(data)
    data["vocabulary_params"] = dict(demo.to_dict()["vocabulary_params"], vocab_file="../x.txt")
    with pytest.raises(GPTSANError, match="vocab_file must be a file name"):
        GPTSANConfig.from_dict(data)


def test_demo_model_is_what_its_recipe_records():
    recipe = load_script("scripts/make_demo_model.py")
    files = fp.VocabularyFiles.of(os.path.join(DEMO, recipe.DEMO_VOCAB_FILE), DEMO_EMOJI)
    assert GPTSANConfig.from_json_file(DEMO).vocabulary == files.record(
        name=recipe.DEMO_VOCAB_NAME)
    assert not os.path.exists(os.path.join(DEMO, "ja-swe36k.txt"))  # 8k: not named 36k


# ------------------------------------------------------------------- generation and MASK fill
def test_generate_and_fill_refuse_a_foreign_vocabulary(capsys, foreign):
    vocab, emoji = foreign
    for script, text in (("run_generate.py", "今日は"), ("run_languagemodel.py", "今日は[MASK]")):
        assert_refused(run(capsys, script, "--model", DEMO, "--context", text,
                           "--vocabulary", vocab), vocab, DEMO_VOCAB)
        assert_refused(run(capsys, script, "--model", DEMO, "--context", text,
                           "--emoji", emoji), emoji, DEMO_EMOJI)


def test_predictor_refuses_a_tampered_copy(tmp_path, foreign):
    from gptsan.inference import Predictor

    model_dir = copy_demo(tmp_path / "demo")
    shutil.copy(foreign[0], os.path.join(model_dir, "ja-swe8k-demo.txt"))
    with pytest.raises(fp.VocabularyMismatch, match="recorded in .*parameters.json"):
        Predictor(model_dir)


# ---------------------------------------------------------------------------- training data
def test_make_tfrecord_and_encode_swe_have_no_default_vocabulary(capsys, tmp_path):
    assert_refused(run(capsys, "scripts/make_tfrecord.py", "--input_files", SAMPLE_TEXT,
                       "--output_prefix", tmp_path / "lm"), "--vocabulary")
    assert_refused(run(capsys, "encode_swe.py", "--src_dir", SAMPLE_TEXT, "--dst_file",
                       tmp_path / "out.npz"), "--vocabulary")
    assert os.listdir(tmp_path) == []


def test_records_carry_their_vocabulary(records, capsys, foreign):
    with open(records["demo"] + fp.RECORDS_SUFFIX, encoding="utf-8") as f:
        sidecar = json.load(f)
    assert sidecar["vocabulary"] == DEMO_VOCAB
    assert sidecar["vocab_sha256"] == fp.VocabularyFiles.of(DEMO_VOCAB, DEMO_EMOJI).vocab_sha256
    shard = records["demo"] + "_0000.tfrecord"
    code, lines = run(capsys, "scripts/show_tfrecord.py", shard)  # the recorded vocabulary
    assert code == 0
    assert_refused(run(capsys, "scripts/show_tfrecord.py", shard, "--vocabulary", foreign[0]),
                   foreign[0], DEMO_VOCAB, records["demo"] + fp.RECORDS_SUFFIX)


def test_show_tfrecord_without_a_record_needs_a_vocabulary(records, capsys, tmp_path):
    renamed = str(tmp_path / "data.tfrecord")
    shutil.copy(records["demo"] + "_0000.tfrecord", renamed)
    assert_refused(run(capsys, "scripts/show_tfrecord.py", renamed), renamed, "--vocabulary")


def test_shards_without_a_record_are_named(records, tmp_path):
    renamed = str(tmp_path / "data_0000.tfrecord")  # a prefix without <prefix>.vocabulary.json
    shutil.copy(records["demo"] + "_0000.tfrecord", renamed)
    assert fp.records_vocabulary([renamed]) == (None, [renamed])
    config = GPTSANConfig.from_json_file(os.path.join(ROOT, "configs", "demo.json"))
    with pytest.raises(GPTSANError, match="no vocabulary: pass --vocabulary"):
        fp.training_vocabulary(config, record_files=[renamed])
    files, _ = fp.training_vocabulary(config, DEMO_VOCAB, record_files=[renamed])
    assert "carry no vocabulary fingerprint" in files.note and renamed in files.note


def test_records_of_two_vocabularies_are_refused(records):
    shards = [records["demo"] + "_0000.tfrecord", records["project"] + "_0000.tfrecord"]
    with pytest.raises(fp.VocabularyMismatch, match="different vocabularies"):
        fp.records_vocabulary(shards)


# ---------------------------------------------------------------------------------- training
def train_args(records, model_dir, *extra):
    return ["--input_files", records + "_*.tfrecord", "--model_dir", model_dir,
            "--max_training_step", "1", "--no_progress", *extra]


def test_run_train_refuses_a_foreign_vocabulary(records, capsys, tmp_path, foreign):
    vocab = foreign[0]
    never = tmp_path / "never"
    demo_config = os.path.join(ROOT, "configs", "demo.json")
    # new run: the TFRecords were made with another vocabulary
    assert_refused(run(capsys, "run_train.py", "--parameter_file", demo_config,
                       *train_args(records["demo"], never, "--vocabulary", vocab)),
                   vocab, DEMO_VOCAB, records["demo"] + fp.RECORDS_SUFFIX)
    # --init_checkpoint: the model records another vocabulary
    assert_refused(run(capsys, "run_train.py", *train_args(
        records["demo"], never, "--init_checkpoint", DEMO, "--vocabulary", vocab)),
        vocab, os.path.join(DEMO, "parameters.json"))
    # --init_checkpoint's own vocabulary, but TFRecords of another one
    assert_refused(run(capsys, "run_train.py", "--parameter_file", demo_config, *train_args(
        records["project"], never, "--init_checkpoint", DEMO)),
        DEMO_VOCAB, PROJECT_VOCAB, records["project"] + fp.RECORDS_SUFFIX)
    # resume: the output directory records another vocabulary
    resumed = copy_demo(tmp_path / "resume")
    assert_refused(run(capsys, "run_train.py", *train_args(records["demo"], resumed,
                                                             "--vocabulary", vocab)),
                   vocab, os.path.join(resumed, "ja-swe8k-demo.txt"))
    assert not never.exists()


def test_training_records_the_vocabulary_it_resolves(records):
    config = GPTSANConfig.from_json_file(os.path.join(ROOT, "configs", "demo.json"))
    files, record = fp.training_vocabulary(config, record_files=[records["demo"] +
                                                                 "_0000.tfrecord"])
    assert files.vocab == DEMO_VOCAB  # no --vocabulary: the one the TFRecords were made with
    assert record == files.record() and record.vocab_file == "ja-swe8k-demo.txt"
    files, record = fp.training_vocabulary(config, init_checkpoint=DEMO)
    assert record == GPTSANConfig.from_json_file(DEMO).vocabulary  # the init's names kept


# ------------------------------------------------------------------- conversion, add_layers
def test_conversion_and_add_layers_refuse_a_foreign_vocabulary(capsys, tmp_path, foreign):
    vocab, _ = foreign
    hf_dir = str(tmp_path / "hf")
    code, _ = run(capsys, "scripts/convert_checkpoint.py", "--src", DEMO, "--dst", hf_dir)
    assert code == 0
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    demo_record = GPTSANConfig.from_json_file(DEMO).vocabulary
    assert hf_config[fp.HF_RECORD_KEY]["vocab_sha256"] == demo_record.vocab_sha256
    # HF -> GPTSAN: --vocabulary against the record in config.json
    assert_refused(run(capsys, "scripts/convert_checkpoint.py", "--src", hf_dir, "--dst",
                       tmp_path / "back", "--vocabulary", vocab),
                   vocab, os.path.join(hf_dir, "config.json"))
    # ... and against the HF directory's own vocab.txt when config.json records nothing
    del hf_config[fp.HF_RECORD_KEY]
    with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f)
    assert_refused(run(capsys, "scripts/convert_checkpoint.py", "--src", hf_dir, "--dst",
                       tmp_path / "back", "--vocabulary", vocab),
                   vocab, os.path.join(hf_dir, "vocab.txt"))
    # GPTSAN -> HF and add_layers: a model directory whose copy is not what it records
    tampered = copy_demo(tmp_path / "tampered")
    shutil.copy(vocab, os.path.join(tampered, "ja-swe8k-demo.txt"))
    assert_refused(run(capsys, "scripts/convert_checkpoint.py", "--src", tampered, "--dst",
                       tmp_path / "hf2"), os.path.join(tampered, "ja-swe8k-demo.txt"),
                   os.path.join(tampered, "parameters.json"))
    assert_refused(run(capsys, "scripts/add_layers.py", "--src", tampered, "--dst",
                       tmp_path / "more", "--add_extra_stage", "1", "--frozen", "existing"),
                   os.path.join(tampered, "parameters.json"))
    assert sorted(os.listdir(tmp_path)) == ["hf", "tampered"]


def test_round_trip_keeps_the_record(tmp_path):
    from gptsan.extra_layers import add_layers_to_model_dir
    from gptsan.hf_format import convert_gptsan_to_hf, convert_hf_to_gptsan

    convert_gptsan_to_hf(DEMO, str(tmp_path / "hf"))
    config = convert_hf_to_gptsan(str(tmp_path / "hf"), str(tmp_path / "back"))
    demo = GPTSANConfig.from_json_file(DEMO).vocabulary
    assert (config.vocabulary.vocab_sha256, config.vocabulary.emoji_sha256,
            config.vocabulary.vocab_name) == (demo.vocab_sha256, demo.emoji_sha256,
                                              demo.vocab_name)
    added = add_layers_to_model_dir(str(tmp_path / "back"), str(tmp_path / "more"), 1,
                                    frozen="existing")
    assert added.vocabulary == config.vocabulary
    with open(tmp_path / "more" / config.vocabulary.vocab_file, encoding="utf-8") as f, \
            open(DEMO_VOCAB, encoding="utf-8") as g:
        assert f.read() == g.read()


# -------------------------------------------------- directories that record nothing (published)
@pytest.fixture(scope="module")
def published_style(tmp_path_factory):
    """A 36k model directory as the published checkpoints are: no record, no vocabulary."""
    from gptsan.checkpoint import write_tf_checkpoint
    from gptsan.variables import variable_shapes

    model = ModelConfig(num_contexts=16, num_switch_layers=1, num_ext_layers=0, num_hidden=16,
                        num_header=2, num_experts=2, num_spout=0, num_vocabulary=36000)
    rng = np.random.default_rng(0)
    variables = {n: (rng.standard_normal(s) * 0.1).astype(np.float32)
                 for n, s in variable_shapes(model).items()}
    path = str(tmp_path_factory.mktemp("published") / "gptsan-2.8b")
    write_tf_checkpoint(path, variables, model)
    return path


def test_unrecorded_directory_needs_the_published_vocabulary(published_style, capsys, tmp_path):
    model_dir = str(tmp_path / "model")
    shutil.copytree(published_style, model_dir)
    result = run(capsys, "run_generate.py", "--model", model_dir, "--context", "今日は")
    assert_refused(result, model_dir, "records no vocabulary fingerprint", "vocab.txt",
                   "Tanrei/GPTSAN-japanese", "tanreinama/GPTSAN")
    # the README's old advice: this repository's ja-swe36k.txt and emoji.json copied in
    shutil.copy(PROJECT_VOCAB, model_dir)
    shutil.copy(PROJECT_EMOJI, model_dir)
    assert_refused(run(capsys, "run_languagemodel.py", "--model", model_dir, "--context", "あ"),
                   os.path.join(model_dir, "ja-swe36k.txt"), "not the published one")


def test_unrecorded_directory_with_the_published_vocabulary_says_so(published_style, capsys,
                                                                    tmp_path):
    from gptsan import generation as gen

    vocab, emoji = published_files()
    model_dir = str(tmp_path / "model")
    shutil.copytree(published_style, model_dir)
    shutil.copy(PROJECT_VOCAB, model_dir)
    shutil.copy(PROJECT_EMOJI, model_dir)
    # --vocabulary must agree with the directory's own copy (here the wrong one)
    assert_refused(run(capsys, "run_generate.py", "--model", model_dir, "--context", "あ",
                       "--vocabulary", vocab, "--emoji", emoji),
                   vocab, os.path.join(model_dir, "ja-swe36k.txt"))
    shutil.copy(vocab, model_dir)
    shutil.copy(emoji, model_dir)
    encoder, _ = gen.open_model_files(model_dir)
    assert len(encoder) == 36000
    assert f"using {fp.PUBLISHED_NAME}" in capsys.readouterr().err
    # converted, the directory records it: later tools check instead of assuming
    from gptsan.hf_format import convert_gptsan_to_hf, convert_hf_to_gptsan

    convert_gptsan_to_hf(model_dir, str(tmp_path / "hf"))
    config = convert_hf_to_gptsan(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert config.vocabulary.vocab_sha256 == fp.PUBLISHED_VOCAB_SHA256
    assert config.vocabulary.vocab_file == "ja-swe36k.txt"  # the published name again
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "emoji.json",
                                                   "model.safetensors", "vocab.txt"]
