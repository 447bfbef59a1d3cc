"""Optimizer defaults = the published optimization.py, checked against an independent NumPy
re-implementation of its update loop; opt-in improvements; clipping, loss scaling, freezing."""
import re

import numpy as np
import pytest

from gptsan.compat import mtf, tf
from gptsan.config import TrainConfig
from gptsan.errors import GPTSANError
from gptsan import optimization

# name -> shape: one of each kind of variable (docs/ARCHITECTURE.md "Checkpoint names")
TOY_VARIABLES = {
    "model/wte": [6, 4],
    "model/wob": [6],
    "model/ln0/g": [4],
    "model/an1/b": [4],
    "model/mlp2/p1/bias": [8],
    "model/att0/o/kernel": [4, 4],
    "pasts/out/kernel": [3, 4],
}
TOY_BASE_LR = 0.5  # 1 / base_lr**2 = 4: steps 0-1 warm up, 2-4 keep base_lr, 5 decays
TOY_WARMUP = 2
TOY_STEPS = 6


# ---------------------------------------------------------------------------------------------
# the published update loop in NumPy (written from optimization.py at HEAD, float64)


def published_learning_rate(step, base_lr, warmup, warmup_from_one=False):
    """create_optimizer: 1/sqrt(max(1/base_lr^2, step)); warm-up base_lr * step / warmup."""
    lr = 1.0 / np.sqrt(max((1.0 / base_lr) ** 2, step))
    if warmup and step < warmup:
        lr = base_lr * (step + 1 if warmup_from_one else step) / warmup
        lr = min(lr, base_lr)
    return lr


def published_training(params, grad_fn, steps, base_lr, warmup, weight_decay=0.01,
                       exclude=("LayerNorm", "layer_norm", "bias"), clip_norm=None,
                       grad_scale=1.0, bias_correction=False, warmup_from_one=False):
    """`steps` updates of AdamWeightDecayOptimizer as create_optimizer drives it.

    grad_fn(name, value) -> dLoss/dvalue. The gradients are those of loss * grad_scale,
    clipped to global norm clip_norm (if given), then divided by grad_scale in apply_grad.
    Returns (params, {name: (m, v)}, [lr of each step]).
    """
    params = {n: np.asarray(p, np.float64).copy() for n, p in params.items()}
    m = {n: np.zeros_like(p) for n, p in params.items()}
    v = {n: np.zeros_like(p) for n, p in params.items()}
    lrs = []
    for step in range(steps):  # global_step before its increment
        lr = published_learning_rate(step, base_lr, warmup, warmup_from_one)
        lrs.append(lr)
        grads = {n: grad_fn(n, p) * grad_scale for n, p in params.items()}
        if clip_norm is not None:
            norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
            grads = {n: g * (clip_norm / max(norm, clip_norm)) for n, g in grads.items()}
        for name, grad in grads.items():
            grad = grad / grad_scale
            m[name] = 0.9 * m[name] + 0.1 * grad
            v[name] = 0.999 * v[name] + 0.001 * grad ** 2
            m_hat, v_hat = m[name], v[name]
            if bias_correction:
                m_hat = m_hat / (1 - 0.9 ** (step + 1))
                v_hat = v_hat / (1 - 0.999 ** (step + 1))
            update = m_hat / (np.sqrt(v_hat) + 1e-8)
            if weight_decay and not any(re.search(r, name) for r in exclude):
                update = update + weight_decay * params[name]
            params[name] = params[name] - lr * update
    return params, {n: (m[n], v[n]) for n in params}, lrs


# ---------------------------------------------------------------------------------------------
# the same steps through gptsan.optimization on a real mtf graph


