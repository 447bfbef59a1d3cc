"""Mesh shapes, layout rules, dtype policy, and mesh-independence of the model."""
import os

import numpy as np
import pytest

from conftest import random_ids
from gptsan import mesh as meshlib
from gptsan.compat import mtf, session_config, tf
from gptsan.config import GPTSANConfig, ModelConfig
from gptsan.errors import GPTSANError
from gptsan.inference import Predictor
from gptsan.modeling import build_model
from gptsan.variables import MODEL_VARIABLE_PREFIXES

REL_TOL = 1e-5


@pytest.mark.parametrize("text, expected", [
    ("batch:2,model:2", [("batch", 2), ("model", 2)]),
    ("model:4", [("batch", 1), ("model", 4)]),
    (" model : 2 , batch : 1 ", [("batch", 1), ("model", 2)]),
    (None, [("batch", 1), ("model", 1)]),
])
def test_parse_mesh_shape(text, expected):
    shape = meshlib.parse_mesh_shape(text)
    assert [(d.name, d.size) for d in shape.dims] == expected


@pytest.mark.parametrize("text, message", [
    ("batch=2", "malformed mesh shape"),
    ("batch:2,model", "malformed mesh shape"),
    ("rows:2", "unknown mesh dimension 'rows'"),
    ("batch:0", "must be >= 1"),
    ("batch:2,batch:2", "given twice"),
])
def test_parse_mesh_shape_rejects(text, message):
    with pytest.raises(GPTSANError, match=message):
        meshlib.parse_mesh_shape(text)


def test_device_count_must_match():
    with pytest.raises(GPTSANError, match=r"batch:2,model:2 needs 4 devices, got 2"):
        meshlib.make_mesh_impl("batch:2,model:2", devices=["cpu:0", "cpu:1"])


def test_dtype_policy():
    policy = meshlib.dtype_policy("bfloat16")
    assert (policy.master_dtype, policy.slice_dtype, policy.activation_dtype) == (
        tf.float32, tf.float32, tf.bfloat16)
    assert meshlib.dtype_policy("float16").activation_dtype == tf.float16
    with pytest.raises(GPTSANError, match="unknown activation dtype 'int8'"):
        meshlib.dtype_policy("int8")


def test_layout_rules_split_only_divisible_dimensions():
    rules = meshlib.layout_rules()
    mesh_shape = meshlib.parse_mesh_shape("batch:2,model:4")
    layout = [rules.tensor_dimension_to_mesh_axis(mtf.Dimension(name, size), mesh_shape)
              for name, size in [("batch", 4), ("batch", 1), ("heads", 8), ("experts", 6),
                                 ("d_model", 64)]]
    assert layout == [0, None, 1, None, None]
    assert ("experts", "model") in meshlib.LAYOUT_RULES


def test_model_parallel_size_must_divide_heads(hf_tiny):
    with pytest.raises(GPTSANError, match="num_header=4 is not divisible by the model-parallel "
                                          "size 3"):
        Predictor(hf_tiny.model_dir, mesh_shape="model:3")


@pytest.fixture(scope="module")
def mesh_inputs():
    rng = np.random.default_rng(2)
    return random_ids(rng, 2, 12), np.array([3, 0], np.int32)


@pytest.mark.parametrize("mesh_shape", ["batch:2,model:2", "batch:1,model:4"])
def test_same_logits_on_every_mesh(hf_tiny, tiny_predictor, mesh_inputs, mesh_shape):
    ids, num_precontext = mesh_inputs
    reference = tiny_predictor.forward(ids, num_precontext=num_precontext)
    with Predictor(hf_tiny.model_dir, mesh_shape=mesh_shape) as predictor:
        ours = predictor.forward(ids, num_precontext=num_precontext)
        scale = np.abs(reference["logits"]).max()
        assert np.abs(ours["logits"] - reference["logits"]).max() <= REL_TOL * scale
        for mine, theirs in zip(ours["expert_index"], reference["expert_index"]):
            np.testing.assert_array_equal(mine, theirs)
        if mesh_shape == "batch:2,model:2":  # the K/V cache on a split mesh
            predictor.prefill(ids[:, :8], num_precontext=num_precontext)
            step = predictor.step(ids[:, 8])["logits"]
            assert np.abs(step - reference["logits"][:, 8]).max() <= REL_TOL * scale


def test_checkpoint_written_on_2x2_restores_on_1x1(tmp_path):
    """Train-like save on a 2x2 mesh (slices -> masters -> Saver), predict on 1x1."""
    config = ModelConfig(num_contexts=16, num_switch_layers=1, num_ext_layers=1, num_hidden=32,
                         num_header=4, num_experts=4, num_spout=8, num_vocabulary=50,
                         num_moe_hidden=32, num_ext_hidden=32)
    ids = random_ids(np.random.default_rng(0), 2, 6, vocab=50)
    model_dir = str(tmp_path / "model")
    os.makedirs(model_dir)
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(0)
        mtf_graph = mtf.Graph()
        mesh = mtf.Mesh(mtf_graph, "mesh")
        ids_dims = [mtf.Dimension(meshlib.BATCH, 2), mtf.Dimension(meshlib.LENGTH, 6)]
        output = build_model(config, mesh, mtf.import_tf_tensor(mesh, tf.constant(ids), ids_dims))
        # Change every variable on the slices only (as training does), then save masters.
        updates = [mtf.assign(var, var.outputs[0] * 1.5) for var in mtf_graph.trainable_variables]
        mesh_impl = meshlib.make_mesh_impl("batch:2,model:2")
        lowering = mtf.Lowering(mtf_graph, {mesh: mesh_impl})
        logits = lowering.export_to_tf_tensor(output.logits)
        update_op = tf.group([lowering.lowered_operation(op) for op in updates])
        masters = [v for v in tf.global_variables()
                   if v.op.name.startswith(MODEL_VARIABLE_PREFIXES)]
        saver = tf.train.Saver(masters)
        with tf.Session(graph=graph, config=session_config(4)) as session:
            session.run(tf.global_variables_initializer())
            session.run(lowering.copy_masters_to_slices())
            session.run(update_op)
            expected = session.run(logits)
            session.run(lowering.copy_slices_to_masters())
            saver.save(session, os.path.join(model_dir, "model.ckpt"), global_step=7)
    GPTSANConfig(model=config).to_json_file(os.path.join(model_dir, "parameters.json"))
    with Predictor(model_dir) as predictor:
        ours = predictor.forward(ids)["logits"]
    assert np.abs(ours - expected).max() <= REL_TOL * np.abs(expected).max()
