"""The mtf model: variable names/shapes/counts of every config, the Switch layer vs NumPy."""
import glob
import os

import numpy as np
import pytest

from conftest import build_graph_variables
from gptsan import mesh as meshlib
from gptsan.compat import mtf, tf
from gptsan.config import GPTSANConfig, ModelConfig
from gptsan.modeling import KVCache, build_model
from gptsan.plan import INFER, TRAIN, execution_plan
from gptsan.switch import expert_capacity, split_into_groups, switch_ffn
from gptsan.variables import count_parameters, variable_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED_2_8B_PARAMETERS = 2_776_248_480  # the published model card's figure (backbone)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))),
                         ids=os.path.basename)
def test_every_config_builds_with_the_published_shapes(path):
    config = GPTSANConfig.from_json_file(path).model
    variables, output = build_graph_variables(config)
    assert variables == variable_shapes(config)
    assert sum(int(np.prod(s)) for s in variables.values()) == count_parameters(config)["total"]
    assert len(output.hidden_states) == config.num_layers
    assert len(output.router_stats) == config.num_switch_layers
    assert output.logits.shape.to_integer_list == [1, 1, config.num_vocabulary]
    if os.path.basename(path) == "gptsan-2.8b.json":
        assert count_parameters(config)["backbone"] == PUBLISHED_2_8B_PARAMETERS


def test_variable_table_agrees_with_the_converter():
    """The TF variables the converter makes of a real transformers model (shapes from
    transformers, not from the table) are the table's."""
    transformers = pytest.importorskip("transformers")
    from gptsan.hf_format import hf_config_dict, hf_to_tf_refs

    config = GPTSANConfig.from_json_file(os.path.join(ROOT, "configs", "tiny.json")).model
    hf_model = transformers.GPTSanJapaneseForConditionalGeneration(
        transformers.GPTSanJapaneseConfig(**hf_config_dict(config)))
    state = {name: np.zeros(tuple(t.shape), np.float32)
             for name, t in hf_model.state_dict().items()}
    refs, _ = hf_to_tf_refs(state, config.num_header)
    expected = {name: ref.shape for name, ref in refs.items()}
    assert expected == variable_shapes(config)


@pytest.mark.parametrize("tokens, experts, train, capacity", [
    (16, 4, False, 8), (1, 4, False, 4), (2, 16, False, 4), (1024, 16, True, 80),
    (1024, 16, False, 128), (600, 4, True, 187),
])
def test_expert_capacity_formula(tokens, experts, train, capacity):
    assert expert_capacity(tokens, experts, train) == capacity


@pytest.mark.parametrize("tokens, groups", [(24, (1, 24)), (1024, (1, 1024)),
                                            (1200, (2, 600)), (2048 * 3, (6, 1024)),
                                            (1031, (2, 516)), (2049, (3, 683))])
def test_split_into_groups(tokens, groups):
    assert split_into_groups(tokens) == groups


# ---------------------------------------------------------------------- Switch vs NumPy
def _numpy_switch(x, w_gate, w_soft, w_in, w_out, train):
    """Published Switch FFN on [B, T, D] x (eval: no jitter), as plain NumPy."""
    batch, length, d = x.shape
    num_experts = w_gate.shape[1]
    n = batch * length
    groups, size = split_into_groups(n)
    capacity = expert_capacity(size, num_experts, train)
    valid = (np.arange(groups * size) < n).reshape(groups, size)  # padding slots at the end
    tokens = np.concatenate([x.reshape(n, d), np.zeros((groups * size - n, d))]).reshape(
        groups, size, d)
    logits = tokens @ w_gate
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    index = probs.argmax(-1)  # [G, S]
    gate = probs.max(-1)
    mask = np.eye(num_experts)[index] * valid[..., None]  # [G, S, E]
    position = ((np.cumsum(mask, axis=1) - mask) * mask).sum(-1)  # exclusive, [G, S]
    kept = position < capacity
    hidden = np.maximum(np.einsum("gsd,edf->gsef", tokens, w_in), 0)
    expert_out = np.einsum("gsef,efd->gsed", hidden, w_out)  # every expert's output
    chosen = np.take_along_axis(expert_out, index[..., None, None], axis=2)[:, :, 0]
    y = (gate * kept)[..., None] * chosen + np.tanh(tokens @ w_soft)
    count = valid.sum(1)[:, None]
    density, proxy = mask.sum(1) / count, (probs * valid[..., None]).sum(1) / count
    aux = (density * proxy).mean() * num_experts ** 2

    def unpad(a):
        return a.reshape(groups * size, *a.shape[2:])[:n].reshape(batch, length, *a.shape[2:])

    return unpad(y), aux, unpad(index), unpad(kept)


