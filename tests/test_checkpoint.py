"""Checkpoint conversion (GPTSAN TF <-> HF transformers) and adding extra layers."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import build_graph_variables
from gptsan import checkpoint as ck
from gptsan import extra_layers, hf_format
from gptsan.compat import tf
from gptsan.config import GPTSANConfig, ModelConfig
from gptsan.errors import GPTSANError
from gptsan.variables import SHAPE_FIELDS, variable_shapes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "scripts", "convert_checkpoint.py")
ADD_LAYERS = os.path.join(ROOT, "scripts", "add_layers.py")

# The tiny HF model of the brief: d 32, 4 heads (hd 8), 4 experts, 2 switch + 1 extra layer.
HF_KWARGS = dict(vocab_size=128, d_model=32, num_heads=4, num_experts=4, num_switch_layers=2,
                 num_ext_layers=1, d_ff=64, d_ext=48, max_position_embeddings=32, d_spout=16)
D, H, HD, E, FF, EXT, CTX, V, SP, L = 32, 4, 8, 4, 64, 48, 32, 128, 16, 3

# docs/ARCHITECTURE.md "Checkpoint names" written out by hand for the tiny model (independent of
# gptsan.variables).
DOCUMENTED_SHAPES = {"model/wte": (V, D), "model/wpe": (CTX, D), "model/ete": (CTX, D),
                 "model/dense/kernel": (D, D), "model/dense_1/bias": (D,), "model/wob": (V,),
                 "pasts/out/kernel": (SP, L * 2 * D)}
for _i in range(L):
    DOCUMENTED_SHAPES.update({f"model/att{_i}/qkv/kernel": (D, 3, H, HD),
                          f"model/att{_i}/o/kernel": (H, HD, D),
                          f"model/an{_i}/g": (D,), f"model/an{_i}/b": (D,),
                          f"model/ln{_i}/g": (D,), f"model/ln{_i}/b": (D,)})
for _i in range(2):
    DOCUMENTED_SHAPES.update({f"model/moe{_i}/switch_gating/kernel": (D, E),
                          f"model/moe{_i}/softmlp/kernel": (D, D),
                          f"model/moe{_i}/wi/kernel": (E, D, FF),
                          f"model/moe{_i}/wo/kernel": (E, FF, D)})
DOCUMENTED_SHAPES.update({"model/mlp2/p1/kernel": (D, EXT), "model/mlp2/p1/bias": (EXT,),
                      "model/mlp2/p2/kernel": (EXT, D), "model/mlp2/p2/bias": (D,)})
for _n in range(8):
    DOCUMENTED_SHAPES[f"pasts/mlp{_n}/kernel"] = (SP, SP)


def _hf_model(seed=0, **overrides):
    """A tiny HF GPTSAN with every weight random (default init leaves LN/bias constants)."""
    torch.manual_seed(seed)
    config = transformers.GPTSanJapaneseConfig(**{**HF_KWARGS, **overrides})
    model = transformers.GPTSanJapaneseForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
        model.final_logits_bias.normal_()
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    model = _hf_model()
    model.save_pretrained(str(path), safe_serialization=True)
    (path / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(V)), encoding="utf-8")
    (path / "emoji.json").write_text(json.dumps({"emoji": {}, "emoji_inv": {}}), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def model_dir(hf_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tf") / "model")
    hf_format.convert_hf_to_gptsan(hf_dir, path)
    return path


def _run(script, *args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_hf_to_gptsan_names_shapes_and_values(hf_dir, model_dir):
    assert sorted(os.listdir(model_dir)) == sorted([
        "checkpoint", "model.ckpt-0.index", "model.ckpt-0.data-00000-of-00001",
        "parameters.json", "vocab.txt", "emoji.json"])  # the HF names: not the published 36k
    record = GPTSANConfig.from_json_file(model_dir).vocabulary
    assert (record.vocab_file, record.emoji_file) == ("vocab.txt", "emoji.json")
    variables = ck.read_tf_checkpoint(model_dir)
    assert {n: v.shape for n, v in variables.items()} == DOCUMENTED_SHAPES
    assert all(v.dtype == np.float32 for v in variables.values())
    reader = tf.train.load_checkpoint(model_dir)
    assert reader.get_tensor("global_step") == 0

    hf = safetensors_numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    block = "model.blocks.{}.self_attn.self_attn.{}_proj.weight"
    same = {  # TF name -> (HF name, TF -> HF transform)
        "model/wte": ("model.embed_tokens.weight", lambda a: a),
        "model/wob": ("final_logits_bias", lambda a: a[None]),
        "model/dense/kernel": ("model.last_project.weight", np.transpose),
        "model/ete": ("model.extra_position_embeddings.weight", lambda a: a),
        "model/mlp2/p1/bias": ("model.blocks.2.feed_forward.mlp.wi.bias", lambda a: a),
        "model/an2/g": ("model.blocks.2.self_attn.norm.weight", lambda a: a),
        "model/ln0/b": ("model.blocks.0.feed_forward.norm.bias", lambda a: a),
        "pasts/mlp3/kernel": ("model.spout.6.weight", np.transpose),
        "pasts/out/kernel": ("model.spout.16.weight", np.transpose),
    }
    for tf_name, (hf_name, to_hf) in same.items():
        np.testing.assert_array_equal(to_hf(variables[tf_name]), hf[hf_name], err_msg=tf_name)
    for j, proj in enumerate("qkv"):  # heads-major: x . kernel[:, j] == proj(x)
        x = np.random.default_rng(j).standard_normal(D).astype(np.float32)
        ours = np.einsum("d,dhk->hk", x, variables["model/att1/qkv/kernel"][:, j]).reshape(-1)
        np.testing.assert_allclose(ours, hf[block.format(1, proj)] @ x, rtol=1e-5, atol=1e-5)
    a = np.random.default_rng(9).standard_normal((H, HD)).astype(np.float32)
    np.testing.assert_allclose(np.einsum("hk,hkd->d", a, variables["model/att0/o/kernel"]),
                               hf[block.format(0, "out")] @ a.reshape(-1), rtol=1e-5, atol=1e-5)
    for e in range(E):
        np.testing.assert_array_equal(
            variables["model/moe1/wo/kernel"][e].T,
            hf[f"model.blocks.1.feed_forward.mlp.experts.expert_{e}.wo.weight"])

    params = json.load(open(os.path.join(model_dir, "parameters.json")))["model_params"]
    assert {k: params[k] for k in ("num_contexts", "num_switch_layers", "num_ext_layers",
                                   "num_hidden", "num_header", "num_experts", "num_spout",
                                   "num_vocabulary", "num_moe_hidden", "num_ext_hidden")} == dict(
        num_contexts=CTX, num_switch_layers=2, num_ext_layers=1, num_hidden=D, num_header=H,
        num_experts=E, num_spout=SP, num_vocabulary=V, num_moe_hidden=FF, num_ext_hidden=EXT)


def test_hf_gptsan_hf_round_trip_is_bit_exact_and_loads(hf_dir, model_dir, tmp_path):
    out = str(tmp_path / "hf2")
    hf_format.convert_gptsan_to_hf(model_dir, out)
    before = safetensors_numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    after = safetensors_numpy.load_file(os.path.join(out, "model.safetensors"))
    assert set(before) == set(after)
    for name in before:
        assert before[name].dtype == after[name].dtype
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    with open(os.path.join(out, "vocab.txt")) as ours:
        assert ours.read() == "\n".join(f"t{i}" for i in range(V))

    model, info = transformers.GPTSanJapaneseForConditionalGeneration.from_pretrained(
        out, output_loading_info=True)
    assert not any(info.values()), info
    reference = _hf_model().eval()
    ids = torch.tensor([[3, 7, 1, 100]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_gptsan_hf_gptsan_round_trip_is_bit_exact(tmp_path):
    model = ModelConfig(num_contexts=16, num_switch_layers=1, num_ext_layers=2, num_hidden=24,
                        num_header=3, num_experts=2, num_spout=8, num_vocabulary=40,
                        num_moe_hidden=20, num_ext_hidden=36, train_mode="hybrid")
    rng = np.random.default_rng(0)
    variables = {n: rng.standard_normal(s).astype(np.float32)
                 for n, s in variable_shapes(model).items()}
    ck.write_tf_checkpoint(str(tmp_path / "a"), variables, model, step=7)
    assert ck.find_checkpoint(str(tmp_path / "a")).endswith("model.ckpt-7")
    hf_format.convert_gptsan_to_hf(str(tmp_path / "a"), str(tmp_path / "hf"))
    hf_config = transformers.GPTSanJapaneseConfig.from_pretrained(str(tmp_path / "hf"))
    assert (hf_config.num_heads, hf_config.d_ext, hf_config.num_layers) == (3, 36, 3)
    hf_format.convert_hf_to_gptsan(str(tmp_path / "hf"), str(tmp_path / "b"))
    back = ck.read_tf_checkpoint(str(tmp_path / "b"))
    assert set(back) == set(variables)
    for name, value in variables.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    restored = GPTSANConfig.from_json_file(str(tmp_path / "b")).model
    assert {f: getattr(restored, f) for f in SHAPE_FIELDS} == \
        {f: getattr(model, f) for f in SHAPE_FIELDS}


def test_published_style_checkpoint_with_optimizer_slots(model_dir, tmp_path):
    """A bare original checkpoint: no parameters.json, Adam slots and global_step mixed in."""
    variables = ck.read_tf_checkpoint(model_dir)
    graph = tf.Graph()
    with graph.as_default():
        saveables = {}
        for name, value in variables.items():
            saveables[name] = tf.Variable(value, name=name)
            saveables[name + "/adam_m"] = tf.Variable(np.zeros_like(value), name=name + "/adam_m")
        saveables["pasts/out/kernel/slot_v"] = tf.Variable(np.ones(3, np.float32), name="slot")
        saveables["global_step"] = tf.Variable(np.int64(1234), name="global_step")
        saver = tf.train.Saver(saveables)
        with tf.Session(graph=graph) as sess:
            sess.run(tf.global_variables_initializer())
            os.makedirs(tmp_path / "orig")
            saver.save(sess, str(tmp_path / "orig" / "model"), write_meta_graph=False)
    os.remove(tmp_path / "orig" / "checkpoint")  # no index file: found by its .index
    read, config = ck.read_model_dir(str(tmp_path / "orig"))
    assert set(read) == set(variables)
    model = config.model
    assert (model.num_header, model.num_moe_hidden, model.num_ext_hidden) == (H, FF, EXT)
    hf_format.convert_gptsan_to_hf(str(tmp_path / "orig"), str(tmp_path / "hf"))
    assert os.path.exists(tmp_path / "hf" / "model.safetensors")


def test_inconsistent_configs_are_reported(hf_dir, model_dir, tmp_path):
    bad_hf = tmp_path / "bad_hf"
    bad_hf.mkdir()
    os.link(os.path.join(hf_dir, "model.safetensors"), bad_hf / "model.safetensors")
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    (bad_hf / "config.json").write_text(json.dumps({**config, "d_ff": 100}))
    with pytest.raises(GPTSANError, match="d_ff=100.*num_moe_hidden=64"):
        hf_format.convert_hf_to_gptsan(str(bad_hf), str(tmp_path / "out"))
    (bad_hf / "config.json").write_text(json.dumps({**config, "num_heads": 5}))
    with pytest.raises(GPTSANError, match="num_heads=5"):
        hf_format.convert_hf_to_gptsan(str(bad_hf), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")

    bad_tf = tmp_path / "bad_tf"
    bad_tf.mkdir()
    for name in os.listdir(model_dir):
        os.link(os.path.join(model_dir, name), bad_tf / name)
    params = json.load(open(os.path.join(model_dir, "parameters.json")))
    params["model_params"]["num_hidden"] = 64
    os.remove(bad_tf / "parameters.json")
    (bad_tf / "parameters.json").write_text(json.dumps(params))
    with pytest.raises(GPTSANError, match="num_hidden=64.*num_hidden=32"):
        ck.read_model_dir(str(bad_tf))

    with pytest.raises(GPTSANError, match="has 3 entries but the model expects num_vocabulary=128"):
        (tmp_path / "v.txt").write_text("a\nb\nc")
        hf_format.convert_hf_to_gptsan(hf_dir, str(tmp_path / "out"), vocab=str(tmp_path / "v.txt"))
    assert sorted(os.listdir(tmp_path)) == ["bad_hf", "bad_tf", "v.txt"]


def test_hf_misspelled_spout_and_tied_head_are_accepted():
    state = {k: v.numpy() for k, v in _hf_model().state_dict().items()}
    renamed = {k.replace("model.spout.", "model.sqout."): v for k, v in state.items()}
    tf_vars, model = hf_format.hf_to_tf_variables(renamed, num_heads=H)
    assert model.num_spout == SP and "pasts/out/kernel" in tf_vars
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(GPTSANError, match="lm_head.weight differs"):
        hf_format.hf_to_tf_variables(state, num_heads=H)


def test_write_is_atomic_and_refuses_existing_dirs(model_dir, tmp_path):
    variables, config = ck.read_model_dir(model_dir)
    target = tmp_path / "dst"
    with pytest.raises(FileNotFoundError):
        ck.write_tf_checkpoint(str(target), variables, config, files={"x": "/nonexistent/file"})
    assert os.listdir(tmp_path) == []  # no partial or temp directory left
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(GPTSANError, match="not empty"):
        ck.write_tf_checkpoint(str(target), variables, config)
    ck.write_tf_checkpoint(str(target), variables, config, force=True)
    assert "keep" not in os.listdir(target) and sorted(os.listdir(tmp_path)) == ["dst"]
    bad = dict(variables, **{"model/wob": np.zeros(3, np.float32)})
    with pytest.raises(GPTSANError, match=r"model/wob has shape \[3\] but the model expects "
                                          r"\[128\]"):
        ck.write_tf_checkpoint(str(tmp_path / "other"), bad, config)


def test_cli_bad_input_exits_2_and_writes_nothing(model_dir, tmp_path):
    result = _run(CONVERT, "--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "not found" in result.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    result = _run(CONVERT, "--src", str(tmp_path / "junk"), "--dst", str(tmp_path / "o"))
    assert result.returncode == 2 and "neither a GPTSAN model directory" in result.stderr
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old").write_text("old")
    result = _run(CONVERT, "--src", model_dir, "--dst", str(tmp_path / "o"))
    assert result.returncode == 2 and "--force" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path / "o") == ["old"]
    result = _run(ADD_LAYERS, "--src", model_dir, "--dst", str(tmp_path / "o"),
                  "--add_extra_stage", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["junk", "o"]


NEW_LAYER_LEAVES = [("att", "qkv/kernel"), ("att", "o/kernel"), ("an", "g"), ("an", "b"),
                    ("ln", "g"), ("ln", "b"), ("mlp", "p1/kernel"), ("mlp", "p1/bias"),
                    ("mlp", "p2/kernel"), ("mlp", "p2/bias")]


def test_add_layers_project_alternatives(model_dir, tmp_path):
    """--init fan_in --spout_out extend --frozen existing: the project's own choices."""
    dst = tmp_path / "bigger"
    result = _run(ADD_LAYERS, "--src", model_dir, "--dst", str(dst), "--add_extra_stage", "2",
                  "--init", "fan_in", "--spout_out", "extend", "--frozen", "existing")
    assert result.returncode == 0, result.stderr
    old = ck.read_tf_checkpoint(model_dir)
    new = ck.read_tf_checkpoint(str(dst))
    for name, value in old.items():
        if name != "pasts/out/kernel":
            np.testing.assert_array_equal(new[name], value, err_msg=name)
    added = set(new) - set(old)
    assert added == {f"model/{part}{i}/{leaf}" for i in (3, 4) for part, leaf in NEW_LAYER_LEAVES}
    assert new["model/mlp4/p1/kernel"].shape == (D, EXT)  # the model's extra-layer width
    np.testing.assert_array_equal(new["model/an3/g"], np.ones(D))
    np.testing.assert_array_equal(new["model/ln4/b"], np.zeros(D))
    np.testing.assert_array_equal(new["model/mlp3/p2/bias"], np.zeros(D))
    assert 0.8 < new["model/att4/qkv/kernel"].std() * D ** 0.5 < 1.2  # N(0, fan_in ** -0.5)
    assert 0.8 < new["model/mlp3/p2/kernel"].std() * EXT ** 0.5 < 1.2
    grown = new["pasts/out/kernel"]
    assert grown.shape == (SP, 5 * 2 * D)
    np.testing.assert_array_equal(grown[:, :L * 2 * D], old["pasts/out/kernel"])
    assert not grown[:, L * 2 * D:].any()

    config = GPTSANConfig.from_json_file(str(dst))
    assert (config.model.num_switch_layers, config.model.num_ext_layers) == (2, 3)
    frozen = json.load(open(dst / "ignore-params.json"))
    assert frozen == sorted(set(old) - {"pasts/out/kernel"})
    assert config.vocabulary == GPTSANConfig.from_json_file(model_dir).vocabulary
    assert os.path.exists(dst / "vocab.txt") and os.path.exists(dst / "emoji.json")


