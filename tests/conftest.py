"""Shared fixtures for the model tests.

* `hf_tiny`: a random tiny HF `GPTSanJapaneseForConditionalGeneration` (2 Switch + 1 extra
  layer, d 32, 4 heads, 4 experts, vocab 120, 48 positions, spout 16) with every weight
  randomised (LayerNorm gains/biases too, so a dropped tensor shows), saved with
  `save_pretrained` and converted with `gptsan.hf_format.convert_hf_to_gptsan`.
  Session-scoped: built once (~2 s). Yields a `TinyModel` (HF model, HF dir, model dir).
* `tiny_predictor`: a 1x1 `Predictor` on that model dir, shared by the whole session.
* `set_logical_cpu_devices(4)` runs before any TF session so 2x2 and 1x4 meshes work.
* `require_debian_data(path, packages)`: a test that reads system data (Debian's unicode-data,
  manpages-ja) skips with a one-line reason where it is absent -- and fails instead when
  GPTSAN_REQUIRE_SYSTEM_DATA is set, as .ci/run sets it after installing the data.
"""
import dataclasses
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gptsan.compat import set_logical_cpu_devices  # noqa: E402

NUM_TEST_DEVICES = 4  # logical CPU devices for the 2x2 and 1x4 mesh tests
set_logical_cpu_devices(NUM_TEST_DEVICES)
STRICT_DATA_ENV = "GPTSAN_REQUIRE_SYSTEM_DATA"  # set by .ci/run: absent system data fails


def require_debian_data(paths, packages):
    """Skips the calling test (one-line reason) unless all `paths`, installed by the Debian
    `packages`, exist; with GPTSAN_REQUIRE_SYSTEM_DATA set the test fails instead."""
    __tracebackhide__ = True  # report the calling test, not this helper
    missing = [p for p in ([paths] if isinstance(paths, str) else paths) if not os.path.exists(p)]
    if not missing:
        return
    reason = (f"{missing[0]} is absent: needs Debian's {packages} (`make vocab-data` installs "
              "it, as root)")
    if os.environ.get(STRICT_DATA_ENV):
        pytest.fail(f"{reason}; {STRICT_DATA_ENV} is set, so this is an error")
    pytest.skip(reason)

EMBED_STD = 1.0  # random HF embeddings: large enough that routing is balanced (drop-free)
TINY_SEED = 1  # seed of the shared tiny model: its test inputs route drop-free
TINY_HF = dict(vocab_size=120, max_position_embeddings=48, d_model=32, d_ff=64, d_ext=48,
               d_spout=16, num_switch_layers=2, num_ext_layers=1, num_heads=4, num_experts=4,
               expert_capacity=1024)  # capacity large: HF drops nothing


@dataclasses.dataclass
class TinyModel:
    hf: object  # transformers GPTSanJapaneseForConditionalGeneration (eval mode, float32)
    hf_dir: str
    model_dir: str
    config: dict


def randomize_hf_weights(model, seed=0):
    """Draws every HF parameter anew (N(1, 0.2) for LayerNorm gains, N(0, s) elsewhere)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif "embed" in name or "position_embeddings" in name:
                param.copy_(EMBED_STD * torch.randn(param.shape, generator=generator))
            elif "router" in name:
                param.copy_(1.0 * torch.randn(param.shape, generator=generator))
            else:
                scale = param.shape[-1] ** -0.5 if param.dim() == 2 else 0.2
                param.copy_(scale * torch.randn(param.shape, generator=generator))
        model.final_logits_bias.copy_(0.2 * torch.randn(model.final_logits_bias.shape,
                                                        generator=generator))
    return model


def make_hf_model(directory, seed=0, edit=None, **overrides):
    """A random HF GPTSAN saved in `directory`; returns the model (eval mode).

    `edit(model)` may change weights (under no_grad) before saving.
    """
    import torch
    from transformers import GPTSanJapaneseConfig, GPTSanJapaneseForConditionalGeneration

    torch.manual_seed(seed)
    config = GPTSanJapaneseConfig(**{**TINY_HF, **overrides})
    model = GPTSanJapaneseForConditionalGeneration(config)
    randomize_hf_weights(model, seed)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def convert(hf_dir, model_dir):
    from gptsan.hf_format import convert_hf_to_gptsan

    return convert_hf_to_gptsan(hf_dir, model_dir)


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("tiny")
    hf_dir, model_dir = str(base / "hf"), str(base / "gptsan")
    model = make_hf_model(hf_dir, seed=TINY_SEED)
    convert(hf_dir, model_dir)
    return TinyModel(hf=model, hf_dir=hf_dir, model_dir=model_dir, config=dict(TINY_HF))


@pytest.fixture(scope="session")
def tiny_predictor(hf_tiny):
    from gptsan.inference import Predictor

    predictor = Predictor(hf_tiny.model_dir)
    yield predictor
    predictor.close()


def build_graph_variables(config, batch=1, length=1, spout=False):
    """Builds the mtf model graph only (nothing lowered or allocated): ({TF name: shape tuple}
    of the variables `build_model` creates, its output)."""
    from gptsan import mesh as meshlib
    from gptsan.compat import mtf, tf
    from gptsan.modeling import build_model

    graph = tf.Graph()
    with graph.as_default():
        mesh = mtf.Mesh(mtf.Graph(), "mesh")
        ids = mtf.zeros(mesh, [mtf.Dimension(meshlib.BATCH, batch),
                               mtf.Dimension(meshlib.LENGTH, length)], dtype=tf.int32)
        spout_tensor = None
        if spout:
            spout_tensor = mtf.zeros(mesh, [ids.shape.dims[0],
                                            mtf.Dimension(meshlib.SPOUT, config.num_spout)])
        output = build_model(config, mesh, ids, spout=spout_tensor)
        variables = {v.name: tuple(v.shape.to_integer_list) for v in mesh.graph.all_variables}
        masters = {v.op.name: tuple(v.shape.as_list()) for v in tf.global_variables()}
    assert variables == masters  # mtf names are the TF checkpoint names
    return variables, output


def random_ids(rng, batch, length, vocab=TINY_HF["vocab_size"]):
    return rng.integers(0, vocab, size=(batch, length)).astype(np.int32)


def run_hf(model, input_ids, **kwargs):
    """HF forward (no grad) -> (logits [b, s, V], hidden_states L+1 x [b, s, d], expert choices).

    Expert choices (argmax of each Switch router's logits, before capacity) come from forward
    hooks on the router modules (HF's `output_router_logits` crashes in 4.40.2).
    """
    import torch

    choices = []
    blocks = model.model.blocks[:model.config.num_switch_layers]
    hooks = [block.feed_forward.mlp.router.register_forward_hook(
        lambda module, args, output: choices.append(output[2].argmax(-1).numpy()))
        for block in blocks]
    tensors = {k: torch.as_tensor(v) for k, v in kwargs.items() if v is not None}
    try:
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(np.asarray(input_ids, np.int64)),
                        output_hidden_states=True, **tensors)
    finally:
        for hook in hooks:
            hook.remove()
    return (out.logits.numpy(), [h.numpy() for h in out.hidden_states], choices)


@pytest.fixture(scope="session")
def hf_reference():
    """`run_hf` as a fixture (see its docstring)."""
    return run_hf


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds (child processes)")
