"""Predictor API: outputs, the K/V cache (prefill/step/reorder_cache) and bad-input errors."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import TINY_HF, random_ids
from gptsan.errors import GPTSANError
from gptsan.inference import Predictor

VOCAB = TINY_HF["vocab_size"]
CTX = TINY_HF["max_position_embeddings"]


def test_forward_outputs(tiny_predictor):
    ids = random_ids(np.random.default_rng(2), 2, 12)
    out = tiny_predictor.forward(ids)
    assert out["logits"].shape == (2, 12, VOCAB) and out["logits"].dtype == np.float32
    assert [h.shape for h in out["hidden_states"]] == [(2, 12, TINY_HF["d_model"])] * 3
    assert [e.shape for e in out["expert_index"]] == [(2, 12)] * 2
    assert all(((e >= 0) & (e < TINY_HF["num_experts"])).all() for e in out["expert_index"])
    assert tiny_predictor.max_length == CTX
    again = tiny_predictor.forward(ids.tolist())  # lists work too; same program, same result
    np.testing.assert_array_equal(again["logits"], out["logits"])


def test_reorder_cache_moves_rows(tiny_predictor):
    ids = random_ids(np.random.default_rng(2), 2, 12)
    tiny_predictor.prefill(ids[:, :8])
    plain = tiny_predictor.step(np.array([5, 5]))["logits"]
    tiny_predictor.prefill(ids[:, :8])
    tiny_predictor.reorder_cache([1, 1])
    reordered = tiny_predictor.step(np.array([5, 5]))["logits"]
    np.testing.assert_allclose(reordered[0], plain[1], atol=1e-5)
    np.testing.assert_allclose(reordered[1], plain[1], atol=1e-5)
    assert tiny_predictor.cache_length == 9
    with pytest.raises(GPTSANError, match="reorder_cache index 2 is out of range for a batch of 2"):
        tiny_predictor.reorder_cache([0, 2])
    with pytest.raises(GPTSANError, match="step\\(\\) got 3 tokens but the cache holds 2 rows"):
        tiny_predictor.step([1, 2, 3])


def test_prefill_routed_as_the_padded_pass(tiny_predictor):
    """routing_length: a 12-token prompt prefilled alone routes like the first 12 tokens of the
    48-token right-padded pass (capacity 24 per expert, not 6), so its outputs equal that
    pass's; without it, this repetitive prompt overflows an expert."""
    ids = np.full([1, 12], 7)
    padded = np.concatenate([ids, np.full([1, CTX - 12], VOCAB - 1)], 1)
    full = tiny_predictor.forward(padded)
    alone = tiny_predictor.prefill(ids)
    assert not all(kept.all() for kept in alone["expert_kept"])  # the case this is about
    routed = tiny_predictor.prefill(ids, routing_length=CTX)
    scale = np.abs(full["logits"]).max()
    np.testing.assert_allclose(routed["logits"], full["logits"][:, :12], atol=1e-5 * scale)
    for ours, theirs in zip(routed["expert_kept"], full["expert_kept"]):
        np.testing.assert_array_equal(ours, theirs[:, :12])
    with pytest.raises(GPTSANError, match="routing_length=8 needs batch 1 and 12 <= "):
        tiny_predictor.prefill(ids, routing_length=8)
    with pytest.raises(GPTSANError, match="needs batch 1"):
        tiny_predictor.prefill(np.tile(ids, [2, 1]), routing_length=CTX)
    tiny_predictor.rewind(5)
    assert tiny_predictor.cache_length == 5
    with pytest.raises(GPTSANError, match="rewind length 6 is out of range 1..5"):
        tiny_predictor.rewind(6)


def test_step_until_the_cache_is_full(tiny_predictor):
    ids = random_ids(np.random.default_rng(5), 1, CTX - 1)
    tiny_predictor.prefill(ids)
    tiny_predictor.step([3])
    assert tiny_predictor.cache_length == CTX
    with pytest.raises(GPTSANError, match=f"cache is full: {CTX} slots"):
        tiny_predictor.step([3])
    with pytest.raises(GPTSANError, match=f"prompt needs {CTX + 1} cache slots"):
        tiny_predictor.prefill(np.concatenate([ids, ids[:, :1]], 1), spout=np.zeros(16))


