"""scripts/bench_scale.py on a few-hundred-MB model: each conversion and add_layers, run as
the real command line tools in child processes, stays within the largest tensor plus a fixed
overhead in peak RSS -- whatever the model's total size (the pre-streaming tools held the whole
model two or three times)."""
import json
import os
import subprocess
import sys

import pytest

from gptsan.config import GPTSANConfig, ModelConfig, TrainConfig
from gptsan.memory import tensor_bytes
from gptsan.variables import variable_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "scripts", "bench_scale.py")
# ~320 MB of float32 weights in 8 Switch layers; the largest tensor (the embedding) is ~37 MB
MODEL = ModelConfig(num_contexts=128, num_switch_layers=8, num_ext_layers=0, num_hidden=256,
                    num_header=4, num_experts=8, num_spout=64, num_vocabulary=36000,
                    num_moe_hidden=2048)
LARGEST_TENSOR_COPIES = 4  # streaming holds a few tensors at once (read, converted, cached)
FIXED_OVERHEAD = 224 * 2 ** 20  # modules, graph, session and buffers beyond the baseline


@pytest.mark.slow
def test_conversions_and_add_layers_stay_near_the_largest_tensor(tmp_path):
    config_path = str(tmp_path / "config.json")
    GPTSANConfig(model=MODEL, train=TrainConfig()).to_json_file(config_path)
    total, largest = tensor_bytes(variable_shapes(MODEL))
    assert total > 300 * 2 ** 20 and largest < total / 8
    result = subprocess.run(
        [sys.executable, BENCH, "--config", config_path, "--add_extra_stage", "2",
         "--steps", "baseline,from_hf16,add_layers", "--work_dir", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["weights_bytes"] == total and report["largest_tensor_bytes"] == largest
    assert set(report) >= {"baseline", "random", "to_hf16", "from_hf16", "add_layers"}
    baseline = report["baseline"]["peak_rss_bytes"]
    bound = baseline + LARGEST_TENSOR_COPIES * largest + FIXED_OVERHEAD
    for step in ("to_hf16", "from_hf16", "add_layers"):  # both directions, float16 files
        peak = report[step]["peak_rss_bytes"]
        assert peak <= bound, (f"{step}: {peak / 2 ** 20:.0f} MiB > bound {bound / 2 ** 20:.0f} "
                               f"MiB (baseline {baseline / 2 ** 20:.0f} MiB)")
        assert peak < baseline + total  # the whole model was never held
    assert os.path.isdir(tmp_path / "w" / "ft")  # add_layers wrote its model
