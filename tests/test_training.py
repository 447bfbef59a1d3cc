"""run_train.py end to end on the tiny model: loss falls, MLM learns, preemption resumes bitwise,
fine-tuning freezes, NaN stops cleanly, bad input is one line with nothing written.

TFRecords are made by scripts/make_tfrecord.py from the Japanese sample corpus (data/sample).
Training runs happen in this process (TF is already loaded) except the one that is SIGKILLed.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gptsan.compat import tf
from gptsan.errors import GPTSANError
from gptsan.memory import ONEDNN_SYSTEM_ALLOCATOR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample")
VOCAB = os.path.join(ROOT, "ja-swe36k.txt")
EMOJI = os.path.join(ROOT, "emoji.json")
NUM_CONTEXT = 64  # short contexts keep the CPU steps fast
STEPS = 120  # training steps of the loss tests
CHECKPOINT_STEPS = 10
PREEMPT_STEPS = 30  # the preempted run stops here; the lm run kept its checkpoint of this step
MESH = "batch:2,model:2"  # the acceptance mesh: 4 logical CPU devices (tests/conftest.py)
MIN_LOSS_DROP = 0.30  # acceptance: the loss falls by at least 30 %

pytestmark = pytest.mark.skipif(
    not (os.path.isdir(SAMPLE) and os.path.isfile(VOCAB)),
    reason="needs data/sample/*.txt and the project vocabulary ja-swe36k.txt")


def run_train(*args):
    """run_train.main in this process; returns the (step, loss) list of the steps run."""
    import run_train as cli
    from gptsan import estimator

    captured = {}
    original = estimator.train

    def spy(*a, **k):
        captured["losses"] = original(*a, **k)
        return captured["losses"]

    estimator.train = spy
    try:
        assert cli.main(list(args) + ["--no_progress"]) == 0
    finally:
        estimator.train = original
    return captured.get("losses", [])


def read_variables(path):
    reader = tf.train.load_checkpoint(path)
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}


def latest_step(model_dir):
    path = tf.train.latest_checkpoint(model_dir)
    return int(path.rsplit("-", 1)[1]) if path else None


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Shared: the parameter file, lm/hybrid TFRecords and the two trained model dirs."""
    base = tmp_path_factory.mktemp("training")
    with open(os.path.join(ROOT, "configs", "tiny.json"), encoding="utf-8") as f:
        config = json.load(f)
    # tiny model (2 Switch layers, d 64, 4 experts) without extra layers, so fine-tuning can
    # add one; short contexts; a learning rate that moves in 120 steps; keep every checkpoint
    config["model_params"].update(num_contexts=NUM_CONTEXT, num_ext_layers=0)
    config["train_params"].update(base_lr=5e-3, num_warmup_steps=5, batch_size=8,
                                  checkpoint_per_steps=CHECKPOINT_STEPS,
                                  max_to_keep_save=STEPS // CHECKPOINT_STEPS + 1)
    params = str(base / "tiny.json")
    with open(params, "w", encoding="utf-8") as f:
        json.dump(config, f)
    records = {}
    for mode in ("lm", "hybrid"):
        prefix = str(base / mode)
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tfrecord.py"),
                        "--input_files", os.path.join(SAMPLE, "classes.csv"), "--mode", mode,
                        "--num_context", str(NUM_CONTEXT), "--output_prefix", prefix,
                        "--seed", "0", "--num_process", "1", "--vocabulary", VOCAB],
                       check=True, capture_output=True)
        records[mode] = prefix + "_*.tfrecord"
    return {"base": base, "params": params, "records": records, "trained": {}}


def common_args(work, mode, model_dir, steps=STEPS):
    return ["--parameter_file", work["params"], "--input_files", work["records"][mode],
            "--model_dir", model_dir, "--mesh_shape", MESH, "--max_training_step", str(steps),
            "--seed", "1", "--spout_vector", "onehot", "--summary_steps", "10"]