def _toy_problem(coefficient_scale=1.0):
    """Initial values, and loss = sum_v sum(c_v * v + a_v * v^2 / 2): gradient c_v + a_v * v."""
    rng = np.random.RandomState(0)
    init, linear, quadratic = {}, {}, {}
    for name, shape in TOY_VARIABLES.items():
        init[name] = rng.randn(*shape).astype(np.float32)
        linear[name] = (rng.randn(*shape) * coefficient_scale).astype(np.float32)
        quadratic[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    return init, linear, quadratic


def _train_toy(steps=1, ignore=(), clip=False, clip_norm=optimization.CLIP_NORM, scale=1.0,
               coefficient_scale=1.0, **config):
    """`steps` optimizer steps on the toy problem (global step incremented after each).

    `scale`: a float, or a function making a DynamicLossScale in the new graph. `config`:
    TrainConfig keys (default: base_lr TOY_BASE_LR, num_warmup_steps TOY_WARMUP).
    Returns a dict: before/after (values), slots {name: (m, v)}, lrs, grad_norm (first
    step), names (TF global variables), and for a dynamic scale scale/good_steps.
    """
    tf.reset_default_graph()
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "mesh")
    init, linear, quadratic = _toy_problem(coefficient_scale)
    variables, terms = {}, []
    for name, shape in TOY_VARIABLES.items():
        dims = [mtf.Dimension(f"{name.replace('/', '_')}_{k}", n) for k, n in enumerate(shape)]
        scope, leaf = name.rsplit("/", 1)
        with tf.variable_scope(scope):
            var = mtf.get_variable(mesh, leaf, mtf.Shape(dims),
                                   initializer=tf.constant_initializer(init[name]))
        variables[name] = var
        c = mtf.import_tf_tensor(mesh, tf.constant(linear[name]), var.shape)
        a = mtf.import_tf_tensor(mesh, tf.constant(quadratic[name]), var.shape)
        terms.append(mtf.reduce_sum(var * c + var * var * a * 0.5))
    loss = mtf.add_n(terms)
    config = TrainConfig(**{"base_lr": TOY_BASE_LR, "num_warmup_steps": TOY_WARMUP, **config})
    global_step = tf.train.get_or_create_global_step()
    loss_scale = scale() if callable(scale) else scale
    ops = optimization.build_train_ops(loss, config, global_step, ignore_names=ignore,
                                       clip_gradients=clip, clip_norm=clip_norm,
                                       loss_scale=loss_scale)
    impl = mtf.placement_mesh_impl.PlacementMeshImpl(shape=[], layout={}, devices=[""])
    lowering = mtf.Lowering(graph, {mesh: impl})
    update = tf.group([lowering.lowered_operation(op) for op in ops.update_ops])
    if ops.finite is not None:
        finite = lowering.export_to_tf_tensor(ops.finite)
        with tf.control_dependencies([update]):
            update = tf.group(update, loss_scale.update(finite))
    with tf.control_dependencies([update]):
        train_op = tf.assign_add(global_step, 1)
    export = lowering.export_to_tf_tensor
    tf_vars = {n: export(v) for n, v in variables.items()}
    slot_vars = {v.name: v for v in graph.all_variables}
    tf_slots = {n: tuple(export(slot_vars[n + s].outputs[0])
                         for s in optimization.ADAM_SLOT_SUFFIXES)
                for n in variables if n + optimization.ADAM_SLOT_SUFFIXES[0] in slot_vars}
    norm = export(ops.grad_norm)
    result = {"names": [v.name for v in tf.global_variables()], "lrs": []}
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        sess.run(lowering.copy_masters_to_slices())
        result["before"] = sess.run(tf_vars)
        result["grad_norm"] = sess.run(norm)
        for _ in range(steps):
            result["lrs"].append(float(sess.run(ops.learning_rate)))
            sess.run(train_op)
        result["after"], result["slots"] = sess.run([tf_vars, tf_slots])
        if ops.finite is not None:
            result["scale"], result["good_steps"] = sess.run([loss_scale.scale,
                                                              loss_scale.good_steps])
    return result


def _golden(steps=TOY_STEPS, coefficient_scale=1.0, **kwargs):
    init, linear, quadratic = _toy_problem(coefficient_scale)
    return published_training(init, lambda n, p: linear[n] + quadratic[n] * p, steps,
                              TOY_BASE_LR, TOY_WARMUP, **kwargs)


def _assert_matches(result, golden, names=TOY_VARIABLES):
    params, slots, lrs = golden
    np.testing.assert_allclose(result["lrs"], lrs, rtol=1e-6, atol=1e-9)
    for name in names:
        np.testing.assert_allclose(result["after"][name], params[name], rtol=2e-5, atol=2e-6,
                                   err_msg=name)
        for ours, expected in zip(result["slots"][name], slots[name]):
            np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# defaults = published


def test_defaults_are_the_published_ones():
    config = TrainConfig()
    assert config.weight_decay == 0.01 and not config.adam_bias_correction
    assert config.no_decay_pattern == "LayerNorm|layer_norm|bias" and not config.warmup_from_one
    assert optimization.CLIP_NORM == 0.01 and optimization.MIXED_PRECISION_LOSS_SCALE == 512
    assert (optimization.ADAM_BETA1, optimization.ADAM_BETA2, optimization.ADAM_EPSILON) == (
        0.9, 0.999, 1e-8)