def _run_switch(batch, length, train, zero_router=False, seed=0, local_experts=False):
    config = ModelConfig(num_contexts=length, num_switch_layers=1, num_hidden=8, num_header=2,
                         num_experts=4, num_spout=0, num_vocabulary=10, num_moe_hidden=16)
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(seed)
        mtf_graph = mtf.Graph()
        mesh = mtf.Mesh(mtf_graph, "mesh")
        x_np = np.random.default_rng(seed).normal(size=(batch, length, 8)).astype(np.float32)
        dims = [mtf.Dimension(meshlib.BATCH, batch), mtf.Dimension(meshlib.LENGTH, length),
                mtf.Dimension(meshlib.D_MODEL, 8)]
        x = mtf.import_tf_tensor(mesh, tf.constant(x_np), dims)
        with tf.variable_scope("moe0"):
            plan = execution_plan("" if local_experts else None, TRAIN if train else INFER)
            y, aux, stats = switch_ffn(x, config, plan, meshlib.dtype_policy("float32"))
        lowering = mtf.Lowering(mtf_graph, {mesh: meshlib.make_mesh_impl("", devices=[""])})
        fetches = [lowering.export_to_tf_tensor(t)
                   for t in (y, aux, stats.expert_index, stats.kept)]
        names = ["switch_gating", "softmlp", "wi", "wo"]
        weights = [graph.get_tensor_by_name(f"moe0/{n}/kernel:0") for n in names]
        with tf.Session(graph=graph) as session:
            session.run(tf.global_variables_initializer())
            if zero_router:
                session.run(tf.assign(weights[0], tf.zeros_like(weights[0])))
            values = session.run(weights)
            outputs = session.run(fetches)
    return x_np, values, outputs


@pytest.mark.parametrize("local_experts", [False, True], ids=["einsum", "scatter"])
@pytest.mark.parametrize("batch, length", [(2, 12), (3, 400), (1, 1031), (1, 2)])
def test_switch_layer_matches_numpy(batch, length, local_experts):
    """One group with drops; two groups; a padded last group; 2 tokens (token-choice path)."""
    x, weights, (y, aux, index, kept) = _run_switch(batch, length, train=False,
                                                    local_experts=local_experts)
    y_ref, aux_ref, index_ref, kept_ref = _numpy_switch(x, *weights, train=False)
    np.testing.assert_array_equal(index, index_ref)
    np.testing.assert_array_equal(kept.astype(bool), kept_ref)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(aux, aux_ref, rtol=1e-5)


def test_switch_overflow_and_training_capacity():
    """Zero router: every token -> expert 0 with gate 1/4; jitter cannot change that.

    Training capacity (1.25) keeps int(24 * 1.25 / 4) = 7 tokens; the rest get only the
    softmlp term, computed from the un-jittered input (jitter touches the gate copy only).
    """
    x, weights, (y, aux, index, kept) = _run_switch(2, 12, train=True, zero_router=True)
    assert (index == 0).all()
    np.testing.assert_array_equal(kept.reshape(-1), np.arange(24) < 7)
    y_ref, aux_ref, _, kept_ref = _numpy_switch(x, *weights, train=True)
    np.testing.assert_array_equal(kept.astype(bool), kept_ref)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    assert aux == pytest.approx(1.0)  # density [1, 0, 0, 0] * proxy 1/4, mean * 16