def test_add_layers_defaults_are_the_published_tool(model_dir, tmp_path):
    """An independent statement of what HEAD's tools/run_modelconvert.py writes for
    --add_extra_stage N, checked against our default output."""
    src = tmp_path / "src"
    shutil.copytree(model_dir, src)
    source_ignore = ["model/wte", "model/att0/qkv/kernel", "pasts/mlp0/kernel"]
    (src / "ignore-params.json").write_text(json.dumps(source_ignore))
    dst = tmp_path / "GPTSAN-finetune"
    n = 2
    result = _run(ADD_LAYERS, "--src", str(src), "--dst", str(dst), "--add_extra_stage", str(n))
    assert result.returncode == 0, result.stderr
    old = ck.read_tf_checkpoint(str(src))
    reader = tf.train.load_checkpoint(str(dst))
    stored = reader.get_variable_to_shape_map()
    new = {name: reader.get_tensor(name) for name in stored}
    # HEAD: every source variable except pasts/out/kernel is copied as is ...
    kept = sorted(set(old) - {"pasts/out/kernel"})
    for name in kept:
        np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    # ... and for each new layer l: an/ln b=0, g=1, and N(0,1)*0.02 for the four kernels AND
    # the two MLP biases, pasts/out/kernel drawn anew likewise. HEAD's MLP width is
    # 4 * num_hidden, which published models always have; ours is num_ext_hidden (EXT here).
    layers = range(L, L + n)
    expected_new = {f"model/{part}{i}/{leaf}" for i in layers for part, leaf in NEW_LAYER_LEAVES}
    expected_new.add("pasts/out/kernel")
    assert set(stored) == set(kept) | expected_new | {"global_step"}  # no optimizer slots
    assert not any(name.endswith(("/adam_m", "/adam_v")) for name in stored)
    assert new["global_step"] == 0
    randoms = {"qkv/kernel": (D, 3, H, HD), "o/kernel": (H, HD, D), "p1/kernel": (D, EXT),
               "p1/bias": (EXT,), "p2/kernel": (EXT, D), "p2/bias": (D,)}
    for i in layers:
        for norm in ("an", "ln"):
            np.testing.assert_array_equal(new[f"model/{norm}{i}/g"], np.ones(D, np.float32))
            np.testing.assert_array_equal(new[f"model/{norm}{i}/b"], np.zeros(D, np.float32))
        for leaf, shape in randoms.items():
            part = "att" if leaf.endswith("/kernel") and leaf[0] in "qo" else "mlp"
            value = new[f"model/{part}{i}/{leaf}"]
            assert value.shape == shape and value.dtype == np.float32
            assert abs(value.mean()) < 0.01 and 0.013 < value.std() < 0.027, (i, leaf)
    spout_out = new["pasts/out/kernel"]
    assert spout_out.shape == (SP, (L + n) * 2 * D)
    assert abs(spout_out.mean()) < 0.002 and 0.019 < spout_out.std() < 0.021
    assert not np.array_equal(spout_out[:, :L * 2 * D], old["pasts/out/kernel"])
    params = json.load(open(dst / "parameters.json"))
    source_params = json.load(open(src / "parameters.json"))
    assert params["model_params"] == dict(source_params["model_params"],
                                          num_ext_layers=source_params["model_params"][
                                              "num_ext_layers"] + n)
    assert params["train_params"]["output_dir"] == "GPTSAN-finetune"
    assert json.load(open(dst / "ignore-params.json")) == source_ignore  # unchanged
    assert json.load(open(dst / "transformer-params.json")) == kept
    assert sorted(json.load(open(dst / "all-params.json"))) == sorted(set(kept) | expected_new)
    # HEAD refuses a source without ignore-params.json; we point at --frozen existing
    result = _run(ADD_LAYERS, "--src", model_dir, "--dst", str(tmp_path / "x"),
                  "--add_extra_stage", "1")
    assert result.returncode == 2 and "--frozen existing" in result.stderr
    assert not os.path.exists(tmp_path / "x")


