"""run_languagemodel.py and run_generate.py against independent NumPy statements of what the
published scripts (tanreinama/GPTSAN HEAD run_languagemodel.py / run_generate.py) output.

The goldens below are written from the published scripts' documented behaviour, not from our
code: they take a model forward function (`Predictor.forward`, itself checked against the HF
port elsewhere) and re-state HEAD's loops -- input layout, `num_precontext`, padding, token
choice, beam replacement, scores, vector, printed text -- step by step. The CLIs run in-process
with default flags on the trained demo model and on tiny random models.
"""
import copy
import io
import json
import os

import numpy as np
import pytest

import run_generate
import run_languagemodel
from gptsan import generation as gen
from gptsan.errors import GPTSANError
from test_generation import make_tiny_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "models", "demo")
LONG = 128  # positions of the tiny models that read CONTEXTS (most of it as byte tokens)
PUBLISHED_KEYS = ["output_text", "output_tokens", "output_scores", "output_vector", "input_text",
                  "input_tokens"]
CONTEXTS = [  # 0-3 masks, a URL, a date, a price, emoji, and nothing at all
    "東京の天気は晴れでしょう。",
    "東京の[MASK]は晴れでしょう。",
    "[MASK]の[MASK]は晴れ[MASK]。",
    "詳細は https://example.com/a?b=1 を[MASK]ください",
    "2023年4月1日に1,200円で[MASK]を買った😀🍣",
    "",
]


# --------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (model dir, encoder, config, predictor)}: the demo model and tiny random ones."""
    base = tmp_path_factory.mktemp("published")

    def boost_eot(variables, model):  # EOT often among the top choices: rows finish and
        variables["model/wob"][-1] += 7.0  # get replaced by the best row (HEAD's beams)

    def skew_router(variables, model):  # most tokens choose expert 0: capacity drops depend
        for layer in range(model.num_switch_layers):  # on the routing group's size
            variables[f"model/moe{layer}/switch_gating/kernel"][:, 0] += 3.0

    dirs = {"demo": DEMO,
            "tiny": make_tiny_model_dir(str(base / "tiny"), seed=1, edit=boost_eot,
                                        num_contexts=LONG),
            "lm": make_tiny_model_dir(str(base / "lm"), seed=2, train_mode="lm",
                                      num_contexts=LONG),
            "mlm": make_tiny_model_dir(str(base / "mlm"), seed=2, train_mode="mlm"),
            "drops": make_tiny_model_dir(str(base / "drops"), seed=3, edit=skew_router,
                                         num_experts=4, num_contexts=48)}
    opened = {}
    for name, path in dirs.items():
        encoder, config = gen.open_model_files(path)
        opened[name] = (path, encoder, config, gen.open_predictor(path))
    return opened


def _forward(predictor, rows, num_precontext=0, spout=None):
    """Model logits [b, s, V] and layer outputs [L][b, s, d] for padded rows of ids."""
    ids = np.asarray(rows, np.int32)
    out = predictor.forward(ids, num_precontext=np.full([len(ids)], num_precontext, np.int32),
                            spout=spout)
    return out["logits"], out["hidden_states"]


# --------------------------------------------------------------------------- run_languagemodel
def head_languagemodel(encoder, train_mode, predictor, context, mask="[MASK]", pos_vector=-1):
    """HEAD run_languagemodel.py, re-stated: the JSON it writes for `context`."""
    n = len(encoder)
    sot, msk = n - 7, n - 6
    if train_mode == "lm":  # the marker is ordinary text, nothing is bidirectional
        body, bidirectional = encoder.encode(context), 0
    else:  # hybrid: pieces joined by MSK; the first len(body) memory slots see each other
        body = []
        for k, piece in enumerate(context.split(mask)):
            body += ([msk] if k else []) + encoder.encode(piece)
        bidirectional = len(body)
    tokens = [sot] + body
    logits, hidden = _forward(predictor, [tokens], bidirectional)
    logits = logits[0]
    filled = [int(np.argmax(logits[i])) if tokens[i + 1] == msk else tokens[i + 1]
              for i in range(len(tokens) - 1)]
    scores = [float(logits[i][tokens[i + 1]]) for i in range(len(tokens) - 1)]
    position = pos_vector if pos_vector >= 0 else len(tokens) - 1
    vector = np.concatenate([layer[0, position] for layer in hidden])  # [L * d]
    return {"output_text": encoder.decode(filled), "output_tokens": filled,
            "output_scores": scores, "output_vector": vector.astype(float).tolist(),
            "input_text": context, "input_tokens": tokens}


