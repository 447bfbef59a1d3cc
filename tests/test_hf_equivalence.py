"""The Mesh-TF model vs the independent HF transformers 4.40.2 implementation.

A random tiny HF model is converted with `gptsan.hf_format` and run through `Predictor`:
logits agree to 1e-5 x max |logit|, greedy tokens and expert choices are identical, in
every mode (LM, Prefix-LM, batch, spout, incremental). Where HF differs from the published
model (docs/ARCHITECTURE.md "Differences from the HF port") the published behaviour is checked
explicitly.
"""
import types

import numpy as np
import pytest

from conftest import make_hf_model, random_ids, run_hf, convert

REL_TOL = 1e-5  # logits: max |delta| <= REL_TOL * max |reference logit|


def assert_logits_match(ours, reference):
    scale = np.abs(reference).max()
    delta = np.abs(ours - reference).max()
    assert delta <= REL_TOL * scale, f"max |delta| {delta} > {REL_TOL} x {scale}"
    np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


def assert_experts_match(ours, choices):
    assert len(ours) == len(choices)
    for layer, (mine, theirs) in enumerate(zip(ours, choices)):
        np.testing.assert_array_equal(mine, theirs, err_msg=f"expert choices of layer {layer}")


def assert_drop_free(ours):
    """Precondition of an HF comparison: no token over expert capacity (HF drops none).

    The published capacity (one group over all batch*length tokens, C = S/2 here) makes
    drops input-dependent; the fixed inputs below were chosen drop-free for the tiny model.
    """
    for layer, kept in enumerate(ours["expert_kept"]):
        assert kept.all(), f"layer {layer} dropped {int((~kept).sum())} tokens (not drop-free)"


@pytest.fixture(scope="module")
def ids():
    return random_ids(np.random.default_rng(2), 2, 12)  # [2, 12]


@pytest.fixture(scope="module")
def spout():
    return np.random.default_rng(1002).normal(size=(2, 16)).astype(np.float32)  # [2, d_spout]


def test_lm_batch_of_two(hf_tiny, tiny_predictor, ids):
    ours = tiny_predictor.forward(ids)
    logits, hidden, choices = run_hf(hf_tiny.hf, ids)
    assert_logits_match(ours["logits"], logits)
    assert_experts_match(ours["expert_index"], choices)
    assert_drop_free(ours)
    assert len(np.unique(np.concatenate(choices))) > 1  # several experts are used


def test_hidden_states_of_every_layer(hf_tiny, tiny_predictor, ids):
    ours = tiny_predictor.forward(ids)["hidden_states"]
    _, hidden, _ = run_hf(hf_tiny.hf, ids)
    num_switch = hf_tiny.config["num_switch_layers"]
    assert len(ours) == len(hidden) - 1 == 3  # HF appends last_hidden_state
    ete = hf_tiny.hf.model.extra_position_embeddings.weight.detach().numpy()
    for layer, (mine, theirs) in enumerate(zip(ours, hidden)):
        if layer == num_switch - 1:
            # HF adds ete[pos] in place to the tensor it already returned
            # (docs/ARCHITECTURE.md "Differences from the HF port": hidden states).
            mine = mine + ete[:ids.shape[1]]
        np.testing.assert_allclose(mine, theirs, atol=2e-5 * np.abs(theirs).max())


def test_prefix_lm(hf_tiny, tiny_predictor, ids):
    num_precontext = np.array([5, 9], np.int32)
    token_type_ids = (np.arange(12)[None] < num_precontext[:, None]).astype(np.int64)
    ours = tiny_predictor.forward(ids, num_precontext=num_precontext)
    assert_drop_free(ours)
    logits, _, choices = run_hf(hf_tiny.hf, ids, token_type_ids=token_type_ids)
    assert_logits_match(ours["logits"], logits)
    assert_experts_match(ours["expert_index"], choices)
    plain = tiny_predictor.forward(ids)["logits"]
    assert np.abs(plain[:, :4] - ours["logits"][:, :4]).max() > 1e-3  # the prefix matters


def test_spout(hf_tiny, tiny_predictor, ids, spout):
    ours = tiny_predictor.forward(ids, spout=spout)
    assert_drop_free(ours)
    # HF needs an explicit attention_mask with a spout
    # (docs/ARCHITECTURE.md "Differences from the HF port": padding).
    logits, _, choices = run_hf(hf_tiny.hf, ids, spout=spout,
                                attention_mask=np.ones(ids.shape, np.float32))
    assert_logits_match(ours["logits"], logits)
    assert_experts_match(ours["expert_index"], choices)


def test_spout_with_prefix_counts_the_spout_slot(hf_tiny, tiny_predictor, ids, spout):
    """Published num_precontext is a memory index: 1 (spout slot) + prefix tokens."""
    prefix_tokens = np.array([4, 7])
    ours = tiny_predictor.forward(ids, num_precontext=1 + prefix_tokens, spout=spout)
    assert_drop_free(ours)
    # HF token_type_ids over the T+1 keys (spout slot first).
    token_type_ids = (np.arange(13)[None] < 1 + prefix_tokens[:, None]).astype(np.int64)
    logits, _, choices = run_hf(hf_tiny.hf, ids, spout=spout, token_type_ids=token_type_ids,
                                attention_mask=np.ones(ids.shape, np.float32))
    assert_logits_match(ours["logits"], logits)
    assert_experts_match(ours["expert_index"], choices)