def trained(work, mode):
    """Trains `mode` once per module (STEPS steps on the 2x2 mesh); returns (dir, losses)."""
    if mode not in work["trained"]:
        model_dir = str(work["base"] / f"model_{mode}")
        losses = run_train(*common_args(work, mode, model_dir))
        work["trained"][mode] = (model_dir, losses)
    return work["trained"][mode]


def loss_drop(losses):
    """(initial loss = step 1, before any update; final = mean of the last 10 steps)."""
    return losses[0][1], sum(v for _, v in losses[-10:]) / 10


@pytest.mark.parametrize("mode", ["lm", "hybrid"])
def test_loss_falls_on_2x2_mesh(work, mode):
    model_dir, losses = trained(work, mode)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    first, last = loss_drop(losses)
    print(f"{mode}: loss {first:.3f} -> {last:.3f}")
    assert last <= (1 - MIN_LOSS_DROP) * first, (first, last)
    assert latest_step(model_dir) == STEPS  # --max_training_step really stops there
    for name in ("parameters.json", "ja-swe36k.txt", "emoji.json"):
        assert os.path.isfile(os.path.join(model_dir, name))
    # TensorBoard: losses, learning rate and per-layer router statistics
    tags = set()
    for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
        for event in tf.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {"loss/total", "loss/cross_entropy", "loss/load_balancing", "train/learning_rate",
            "router/layer0/entropy", "router/layer1/expert3_fraction"} <= tags


def test_reported_loss_is_the_published_cross_entropy(work):
    """The Estimator's `loss` (progress bar, logs) is the cross entropy with z-loss, without the
    load-balancing term (published train_fn reports `loss`, optimizes `loss + extra_loss`)."""
    model_dir, _ = trained(work, "lm")
    steps = {}
    for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
        for event in tf.train.summary_iterator(path):
            steps.setdefault(event.step, {}).update(
                (v.tag, v.simple_value) for v in event.summary.value)
    checked = [v for v in steps.values() if {"loss", "loss/total"} <= set(v)]
    assert len(checked) >= 5
    for v in checked:
        assert v["loss"] == pytest.approx(v["loss/cross_entropy"], rel=1e-6)
        assert v["loss/total"] == pytest.approx(v["loss"] + 1e-2 * v["loss/load_balancing"],
                                                rel=1e-6)
        assert v["loss/total"] > v["loss"]


def test_lm_loss_is_the_published_masked_mean():
    """sum(mask * (CE + 1e-4 log(Z)^2)) / (sum(mask) + 1e-5), against NumPy."""
    from gptsan.compat import mtf
    from gptsan.losses import lm_loss

    rng = np.random.RandomState(0)
    logits = rng.randn(2, 3, 7).astype(np.float32) * 3
    for targets in ([[4, -1, 2], [-1, 0, 6]], [[-1, -1, 5], [-1, -1, -1]],
                    [[-1, -1, -1], [-1, -1, -1]]):
        targets = np.array(targets, np.int32)
        graph = mtf.Graph()
        mesh = mtf.Mesh(graph, "mesh")
        dims = [mtf.Dimension("batch", 2), mtf.Dimension("length", 3)]
        vocab = mtf.Dimension("vocab", 7)
        with tf.Graph().as_default():
            loss, count = lm_loss(
                mtf.import_tf_tensor(mesh, tf.constant(logits), mtf.Shape(dims + [vocab])),
                mtf.import_tf_tensor(mesh, tf.constant(targets), mtf.Shape(dims)), vocab)
            impl = mtf.placement_mesh_impl.PlacementMeshImpl(shape=[], layout={}, devices=[""])
            lowering = mtf.Lowering(graph, {mesh: impl})
            with tf.Session() as sess:
                ours, n = sess.run([lowering.export_to_tf_tensor(loss),
                                    lowering.export_to_tf_tensor(count)])
        log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
        per_token = log_z - np.take_along_axis(logits, np.maximum(targets, 0)[..., None],
                                               -1)[..., 0] + 1e-4 * log_z ** 2
        mask = targets != -1
        expected = (per_token * mask).sum() / (mask.sum() + 1e-5)
        assert n == mask.sum()
        assert ours == pytest.approx(expected, rel=1e-6, abs=1e-12), targets