def _languagemodel(tmp_path, capsys, model_dir, *flags):
    out = tmp_path / "out.json"
    assert run_languagemodel.main(["--model", model_dir, "--output", str(out), *flags]) == 0
    printed = capsys.readouterr().out
    return out.read_text(encoding="utf-8"), printed


def _assert_same_fill(got, want):
    assert list(got)[:6] == PUBLISHED_KEYS  # HEAD's keys, first, in HEAD's order
    for key in ("output_text", "output_tokens", "input_text", "input_tokens"):
        assert got[key] == want[key], key
    np.testing.assert_allclose(got["output_scores"], want["output_scores"], rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(got["output_vector"], want["output_vector"], rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("name", ["demo", "tiny", "lm"])
@pytest.mark.parametrize("context", CONTEXTS)
def test_languagemodel_defaults_give_heads_output(models, name, context, tmp_path, capsys):
    model_dir, encoder, config, predictor = models[name]
    text, printed = _languagemodel(tmp_path, capsys, model_dir, "--context", context)
    assert text.isascii()  # HEAD writes ASCII-escaped JSON
    got = json.loads(text)
    want = head_languagemodel(encoder, config.model.train_mode, predictor, context)
    _assert_same_fill(got, want)
    assert printed.split("\n")[:8:2] == ["{OUTPUT TEXTS}", "{OUTPUT TOKENS}", "{OUTPUT SCORES}",
                                         "{OUTPUT VECTOR SHAPE}"]
    assert printed.split("\n")[7] == str((len(want["output_vector"]),))


def test_languagemodel_pos_vector_and_mask_marker(models, tmp_path, capsys):
    model_dir, encoder, config, predictor = models["demo"]
    context = "東京の<m>は<m>でしょう。"
    got = json.loads(_languagemodel(tmp_path, capsys, model_dir, "--context", context,
                                    "--mask", "<m>", "--pos_vector", "2")[0])
    _assert_same_fill(got, head_languagemodel(encoder, "hybrid", predictor, context, "<m>", 2))


def test_heads_bidirectional_span_differs_from_every_token(models):
    """The published span leaves the last token out; reading it in too changes the numbers
    (the old project behaviour), so the tests above can tell the two apart."""
    _, encoder, _, predictor = models["demo"]
    tokens = [len(encoder) - 7] + encoder.encode("東京の天気は晴れでしょう。")
    published, _ = _forward(predictor, [tokens], len(tokens) - 1)
    everything, _ = _forward(predictor, [tokens], len(tokens))
    assert np.max(np.abs(published - everything)) > 1e-2


def test_mlm_models_are_refused_by_the_published_rules(models, tmp_path, capsys):
    model_dir = models["mlm"][0]
    with pytest.raises(GPTSANError, match="--fill_mode prefix"):
        run_languagemodel.main(["--model", model_dir, "--context", "あ[MASK]い"])
    got = json.loads(_languagemodel(tmp_path, capsys, model_dir, "--context", "あ[MASK]い",
                                    "--fill_mode", "prefix")[0])
    assert got["fill_mode"] == "prefix" and got["input_tokens"][2] == len(models["mlm"][1]) - 6


def test_prefix_fill_mode_reads_every_token_and_fills_ordinary_ids(models, tmp_path, capsys):
    model_dir, encoder, config, predictor = models["tiny"]
    context = "織田[MASK]は武将"
    got = json.loads(_languagemodel(tmp_path, capsys, model_dir, "--context", context,
                                    "--fill_mode", "prefix", "--vectors_all",
                                    str(tmp_path / "all.npy"))[0])
    tokens = got["input_tokens"]
    logits, hidden = _forward(predictor, [tokens], len(tokens))  # SOT + every token
    at = tokens.index(len(encoder) - 6) - 1
    banned = np.zeros(len(encoder), bool)
    banned[-7:] = True  # the controls (EOT included) never fill a mask here
    fill = int(np.argmax(np.where(banned, -np.inf, logits[0, at])))
    assert got["output_tokens"][at] == fill
    assert got["output_scores"][at] == pytest.approx(float(logits[0, at, fill]), rel=1e-5)
    vectors = np.load(tmp_path / "all.npy")  # [s, L, d]
    assert vectors.shape == (len(tokens), config.model.num_layers, config.model.num_hidden)
    for layer in range(config.model.num_layers):
        np.testing.assert_allclose(vectors[:, layer], hidden[layer][0], atol=1e-6)


# --------------------------------------------------------------------------- run_generate
def head_generate(encoder, predictor, num_contexts, context, top_k, rows, max_generate, rng,
                  spout=None):
    """HEAD run_generate.py, re-stated, one run: (printed texts, token lists, logit scores).

    `rng.random()` stands for HEAD's np.random.choice draw (inverse CDF), one per row whose
    argmax is not EOT, rows in order.
    """
    n = len(encoder)
    not_token, sep, seg, eot, sot = n - 4, n - 5, n - 2, n - 1, n - 7
    last_token = encoder.encode("<|byte0|>")[0] - 1
    prompt = [sot, seg] + encoder.encode(context)
    size = min(max_generate + len(prompt), num_contexts)  # HEAD's padded input length
    tokens, scores, fixed = [[] for _ in range(rows)], [[] for _ in range(rows)], []
    while not all(t and (t[-1] == eot or len(t) >= max_generate) for t in tokens):
        batch = [((prompt + t)[-size:] + [eot] * size)[:size] for t in tokens]
        logits, _ = _forward(predictor, batch, 0, spout)
        for r in range(rows):
            row = np.asarray(logits[r, min(len(prompt) + len(tokens[r]) - 1, size - 1)],
                             np.float64)
            if int(np.argmax(row)) == eot:
                pick = eot
            else:
                weights = np.exp(row - row.max())
                weights[[not_token, sep]] = 0.0
                weights /= weights.sum()
                kth = np.sort(weights)[-top_k]
                weights[weights < kth] = 1e-10
                cdf = np.cumsum(weights / weights.sum())
                pick = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")),
                           n - 1)
            tokens[r].append(pick)
            scores[r].append(float(row[pick]))
        means = [np.mean(s) if t[-1] != eot else -1e10 for t, s in zip(tokens, scores)]
        best = int(np.argmax(means))
        if means[best] != -1e10:
            for r in range(rows):
                if tokens[r][-1] == eot:
                    fixed.append((tokens[r], scores[r]))
                    tokens[r], scores[r] = copy.copy(tokens[best]), copy.copy(scores[best])
    everything = list(zip(tokens, scores)) + fixed
    texts = []
    for generated, _ in everything:
        shown = []
        for t in generated:
            if t == n - 3:  # BAG: the previous token twice more
                shown += shown[-1:] * 2
            elif t < last_token:
                shown.append(t)
        texts.append(encoder.decode(shown))
    return texts, [g for g, _ in everything], [s for _, s in everything]


def _generate(tmp_path, capsys, model_dir, *flags):
    out = tmp_path / "gen.json"
    assert run_generate.main(["--model", model_dir, "--output", str(out), "--quiet",
                              *flags]) == 0
    return json.loads(out.read_text(encoding="utf-8")), capsys.readouterr().out


def _markers(printed):
    return [line for line in printed.split("\n") if line.startswith("====[")]


_GREEDY = {}  # (model, context) -> HEAD's greedy output, shared by the cached/uncached tests


def _head_greedy(models, name, context):
    if (name, context) not in _GREEDY:
        _, encoder, config, predictor = models[name]
        _GREEDY[name, context] = head_generate(encoder, predictor, config.model.num_contexts,
                                               context, 1, 1, 12, np.random.default_rng(0))
    return _GREEDY[name, context]


@pytest.mark.parametrize("name", ["demo", "tiny"])
@pytest.mark.parametrize("context", CONTEXTS)
def test_greedy_generation_gives_heads_text(models, name, context, tmp_path, capsys):
    _check_greedy(models, name, context, tmp_path, capsys, [])


@pytest.mark.parametrize("name", ["demo", "tiny"])
@pytest.mark.parametrize("context", CONTEXTS[1:5:3])
def test_greedy_recomputation_gives_heads_text(models, name, context, tmp_path, capsys):
    _check_greedy(models, name, context, tmp_path, capsys, ["--no_cache"])


def _check_greedy(models, name, context, tmp_path, capsys, extra):
    model_dir, encoder, _, _ = models[name]
    flags = ["--context", context, "--top_k", "1", "--beam_width", "1", "--max_generate", "12",
             "--seed", "0"] + extra
    got, printed = _generate(tmp_path, capsys, model_dir, *flags)
    texts, tokens, scores = _head_greedy(models, name, context)
    assert [g["text"] for g in got["generations"]] == texts
    assert [g["model_tokens"] for g in got["generations"]] == tokens
    np.testing.assert_allclose(got["generations"][0]["scores"], scores[0], rtol=1e-4, atol=1e-4)
    assert got["prompt_tokens"] == [len(encoder) - 7, len(encoder) - 2] + encoder.encode(context)
    assert _markers(printed) == ["====[start generate]====", "====[end generate]===="]


@pytest.mark.parametrize("cache", [True, False])
def test_heads_rows_sample_and_replace_finished_rows(models, cache, tmp_path, capsys):
    """Default beam_width 4 with top-k sampling: rows that end with EOT are kept and replaced
    by the best row; every row is printed, each between HEAD's markers."""
    model_dir, encoder, config, predictor = models["tiny"]
    flags = ["--context", "織田信長は", "--top_k", "6", "--max_generate", "10", "--seed", "6"]
    got, printed = _generate(tmp_path, capsys, model_dir, *flags,
                             *([] if cache else ["--no_cache"]))
    texts, tokens, scores = head_generate(encoder, predictor, config.model.num_contexts,
                                          "織田信長は", 6, 4, 10, np.random.default_rng(6))
    assert len(tokens) > 4  # some rows finished and were replaced: the case under test
    assert [g["model_tokens"] for g in got["generations"]] == tokens
    assert [g["text"] for g in got["generations"]] == texts
    for generation, want in zip(got["generations"], scores):
        np.testing.assert_allclose(generation["scores"], want, rtol=1e-4, atol=1e-4)
    assert _markers(printed) == ["====[start generate]====", "====[end generate]===="] * len(texts)


def test_no_cache_pads_the_routing_group_like_head(models, tmp_path, capsys):
    """--no_cache pads to min(prompt + max_generate, num_contexts): with capacity drops in play
    this decides the logits, and our output equals HEAD's."""
    model_dir, encoder, config, predictor = models["drops"]
    context, new = "あいうえおかきくけこさしすせそたちつてとなにぬね", 6
    prompt = [len(encoder) - 7, len(encoder) - 2] + encoder.encode(context)
    eot = len(encoder) - 1
    head_padded, _ = _forward(predictor, [prompt + [eot] * new])
    model_padded, _ = _forward(predictor, [prompt + [eot] * (48 - len(prompt))])
    assert np.max(np.abs(head_padded[0, :len(prompt)] - model_padded[0, :len(prompt)])) > 1e-3
    got, _ = _generate(tmp_path, capsys, model_dir, "--context", context, "--top_k", "1",
                       "--beam_width", "1", "--max_generate", str(new), "--no_cache", "--seed", "0")
    texts, tokens, scores = head_generate(encoder, predictor, 48, context, 1, 1, new,
                                          np.random.default_rng(0))
    assert got["generations"][0]["model_tokens"] == tokens[0]
    np.testing.assert_allclose(got["generations"][0]["scores"], scores[0], rtol=1e-4, atol=1e-4)


def test_uniform_spout_is_one_vector_per_row(models, tmp_path, capsys):
    model_dir, encoder, config, predictor = models["tiny"]
    got, _ = _generate(tmp_path, capsys, model_dir, "--context", "織田", "--spout", "uniform",
                       "--top_k", "6", "--max_generate", "6", "--seed", "9", "--no_cache")
    spout = np.random.default_rng(9).uniform(0.0, 1.0, [4, 8]).astype(np.float32)
    texts, tokens, _ = head_generate(encoder, predictor, config.model.num_contexts, "織田", 6, 4,
                                     6, np.random.default_rng(9), spout=spout)
    assert [g["model_tokens"] for g in got["generations"]] == tokens
    with pytest.raises(GPTSANError, match="out of range for num_spout=8"):
        run_generate.main(["--model", model_dir, "--spout", "8"])


def test_heads_marker_layout_over_runs():
    out = io.StringIO()
    run_generate.print_runs(["a", "b", "c", "d"], [0, 0, 1, 1], run_generate.Markers(out), out)
    assert out.getvalue().split("\n")[:-1] == [
        "====[start generate]====", "a", "====[next generate]====",
        "====[start generate]====", "b", "====[next generate]====",
        "c", "====[end generate]====", "d", "====[end generate]===="]


def test_project_sampler_options_need_their_decoder(models):
    with pytest.raises(GPTSANError, match="--decoder sample"):
        run_generate.main(["--model", models["tiny"][0], "--top_p", "0.9"])