# ---------------------------------------------------------------------- whole model
def test_gradients_reach_every_variable_and_the_gather_rows():
    """mtf.gradients through the model (training uses it): wpe rows beyond T get none."""
    config = ModelConfig(num_contexts=16, num_switch_layers=1, num_ext_layers=1, num_hidden=16,
                         num_header=2, num_experts=2, num_spout=4, num_vocabulary=20)
    graph = tf.Graph()
    with graph.as_default():
        mtf_graph = mtf.Graph()
        mesh = mtf.Mesh(mtf_graph, "mesh")
        batch, length = mtf.Dimension(meshlib.BATCH, 2), mtf.Dimension(meshlib.LENGTH, 5)
        ids = mtf.import_tf_tensor(mesh, tf.constant([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]),
                                   [batch, length])
        spout = mtf.import_tf_tensor(mesh, tf.ones([2, 4]),
                                     [batch, mtf.Dimension(meshlib.SPOUT, 4)])
        output = build_model(config, mesh, ids, spout=spout, plan=execution_plan(None, TRAIN))
        loss = mtf.reduce_mean(mtf.square(output.logits)) + output.aux_loss
        variables = mtf_graph.trainable_variables
        grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
        assert all(g is not None for g in grads)
        lowering = mtf.Lowering(mtf_graph, {mesh: meshlib.make_mesh_impl("", devices=[""])})
        wpe = [g for v, g in zip(variables, grads) if v.name == "model/wpe"][0]
        grad_values = [lowering.export_to_tf_tensor(g) for g in grads]
        wpe_grad = lowering.export_to_tf_tensor(wpe)
        with tf.Session(graph=graph) as session:
            session.run(tf.global_variables_initializer())
            values, wpe_value = session.run([grad_values, wpe_grad])
    assert all(np.isfinite(v).all() for v in values)
    # Positions 1..5 (the spout takes slot 0) are used; wpe[0] and rows > 5 get no gradient.
    used = np.abs(wpe_value).sum(-1) > 0
    np.testing.assert_array_equal(used, (np.arange(16) >= 1) & (np.arange(16) <= 5))


def _training_gradients(config, ids, one_slice, recompute_ext_layers=False):
    """{variable: gradient} of sum(logits * c) + aux loss for one training build on 1x1,
    with every weight set from a fixed RNG by name and step-seeded router jitter."""
    from gptsan.seeded_mesh import StepSeededMeshImpl

    graph = tf.Graph()
    with graph.as_default():
        mtf_graph = mtf.Graph()
        mesh = mtf.Mesh(mtf_graph, "mesh")
        batch, length = (mtf.Dimension(meshlib.BATCH, ids.shape[0]),
                         mtf.Dimension(meshlib.LENGTH, ids.shape[1]))
        output = build_model(config, mesh, mtf.import_tf_tensor(mesh, tf.constant(ids),
                                                                [batch, length]),
                             plan=execution_plan("" if one_slice else None, TRAIN,
                                                 recompute_ext_layers=recompute_ext_layers))
        coefficients = np.random.default_rng(1).normal(size=output.logits.shape.to_integer_list)
        loss = mtf.reduce_sum(output.logits * mtf.import_tf_tensor(
            mesh, tf.constant(coefficients, tf.float32), output.logits.shape)) + output.aux_loss
        variables = mtf_graph.trainable_variables
        grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
        impl = StepSeededMeshImpl(meshlib.parse_mesh_shape(""), meshlib.layout_rules(), [""],
                                  tf.constant(0, tf.int64), seed=3)
        lowering = mtf.Lowering(mtf_graph, {mesh: impl})
        fetches = {v.name: lowering.export_to_tf_tensor(g) for v, g in zip(variables, grads)}
        with tf.Session(graph=graph) as session:
            for master in tf.global_variables():
                seed = sum(map(ord, master.op.name))
                value = np.random.default_rng(seed).normal(size=master.shape.as_list()) * 0.3
                master.load(value.astype(np.float32), session)
            session.run(lowering.copy_masters_to_slices())
            return session.run(fetches)


def test_one_slice_training_matches_the_einsum_path():
    """One-slice training (per-expert gather/scatter with TF gradients, segment-sum
    embedding gradient) gives the gradients of the mesh-general one-hot einsum path, with
    tokens dropped by the training capacity (64 tokens, 4 experts: capacity 20)."""
    config = ModelConfig(num_contexts=16, num_switch_layers=2, num_ext_layers=1, num_hidden=16,
                         num_header=2, num_experts=4, num_spout=0, num_vocabulary=40,
                         num_moe_hidden=24, num_ext_hidden=24)
    ids = np.random.default_rng(0).integers(0, 40, (4, 16)).astype(np.int32)
    assert expert_capacity(64, 4, train=True) == 20
    einsum = _training_gradients(config, ids, one_slice=False)
    fast = _training_gradients(config, ids, one_slice=True)
    assert set(fast) == set(einsum)
    for name, value in einsum.items():
        scale = np.abs(value).max() + 1e-6
        np.testing.assert_allclose(fast[name], value, atol=1e-4 * scale, err_msg=name)