def test_first_step_of_the_published_warm_up_has_learning_rate_zero(work, tmp_path):
    """Published warm-up: lr = base_lr * step / warmup with the step before the update, so the
    first step of a run leaves every weight as it was (Adam's moments do move)."""
    source_dir, _ = trained(work, "lm")
    model_dir = str(tmp_path / "one_step")
    args = common_args(work, "lm", model_dir, steps=1)
    args[args.index("--mesh_shape") + 1] = "batch:1,model:1"
    run_train(*args, "--init_checkpoint", source_dir)
    before, after = read_variables(source_dir), read_variables(model_dir)
    assert after["global_step"] == 1
    for name in ("model/wte", "model/ln0/g", "model/moe1/wi/kernel", "pasts/out/kernel"):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        assert not np.array_equal(after[name + "/adam_m"], before[name + "/adam_m"]), name


def vocabulary_test_files(work, tmp_path, num_vocabulary):
    """(parameter file with model_params.num_vocabulary set, or removed when None; the project
    vocabulary plus one entry; a glob of copies of the lm TFRecords without their vocabulary
    record, so only sizes and shapes can be compared)."""
    with open(work["params"], encoding="utf-8") as f:
        config = json.load(f)
    config["model_params"]["num_vocabulary"] = num_vocabulary
    if num_vocabulary is None:
        del config["model_params"]["num_vocabulary"]
    params = tmp_path / "params.json"
    params.write_text(json.dumps(config), encoding="utf-8")
    vocab = tmp_path / "vocab.txt"
    with open(VOCAB, encoding="utf-8") as f:
        vocab.write_text(f.read() + "\n<|extra|>", encoding="utf-8")
    for shard in glob.glob(work["records"]["lm"]):
        shutil.copy(shard, tmp_path / os.path.basename(shard))
    return params, vocab, str(tmp_path / os.path.basename(work["records"]["lm"]))


def test_num_vocabulary_comes_from_the_vocabulary_file(work, tmp_path):
    """A parameter file without model_params.num_vocabulary (like the published ones) takes it
    from --vocabulary; token ids of the records must fit it."""
    params, vocab, records = vocabulary_test_files(work, tmp_path, None)
    model_dir = str(tmp_path / "bigger")
    args = common_args(work, "lm", model_dir, steps=1)
    args[args.index("--parameter_file") + 1] = str(params)
    args[args.index("--input_files") + 1] = records
    args[args.index("--mesh_shape") + 1] = "batch:1,model:1"
    run_train(*args, "--vocabulary", str(vocab), "--emoji", EMOJI)
    with open(os.path.join(model_dir, "parameters.json"), encoding="utf-8") as f:
        assert json.load(f)["model_params"]["num_vocabulary"] == 36001
    assert read_variables(model_dir)["model/wob"].shape == (36001,)
    import run_train as cli
    small = tmp_path / "small.txt"
    small.write_text("\n".join(["a", "b", "c"]), encoding="utf-8")
    args[args.index("--model_dir") + 1] = str(tmp_path / "never")
    with pytest.raises(GPTSANError, match="hold token id .* num_vocabulary=3"):
        cli.main(args + ["--vocabulary", str(small), "--emoji", EMOJI])
    assert not os.path.exists(tmp_path / "never")