@pytest.mark.parametrize("kwargs, message", [
    ({"input_ids": [[1, VOCAB]]}, f"token id {VOCAB} at \\[0, 1\\] is out of range: valid ids "
                                  f"are 0..{VOCAB - 1}"),
    ({"input_ids": [[-1, 2]]}, "token id -1 at \\[0, 0\\] is out of range"),
    ({"input_ids": [[1] * (CTX + 1)]}, f"sequence of {CTX + 1} tokens is longer than "
                                       f"num_contexts={CTX}"),
    ({"input_ids": [1, 2, 3]}, "input_ids must have shape \\[batch, length\\]"),
    ({"input_ids": [[1.5, 2]]}, "input_ids must be integers"),
    ({"input_ids": [[1, 2]], "spout": np.zeros(15)}, "spout has length 15 but the model "
                                                      "expects num_spout=16"),
    ({"input_ids": [[1, 2]], "spout": np.zeros((3, 16))}, "spout has 3 rows for a batch of 1"),
    ({"input_ids": [[1, 2]], "num_precontext": -1}, "num_precontext -1 is out of range"),
    ({"input_ids": [[1, 2]], "num_precontext": [1, 2]}, "num_precontext must be an integer or 1"),
])
def test_bad_inputs(tiny_predictor, kwargs, message):
    with pytest.raises(GPTSANError, match=message):
        tiny_predictor.forward(**kwargs)


def test_step_needs_a_prefill(hf_tiny):
    predictor = Predictor(hf_tiny.model_dir)
    with pytest.raises(GPTSANError, match="step\\(\\) needs a prefill\\(\\) first"):
        predictor.step([1])
    predictor.close()


def test_bad_model_directories(hf_tiny, tmp_path):
    with pytest.raises(GPTSANError, match="model directory not found"):
        Predictor(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GPTSANError, match="has no parameters.json"):
        Predictor(str(empty))
    shutil.copy(os.path.join(hf_tiny.model_dir, "parameters.json"), empty)
    with pytest.raises(GPTSANError, match="no TF checkpoint in"):
        Predictor(str(empty))

    mismatched = tmp_path / "mismatched"
    shutil.copytree(hf_tiny.model_dir, mismatched)
    params_path = mismatched / "parameters.json"
    params = json.loads(params_path.read_text())
    params["model_params"]["num_contexts"] = 64
    params_path.write_text(json.dumps(params))
    with pytest.raises(GPTSANError, match="model/wpe has shape \\[48, 32\\] but parameters.json "
                                          "implies \\[64, 32\\]"):
        Predictor(str(mismatched))
    params["model_params"].update(num_contexts=48, num_switch_layers=3, num_ext_layers=0)
    params_path.write_text(json.dumps(params))
    with pytest.raises(GPTSANError, match="lacks model/moe2/"):
        Predictor(str(mismatched))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_predictor_runs_close_to_float32(hf_tiny, tiny_predictor, dtype):
    ids = random_ids(np.random.default_rng(2), 2, 12)
    reference = tiny_predictor.forward(ids)["logits"]
    with Predictor(hf_tiny.model_dir, dtype=dtype) as predictor:
        logits = predictor.forward(ids)["logits"]
        predictor.prefill(ids[:, :8])
        step = predictor.step(ids[:, 8])["logits"]
    scale = np.abs(reference).max()
    assert logits.dtype == np.float32 and np.isfinite(step).all()
    assert np.abs(logits - reference).max() < 0.1 * scale  # rounding only
    assert np.abs(step - reference[:, 8]).max() < 0.2 * scale


def test_callable_from_options_runs_like_session_run():
    """inference._callable uses the session's callable-from-options path (a private TF API,
    chosen for its per-call cost): same fetches and the same target side effect as run()."""
    from gptsan.compat import tf
    from gptsan.inference import _callable

    with tf.Graph().as_default():
        x = tf.placeholder(tf.float32, [3], name="x")
        n = tf.placeholder(tf.int32, [], name="n")
        counter = tf.Variable(0, name="counter")
        bump = counter.assign_add(n)
        with tf.Session() as session:
            session.run(counter.initializer)
            run = _callable(session, [x * 2.0, tf.reduce_sum(x)], [bump.op], [x, n])
            doubled, total = run([1.0, 2.0, 3.0], 5)
            expected = session.run([x * 2.0, tf.reduce_sum(x)], {x: [1.0, 2.0, 3.0]})
            np.testing.assert_array_equal(doubled, expected[0])
            assert total == expected[1] and session.run(counter) == 5