def test_fused_cross_entropy_matches_mtf():
    """layers.softmax_cross_entropy (fused kernel, own gradient) = mtf's cross entropy with
    z-loss, in value and gradient, on a 2x2 mesh (rows split over batch)."""
    from gptsan.layers import softmax_cross_entropy

    rng = np.random.default_rng(0)
    logits_np = (rng.normal(size=(4, 3, 50)) * 4).astype(np.float32)
    labels_np = rng.integers(0, 50, (4, 3)).astype(np.int32)
    weights_np = rng.normal(size=(4, 3)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        mesh = mtf.Mesh(mtf.Graph(), "mesh")
        dims = [mtf.Dimension(meshlib.BATCH, 4), mtf.Dimension(meshlib.LENGTH, 3)]
        vocab = mtf.Dimension(meshlib.VOCAB, 50)
        logits = mtf.import_tf_tensor(mesh, tf.constant(logits_np), dims + [vocab])
        labels = mtf.import_tf_tensor(mesh, tf.constant(labels_np), dims)
        weights = mtf.import_tf_tensor(mesh, tf.constant(weights_np), dims)
        losses = [softmax_cross_entropy(logits, labels, vocab, z_loss=1e-2),
                  mtf.layers.softmax_cross_entropy_with_logits(logits, labels, vocab, 1e-2)]
        grads = [mtf.gradients([mtf.reduce_sum(loss * weights)], [logits])[0]
                 for loss in losses]
        impl = meshlib.make_mesh_impl("batch:2,model:2", devices=[""] * 4)
        lowering = mtf.Lowering(mesh.graph, {mesh: impl})
        with tf.Session(graph=graph) as session:
            (ours, theirs), (our_grad, their_grad) = session.run(
                [[lowering.export_to_tf_tensor(t) for t in pair] for pair in (losses, grads)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    np.testing.assert_allclose(our_grad, their_grad, atol=1e-6)


def test_masked_softmax_gradient_matches_mtf_softmax():
    from gptsan.attention import MASKED_SCORE, masked_softmax as _masked_softmax

    rng = np.random.default_rng(0)
    scores_np = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # [B, H, T, M]
    mask_np = (rng.uniform(size=(2, 4, 5)) < 0.6).astype(np.float32)  # [B, T, M]
    coefficients = rng.normal(size=scores_np.shape).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        mesh = mtf.Mesh(mtf.Graph(), "mesh")
        b, h, t, m = (mtf.Dimension(n, k) for n, k in zip(
            (meshlib.BATCH, meshlib.HEADS, meshlib.LENGTH, meshlib.MEMORY), scores_np.shape))
        scores = mtf.import_tf_tensor(mesh, tf.constant(scores_np), [b, h, t, m])
        mask = mtf.import_tf_tensor(mesh, tf.constant(mask_np), [b, t, m])
        c = mtf.import_tf_tensor(mesh, tf.constant(coefficients), [b, h, t, m])
        reference = mtf.softmax(scores * mask + (1.0 - mask) * MASKED_SCORE, m)
        outputs = [_masked_softmax(scores, mask), reference]
        grads = [mtf.gradients([mtf.reduce_sum(p * c)], [scores])[0] for p in outputs]
        lowering = mtf.Lowering(mesh.graph, {mesh: meshlib.make_mesh_impl("", devices=[""])})
        with tf.Session(graph=graph) as session:
            values = session.run([lowering.export_to_tf_tensor(x) for x in outputs + grads])
    np.testing.assert_allclose(values[0], values[1], atol=1e-6)
    np.testing.assert_allclose(values[2], values[3], atol=1e-5)


def test_bfloat16_activations_run_close_to_float32():
    config = ModelConfig(num_contexts=16, num_switch_layers=1, num_ext_layers=1, num_hidden=16,
                         num_header=2, num_experts=2, num_spout=0, num_vocabulary=20)
    results = {}
    for name in ("float32", "bfloat16"):
        graph = tf.Graph()
        with graph.as_default():
            tf.set_random_seed(3)
            mtf_graph = mtf.Graph()
            mesh = mtf.Mesh(mtf_graph, "mesh")
            ids = mtf.import_tf_tensor(mesh, tf.constant([[1, 2, 3, 4]]),
                                       [mtf.Dimension(meshlib.BATCH, 1),
                                        mtf.Dimension(meshlib.LENGTH, 4)])
            output = build_model(config, mesh, ids, variable_dtype=meshlib.dtype_policy(name))
            lowering = mtf.Lowering(mtf_graph, {mesh: meshlib.make_mesh_impl("", devices=[""])})
            logits = lowering.export_to_tf_tensor(output.logits)
            assert logits.dtype == tf.float32
            with tf.Session(graph=graph) as session:
                session.run(tf.global_variables_initializer())
                results[name] = session.run(logits)
    scale = np.abs(results["float32"]).max()
    assert np.abs(results["bfloat16"] - results["float32"]).max() < 0.05 * scale


def test_multi_token_chunks_on_a_fixed_cache():
    """KVCache with T > 1: a 3-token chunk after 5 cached tokens equals the full pass; unfilled
    cache slots (garbage here) are ignored; prefix keys among the new tokens are visible."""
    config = ModelConfig(num_contexts=8, num_switch_layers=1, num_ext_layers=1, num_hidden=16,
                         num_header=2, num_experts=1, num_spout=0, num_vocabulary=20)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (2, 8)).astype(np.int32)
    graph = tf.Graph()
    with graph.as_default():
        mtf_graph = mtf.Graph()
        mesh = mtf.Mesh(mtf_graph, "mesh")
        batch = mtf.Dimension(meshlib.BATCH, 2)

        def run_ids(values):
            return mtf.import_tf_tensor(mesh, tf.constant(values),
                                        [batch, mtf.Dimension(meshlib.LENGTH, values.shape[1])])

        def precontext(values):
            return mtf.import_tf_tensor(mesh, tf.constant(values, tf.int32), [batch])

        full = build_model(config, mesh, run_ids(ids), precontext([4, 0]))
        short = build_model(config, mesh, run_ids(ids[:, 5:]), precontext([2, 0]))
        cache_dims = [mtf.Dimension(meshlib.MEMORY, 8), batch, mtf.Dimension(meshlib.HEADS, 2),
                      mtf.Dimension(meshlib.HEAD_DIM, 8)]
        feeds, caches = [], []
        for _ in range(2 * config.num_layers):
            feeds.append(tf.placeholder(tf.float32, [8, 2, 2, 8]))
            caches.append(mtf.import_tf_tensor(mesh, feeds[-1], cache_dims))
        length = tf.placeholder(tf.int32, [])

        def cached(precontext_values):
            past = KVCache(caches[0::2], caches[1::2], mtf.import_tf_tensor(mesh, length))
            return build_model(config, mesh, run_ids(ids[:, 5:]), precontext(precontext_values),
                               past=past)

        chunk, chunk_prefix = cached([4, 0]), cached([2, 0])
        lowering = mtf.Lowering(mtf_graph, {mesh: meshlib.make_mesh_impl("", devices=[""])})
        export = lowering.export_to_tf_tensor
        presents = [tf.transpose(export(t), [1, 0, 2, 3]) for kv in full.presents for t in kv]
        with tf.Session(graph=graph) as session:
            session.run(tf.global_variables_initializer())
            full_logits, short_logits, present_values = session.run(
                [export(full.logits), export(short.logits), presents])
            garbage = [np.where(np.arange(8)[:, None, None, None] < 5, p,
                                rng.normal(size=p.shape) * 100) for p in present_values]
            chunk_logits = session.run(export(chunk.logits),
                                       {**dict(zip(feeds, garbage)), length: 5})
            prefix_logits = session.run(export(chunk_prefix.logits),
                                        {**dict(zip(feeds, garbage)), length: 0})
    np.testing.assert_allclose(chunk_logits, full_logits[:, 5:], atol=1e-5)
    # Empty cache (length 0): the 3 tokens alone, keys < num_precontext=2 visible to all.
    np.testing.assert_allclose(prefix_logits, short_logits, atol=1e-5)
    assert np.abs(prefix_logits[0, 0] - chunk_logits[0, 0]).max() > 1e-3


@pytest.mark.parametrize("local_experts", [False, True], ids=["einsum", "scatter"])
def test_switch_eval_overflow(local_experts):
    """Zero router, eval: capacity int(24 * 2 / 4) = 12; tokens 12..23 get only softmlp."""
    x, weights, (y, aux, index, kept) = _run_switch(2, 12, train=False, zero_router=True,
                                                    local_experts=local_experts)
    np.testing.assert_array_equal(kept.reshape(-1), np.arange(24) < 12)
    y_ref, _, _, _ = _numpy_switch(x, *weights, train=False)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    soft_only = np.tanh(x @ weights[1])
    np.testing.assert_allclose(y.reshape(24, -1)[12:], soft_only.reshape(24, -1)[12:], atol=1e-6)


@pytest.mark.parametrize("mesh_shape", ["batch:1,model:1", "batch:2,model:2"])
def test_recomputed_attention_matches_autodiff_of_stored_probabilities(mesh_shape):
    """Training attention (probabilities recomputed in the backward pass) gives the outputs and
    the q/k/v gradients of the plain einsum + masked softmax formulation, heads split or not."""
    from gptsan.attention import masked_softmax as _masked_softmax
    from gptsan.attention import recomputed_attention as _recomputed_attention

    rng = np.random.default_rng(0)
    b, t, m, h, k = 2, 3, 4, 2, 5
    arrays = {"q": rng.standard_normal((b, t, h, k)), "keys": rng.standard_normal((b, m, h, k)),
              "values": rng.standard_normal((b, m, h, k)),
              "mask": (rng.random((b, t, m)) > 0.3), "c": rng.standard_normal((b, t, h, k))}
    graph = tf.Graph()
    with graph.as_default():
        mtf_graph = mtf.Graph()
        mesh = mtf.Mesh(mtf_graph, "mesh")
        dim = {n: mtf.Dimension(n, s) for n, s in ((meshlib.BATCH, b), (meshlib.LENGTH, t),
                                                    (meshlib.MEMORY, m), (meshlib.HEADS, h),
                                                    (meshlib.HEAD_DIM, k))}
        bthk = [dim[meshlib.BATCH], dim[meshlib.LENGTH], dim[meshlib.HEADS], dim[meshlib.HEAD_DIM]]
        bmhk = [dim[meshlib.BATCH], dim[meshlib.MEMORY], dim[meshlib.HEADS], dim[meshlib.HEAD_DIM]]
        shapes = {"q": bthk, "keys": bmhk, "values": bmhk, "c": bthk,
                  "mask": [dim[meshlib.BATCH], dim[meshlib.LENGTH], dim[meshlib.MEMORY]]}
        x = {n: mtf.import_tf_tensor(mesh, tf.constant(a, tf.float32), shapes[n])
             for n, a in arrays.items()}
        ours = _recomputed_attention(x["q"], x["keys"], x["values"], x["mask"], bthk)
        scores = mtf.einsum([x["q"], x["keys"]], [dim[meshlib.BATCH], dim[meshlib.HEADS],
                                                 dim[meshlib.LENGTH], dim[meshlib.MEMORY]])
        plain = mtf.einsum([_masked_softmax(scores, x["mask"]), x["values"]], bthk)
        outputs = {}
        for name, context in (("ours", ours), ("plain", plain)):
            loss = mtf.reduce_sum(context * x["c"])
            grads = mtf.gradients([loss], [x["q"], x["keys"], x["values"]])
            outputs[name] = [context] + grads
        devices = meshlib.cpu_devices_for(meshlib.parse_mesh_shape(mesh_shape))
        lowering = mtf.Lowering(mtf_graph, {mesh: meshlib.make_mesh_impl(mesh_shape, devices)})
        fetch = {n: [lowering.export_to_tf_tensor(t) for t in ts] for n, ts in outputs.items()}
        with tf.Session(graph=graph, config=tf.ConfigProto(device_count={"CPU": 4})) as session:
            values = session.run(fetch)
    for ours_value, plain_value in zip(values["ours"], values["plain"]):
        np.testing.assert_allclose(ours_value, plain_value, rtol=1e-5, atol=1e-6)


def test_recomputed_extra_layers_give_the_same_gradients():
    """Fine-tuning's recomputation of the extra layers (and their spout keys/values) in the
    backward pass changes no gradient."""
    config = ModelConfig(num_contexts=16, num_switch_layers=1, num_ext_layers=2, num_hidden=16,
                         num_header=2, num_experts=2, num_spout=0, num_vocabulary=40,
                         num_moe_hidden=24, num_ext_hidden=24)
    ids = np.random.default_rng(2).integers(0, 40, (2, 16)).astype(np.int32)
    for one_slice in (False, True):
        stored = _training_gradients(config, ids, one_slice)
        recomputed = _training_gradients(config, ids, one_slice, recompute_ext_layers=True)
        assert set(stored) == set(recomputed)
        for name, value in stored.items():
            np.testing.assert_allclose(recomputed[name], value, rtol=1e-4,
                                       atol=1e-5 * (np.abs(value).max() + 1e-6), err_msg=name)