def test_published_steps_match_the_numpy_golden():
    """Default settings for 6 steps: lr 0 at step 0, no bias correction, decay 0.01 of every
    variable but `.../bias` (LayerNorm g/b and wob too), inverse-square-root decay at step 5."""
    result = _train_toy(TOY_STEPS)
    golden = _golden()
    assert golden[2][:3] == [0.0, 0.25, 0.5] and golden[2][5] == pytest.approx(5 ** -0.5)
    _assert_matches(result, golden)
    # first step: learning rate 0 -> nothing moved although Adam's moments did
    first = _train_toy(1)
    for name in TOY_VARIABLES:
        np.testing.assert_array_equal(first["after"][name], first["before"][name])
        assert np.all(first["slots"][name][0] != 0), name


def test_published_clipping_with_the_fixed_float16_scale():
    """--clip_gradients --use_mixed_precision: the gradients of loss * 2^9 are clipped to 0.01
    and then divided by 2^9 (the true gradients end at norm 0.01 / 512)."""
    result = _train_toy(4, clip=True, scale=optimization.MIXED_PRECISION_LOSS_SCALE)
    _assert_matches(result, _golden(4, clip_norm=0.01, grad_scale=512.0))
    unscaled = _train_toy(4, clip=True)
    _assert_matches(unscaled, _golden(4, clip_norm=0.01))
    assert result["grad_norm"] == pytest.approx(unscaled["grad_norm"], rel=1e-6)  # true norm
    assert not np.allclose(result["after"]["model/wte"], unscaled["after"]["model/wte"])


def test_opt_in_improvements_match_the_numpy_golden():
    norm_and_bias = optimization.NORM_AND_BIAS_NO_DECAY_PATTERN
    result = _train_toy(TOY_STEPS, clip=True, clip_norm=1.0, adam_bias_correction=True,
                        warmup_from_one=True, no_decay_pattern=norm_and_bias, weight_decay=0.1)
    golden = _golden(clip_norm=1.0, bias_correction=True, warmup_from_one=True,
                     exclude=[norm_and_bias], weight_decay=0.1)
    assert golden[2][:2] == [0.25, 0.5]
    _assert_matches(result, golden)
    # the dynamic scale clips the true gradients at clip_norm (here it stays at 2^10)
    dynamic = _train_toy(3, clip=True, scale=lambda: optimization.DynamicLossScale(2.0 ** 10))
    _assert_matches(dynamic, _golden(3, clip_norm=0.01))


def test_weight_decay_name_rules():
    from gptsan.config import ModelConfig
    from gptsan.variables import variable_shapes

    names = list(variable_shapes(ModelConfig(
        num_contexts=8, num_switch_layers=1, num_ext_layers=1, num_hidden=8, num_header=2,
        num_experts=2, num_spout=4, num_vocabulary=16)))
    skipped = sorted(n for n in names if not optimization.uses_weight_decay(n))
    assert skipped == ["model/dense_1/bias", "model/mlp1/p1/bias", "model/mlp1/p2/bias"]
    pattern = optimization.NORM_AND_BIAS_NO_DECAY_PATTERN
    skipped = {n for n in names if not optimization.uses_weight_decay(n, pattern)}
    assert skipped == {n for n in names if n.endswith("bias") or n == "model/wob"
                       or re.search(r"/(an|ln)\d+/[gb]$", n)}
    for name in ("model/wte", "model/wpe", "model/ete", "model/att0/qkv/kernel",
                 "model/moe0/wi/kernel", "model/moe0/switch_gating/kernel", "pasts/mlp3/kernel",
                 "model/dense/kernel"):
        assert optimization.uses_weight_decay(name, pattern), name
    assert not optimization.uses_weight_decay("model/ln12/b:0", pattern)


def test_learning_rate_schedule_values():
    step = tf.placeholder(tf.int64, [])
    published = optimization.learning_rate_schedule(step, base_lr=0.01, num_warmup_steps=10)
    from_one = optimization.learning_rate_schedule(step, 0.01, 10, warmup_from_one=True)
    steps = (0, 4, 9, 10, 5000, 40000)
    with tf.Session() as sess:
        values = [sess.run([published, from_one], {step: s}) for s in steps]
    for s, (ours, ours_from_one) in zip(steps, values):
        assert ours == pytest.approx(published_learning_rate(s, 0.01, 10), abs=1e-9), s
        assert ours_from_one == pytest.approx(published_learning_rate(s, 0.01, 10, True)), s
    assert values[0] == [0.0, pytest.approx(0.001)] and values[2][1] == pytest.approx(0.01)
    assert values[4][0] == pytest.approx(0.01)  # constant until 1 / base_lr**2 = 10000
    assert values[5][0] == pytest.approx(1 / 200.0)  # then 1 / sqrt(step)


