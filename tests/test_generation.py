"""Generation logic: token rules (gptsan.sampling), prompts and spouts (gptsan.prompts), and
decoding (gptsan.generation) on a tiny random model: cache vs full recomputation, beam search vs
exhaustive search. HEAD's loops are checked against independent re-implementations in
tests/test_published_behaviour.py."""
import itertools
import json
import os

import numpy as np
import pytest

from gptsan import data
from gptsan import generation as gen
from gptsan import prompts
from gptsan import sampling
from gptsan.data import SpecialTokens
from gptsan.errors import GPTSANError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

V = 300  # vocabulary of the pure-logic tests: 38 words, 255 bytes, 7 controls
SPECIAL = SpecialTokens.from_vocab_size(V, dots=[10, 11], nl=12)


# --------------------------------------------------------------------------- pure logic
def test_control_ids_count_from_the_end():
    s = SpecialTokens.from_vocab_size(36000)
    assert (s.sot, s.msk, s.sep, s.not_token, s.bag, s.seg, s.eot) == tuple(range(35993, 36000))
    assert s.controls == tuple(range(35993, 36000)) and s.vocab_size == 36000
    assert s.last_token == 35993 - 255 - 1 and s.nl is None and s.dots == frozenset()
    assert s.is_control(35993) and s.is_control(35999) and not s.is_control(35992)


def test_training_feed_uses_sep_for_sentence_ends_and_bag_for_runs():
    s = SPECIAL
    head = [s.sot, s.seg]
    assert prompts.build_prompt(s, [1, 10, 2, 2, 2, 2, 3, 12, 5, 5],
                                as_training=True).input_ids == head + [
        1, s.sep, 2, s.bag, 3, 12, 5, 5]
    byte = s.last_token + 8  # runs of byte tokens and newlines are not BAGged
    assert prompts.build_prompt(s, [byte] * 3 + [12] * 3 + [11] * 3,
                                as_training=True).input_ids == \
        head + [byte] * 3 + [12] * 3 + [s.sep, s.bag]
    assert prompts.feed_token(11, s, True) == s.sep and prompts.feed_token(12, s, True) == 12
    assert prompts.feed_token(7, s, True) == 7 and prompts.feed_token(s.bag, s, True) == s.bag


def test_published_feed_is_the_ids_as_encoded():
    """HEAD feeds `SOT SEG context` as encoded and every generated id as it is."""
    s = SPECIAL
    ids = [1, 10, 2, 2, 2, 2, 3, 12, 5, 5]
    assert prompts.build_prompt(s, ids).input_ids == [s.sot, s.seg] + ids
    assert prompts.build_prompt(s, []).input_ids == [s.sot, s.seg]  # empty context: allowed
    assert all(prompts.feed_token(t, s, False) == t for t in (11, 12, s.bag, s.eot))


def test_printed_ids_published_and_training():
    s = SPECIAL
    byte, emoji_last = s.last_token + 3, s.last_token  # HEAD drops ids >= LAST_TOKEN
    tokens = [s.bag, 1, 2, s.bag, byte, emoji_last, 3, s.sep, s.eot]
    assert prompts.expand_output(tokens, s, published=True) == [1, 2, 2, 2, 3]
    assert prompts.expand_output(tokens, s, published=False) == [1, 2, 2, 2, byte, emoji_last, 3]


def test_published_distribution_is_heads_top_k_with_a_floor():
    s = SPECIAL
    logits = np.linspace(0.0, 3.0, V)
    logits[s.sep], logits[s.not_token] = 50.0, 40.0  # banned even when they are the best
    probs = sampling.published_distribution(logits, s, top_k=3)
    softmax = np.exp(logits - logits.max())
    softmax[[s.sep, s.not_token]] = 0.0
    softmax /= softmax.sum()
    top3 = np.argsort(-softmax)[:3]
    expected = np.where(np.isin(np.arange(V), top3), softmax, 1e-10)
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=1e-12)
    assert probs[s.sep] == probs[s.not_token] == probs[0] > 0  # the floor reaches them too
    exact = sampling.published_distribution(logits, s, top_k=3, floor=0.0)
    assert set(np.flatnonzero(exact)) == set(top3.tolist())
    assert sampling.published_distribution(logits, s, top_k=0, floor=0.0)[s.sep] == 0.0