def test_mlm_targets_predicted_better_than_chance(work):
    from gptsan.inference import Predictor
    from gptsan.records import read_examples

    model_dir, _ = trained(work, "hybrid")
    examples = [e for _, e in read_examples(glob.glob(work["records"]["hybrid"])[0], count=200)
                if e["num_input"][0] > 0][:16]
    assert examples, "the hybrid records hold no prefix (MLM) examples"
    x = np.stack([e["x"] for e in examples]).astype(np.int32)
    y = np.stack([e["y"] for e in examples])
    prefix = np.array([e["num_input"][0] for e in examples], np.int32)
    with Predictor(model_dir, mesh_shape="batch:1,model:1") as predictor:
        logits = predictor.forward(x, num_precontext=prefix)["logits"]  # [b, s, V]
    positions = (np.arange(NUM_CONTEXT)[None, :] < prefix[:, None]) & (y >= 0)
    assert positions.sum() >= 10
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    target_logp = np.take_along_axis(logp, np.maximum(y, 0)[..., None], -1)[..., 0][positions]
    vocab = logits.shape[-1]
    top10 = np.argsort(-logits, -1)[..., :10]
    hit10 = (top10 == y[..., None]).any(-1)[positions].mean()
    print(f"MLM targets: mean log p {target_logp.mean():.3f} (chance {-np.log(vocab):.3f}), "
          f"top-10 accuracy {hit10:.3f} (chance {10 / vocab:.5f})")
    assert target_logp.mean() > -np.log(vocab) + 2.0  # > 7x the uniform probability
    assert hit10 > 50 * 10 / vocab


