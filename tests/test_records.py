"""TFRecord schema: write/read round trip, shard writing, errors, and the Estimator input_fn."""
import numpy as np
import pytest

from gptsan import records
from gptsan.compat import tf
from gptsan.errors import GPTSANError

CTX = 16


def make_rows(count, ctx=CTX, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(count):
        x = rng.integers(0, 36000, ctx)
        y = np.where(rng.random(ctx) < 0.3, -1, rng.integers(0, 36000, ctx))
        rows.append((x, y, 1000 + k, int(rng.integers(1, ctx))))
    return rows


def write(prefix, rows, per_shard=4, force=False):
    writer = records.ShardWriter(str(prefix), per_shard, force=force)
    for x, y, i, n in rows:
        writer.write(records.serialize_example(x, y, i, n))
    return writer.commit()


def test_round_trip_through_shards(tmp_path):
    rows = make_rows(10)
    paths = write(tmp_path / "lm", rows)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["lm_0000.tfrecord", "lm_0001.tfrecord",
                                                      "lm_0002.tfrecord"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.rsplit("/", 1)[1] for p in paths]
    back = [ex for path in paths for _, ex in records.read_examples(path)]
    assert len(back) == 10
    for (x, y, i, n), ex in zip(rows, back):
        assert np.array_equal(ex["x"], x) and np.array_equal(ex["y"], y)
        assert ex["i"].tolist() == [i] and ex["num_input"].tolist() == [n]
    picked = list(records.read_examples(paths[1], start=1, count=2))
    assert [k for k, _ in picked] == [1, 2] and np.array_equal(picked[0][1]["x"], rows[5][0])


def test_parse_example_graph_op():
    x, y, i, n = make_rows(1)[0]
    with tf.Graph().as_default(), tf.Session() as sess:
        parsed = records.parse_example(tf.constant(records.serialize_example(x, y, i, n)), CTX)
        assert parsed["x"].shape.as_list() == [CTX] and parsed["num_input"].shape.as_list() == [1]
        assert all(t.dtype == tf.int32 for t in parsed.values())
        out = sess.run(parsed)
    assert np.array_equal(out["x"], x) and np.array_equal(out["y"], y)
    assert out["i"].tolist() == [i] and out["num_input"].tolist() == [n]


def test_writer_refuses_to_overwrite_and_replaces_stale_shards(tmp_path):
    write(tmp_path / "lm", make_rows(10))
    with pytest.raises(GPTSANError, match="--force"):
        records.ShardWriter(str(tmp_path / "lm"), 4)
    paths = write(tmp_path / "lm", make_rows(3, seed=1), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_0000.tfrecord"]  # no stale shards
    assert len(list(records.read_examples(paths[0]))) == 3
    writer = records.ShardWriter(str(tmp_path / "other"), 2)
    writer.write(records.serialize_example(*make_rows(1)[0]))
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_0000.tfrecord"]  # nothing left


def test_malformed_tfrecord_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes("これはTFRecordではありません".encode("utf-8") * 5)
    for call in (lambda: list(records.read_examples(str(bad))),
                 lambda: records.input_fn_builder(str(bad), CTX, 2, True)):
        with pytest.raises(GPTSANError) as err:
            call()
        assert "not a valid TFRecord" in str(err.value) and "\n" not in str(err.value)
    good = write(tmp_path / "lm", make_rows(3))[0]
    truncated = tmp_path / "cut.tfrecord"
    truncated.write_bytes(open(good, "rb").read()[:-7])
    with pytest.raises(GPTSANError, match="not a valid TFRecord"):
        list(records.read_examples(str(truncated)))
    with tf.io.TFRecordWriter(str(tmp_path / "other.tfrecord")) as writer:
        writer.write(b"\xff\xfe not a protobuf")
    with pytest.raises(GPTSANError, match="not a tf.train.Example"):
        list(records.read_examples(str(tmp_path / "other.tfrecord")))
    with pytest.raises(GPTSANError, match="no such TFRecord"):
        list(records.read_examples(str(tmp_path / "missing.tfrecord")))


def test_num_context_mismatch_is_detected_before_training(tmp_path):
    write(tmp_path / "lm", make_rows(4, ctx=24))
    with pytest.raises(GPTSANError) as err:
        records.input_fn_builder(str(tmp_path / "lm_*.tfrecord"), CTX, 2, True, seed=0)
    message = str(err.value)
    assert "24 tokens" in message and f"num_contexts={CTX}" in message and "\n" not in message
    with pytest.raises(GPTSANError, match="no training files"):
        records.input_fn_builder(str(tmp_path / "none_*.tfrecord"), CTX, 2, True)


def run_batches(input_fn, steps, params=None):
    with tf.Graph().as_default():
        dataset = input_fn(params or {})
        features = tf.data.make_one_shot_iterator(dataset).get_next()
        shapes = {name: t.shape.as_list() for name, t in features.items()}
        with tf.Session() as sess:
            batches = [sess.run(features) for _ in range(steps)]
    return shapes, batches


def test_input_fn_static_batches(tmp_path):
    rows = make_rows(11)
    write(tmp_path / "lm", rows, per_shard=4)
    pattern = str(tmp_path / "lm_*.tfrecord")
    evaluate = records.input_fn_builder(pattern, CTX, 3, is_training=False)
    shapes, batches = run_batches(evaluate, 3)
    assert shapes == {"x": [3, CTX], "y": [3, CTX], "i": [3, 1], "num_input": [3, 1]}
    got = np.concatenate([b["x"] for b in batches])
    assert np.array_equal(got, np.stack([r[0] for r in rows[:9]]))  # in order, remainder dropped
    with pytest.raises(tf.errors.OutOfRangeError):
        run_batches(evaluate, 4)
    train = records.input_fn_builder([pattern], CTX, 3, is_training=True, seed=7)
    shapes, batches = run_batches(train, 10, params={"batch_size": 2})  # TPUEstimator's batch
    assert shapes["x"] == [2, CTX] and shapes["i"] == [2, 1]
    ids = np.concatenate([b["i"][:, 0] for b in batches])
    assert len(ids) == 20 and set(ids) <= {1000 + k for k in range(11)}  # repeats forever
    assert ids[:11].tolist() != sorted(ids[:11].tolist())  # shuffled
    _, again = run_batches(train, 10, params={"batch_size": 2})
    assert np.array_equal(ids, np.concatenate([b["i"][:, 0] for b in again]))  # seeded