def test_published_choice_takes_eot_when_it_is_the_argmax():
    s = SPECIAL
    logits = np.zeros(V)
    logits[s.eot] = 1.0
    rng = np.random.default_rng(0)
    assert all(sampling.published_choice(logits, s, 120, 1e-10, rng) == s.eot for _ in range(20))
    logits[s.sep] = 2.0  # SEP on top: never EOT by the argmax rule, SEP banned
    draws = {sampling.published_choice(logits, s, 1, 0.0, rng) for _ in range(20)}
    assert draws == {s.eot}  # the top-1 after the ban


def test_mask_logits_never_allows_control_tokens():
    s = SPECIAL
    x = sampling.mask_logits(np.linspace(0, 1, V) + 100 * np.isin(np.arange(V), s.controls), s)
    banned = {s.sot, s.msk, s.sep, s.not_token, s.seg}
    assert {int(t) for t in np.flatnonzero(~np.isfinite(x))} == banned
    assert int(np.argmax(x)) in (s.bag, s.eot)


def test_sep_as_top_choice_narrows_to_sentence_ends():
    s = SPECIAL
    logits = np.zeros(V)
    logits[s.sep], logits[3], logits[11], logits[s.eot] = 9.0, 8.0, 1.0, 2.0
    x = sampling.mask_logits(logits, s)
    assert set(np.flatnonzero(np.isfinite(x))) == {10, 11, 12, s.eot}
    logits[s.sep] = 7.0  # SEP not on top: nothing narrowed, SEP still banned
    x = sampling.mask_logits(logits, s)
    assert np.isfinite(x).sum() == V - 5 and int(np.argmax(x)) == 3


def test_repetition_penalty_and_allowed_tokens():
    s = SPECIAL
    logits = np.array([2.0, -2.0, 1.0] + [0.0] * (V - 3))
    x = sampling.mask_logits(logits, s, history=[0, 1, 1], repetition_penalty=2.0,
                             allowed=[0, 1, 2])
    assert x[:3].tolist() == [1.0, -4.0, 1.0]
    assert np.isinf(x[3:]).all()