def test_names_and_shapes_agree_with_the_model_graph():
    for model in (ModelConfig(num_contexts=8, num_switch_layers=2, num_ext_layers=1, num_hidden=8,
                              num_header=2, num_experts=2, num_spout=4, num_vocabulary=10),
                  ModelConfig(num_contexts=8, num_switch_layers=0, num_ext_layers=2, num_hidden=8,
                              num_header=4, num_spout=0, num_vocabulary=10, num_ext_hidden=12)):
        assert variable_shapes(model) == {
            n: tuple(s) for n, s in build_graph_variables(model)[0].items()}


def test_add_layers_to_switch_only_model_creates_zero_ete_and_loads_in_hf(tmp_path):
    model = ModelConfig(num_contexts=16, num_switch_layers=1, num_ext_layers=0, num_hidden=16,
                        num_header=2, num_experts=2, num_spout=0, num_vocabulary=30)
    rng = np.random.default_rng(1)
    variables = {n: rng.standard_normal(s).astype(np.float32)
                 for n, s in variable_shapes(model).items()}
    new, new_model, kept, added = extra_layers.add_extra_layers(variables, model, 1, seed=3)
    assert new_model.num_ext_layers == 1 and new_model.num_ext_hidden == 4 * 16
    assert not new["model/ete"].load().any() and "pasts/out/kernel" not in new
    assert kept == sorted(variables) and "model/ete" in added
    again = extra_layers.add_extra_layers(variables, model, 1, seed=3)[0]
    np.testing.assert_array_equal(again["model/mlp1/p1/kernel"].load(),
                                  new["model/mlp1/p1/kernel"].load())
    ck.write_tf_checkpoint(str(tmp_path / "m"), new, new_model)
    hf_format.convert_gptsan_to_hf(str(tmp_path / "m"), str(tmp_path / "hf"))
    hf_model, info = transformers.GPTSanJapaneseForConditionalGeneration.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.values()) and len(hf_model.model.blocks) == 2
    with pytest.raises(GPTSANError, match="must be > 0"):
        extra_layers.add_extra_layers(variables, model, 0)