def test_sigkill_then_rerun_resumes_to_the_same_weights(work, tmp_path):
    """All three runs are child processes with one environment: kernels may round differently
    in another process state (e.g. an allocator setting or memory alignment), and a Switch
    model amplifies such a difference over the steps."""
    env = dict(os.environ)
    env.pop(ONEDNN_SYSTEM_ALLOCATOR, None)  # set by the in-process fine-tuning tests
    reference_dir = str(tmp_path / "uninterrupted")
    command = [sys.executable, os.path.join(ROOT, "run_train.py"), "--no_progress"]
    subprocess.run(command + common_args(work, "lm", reference_dir, steps=PREEMPT_STEPS),
                   check=True, env=env, capture_output=True)
    model_dir = str(tmp_path / "preempted")
    args = common_args(work, "lm", model_dir, steps=PREEMPT_STEPS)
    process = subprocess.Popen(command + args, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 300
    try:
        while latest_step(model_dir) in (None, 0) and process.poll() is None:
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    killed_at = latest_step(model_dir)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert killed_at is not None and killed_at < PREEMPT_STEPS, killed_at
    rerun = subprocess.run(command + args, env=env, capture_output=True, text=True)  # the same
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"to step {PREEMPT_STEPS}" in rerun.stderr
    resumed = read_variables(model_dir)
    reference = read_variables(os.path.join(reference_dir, f"model.ckpt-{PREEMPT_STEPS}"))
    assert set(resumed) == set(reference)
    assert resumed["global_step"] == PREEMPT_STEPS
    earlier = read_variables(os.path.join(
        reference_dir, f"model.ckpt-{PREEMPT_STEPS - CHECKPOINT_STEPS}"))
    for name in reference:  # weights AND optimizer slots
        # the same up to float rounding (1e-6), far below what a resume on the wrong batches or
        # without the Adam slots misses by (about the learning rate, 5e-3, per step)
        moved = np.max(np.abs(reference[name] - earlier[name]).astype(np.float64))
        np.testing.assert_allclose(resumed[name], reference[name], rtol=0,
                                   atol=1e-3 * moved + 1e-6, err_msg=name)


def test_resume_after_switching_the_spout_on_and_off(work, tmp_path):
    """A run without a spout still writes the spout's optimizer slots (never updating it), so
    the same model dir resumes with a spout, and back."""
    model_dir = str(tmp_path / "switch")

    def run(steps, spout):
        args = common_args(work, "lm", model_dir, steps=steps)
        args[args.index("--spout_vector") + 1] = spout
        args[args.index("--mesh_shape") + 1] = "batch:1,model:1"
        return run_train(*args)

    run(2, "none")
    plain = read_variables(model_dir)
    assert "pasts/out/kernel/adam_m" in plain and not plain["pasts/out/kernel/adam_m"].any()
    assert run(4, "onehot")[0][0] == 3  # resumed at step 3
    with_spout = read_variables(model_dir)
    assert not np.array_equal(plain["pasts/out/kernel"], with_spout["pasts/out/kernel"])
    run(5, "none")
    again = read_variables(model_dir)
    for name in ("pasts/out/kernel", "pasts/out/kernel/adam_m", "pasts/mlp0/kernel"):
        np.testing.assert_array_equal(again[name], with_spout[name], err_msg=name)
    assert not np.array_equal(again["model/wte"], with_spout["model/wte"])


def test_model_dir_in_a_bucket(work):
    """--model_dir may be a URL (gs:// on TPUs): everything goes through tf.io.gfile. TF's
    in-memory ram:// file system stands in for the bucket (it lives in this process)."""
    from gptsan import fileio

    model_dir = "ram://bucket/models/tiny"
    args = common_args(work, "lm", model_dir, steps=2)
    args[args.index("--mesh_shape") + 1] = "batch:1,model:1"
    run_train(*args)
    assert {"parameters.json", "ja-swe36k.txt", "checkpoint"} <= set(fileio.listdir(model_dir))
    assert latest_step(model_dir) == 2
    args[args.index("--max_training_step") + 1] = "3"
    assert run_train(*args)[0][0] == 3  # resumed from the bucket
    assert not os.path.exists("ram:") and not os.path.exists(os.path.join(ROOT, "ram:"))


def test_float16_training_fixed_or_dynamic_loss_scale(work, tmp_path):
    """--use_mixed_precision: the published fixed 2^9 (nothing to checkpoint); with
    --dynamic_loss_scale an adaptive scale kept in the checkpoint."""
    from gptsan import optimization

    fixed = str(tmp_path / "fixed")
    args = common_args(work, "lm", fixed, steps=2)
    args[args.index("--mesh_shape") + 1] = "batch:1,model:1"
    losses = run_train(*args, "--use_mixed_precision", "--clip_gradients")
    assert len(losses) == 2 and all(np.isfinite(v) for _, v in losses)
    assert optimization.LOSS_SCALE_VARIABLE not in read_variables(fixed)
    model_dir = str(tmp_path / "fp16")
    args[args.index("--model_dir") + 1] = model_dir
    args[args.index("--max_training_step") + 1] = "3"
    losses = run_train(*args, "--use_mixed_precision", "--dynamic_loss_scale")
    assert len(losses) == 3 and all(np.isfinite(v) for _, v in losses)
    stored = read_variables(model_dir)
    assert stored[optimization.LOSS_SCALE_VARIABLE] == optimization.DYNAMIC_SCALE_INITIAL
    assert stored["training/loss_scale_good_steps"] == 3
    args[args.index("--model_dir") + 1] = fixed
    with pytest.raises(GPTSANError, match="trained without --dynamic_loss_scale"):
        run_train(*args, "--use_mixed_precision", "--dynamic_loss_scale")


def test_finetune_after_add_layers_freezes_the_backbone(work, tmp_path):
    from gptsan.extra_layers import IGNORE_PARAMS_FILE, add_layers_to_model_dir

    source_dir, _ = trained(work, "lm")
    extended = str(tmp_path / "extended")
    add_layers_to_model_dir(source_dir, extended, 1, seed=0, frozen="existing")
    ignore = os.path.join(extended, IGNORE_PARAMS_FILE)
    tuned = str(tmp_path / "tuned")
    run_train("--init_checkpoint", extended, "--ignore_parameters", ignore,
              "--input_files", work["records"]["lm"], "--model_dir", tuned, "--mesh_shape", MESH,
              "--max_training_step", "3", "--clip_gradients", "--spout_vector", "onehot")
    before, after = read_variables(extended), read_variables(tuned)
    with open(ignore, encoding="utf-8") as f:
        frozen = json.load(f)
    assert "model/wte" in frozen and "model/mlp2/p1/kernel" not in frozen
    for name in frozen:
        assert np.array_equal(before[name], after[name]), f"{name} moved"
        assert f"{name}/adam_m" not in after, f"{name} has optimizer slots"
    for name in ("model/mlp2/p1/kernel", "model/att2/qkv/kernel", "model/ln2/g",
                 "pasts/out/kernel"):
        assert not np.array_equal(before[name], after[name]), f"{name} did not train"
        assert f"{name}/adam_m" in after
    assert after["global_step"] == 3
    # every directory of the chain records the project vocabulary it was trained with
    from gptsan.config import GPTSANConfig
    from gptsan.fingerprint import PROJECT_VOCAB_SHA256

    for model_dir in (source_dir, extended, tuned):
        record = GPTSANConfig.from_json_file(model_dir).vocabulary
        assert (record.vocab_file, record.vocab_sha256) == ("ja-swe36k.txt", PROJECT_VOCAB_SHA256)
    # resuming that run without its freeze list would need optimizer state it never had
    import run_train as cli
    with pytest.raises(GPTSANError, match="no optimizer state for model/"):
        cli.main(["--input_files", work["records"]["lm"], "--model_dir", tuned,
                  "--mesh_shape", MESH, "--max_training_step", "4"])


FROZEN_BF16_LOSS_TOLERANCE = 0.01  # relative: bfloat16 storage rounds frozen weights by <= 2^-9


def test_finetune_with_bfloat16_frozen_weights(work, tmp_path):
    """--frozen_dtype bfloat16: the frozen backbone is held and saved in bfloat16, the loss
    stays within 1% of the float32 run's, and only the added layers train."""
    from gptsan.extra_layers import IGNORE_PARAMS_FILE, add_layers_to_model_dir

    source_dir, _ = trained(work, "lm")
    extended = str(tmp_path / "extended")
    add_layers_to_model_dir(source_dir, extended, 1, seed=0, frozen="existing")
    ignore = os.path.join(extended, IGNORE_PARAMS_FILE)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        losses[dtype] = run_train(
            "--init_checkpoint", extended, "--ignore_parameters", ignore, "--input_files",
            work["records"]["lm"], "--model_dir", str(tmp_path / dtype), "--mesh_shape",
            "batch:1,model:1", "--max_training_step", "3", "--seed", "1", "--frozen_dtype", dtype)
    assert [s for s, _ in losses["bfloat16"]] == [s for s, _ in losses["float32"]] == [1, 2, 3]
    for (_, narrow), (_, full) in zip(losses["bfloat16"], losses["float32"]):
        assert abs(narrow - full) <= FROZEN_BF16_LOSS_TOLERANCE * full
    assert losses["bfloat16"] != losses["float32"]  # the rounding is real
    reader = tf.train.load_checkpoint(str(tmp_path / "bfloat16"))
    dtypes = reader.get_variable_to_dtype_map()
    before = read_variables(extended)
    with open(ignore, encoding="utf-8") as f:
        frozen = json.load(f)
    import ml_dtypes
    for name in frozen:
        assert dtypes[name] == tf.bfloat16 and f"{name}/adam_m" not in dtypes, name
        np.testing.assert_array_equal(reader.get_tensor(name),
                                      before[name].astype(ml_dtypes.bfloat16), err_msg=name)
    assert dtypes["model/mlp2/p1/kernel"] == tf.float32
    assert not np.array_equal(reader.get_tensor("model/mlp2/p1/kernel"),
                              before["model/mlp2/p1/kernel"])
    import run_train as cli
    args = ["--ignore_parameters", ignore, "--input_files", work["records"]["lm"],
            "--model_dir", str(tmp_path / "bfloat16"), "--mesh_shape", "batch:1,model:1",
            "--max_training_step", "4"]
    with pytest.raises(GPTSANError, match="resume with --frozen_dtype bfloat16"):
        cli.main(args)
    with pytest.raises(GPTSANError, match="one-device fine-tuning"):
        cli.main(args[:-4] + ["--mesh_shape", MESH, "--frozen_dtype", "bfloat16"])


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(work, tmp_path):
    with open(work["params"], encoding="utf-8") as f:
        config = json.load(f)
    config["train_params"].update(base_lr=1e9, num_warmup_steps=0, checkpoint_per_steps=1)
    params = str(tmp_path / "explode.json")
    with open(params, "w", encoding="utf-8") as f:
        json.dump(config, f)
    model_dir = str(tmp_path / "nan")
    args = common_args(work, "lm", model_dir, steps=30)
    args[args.index("--parameter_file") + 1] = params
    with pytest.raises(GPTSANError, match=r"loss became (nan|inf|-inf) at step \d+") as info:
        run_train(*args)
    message = str(info.value)
    assert "\n" not in message and "checkpoint" in message
    failed_at = int(message.split("at step ")[1].split(";")[0])
    last = latest_step(model_dir)
    assert last is not None and last < failed_at
    for name, value in read_variables(model_dir).items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.all(np.isfinite(value)), f"non-finite {name} in the kept checkpoint"


def bad_input_cases(work, tmp_path):
    small_vocab = tmp_path / "small_vocab.txt"
    small_vocab.write_text("\n".join(["a", "b", "c"]), encoding="utf-8")
    unknown = tmp_path / "ignore.json"
    unknown.write_text(json.dumps(["model/wte", "model/att9/qkv/kernel"]), encoding="utf-8")
    short = str(tmp_path / "short")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tfrecord.py"),
                    "--input_files", os.path.join(SAMPLE, "news_01.txt"), "--mode", "lm",
                    "--num_context", "32", "--output_prefix", short, "--num_process", "1",
                    "--vocabulary", VOCAB],
                   check=True, capture_output=True)
    garbage, not_examples = tmp_path / "garbage.tfrecord", str(tmp_path / "text.tfrecord")
    garbage.write_bytes(b"not a tfrecord")
    with tf.io.TFRecordWriter(not_examples) as writer:
        writer.write(b"a record that is not a tf.train.Example")
    return [
        ([], {"--input_files": str(tmp_path / "nothing*.tfrecord")}, "no input files matched"),
        ([], {"--input_files": str(garbage)}, "not a readable TFRecord file"),
        ([], {"--input_files": not_examples}, "not tf.train.Examples"),
        ([], {"--input_files": short + "_*.tfrecord"}, "num_context"),
        (["--vocabulary", str(small_vocab), "--emoji", EMOJI], {},
         "not " + VOCAB),  # not the vocabulary of the TFRecords
        (["--ignore_parameters", str(unknown)], {}, "model/att9/qkv/kernel"),
        ([], {"--mesh_shape": "batch:3,model:1"}, "not divisible by the mesh batch size"),
        ([], {"--mesh_shape": "batch:1,model:3"}, "model-parallel size 3"),
        ([], {"--mesh_shape": "batch:8,model:1"}, "needs 8 devices"),
        ([], {"--mesh_shape": "rows:2"}, "mesh"),
        ([], {"--spout_vector": "gaussian"}, "spout_vector"),
        (["--dynamic_loss_scale"], {}, "--dynamic_loss_scale needs --use_mixed_precision"),
        (["--clip_gradients", "--clip_norm", "0"], {}, "--clip_norm must be > 0"),
    ]