def test_top_k_top_p_temperature():
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    np.testing.assert_allclose(sampling.sampling_distribution(x, top_k=2), [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(sampling.sampling_distribution(x, top_p=0.7),
                               [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(sampling.sampling_distribution(x, temperature=0.5),
                               np.array([25, 9, 2.25, 0.25]) / 36.5)


def _sampler(**options):
    return gen.GenerationSettings(decoder="sample", beam_width=1, **options)


def test_sampling_is_reproducible_with_a_seed_and_follows_the_distribution():
    x = np.log(np.array([0.6, 0.3, 0.1]))
    settings = _sampler(top_k=0)
    draws = [[sampling.choose_token(x, settings, np.random.default_rng(7)) for _ in range(3)]
             for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.default_rng(0)
    counts = np.bincount([sampling.choose_token(x, settings, rng) for _ in range(4000)],
                         minlength=3)
    np.testing.assert_allclose(counts / 4000, [0.6, 0.3, 0.1], atol=0.03)
    assert sampling.choose_token(x, _sampler(top_k=1), rng) == 0


def test_settings_defaults_are_heads_and_bad_values_are_refused():
    default = gen.GenerationSettings()
    assert (default.decoder, default.top_k, default.beam_width, default.max_generate,
            default.top_k_floor) == ("published", 120, 4, 300, 1e-10)
    for bad in (dict(top_k=-1), dict(top_p=0, decoder="beam"), dict(top_p=1.5, decoder="beam"),
                dict(temperature=-1), dict(max_generate=0),
                dict(num_generate=3, beam_width=2, decoder="beam"),
                dict(repetition_penalty=0), dict(decoder="greedy"), dict(top_k_floor=1.0),
                dict(decoder="sample"),  # the sampler draws one row: beam_width 1
                dict(top_p=0.9), dict(temperature=0.5), dict(allowed_tokens=[1])):  # published
        with pytest.raises(GPTSANError):
            gen.GenerationSettings(**bad)


def test_prompts_plain_and_hybrid():
    s = SPECIAL
    plain = prompts.build_prompt(s, [1, 2, 10], as_training=True)
    assert plain.input_ids == [s.sot, s.seg, 1, 2, s.sep] and plain.num_precontext == 0
    hybrid = prompts.build_prompt(s, [3], prefix_ids=[5, 6, 10])
    assert hybrid.input_ids == [s.sot, 5, 6, 10, s.seg, 3]
    assert hybrid.num_precontext == 4  # SOT + prefix (training: num_input = len(SOT+prefix))
    spouted = prompts.build_prompt(s, [3], prefix_ids=[5, 6], spout=np.zeros([1, 4], np.float32))
    assert spouted.num_precontext == 4  # + the spout slot (memory index)
    only_prefix = prompts.build_prompt(s, [], prefix_ids=[5])
    assert only_prefix.input_ids == [s.sot, 5, s.seg]


def test_prompt_length_limit_and_left_truncation():
    s = SPECIAL
    with pytest.raises(GPTSANError, match="at most 8"):
        prompts.build_prompt(s, list(range(7)), max_length=8)
    with pytest.raises(GPTSANError, match="at most 8"):
        prompts.build_prompt(s, list(range(6)), spout=np.zeros([1, 2]), max_length=8)
    cut = prompts.build_prompt(s, list(range(9)), max_length=8, max_generate=3, truncate="left")
    assert cut.input_ids == [s.sot, s.seg, 6, 7, 8] and cut.truncated == 6


def test_parse_spout(tmp_path):
    assert prompts.parse_spout("none", 8) is None
    np.testing.assert_array_equal(prompts.parse_spout("zeros", 8, rows=2), np.zeros([2, 8]))
    uniform = prompts.parse_spout("uniform", 8, rows=3, seed=3)
    np.testing.assert_array_equal(uniform, prompts.parse_spout("uniform", 8, rows=3, seed=3))
    assert uniform.shape == (3, 8) and (0 <= uniform).all() and (uniform < 1).all()
    assert not np.array_equal(uniform[0], uniform[1])  # HEAD: one vector per row
    np.save(tmp_path / "v.npy", np.arange(8, dtype=np.float32))
    np.testing.assert_array_equal(prompts.parse_spout(str(tmp_path / "v.npy"), 8),
                                  [np.arange(8)])
    (tmp_path / "v.json").write_text(json.dumps([0.5] * 8))
    np.testing.assert_array_equal(prompts.parse_spout(str(tmp_path / "v.json"), 8, rows=2),
                                  [[0.5] * 8] * 2)
    with pytest.raises(GPTSANError, match="shape"):
        prompts.parse_spout(str(tmp_path / "v.npy"), 4)
    with pytest.raises(GPTSANError, match="unknown spout class"):
        prompts.parse_spout("-1", 8)
    with pytest.raises(GPTSANError, match="out of range for num_spout=8"):
        prompts.parse_spout("8", 8)  # HEAD refuses a one-hot id beyond the spout
    with pytest.raises(GPTSANError, match="unknown spout"):
        prompts.parse_spout("banana", 8)
    with pytest.raises(GPTSANError, match="no spout"):
        prompts.parse_spout("zeros", 0)
    with pytest.raises(GPTSANError, match="not found"):
        prompts.parse_spout(str(tmp_path / "missing.npy"), 8)


def test_class_spout_matches_training():
    """Class id -> spout goes through the training code (gptsan.spout.spout_vectors)."""
    np.testing.assert_array_equal(prompts.class_spout_vector(3, 8), np.eye(8)[3])
    half = prompts.class_spout_vector(5, 8, "half_onehot")
    np.testing.assert_array_equal(half[:4], np.eye(4)[1])
    assert ((0 <= half[4:]) & (half[4:] < 1)).all()
    fixed = prompts.class_spout_vector(5, 8, "stateless_uniform")
    np.testing.assert_array_equal(fixed, prompts.class_spout_vector(5, 8, "stateless_uniform"))
    assert not np.array_equal(fixed, prompts.class_spout_vector(6, 8, "stateless_uniform"))


# --------------------------------------------------------------------------- tiny random model
ORDINARY = list("あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
                "織田信長武将、") + list("。｡．.？！?!:：;；")
# 2 experts: the eval capacity int(S * 2.0 / 2) = S never drops a token. With more experts a
# full pass (prefill or full recomputation, S tokens) can overflow an expert when most real
# tokens route to it (HEAD's semantics), while single-token cached steps never drop, and the
# two modes may then legitimately differ (see gptsan.generation).
TINY_PARAMS = dict(num_contexts=24, num_switch_layers=2, num_ext_layers=1, num_hidden=32,
                   num_header=4, num_experts=2, num_spout=8, num_pallarelizm=1,
                   train_mode="hybrid", num_moe_hidden=64, num_ext_hidden=48)
WEIGHT_STD = 0.3  # random weights: spread-out logits (no near-ties between top choices)


def write_tiny_vocabulary(directory):
    """A small ja-swe vocabulary (ordinary chars, specials, 1 emoji class, bytes, controls)."""
    from gptsan.checkpoint import EMOJI_FILE, VOCAB_FILE
    from gptsan.tokenization import CONTROL_TOKENS, NUM_BYTE_TOKENS, SPECIAL_TOKENS

    entries = (ORDINARY + list(SPECIAL_TOKENS) + ["<|emoji1|>"]
               + [f"<|byte{b}|>" for b in range(NUM_BYTE_TOKENS)] + list(CONTROL_TOKENS))
    with open(os.path.join(directory, VOCAB_FILE), "w", encoding="utf-8") as f:
        f.write("\n".join(entries))
    with open(os.path.join(directory, EMOJI_FILE), "w", encoding="utf-8") as f:
        json.dump({"emoji": {"\U0001F600": "<|emoji1|>"},
                   "emoji_inv": {"<|emoji1|>": "\U0001F600"}}, f)
    return len(entries)


def make_tiny_model_dir(path, seed=0, edit=None, **overrides):
    """A GPTSAN model directory with random weights and its own vocabulary copy, recorded in
    parameters.json as the project records it (gptsan.fingerprint).

    `edit(variables, model)` may change the {TF name: array} weights before they are written.
    """
    from gptsan import checkpoint as ck
    from gptsan.config import GPTSANConfig, ModelConfig
    from gptsan.fingerprint import VocabularyFiles

    vocab_dir = os.path.join(os.path.dirname(path), os.path.basename(path) + "-vocab")
    os.makedirs(vocab_dir, exist_ok=True)
    size = write_tiny_vocabulary(vocab_dir)
    model = ModelConfig(num_vocabulary=size, **{**TINY_PARAMS, **overrides})
    rng = np.random.default_rng(seed)
    variables = {}
    for name, shape in ck.expected_variable_shapes(model).items():
        value = rng.standard_normal(shape) * WEIGHT_STD
        variables[name] = (value + 1.0 if name.endswith("/g") else value).astype(np.float32)
    if edit is not None:
        edit(variables, model)
    vocabulary = VocabularyFiles.of(os.path.join(vocab_dir, ck.VOCAB_FILE),
                                    os.path.join(vocab_dir, ck.EMOJI_FILE))
    record = vocabulary.record()
    ck.write_tf_checkpoint(path, variables, GPTSANConfig(model=model, vocabulary=record),
                           files=vocabulary.model_dir_files(record))
    return path


def test_training_feed_is_the_training_rewrite(tmp_path):
    """With --decoder sample|beam the prompt's LM part and every generated token are fed
    exactly like gptsan.data feeds training text."""
    from gptsan.checkpoint import EMOJI_FILE, VOCAB_FILE
    from gptsan.tokenization import SWEEncoder

    write_tiny_vocabulary(str(tmp_path))
    encoder = SWEEncoder.from_files(str(tmp_path / VOCAB_FILE), str(tmp_path / EMOJI_FILE))
    special = SpecialTokens.from_encoder(encoder)
    assert special.last_token == encoder.token_to_id("<|byte0|>") - 1
    rng = np.random.default_rng(0)
    pool = [encoder.token_to_id(c) for c in "あい。！"] + [special.nl, special.last_token + 4]
    for token in pool + list(special.controls):
        assert prompts.feed_token(token, special, True) == \
            data.lm_transform([token], special)[0][0]
    for _ in range(200):
        tokens = list(rng.choice(pool, size=int(rng.integers(1, 12))))
        tokens = [t for t in tokens for _ in range(int(rng.integers(1, 5)))]  # make runs
        fed, _, _ = data.lm_transform(tokens, special)
        prompt = prompts.build_prompt(special, tokens, as_training=True)
        assert prompt.input_ids == [special.sot, special.seg] + fed.tolist()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("gen") / "tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(predictor, encoder, special, config); the predictor serves every batch size."""
    encoder, config = gen.open_model_files(tiny_dir)
    special = SpecialTokens.from_encoder(encoder)
    return gen.open_predictor(tiny_dir), encoder, special, config


def _prompt(tiny, kind, as_training=True):
    _, encoder, special, config = tiny
    spout = None
    if kind == "spout":
        spout = prompts.class_spout_vector(2, config.model.num_spout)[None]  # [1, spout]
    prefix = encoder.encode("織田信長は") if kind in ("prefix", "spout") else []
    return prompts.build_prompt(special, encoder.encode("武将、"), prefix, spout,
                                config.model.num_contexts, as_training=as_training)


def test_tiny_vocabulary_special_tokens(tiny):
    _, encoder, special, _ = tiny
    assert special.vocab_size == len(encoder) and special.eot == len(encoder) - 1
    assert len(special.dots) == len(data.DOT_TEXT)
    assert special.nl == encoder.token_to_id("<BR>")


@pytest.mark.parametrize("kind", ["plain", "prefix", "spout"])
@pytest.mark.parametrize("top_k", [1, 0])
def test_sampler_cache_and_full_recomputation_give_the_same_tokens(tiny, kind, top_k):
    predictor, _, special, _ = tiny
    prompt = _prompt(tiny, kind)
    runs = []
    for use_cache in (True, False):
        settings = _sampler(max_generate=12, top_k=top_k, seed=5, use_cache=use_cache,
                            num_generate=2)
        runs.append(gen.generate(predictor, prompt, special, settings))
    for cached, full in zip(*runs):
        assert cached.model_tokens == full.model_tokens
        np.testing.assert_allclose(cached.scores, full.scores, atol=1e-4)
    if top_k == 1:
        assert runs[0][0].model_tokens == runs[0][1].model_tokens  # greedy is deterministic


@pytest.mark.parametrize("rows", [1, 3])
def test_published_rows_cache_and_full_recomputation_give_the_same_tokens(tiny, rows):
    predictor, _, special, _ = tiny
    prompt = _prompt(tiny, "spout", as_training=False)
    runs = [gen.generate(predictor, prompt, special, gen.GenerationSettings(
        beam_width=rows, max_generate=10, top_k=5, seed=2, use_cache=use_cache))
        for use_cache in (True, False)]
    assert len(runs[0]) >= rows
    for cached, full in zip(*runs):
        assert cached.model_tokens == full.model_tokens and cached.run == full.run == 0
        np.testing.assert_allclose(cached.scores, full.scores, atol=1e-4)


def test_prefix_and_spout_change_the_output(tiny):
    predictor, _, special, _ = tiny
    settings = _sampler(max_generate=6, top_k=1)
    outs = [gen.generate(predictor, _prompt(tiny, k), special, settings)[0].scores
            for k in ("prefix", "spout")]
    assert not np.allclose(outs[0], outs[1])


def test_generation_stops_at_eot_and_at_a_full_context(tiny):
    predictor, _, special, config = tiny
    only_eot = _sampler(allowed_tokens=[special.eot], max_generate=5)
    result = gen.generate(predictor, _prompt(tiny, "plain"), special, only_eot)[0]
    assert result.model_tokens == [special.eot] and result.finish_reason == gen.FINISH_EOT
    assert result.tokens == []
    no_eot = _sampler(top_k=1, max_generate=100, allowed_tokens=list(range(special.sot)))
    prompt = _prompt(tiny, "spout")
    result = gen.generate(predictor, prompt, special, no_eot)[0]
    assert result.finish_reason == gen.FINISH_CONTEXT
    assert len(result.model_tokens) == config.model.num_contexts - 1 - len(prompt.input_ids) + 1


ALLOWED_SLICE = [0, 5, 9]  # a 3-token vocabulary slice: 27 sequences of length 3


def _exhaustive_scores(predictor, prompt, special, length):
    """{sequence: summed masked log-probability} of every ALLOWED_SLICE sequence, from one
    batched full forward pass (independent of the decoding loop)."""
    sequences = list(itertools.product(ALLOWED_SLICE, repeat=length))
    n = len(prompt.input_ids)
    ids = np.array([prompt.input_ids + [prompts.feed_token(t, special, True) for t in seq[:-1]]
                    for seq in sequences], np.int32)  # [27, n + length - 1]
    out = predictor.forward(ids, num_precontext=np.full([len(sequences)], prompt.num_precontext),
                            spout=None if prompt.spout is None else prompt.spout[0])
    scores = {}
    for row, seq in enumerate(sequences):
        scores[seq] = sum(sampling.log_softmax(sampling.mask_logits(
            out["logits"][row, n - 1 + t], special, allowed=ALLOWED_SLICE))[token]
            for t, token in enumerate(seq))
    return scores


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_finds_the_best_sequences_exhaustively(tiny, use_cache):
    predictor, _, special, _ = tiny
    prompt = _prompt(tiny, "spout")
    settings = gen.GenerationSettings(decoder="beam", beam_width=9, max_generate=3,
                                      num_generate=3, allowed_tokens=ALLOWED_SLICE,
                                      use_cache=use_cache)
    results = gen.generate(predictor, prompt, special, settings)
    exhaustive = sorted(((score, list(seq)) for seq, score in
                         _exhaustive_scores(predictor, prompt, special, 3).items()), reverse=True)
    assert all(exhaustive[i][0] - exhaustive[i + 1][0] > 1e-4 for i in range(3))  # no ties
    assert [r.model_tokens for r in results] == [seq for _, seq in exhaustive[:3]]
    np.testing.assert_allclose([r.score for r in results], [s for s, _ in exhaustive[:3]],
                               atol=1e-4)
    assert all(r.finish_reason == gen.FINISH_MAX for r in results)


def test_narrow_beam_is_at_least_as_good_as_greedy(tiny):
    predictor, _, special, _ = tiny
    prompt = _prompt(tiny, "prefix")
    greedy = gen.generate(predictor, prompt, special, _sampler(top_k=1, max_generate=6))[0]
    beam = gen.generate(predictor, prompt, special, gen.GenerationSettings(
        decoder="beam", beam_width=3, max_generate=6))[0]
    assert beam.score >= greedy.score - 1e-6
