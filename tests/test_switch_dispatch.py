"""Every Switch expert dispatch method (gptsan.experts) against one NumPy reference of the
Switch FFN with its softmlp bypass: forward output, and for the methods with a gradient the
gradients of sum(y * c) w.r.t. the input and every weight (router, softmlp, wi, wo)."""
import numpy as np
import pytest

from gptsan import mesh as meshlib
from gptsan.attention import StoredAttention
from gptsan.compat import mtf, tf
from gptsan.config import ModelConfig
from gptsan.experts import EveryExpert, OneHotDispatch, RoutedExperts, TokenChoice
from gptsan.layers import EinsumProducts
from gptsan.plan import ExecutionPlan
from gptsan.switch import EVAL_CAPACITY_FACTOR, MIN_EXPERT_CAPACITY, switch_ffn

D, F, E = 8, 16, 4  # d_model, moe hidden, experts
WEIGHTS = ("switch_gating", "softmlp", "wi", "wo")
METHODS = {"one_hot": OneHotDispatch(), "every_expert": EveryExpert(),
           "token_choice": TokenChoice(), "routed": RoutedExperts(),
           "routed_differentiable": RoutedExperts(differentiable=True)}
# Methods valid on a layout that splits the experts (the others need them whole per slice).
SPLIT_LAYOUT = ("one_hot", "every_expert", "token_choice")


def _inputs(batch, length, seed=0):
    """x [b, t, D], weights, c [b, t, D]; the router leans to expert 0 so that it overflows."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, D)) + 0.5
    w_gate = rng.normal(size=(D, E)) * 0.3
    w_gate[:, 0] += 0.3
    weights = [w_gate, rng.normal(size=(D, D)) * 0.3, rng.normal(size=(E, D, F)) * 0.3,
               rng.normal(size=(E, F, D)) * 0.3]
    c = rng.normal(size=(batch, length, D))
    return [a.astype(np.float32) for a in [x] + weights + [c]]


def _numpy_switch(x, w_gate, w_soft, w_in, w_out, c):
    """(y, kept, {name: dL/dname}) for L = sum(y * c); one group, eval capacity, no jitter."""
    shape, tokens, cc = x.shape, x.reshape(-1, D).astype(np.float64), c.reshape(-1, D)
    n = len(tokens)
    logits = tokens @ w_gate
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expert = probs.argmax(-1)
    position = np.array([(expert[:i] == expert[i]).sum() for i in range(n)])
    capacity = max(min(n, int(n * EVAL_CAPACITY_FACTOR / E)), MIN_EXPERT_CAPACITY)
    weight = probs[np.arange(n), expert] * (position < capacity)  # [n]
    hidden = np.einsum("nd,ndf->nf", tokens, w_in[expert])
    out = np.einsum("nf,nfd->nd", np.maximum(hidden, 0), w_out[expert])
    soft = np.tanh(tokens @ w_soft)
    y = weight[:, None] * out + soft

    d_soft = cc * (1 - soft ** 2)
    d_out = weight[:, None] * cc
    d_hidden = np.einsum("nd,nfd->nf", d_out, w_out[expert]) * (hidden > 0)
    d_probs = np.zeros_like(probs)
    d_probs[np.arange(n), expert] = (cc * out).sum(-1) * (weight > 0)
    d_logits = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True))
    d_wi, d_wo = np.zeros(w_in.shape), np.zeros(w_out.shape)
    np.add.at(d_wi, expert, np.einsum("nd,nf->ndf", tokens, d_hidden))
    np.add.at(d_wo, expert, np.einsum("nf,nd->nfd", np.maximum(hidden, 0), d_out))
    d_x = (d_soft @ w_soft.T + np.einsum("nf,ndf->nd", d_hidden, w_in[expert])
           + d_logits @ w_gate.T)
    grads = {"x": d_x.reshape(shape), "switch_gating": tokens.T @ d_logits,
             "softmlp": tokens.T @ d_soft, "wi": d_wi, "wo": d_wo}
    return y.reshape(shape), (position < capacity).reshape(shape[:2]), grads


def _run(method, arrays, mesh_shape):
    """(y, kept, {name: gradient} or None) of switch_ffn with `method` on `mesh_shape`."""
    x_np, *weights, c_np = arrays
    config = ModelConfig(num_contexts=x_np.shape[1], num_switch_layers=1, num_hidden=D,
                         num_header=2, num_experts=E, num_spout=0, num_vocabulary=10,
                         num_moe_hidden=F)
    plan = ExecutionPlan(training=False, products=EinsumProducts(), experts=method,
                         attention=StoredAttention())
    graph = tf.Graph()
    with graph.as_default():
        mesh = mtf.Mesh(mtf.Graph(), "mesh")
        dims = [mtf.Dimension(meshlib.BATCH, x_np.shape[0]),
                mtf.Dimension(meshlib.LENGTH, x_np.shape[1]), mtf.Dimension(meshlib.D_MODEL, D)]
        x = mtf.import_tf_tensor(mesh, tf.constant(x_np), dims)
        with tf.variable_scope("moe0"):
            y, _, stats = switch_ffn(x, config, plan, meshlib.dtype_policy("float32"))
        outputs = {"y": y, "kept": stats.kept}
        if method.differentiable:
            loss = mtf.reduce_sum(y * mtf.import_tf_tensor(mesh, tf.constant(c_np), dims))
            variables = {v.name.split("/")[1]: v.outputs[0] for v in mesh.graph.trainable_variables}
            names = ["x"] + list(WEIGHTS)
            grads = mtf.gradients([loss], [x] + [variables[n] for n in WEIGHTS])
            outputs.update(zip(names, grads))
        devices = meshlib.cpu_devices_for(meshlib.parse_mesh_shape(mesh_shape))
        lowering = mtf.Lowering(mesh.graph, {mesh: meshlib.make_mesh_impl(mesh_shape, devices)})
        fetches = {n: lowering.export_to_tf_tensor(t) for n, t in outputs.items()}
        with tf.Session(graph=graph, config=tf.ConfigProto(device_count={"CPU": 4})) as session:
            for name, value in zip(WEIGHTS, weights):
                [master] = [v for v in tf.global_variables() if v.op.name == f"moe0/{name}/kernel"]
                master.load(value, session)
            session.run(lowering.copy_masters_to_slices())
            return session.run(fetches)


@pytest.mark.parametrize("name, mesh_shape", [(n, "") for n in METHODS]
                         + [(n, "batch:2,model:2") for n in SPLIT_LAYOUT])
@pytest.mark.parametrize("batch, length", [(2, 12), (1, 2)], ids=["overflow", "two_tokens"])
def test_dispatch_method_matches_numpy(name, mesh_shape, batch, length):
    """24 tokens, capacity 12, most routed to expert 0 (some dropped); and 2 tokens
    (TokenChoice's aliasing-slice kernel). Forward always; gradients where the method has
    them. Mesh "" is 1x1; on 2x2 the experts are split over `model`."""
    arrays = _inputs(batch, length)
    y_ref, kept_ref, grads_ref = _numpy_switch(*arrays)
    if length == 12:
        assert 0 < kept_ref.sum() < kept_ref.size  # the case drops tokens
    result = _run(METHODS[name], arrays, mesh_shape)
    np.testing.assert_array_equal(result["kept"].astype(bool), kept_ref)
    np.testing.assert_allclose(result["y"], y_ref, rtol=1e-5, atol=1e-5)
    for key, reference in grads_ref.items():
        if METHODS[name].differentiable:
            np.testing.assert_allclose(result[key], reference, rtol=1e-5, atol=1e-5,
                                       err_msg=key)