def test_bad_input_is_one_line_and_writes_nothing(work, tmp_path):
    import run_train as cli

    for extra, replace, expected in bad_input_cases(work, tmp_path):
        model_dir = str(tmp_path / "never")
        args = common_args(work, "lm", model_dir) + extra
        for flag, value in replace.items():
            args[args.index(flag) + 1] = value
        with pytest.raises(GPTSANError) as info:
            cli.main(args)
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert not os.path.exists(model_dir), f"{expected}: wrote {model_dir}"


def test_checkpoint_mismatches_are_refused(work, tmp_path):
    import run_train as cli

    source_dir, _ = trained(work, "lm")
    # a bigger vocabulary than the checkpoint's: a bare checkpoint (no parameters.json, nothing
    # recorded) and TFRecords without a vocabulary record leave only the shapes to compare
    params, vocab, records = vocabulary_test_files(work, tmp_path, 36001)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(source_dir):
        if name == "checkpoint" or name.startswith("model.ckpt-"):
            shutil.copy(os.path.join(source_dir, name), bare / name)
    model_dir = str(tmp_path / "never")
    args = common_args(work, "lm", model_dir)
    args[args.index("--parameter_file") + 1] = str(params)
    args[args.index("--input_files") + 1] = records
    with pytest.raises(GPTSANError, match="vocabulary size differs"):
        cli.main(args + ["--vocabulary", str(vocab), "--emoji", EMOJI, "--init_checkpoint",
                         str(bare)])
    assert not os.path.exists(model_dir)
    # resuming into a directory that holds another model / a model without training state
    config = json.loads(params.read_text(encoding="utf-8"))
    config["model_params"].update(num_vocabulary=config["model_params"]["num_vocabulary"] - 1,
                                  num_experts=2)
    params.write_text(json.dumps(config), encoding="utf-8")
    args = common_args(work, "lm", source_dir)
    args[args.index("--parameter_file") + 1] = str(params)
    with pytest.raises(GPTSANError, match="different model"):
        cli.main(args)
    from gptsan.extra_layers import add_layers_to_model_dir
    extended = str(tmp_path / "extended")
    add_layers_to_model_dir(source_dir, extended, 1, frozen="existing")
    with pytest.raises(GPTSANError, match="without adam training state"):
        cli.main(["--input_files", work["records"]["lm"], "--model_dir", extended,
                  "--mesh_shape", MESH])