def _independent_tf(hf):
    """The TF variables of the tiny model from an HF state dict, written out with NumPy alone
    (no gptsan.checkpoint code): the non-streamed result the streaming converter must equal."""
    hf = {k: np.asarray(v, np.float32) for k, v in hf.items()}
    out = {"model/wte": hf["model.embed_tokens.weight"],
           "model/wpe": hf["model.position_embeddings.weight"],
           "model/ete": hf["model.extra_position_embeddings.weight"],
           "model/dense/kernel": hf["model.last_project.weight"].T,
           "model/dense_1/bias": hf["model.last_project.bias"],
           "model/wob": hf["final_logits_bias"][0],
           "pasts/out/kernel": hf["model.spout.16.weight"].T}
    for n in range(8):
        out[f"pasts/mlp{n}/kernel"] = hf[f"model.spout.{2 * n}.weight"].T
    for i in range(L):
        block = f"model.blocks.{i}."
        attn = block + "self_attn.self_attn."
        out[f"model/att{i}/qkv/kernel"] = np.stack(
            [hf[attn + f"{p}_proj.weight"].T for p in "qkv"], axis=1).reshape(D, 3, H, HD)
        out[f"model/att{i}/o/kernel"] = hf[attn + "out_proj.weight"].T.reshape(H, HD, D)
        for ours, theirs in (("an", "self_attn.norm"), ("ln", "feed_forward.norm")):
            out[f"model/{ours}{i}/g"] = hf[block + theirs + ".weight"]
            out[f"model/{ours}{i}/b"] = hf[block + theirs + ".bias"]
        ff = block + "feed_forward."
        if i < 2:
            out[f"model/moe{i}/switch_gating/kernel"] = hf[ff + "mlp.router.classifier.weight"].T
            out[f"model/moe{i}/softmlp/kernel"] = hf[ff + "soft_bypass_mlp.weight"].T
            for w in ("wi", "wo"):
                out[f"model/moe{i}/{w}/kernel"] = np.stack(
                    [hf[ff + f"mlp.experts.expert_{e}.{w}.weight"].T for e in range(E)])
        else:
            out[f"model/mlp{i}/p1/kernel"] = hf[ff + "mlp.wi.weight"].T
            out[f"model/mlp{i}/p1/bias"] = hf[ff + "mlp.wi.bias"]
            out[f"model/mlp{i}/p2/kernel"] = hf[ff + "mlp.wo.weight"].T
            out[f"model/mlp{i}/p2/bias"] = hf[ff + "mlp.wo.bias"]
    return out


