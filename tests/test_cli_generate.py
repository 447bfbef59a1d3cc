"""run_generate.py / run_languagemodel.py end to end on a tiny random model directory."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gptsan import generation as gen
from gptsan import prompts
from gptsan.data import SpecialTokens
from test_generation import make_tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATE = os.path.join(ROOT, "run_generate.py")
LANGUAGEMODEL = os.path.join(ROOT, "run_languagemodel.py")


def _run(script, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env=env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("cli") / "tiny"), seed=1)


def _streamed(stdout):
    """The texts printed between the start/next/end markers."""
    texts, current = [], None
    for line in stdout.split("\n"):
        if line.startswith("====["):
            if current is not None:
                texts.append("\n".join(current))
            current = [] if "end" not in line else None
        elif current is not None:
            current.append(line)
    return texts


def test_sampler_streams_writes_json_and_matches_full_recomputation(model_dir, tmp_path):
    out = tmp_path / "out.json"
    common = ["--model", model_dir, "--context", "武将、", "--prefix", "織田信長は",
              "--spout", "1", "--decoder", "sample", "--top_k", "0", "--seed", "3",
              "--num_generate", "2", "--max_generate", "8", "--output", out]
    first = _run(GENERATE, *common)
    assert first.returncode == 0, first.stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    assert len(data["generations"]) == 2
    assert _streamed(first.stdout) == [g["text"] for g in data["generations"]]
    for g in data["generations"]:
        assert len(g["scores"]) == len(g["model_tokens"]) <= 8
        assert g["score"] == pytest.approx(sum(g["scores"]))
        assert g["finish_reason"] in ("eot", "max_generate")
    encoder, _ = gen.open_model_files(model_dir)
    prefix = encoder.encode("織田信長は")
    assert data["prompt_tokens"][1:1 + len(prefix)] == prefix
    assert data["num_precontext"] == 1 + 1 + len(prefix)  # spout slot + SOT + prefix

    refused = _run(GENERATE, *common, "--no_cache")
    assert refused.returncode == 2 and "exists" in refused.stderr
    again = _run(GENERATE, *common, "--no_cache", "--force")
    assert again.returncode == 0, again.stderr
    data_full = json.loads(out.read_text(encoding="utf-8"))
    assert [g["model_tokens"] for g in data_full["generations"]] == \
        [g["model_tokens"] for g in data["generations"]]


def test_published_rows_stream_with_one_row(model_dir, tmp_path):
    out = tmp_path / "rows.json"
    result = _run(GENERATE, "--model", model_dir, "--context", "武将、", "--beam_width", "1",
                  "--num_generate", "2", "--max_generate", "6", "--seed", "1", "--output", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [g["run"] for g in data["generations"]] == [0, 1]
    assert _streamed(result.stdout) == [g["text"] for g in data["generations"]]
    assert result.stdout.count("====[next generate]====") == 1  # HEAD: start, next, end


def test_generate_beam_search_with_a_truncated_context(model_dir, tmp_path):
    out = tmp_path / "beam.json"
    result = _run(GENERATE, "--model", model_dir, "--context", "さくら" * 10, "--decoder", "beam",
                  "--beam_width", "3", "--num_generate", "2", "--max_generate", "5",
                  "--truncate", "left", "--output", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    scores = [g["score"] for g in data["generations"]]
    assert len(scores) == 2 and scores[0] >= scores[1]
    assert data["truncated_tokens"] > 0 and len(data["prompt_tokens"]) + 5 - 1 <= 24
    assert _streamed(result.stdout) == [g["text"] for g in data["generations"]]
    assert result.stdout.count("====[start generate]====") == 2  # HEAD: one per printed row


def test_languagemodel_fills_masks_and_extracts_vectors(model_dir, tmp_path):
    out, vectors = tmp_path / "lm.json", tmp_path / "all.npy"
    result = _run(LANGUAGEMODEL, "--model", model_dir, "--context", "織田[MASK]は武将",
                  "--pos_vector", "2", "--output", out, "--vectors_all", vectors)
    assert result.returncode == 0, result.stderr
    assert "{OUTPUT TEXTS}" in result.stdout and "{OUTPUT VECTOR SHAPE}" in result.stdout
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data) >= {"output_text", "output_tokens", "output_scores", "output_vector",
                         "input_text", "input_tokens"}
    encoder, config = gen.open_model_files(model_dir)
    special = SpecialTokens.from_encoder(encoder)
    tokens = data["input_tokens"]
    assert tokens[0] == special.sot and tokens.count(special.msk) == 1
    assert data["input_text"] == "織田[MASK]は武将"
    assert len(data["output_tokens"]) == len(data["output_scores"]) == len(tokens) - 1
    assert data["output_text"] == encoder.decode(data["output_tokens"])
    layers, d = config.model.num_layers, config.model.num_hidden
    assert len(data["output_vector"]) == layers * d

    predictor = gen.open_predictor(model_dir)
    # HEAD: every token but the last is bidirectional
    forward = predictor.forward(np.array([tokens]), num_precontext=len(tokens) - 1)
    expected = np.stack([h[0, 2] for h in forward["hidden_states"]])  # [layers, d]
    np.testing.assert_allclose(np.reshape(data["output_vector"], (layers, d)), expected,
                               atol=1e-5)
    all_vectors = np.load(vectors)
    assert all_vectors.shape == (len(tokens), layers, d)
    np.testing.assert_allclose(all_vectors[2], expected, atol=1e-5)
    logits = forward["logits"][0]
    np.testing.assert_allclose(data["output_scores"],
                               [logits[i, tokens[i + 1]] for i in range(len(tokens) - 1)],
                               atol=1e-4)  # HEAD: the logit of the MSK id at a mask


def test_languagemodel_with_a_spout(model_dir, tmp_path):
    out = tmp_path / "spout.json"
    result = _run(LANGUAGEMODEL, "--model", model_dir, "--context", "織田[MASK]は武将",
                  "--spout", "1", "--output", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    _, config = gen.open_model_files(model_dir)
    spout = prompts.parse_spout("1", config.model.num_spout)
    tokens = data["input_tokens"]
    predictor = gen.open_predictor(model_dir)
    # the spout slot counts as a memory slot: every slot but the last token's is bidirectional
    forward = predictor.forward(np.array([tokens]), num_precontext=len(tokens), spout=spout)
    expected = np.stack([h[0, -1] for h in forward["hidden_states"]])  # [layers, d]
    np.testing.assert_allclose(np.reshape(data["output_vector"], expected.shape), expected,
                               atol=1e-5)
    plain = predictor.forward(np.array([tokens]), num_precontext=len(tokens) - 1)
    assert np.abs(plain["hidden_states"][-1][0, -1] - expected[-1]).max() > 1e-3
    assert data["spout"] == "1"


def test_model_dir_in_a_bucket_generates_the_same(model_dir):
    """A model directory behind a URL (gs:// on a TPU VM) is read through tf.io.gfile; TF's
    in-memory ram:// file system stands in for the bucket (it lives in this process)."""
    from gptsan.compat import tf

    bucket = "ram://bucket/models/cli_tiny"
    tf.io.gfile.makedirs(bucket)
    for name in os.listdir(model_dir):
        tf.io.gfile.copy(os.path.join(model_dir, name), f"{bucket}/{name}", overwrite=True)
    results = []
    for where in (model_dir, bucket):
        encoder, config = gen.open_model_files(where)
        special = SpecialTokens.from_encoder(encoder)
        prompt = prompts.build_prompt(special, encoder.encode("織田信長は"),
                                      max_length=config.model.num_contexts)
        settings = gen.GenerationSettings(max_generate=5, top_k=1, beam_width=1)
        results.append(gen.generate(gen.open_predictor(where), prompt, special, settings)[0])
    assert results[0].model_tokens == results[1].model_tokens


def _bad(script, *args):
    result = _run(script, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_inputs_give_one_line_and_exit_2(model_dir, tmp_path):
    out = tmp_path / "never.json"
    base = ["--model", model_dir, "--output", out]
    assert "at most 24" in _bad(GENERATE, *base, "--context", "あい" * 15)
    assert "unknown spout class" in _bad(GENERATE, *base, "--context", "あ", "--spout", "-1")
    assert "unknown spout" in _bad(GENERATE, *base, "--context", "あ", "--spout", "banana")
    np.save(tmp_path / "short.npy", np.zeros(3, np.float32))
    assert "[8]" in _bad(GENERATE, *base, "--context", "あ", "--spout", tmp_path / "short.npy")
    assert "top_k" in _bad(GENERATE, *base, "--context", "あ", "--top_k", "-1")
    assert "invalid int" in _bad(GENERATE, *base, "--context", "あ", "--top_k", "abc")
    assert "out of range" in _bad(LANGUAGEMODEL, *base, "--context", "あい", "--pos_vector", "9")
    assert "unknown spout" in _bad(LANGUAGEMODEL, *base, "--context", "あ", "--spout", "x")
    empty_dir = tmp_path / "not_a_model"
    empty_dir.mkdir()
    assert "not a GPTSAN model" in _bad(GENERATE, "--model", empty_dir, "--context", "あ")
    assert "not found" in _bad(LANGUAGEMODEL, "--model", tmp_path / "nowhere", "--context", "あ")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in os.listdir(model_dir):  # parameters.json and vocabulary, but no checkpoint
        if not name.startswith(("model.ckpt", "checkpoint")):
            (no_weights / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
    assert "checkpoint" in _bad(GENERATE, "--model", no_weights, "--context", "あ")
    assert not out.exists()
    out.write_text("keep")
    assert "exists" in _bad(LANGUAGEMODEL, *base, "--context", "あい")
    assert out.read_text() == "keep"


def test_bench_generate_smoke(tmp_path):
    """The benchmark runs end to end (tiny config, few tokens): cached vs HF generate."""
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    result = _run(os.path.join(ROOT, "scripts", "bench_generate.py"), "--config",
                  os.path.join(ROOT, "configs", "tiny.json"), "--new_tokens", "8",
                  "--window", "2", "--skip_full", "--output", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    for engine in ("cached", "hf_generate"):
        assert report[engine]["new_tokens"] == 8 and report[engine]["tokens_per_s"] > 0
    assert set(report["speedup_cached_vs_hf"]) == {"tokens_per_s", "median"}