def test_spout_vectors_follow_the_published_meanings():
    from gptsan.spout import spout_vectors

    ids = tf.constant([[0], [3], [7], [3]], tf.int64)
    step = tf.placeholder(tf.int64, [])
    kinds = ("uniform", "stateless_uniform", "onehot", "half_onehot")
    tensors = {k: spout_vectors(k, ids, 6, step, seed=0) for k in kinds}
    assert spout_vectors("none", ids, 6, step) is None
    with pytest.raises(GPTSANError, match="spout_vector"):
        spout_vectors("gaussian", ids, 6, step)
    with tf.Session() as sess:
        at0, at1 = sess.run(tensors, {step: 0}), sess.run(tensors, {step: 1})
    np.testing.assert_array_equal(at0["onehot"], np.eye(6)[[0, 3, 1, 3]])  # id mod 6
    np.testing.assert_array_equal(at0["half_onehot"][:, :3], np.eye(3)[[0, 0, 1, 0]])
    with tf.Session() as sess:  # truncatemod, as published: a negative id has no one-hot
        negative = sess.run([spout_vectors(k, tf.constant([[-1], [-7]], tf.int64), 6, step)
                             for k in ("onehot", "half_onehot")], {step: 0})
    assert not negative[0].any() and not negative[1][:, :3].any()
    for kind in kinds:
        assert at0[kind].shape == (4, 6) and np.all((at0[kind] >= 0) & (at0[kind] <= 1))
    # stateless_uniform: a fixed vector per class id; uniform: fresh noise every step
    np.testing.assert_array_equal(at0["stateless_uniform"], at1["stateless_uniform"])
    np.testing.assert_array_equal(at0["stateless_uniform"][1], at0["stateless_uniform"][3])
    assert not np.array_equal(at0["stateless_uniform"][0], at0["stateless_uniform"][1])
    assert not np.array_equal(at0["uniform"], at1["uniform"])
    assert not np.array_equal(at0["half_onehot"][:, 3:], at1["half_onehot"][:, 3:])
