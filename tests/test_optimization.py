"""Optimizer name rules, AdamW arithmetic, clipping and freezing on a toy mtf graph."""
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


def test_weight_decay_name_rules():
    for name in ("model/ln0/g", "model/an3/b", "model/ln12/b:0", "model/mlp2/p1/bias",
                 "model/dense_1/bias", "model/wob"):
        assert not optimization.uses_weight_decay(name), name
    for name in ("model/wte", "model/wpe", "model/att0/qkv/kernel", "model/moe1/wi/kernel",
                 "model/moe0/switch_gating/kernel", "pasts/mlp3/kernel", "model/dense/kernel",
                 "model/ete"):
        assert optimization.uses_weight_decay(name), name


def test_learning_rate_schedule_values():
    step = tf.placeholder(tf.int64, [])
    lr = optimization.learning_rate_schedule(step, base_lr=0.01, num_warmup_steps=10)
    with tf.Session() as sess:
        values = {s: sess.run(lr, {step: s}) for s in (0, 4, 9, 10, 5000, 40000)}
    assert values[0] == pytest.approx(0.001) and values[4] == pytest.approx(0.005)
    assert values[9] == pytest.approx(0.01) and values[10] == pytest.approx(0.01)
    assert values[5000] == pytest.approx(0.01)  # constant until 1 / base_lr**2 = 10000
    assert values[40000] == pytest.approx(1 / 200.0)  # then 1 / sqrt(step)


def _toy_step(tmp_path, optimizer="adam", ignore=(), clip=False, weight_decay=0.1, scale=1.0,
              extra=None, coefficient_scale=1.0):
    """One optimizer step on loss = sum_v sum(v * c_v); returns (before, after, grads, names).

    `scale` may be a function making a DynamicLossScale in the new graph; then `extra` (a
    dict) receives the loss scale, good-step count, Adam slots and `finite` after the step.
    """
    tf.reset_default_graph()
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "mesh")
    rng = np.random.RandomState(0)
    coefficients, variables = {}, {}
    for name, shape in TOY_VARIABLES.items():
        dims = [mtf.Dimension(f"{name.replace('/', '_')}_{k}", n) for k, n in enumerate(shape)]
        scope, leaf = name.rsplit("/", 1)
        with tf.variable_scope(scope):
            variables[name] = mtf.get_variable(
                mesh, leaf, mtf.Shape(dims),
                initializer=tf.constant_initializer(rng.randn(*shape).astype(np.float32)))
        coefficients[name] = (rng.randn(*shape) * coefficient_scale).astype(np.float32)
    loss = mtf.add_n([mtf.reduce_sum(v * mtf.import_tf_tensor(mesh, tf.constant(coefficients[n]),
                                                              v.shape))
                      for n, v in variables.items()])
    config = TrainConfig(base_lr=0.01, num_warmup_steps=0, optimizer=optimizer,
                         weight_decay=weight_decay)
    global_step = tf.train.get_or_create_global_step()
    loss_scale = scale() if callable(scale) else scale
    ops = optimization.build_train_ops(loss, config, global_step, ignore_names=ignore,
                                       clip_gradients=clip, loss_scale=loss_scale)
    impl = mtf.placement_mesh_impl.PlacementMeshImpl(shape=[], layout={}, devices=[""])
    lowering = mtf.Lowering(graph, {mesh: impl})
    train_op = tf.group([lowering.lowered_operation(op) for op in ops.update_ops])
    if ops.finite is not None:
        finite = lowering.export_to_tf_tensor(ops.finite)
        with tf.control_dependencies([train_op]):
            train_op = tf.group(train_op, loss_scale.update(finite))
        slot = [v for v in tf.global_variables() if v.name == "model/wte/adam_m:0"][0]
    tf_vars = {n: lowering.export_to_tf_tensor(v) for n, v in variables.items()}
    norm = lowering.export_to_tf_tensor(ops.grad_norm)
    names = [v.name for v in tf.global_variables()]
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        sess.run(lowering.copy_masters_to_slices())
        before = sess.run(tf_vars)
        grad_norm = sess.run(norm)
        sess.run(train_op)
        after = sess.run(tf_vars)
        if extra is not None:
            extra.update(zip(("scale", "good_steps", "adam_m"),
                             sess.run([loss_scale.scale, loss_scale.good_steps, slot])))
    return before, after, coefficients, names, grad_norm


