"""Config loading, validation and parameter counts."""
import glob
import json
import os

import pytest

from gptsan.config import GPTSANConfig, ModelConfig
from gptsan.errors import GPTSANError
from gptsan.variables import count_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED_2_8B_PARAMETERS = 2_776_248_480  # the published model card's figure


def test_every_shipped_config_loads():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))
    assert {os.path.basename(p) for p in paths} >= {
        "tiny.json", "gptsan-2.8b.json", "gptsan-3b-finetune.json"}
    for path in paths:
        config = GPTSANConfig.from_json_file(path)
        assert config.model.num_layers > 0


def test_2_8b_counts_the_published_figure():
    config = GPTSANConfig.from_json_file(os.path.join(ROOT, "configs", "gptsan-2.8b.json"))
    assert config.model.num_switch_layers == 10 and config.model.num_hidden == 1024
    assert count_parameters(config.model)["backbone"] == PUBLISHED_2_8B_PARAMETERS


def test_round_trip(tmp_path):
    config = GPTSANConfig.from_json_file(os.path.join(ROOT, "configs", "tiny.json"))
    path = tmp_path / "parameters.json"
    config.to_json_file(str(path))
    assert GPTSANConfig.from_json_file(str(tmp_path)) == config
    assert os.listdir(tmp_path) == ["parameters.json"]


def test_hidden_widths_default_to_published_factors():
    model = ModelConfig(num_hidden=64, num_header=4)
    assert (model.num_moe_hidden, model.num_ext_hidden) == (512, 256)


@pytest.mark.parametrize("params, message", [
    ({"num_hidden": 60, "num_header": 8}, "num_header=8 must divide num_hidden=60"),
    ({"num_experts": 6, "num_pallarelizm": 4, "num_header": 8, "num_hidden": 64},
     "num_experts=6 is not divisible"),
    ({"train_mode": "gpt"}, "train_mode must be one of"),
    ({"num_hiden": 3}, "unknown model_params key"),
    ({"num_hidden": "64"}, "must be int"),
])
def test_invalid_configs_name_the_problem(tmp_path, params, message):
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps({"model_params": params}))
    with pytest.raises(GPTSANError, match=message):
        GPTSANConfig.from_json_file(str(path))


def test_vocabulary_mismatch_is_reported():
    with pytest.raises(GPTSANError, match="36000"):
        ModelConfig().validate_vocabulary(8000)


@pytest.mark.parametrize("train_params, message", [
    ({"adam_bias_correction": 1}, "adam_bias_correction must be bool"),
    ({"warmup_from_one": "yes"}, "warmup_from_one must be bool"),
    ({"no_decay_pattern": "bias|("}, "no_decay_pattern 'bias|\\(' is not a regular expression"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
])
def test_invalid_optimizer_keys_name_the_problem(tmp_path, train_params, message):
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps({"model_params": {}, "train_params": train_params}))
    with pytest.raises(GPTSANError, match=message):
        GPTSANConfig.from_json_file(str(path))


def test_optimizer_keys_default_to_the_published_values(tmp_path):
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps({"model_params": {}, "train_params": {
        "adam_bias_correction": True, "warmup_from_one": True, "weight_decay": 0}}))
    train = GPTSANConfig.from_json_file(str(path)).train
    assert train.adam_bias_correction and train.warmup_from_one and train.weight_decay == 0
    published = GPTSANConfig().train
    assert (published.weight_decay, published.no_decay_pattern) == (
        0.01, "LayerNorm|layer_norm|bias")
    assert not published.adam_bias_correction and not published.warmup_from_one