def _stored(model_dir):
    reader = tf.train.load_checkpoint(model_dir)
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
            if n != "global_step"}


def test_streamed_conversions_equal_the_independent_result(hf_dir, tmp_path, monkeypatch):
    """float32 / float16 / bfloat16 safetensors and a sharded float16 pytorch_model.bin all
    give the independent NumPy result bit for bit (widening is exact), written in many small
    shards; --dtype float16 stores exactly its rounding; GPTSAN -> HF writes the very bytes of
    safetensors' own save_file."""
    from gptsan import tensorio

    monkeypatch.setattr(tensorio, "WRITE_GROUP_BYTES", 20_000)  # many SaveV2 groups
    hf = safetensors_numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    sources = {}
    for dtype in (np.float16, tensorio.bfloat16()):
        src = tmp_path / f"hf_{np.dtype(dtype).name}"
        src.mkdir()
        rounded = {k: v.astype(dtype) for k, v in hf.items()}
        safetensors_numpy.save_file(rounded, str(src / "model.safetensors"),
                                    metadata={"format": "pt"})
        (src / "config.json").write_text(json.dumps(config))
        sources[src] = rounded
    bin_dir = tmp_path / "hf_bin"  # two torch shards + index, as transformers writes them
    bin_dir.mkdir()
    names = sorted(hf)
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2])):
        shard = f"pytorch_model-0000{k + 1}-of-00002.bin"
        torch.save({n: torch.from_numpy(hf[n].astype(np.float16)) for n in part},
                   str(bin_dir / shard))
        weight_map.update({n: shard for n in part})
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (bin_dir / "config.json").write_text(json.dumps(config))
    sources[bin_dir] = {k: v.astype(np.float16) for k, v in hf.items()}
    sources[hf_dir] = hf
    for src, state in sources.items():
        out = str(tmp_path / (os.path.basename(str(src)) + "_tf"))
        hf_format.convert_hf_to_gptsan(str(src), out)
        assert len([f for f in os.listdir(out) if ".data-" in f]) > 5  # streamed in groups
        expected, stored = _independent_tf(state), _stored(out)
        assert set(stored) == set(expected) == set(DOCUMENTED_SHAPES)
        for name, value in expected.items():
            assert stored[name].dtype == np.float32
            np.testing.assert_array_equal(stored[name], value, err_msg=f"{src}: {name}")
    half = str(tmp_path / "tf16")
    _run(CONVERT, "--src", hf_dir, "--dst", half, "--dtype", "float16").check_returncode()
    for name, value in _independent_tf(hf).items():
        np.testing.assert_array_equal(_stored(half)[name], value.astype(np.float16), err_msg=name)
    back = tmp_path / "hf_back"
    hf_format.convert_gptsan_to_hf(str(tmp_path / (os.path.basename(hf_dir) + "_tf")), str(back))
    safetensors_numpy.save_file(hf, str(tmp_path / "reference.safetensors"),
                                metadata={"format": "pt"})
    assert (back / "model.safetensors").read_bytes() == \
        (tmp_path / "reference.safetensors").read_bytes()


def test_float16_checkpoint_loads_for_inference(hf_tiny, tmp_path):
    from gptsan.inference import Predictor

    half = str(tmp_path / "tf16")
    hf_format.convert_hf_to_gptsan(hf_tiny.hf_dir, half, dtype="float16")
    ids = [[3, 7, 1, 100, 5]]
    with Predictor(hf_tiny.model_dir) as full, Predictor(half) as narrow:
        a, b = full.forward(ids)["logits"], narrow.forward(ids)["logits"]
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # float16-rounded weights only
    assert not np.array_equal(a, b)