def test_adamw_step_matches_numpy_and_skips_decay_by_name(tmp_path):
    before, after, grads, names, _ = _toy_step(tmp_path)
    lr, wd = 0.01, 0.1
    for name in TOY_VARIABLES:
        # step 1 with bias correction: m_hat = g, v_hat = g^2 -> update = g / (|g| + eps)
        g = grads[name]
        update = g / (np.abs(g) + optimization.ADAM_EPSILON)
        if optimization.uses_weight_decay(name):
            update = update + wd * before[name]
        np.testing.assert_allclose(after[name], before[name] - lr * update, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    # LayerNorm g/b really are NOT decayed: their step is exactly lr * sign(g)
    for name in ("model/ln0/g", "model/an1/b", "model/wob", "model/mlp2/p1/bias"):
        np.testing.assert_allclose(before[name] - after[name], lr * np.sign(grads[name]),
                                   atol=1e-6)  # decay would add 1e-3 * |w| ~ 1e-3
    assert "model/wte/adam_m:0" in names and "model/wte/adam_v:0" in names


def test_loss_scale_does_not_change_the_update(tmp_path):
    _, plain, *_ = _toy_step(tmp_path, weight_decay=0.0)
    _, scaled, *_ = _toy_step(tmp_path, weight_decay=0.0,
                              scale=optimization.MIXED_PRECISION_LOSS_SCALE)
    for name in TOY_VARIABLES:
        np.testing.assert_allclose(plain[name], scaled[name], rtol=1e-6)


def test_dynamic_loss_scale_applies_finite_steps_and_grows():
    _, plain, *_ = _toy_step(None, weight_decay=0.0)
    state = {}
    _, scaled, *_ = _toy_step(None, weight_decay=0.0, extra=state,
                              scale=lambda: optimization.DynamicLossScale(2.0 ** 10, 2))
    for name in TOY_VARIABLES:
        np.testing.assert_allclose(plain[name], scaled[name], rtol=1e-6)
    assert state["scale"] == 2.0 ** 10 and state["good_steps"] == 1  # 1 of 2 finite steps
    _toy_step(None, extra=state, scale=lambda: optimization.DynamicLossScale(2.0 ** 10, 1))
    assert state["scale"] == 2.0 ** 11 and state["good_steps"] == 0  # grown


def test_dynamic_loss_scale_skips_an_overflowing_step():
    """Gradients of 1e30 scaled by 2^40 overflow float32 (as fp16 ones overflow at 65504):
    nothing moves and the scale halves, where a fixed scale writes inf/NaN into the weights."""
    state = {}
    before, after, *_ = _toy_step(None, extra=state, coefficient_scale=1e30,
                                  scale=lambda: optimization.DynamicLossScale(2.0 ** 40))
    for name in TOY_VARIABLES:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    assert not state["adam_m"].any()
    assert state["scale"] == 2.0 ** 39 and state["good_steps"] == 0
    _, fixed, *_ = _toy_step(None, coefficient_scale=1e30, scale=2.0 ** 40)
    assert not np.isfinite(fixed["model/wte"]).all()
    with pytest.raises(GPTSANError, match="needs --optimizer adam"):
        _toy_step(None, optimizer="adafactor", scale=optimization.DynamicLossScale)


def test_frozen_variables_get_no_update_and_no_slots(tmp_path):
    frozen = ["model/wte", "model/ln0/g"]
    before, after, _, names, _ = _toy_step(tmp_path, ignore=frozen)
    for name in TOY_VARIABLES:
        moved = not np.array_equal(before[name], after[name])
        assert moved == (name not in frozen), name
    for name in frozen:
        assert not [n for n in names if n.startswith(name + "/")], names


def test_adafactor_freezes_and_updates(tmp_path):
    before, after, _, names, _ = _toy_step(tmp_path, optimizer="adafactor",
                                           ignore=["pasts/out/kernel"])
    assert np.array_equal(before["pasts/out/kernel"], after["pasts/out/kernel"])
    assert not np.array_equal(before["model/wte"], after["model/wte"])
    assert not [n for n in names if n.startswith("pasts/out/kernel_slot")]


def test_clipping_bounds_the_global_norm(tmp_path):
    _, _, grads, _, norm = _toy_step(tmp_path, clip=True)
    expected = np.sqrt(sum(float(np.sum(g ** 2)) for g in grads.values()))
    assert norm == pytest.approx(expected, rel=1e-5)
    g = [mtf.constant(mtf.Mesh(mtf.Graph(), "m"), 3.0, mtf.Shape([mtf.Dimension("a", 4)]))]
    clipped, _ = optimization.clip_by_global_norm(g, optimization.CLIP_NORM)
    assert clipped[0].shape == g[0].shape


def test_unknown_ignore_names_are_a_user_error(tmp_path):
    with pytest.raises(GPTSANError, match="model/nope"):
        _toy_step(tmp_path, ignore=["model/nope"])
    path = tmp_path / "ignore.json"
    path.write_text('{"not": "a list"}')
    with pytest.raises(GPTSANError, match="JSON list"):
        optimization.load_ignore_parameters(str(path))
    path.write_text('["model/wte:0", "model/ln0/g"]')
    assert optimization.load_ignore_parameters(str(path)) == ["model/wte", "model/ln0/g"]