# ---------------------------------------------------------------------------------------------
# loss scaling, freezing, adafactor


def test_fixed_loss_scale_does_not_change_the_update():
    plain = _train_toy(2)
    scaled = _train_toy(2, scale=optimization.MIXED_PRECISION_LOSS_SCALE)
    for name in TOY_VARIABLES:
        np.testing.assert_allclose(plain["after"][name], scaled["after"][name], rtol=1e-6)


def test_dynamic_loss_scale_applies_finite_steps_and_grows():
    plain = _train_toy(2)
    scaled = _train_toy(2, scale=lambda: optimization.DynamicLossScale(2.0 ** 10, 3))
    for name in TOY_VARIABLES:
        np.testing.assert_allclose(plain["after"][name], scaled["after"][name], rtol=1e-6)
    assert scaled["scale"] == 2.0 ** 10 and scaled["good_steps"] == 2  # 2 of 3 finite steps
    grown = _train_toy(2, scale=lambda: optimization.DynamicLossScale(2.0 ** 10, 2))
    assert grown["scale"] == 2.0 ** 11 and grown["good_steps"] == 0


def test_dynamic_loss_scale_skips_an_overflowing_step():
    """Gradients of 1e30 scaled by 2^40 overflow float32 (as fp16 ones overflow at 65504):
    nothing moves and the scale halves, where a fixed scale writes inf/NaN into the weights."""
    result = _train_toy(2, coefficient_scale=1e30,
                        scale=lambda: optimization.DynamicLossScale(2.0 ** 40))
    for name in TOY_VARIABLES:
        np.testing.assert_array_equal(result["before"][name], result["after"][name], name)
        assert not result["slots"][name][0].any()
    assert result["scale"] == 2.0 ** 38 and result["good_steps"] == 0
    fixed = _train_toy(2, coefficient_scale=1e30, scale=2.0 ** 40)
    assert not np.isfinite(fixed["after"]["model/wte"]).all()
    with pytest.raises(GPTSANError, match="needs --optimizer adam"):
        _train_toy(optimizer="adafactor", scale=optimization.DynamicLossScale)


def test_frozen_variables_get_no_update_and_no_slots():
    frozen = ["model/wte", "model/ln0/g"]
    result = _train_toy(2, ignore=frozen)
    for name in TOY_VARIABLES:
        moved = not np.array_equal(result["before"][name], result["after"][name])
        assert moved == (name not in frozen), name
    for name in frozen:
        assert not [n for n in result["names"] if n.startswith(name + "/")], result["names"]
    _assert_matches(result, _golden(2), [n for n in TOY_VARIABLES if n not in frozen])


def test_adafactor_freezes_and_updates():
    result = _train_toy(2, optimizer="adafactor", ignore=["pasts/out/kernel"])
    assert np.array_equal(result["before"]["pasts/out/kernel"], result["after"]["pasts/out/kernel"])
    assert not np.array_equal(result["before"]["model/wte"], result["after"]["model/wte"])
    assert not [n for n in result["names"] if n.startswith("pasts/out/kernel_slot")]


def test_clipping_reports_the_norm_before_clipping():
    result = _train_toy(1, clip=True)
    init, linear, quadratic = _toy_problem()
    expected = np.sqrt(sum(float(np.sum((linear[n] + quadratic[n] * init[n]) ** 2))
                           for n in TOY_VARIABLES))
    assert result["grad_norm"] == pytest.approx(expected, rel=1e-5)
    g = [mtf.constant(mtf.Mesh(mtf.Graph(), "m"), 3.0, mtf.Shape([mtf.Dimension("a", 4)]))]
    clipped, _ = optimization.clip_by_global_norm(g, optimization.CLIP_NORM)
    assert clipped[0].shape == g[0].shape


def test_unknown_ignore_names_are_a_user_error(tmp_path):
    with pytest.raises(GPTSANError, match="model/nope"):
        _train_toy(ignore=["model/nope"])
    path = tmp_path / "ignore.json"
    path.write_text('{"not": "a list"}')
    with pytest.raises(GPTSANError, match="JSON list"):
        optimization.load_ignore_parameters(str(path))
    path.write_text('["model/wte:0", "model/ln0/g"]')
    assert optimization.load_ignore_parameters(str(path)) == ["model/wte", "model/ln0/g"]