def test_full_context_with_spout_clips_the_last_position(hf_tiny, tiny_predictor, spout):
    """num_contexts tokens + spout: positions 1..ctx, the last one clipped to ctx - 1."""
    ctx = hf_tiny.config["max_position_embeddings"]
    ids = random_ids(np.random.default_rng(3), 1, ctx)
    ours = tiny_predictor.forward(ids, spout=spout[:1])
    assert_drop_free(ours)
    logits, _, choices = run_hf(hf_tiny.hf, ids, spout=spout[:1],
                                attention_mask=np.ones(ids.shape, np.float32))
    assert_logits_match(ours["logits"], logits)
    assert_experts_match(ours["expert_index"], choices)


@pytest.mark.parametrize("rows", [2, 1], ids=["batch2", "one_row"])  # one row: 2-D matmuls
@pytest.mark.parametrize("mode", ["lm", "prefix", "spout"])
def test_incremental_decoding_matches_the_full_pass(hf_tiny, tiny_predictor, ids, spout, mode,
                                                     rows):
    ids, spout = ids[:rows], spout[:rows]
    kwargs = {"lm": {}, "prefix": {"num_precontext": np.array([3, 6][:rows], np.int32)},
              "spout": {"spout": spout}}[mode]
    hf_kwargs = {"lm": {}, "spout": {"spout": spout,
                                     "attention_mask": np.ones(ids.shape, np.float32)},
                 "prefix": {"token_type_ids": (np.arange(12)[None] < np.array([[3], [6]][:rows]))
                            .astype(np.int64)}}[mode]
    reference, _, _ = run_hf(hf_tiny.hf, ids, **hf_kwargs)
    full = tiny_predictor.forward(ids, **kwargs)
    prefill = tiny_predictor.prefill(ids[:, :8], **kwargs)
    assert_drop_free(full)
    assert_drop_free(prefill)
    assert tiny_predictor.cache_length == 8 + (1 if mode == "spout" else 0)
    assert_logits_match(prefill["logits"], reference[:, :8])
    for t in range(8, 12):
        out = tiny_predictor.step(ids[:, t])
        assert out["logits"].shape == (rows, hf_tiny.config["vocab_size"])
        assert_logits_match(out["logits"], reference[:, t])
        np.testing.assert_allclose(out["logits"], full["logits"][:, t],
                                   atol=REL_TOL * np.abs(reference).max())
        for mine, theirs in zip(out["hidden_states"], full["hidden_states"]):
            np.testing.assert_allclose(mine, theirs[:, t], atol=1e-5 * np.abs(theirs).max())


# ---------------------------------------------------------------------- capacity overflow
OVERFLOW_TOKENS = 16  # one group of 16 tokens, E = 4: eval capacity max(min(16, 8), 4) = 8
OVERFLOW_CAPACITY = 8


def _route_everything_to_expert_0(model):
    # Zero router weights: uniform probabilities, argmax (first index) = expert 0 for all.
    model.model.blocks[0].feed_forward.mlp.router.classifier.weight.zero_()


def _published_sparse_mlp_forward(self, hidden_states):
    """HF SparseMLP with the published overflow rule: dropped tokens get 0, not g * h."""
    import torch

    router_mask, router_probs, router_logits = self.router(hidden_states)
    expert_index = torch.argmax(router_mask, dim=-1)
    next_states = torch.zeros_like(hidden_states)
    for idx, expert in enumerate(self.experts.values()):
        token_indices = router_mask[:, :, idx].bool()
        next_states[token_indices] = expert(hidden_states[token_indices]).to(next_states.dtype)
    return router_probs * next_states, (router_logits, expert_index)


@pytest.fixture(scope="module")
def overflow_model(tmp_path_factory):
    from gptsan.inference import Predictor

    base = tmp_path_factory.mktemp("overflow")
    hf = make_hf_model(str(base / "hf"), seed=5, edit=_route_everything_to_expert_0,
                       expert_capacity=OVERFLOW_CAPACITY)
    convert(str(base / "hf"), str(base / "gptsan"))
    predictor = Predictor(str(base / "gptsan"))
    yield hf, predictor
    predictor.close()


def test_overflow_tokens_get_only_the_softmlp_term(overflow_model):
    hf, predictor = overflow_model
    ids = random_ids(np.random.default_rng(4), 1, OVERFLOW_TOKENS)
    ours = predictor.forward(ids)
    kept = ours["expert_kept"][0][0]
    np.testing.assert_array_equal(kept, np.arange(OVERFLOW_TOKENS) < OVERFLOW_CAPACITY)
    np.testing.assert_array_equal(ours["expert_index"][0], 0)

    # HF keeps the same tokens (capacity 8, one sequence = one group) but passes the
    # overflow through as g * h; the published model gives them zero expert output.
    hf_logits, _, _ = run_hf(hf, ids)
    assert np.abs(ours["logits"] - hf_logits).max() > 1e-2 * np.abs(hf_logits).max()
    mlp = hf.model.blocks[0].feed_forward.mlp
    original = mlp.forward
    mlp.forward = types.MethodType(_published_sparse_mlp_forward, mlp)
    try:
        published, _, choices = run_hf(hf, ids)
    finally:
        mlp.forward = original
    assert_logits_match(ours["logits"], published)
    assert_experts_match(ours["expert_index"], choices)
    # The first 8 tokens never see the overflow (causal): they match plain HF too.
    scale = np.abs(hf_logits).max()
    assert np.abs(ours["logits"][:, :8] - hf_logits[:, :8]).max() <= REL_TOL * scale
