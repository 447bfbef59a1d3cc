"""Streaming tensor files (gptsan.tensorio) against the reference libraries' own output."""
import json
import os

import numpy as np
import pytest

from gptsan import tensorio
from gptsan.compat import tf
from gptsan.errors import GPTSANError

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {"b.weight": rng.standard_normal((3, 5)).astype(np.float32),
            "a.bias": rng.standard_normal(7).astype(np.float16),
            "c.norm": rng.standard_normal((2, 4)).astype(tensorio.bfloat16()),
            "d.index": np.arange(6, dtype=np.int64).reshape(2, 3),
            "e.scalar_row": rng.standard_normal((1, 9)).astype(np.float32)}


def test_safetensors_writer_is_byte_identical_and_reader_is_lazy(tmp_path):
    tensors = _tensors()
    safetensors_numpy.save_file(tensors, str(tmp_path / "ref.safetensors"),
                                metadata=tensorio.SAFETENSORS_FORMAT)
    # TensorRefs: the writer loads each one only when it writes it
    loads = []
    refs = {n: tensorio.TensorRef(v.shape, v.dtype, lambda n=n, v=v: loads.append(n) or v)
            for n, v in tensors.items()}
    tensorio.write_safetensors(str(tmp_path / "ours.safetensors"), refs,
                               metadata=tensorio.SAFETENSORS_FORMAT)
    assert sorted(loads) == sorted(tensors)
    assert (tmp_path / "ours.safetensors").read_bytes() == \
        (tmp_path / "ref.safetensors").read_bytes()
    read = tensorio.read_safetensors(str(tmp_path / "ref.safetensors"))
    assert {n: (r.shape, r.dtype) for n, r in read.items()} == \
        {n: (v.shape, v.dtype) for n, v in tensors.items()}
    for name, value in tensors.items():
        loaded = read[name].load()
        assert loaded.dtype == value.dtype and loaded.ctypes.data % tensorio.TF_ALIGNMENT == 0
        np.testing.assert_array_equal(loaded, value)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((tmp_path / "ref.safetensors").read_bytes()[:-8])
    with pytest.raises(GPTSANError, match="truncated"):
        [r.load() for r in tensorio.read_safetensors(str(truncated)).values()]
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(GPTSANError, match="not a safetensors file"):
        tensorio.read_safetensors(str(tmp_path / "junk.safetensors"))


def test_torch_bin_reader_matches_torch_load_without_running_pickles(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=generator)
    state = {"w16": torch.randn(4, 3, generator=generator).half(),
             "wbf16": torch.randn(3, 5, generator=generator).bfloat16(),
             "transposed": base.t(),  # a strided view
             "row": base[2],  # an offset into a shared storage
             "param": torch.nn.Parameter(torch.randn(2, 2, generator=generator)),
             "ids": torch.arange(5)}
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(state, path)
    reference = torch.load(path, weights_only=True)
    refs = tensorio.read_torch_bin(path)
    assert set(refs) == set(reference)
    for name, tensor in reference.items():
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else \
            tensor.detach().numpy()
        loaded = refs[name].load()
        assert refs[name].shape == tuple(tensor.shape) and loaded.shape == tuple(tensor.shape)
        np.testing.assert_array_equal(loaded.astype(expected.dtype), expected, err_msg=name)
    assert refs["wbf16"].dtype == tensorio.bfloat16() and refs["w16"].dtype == np.float16

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": torch.ones(2), "y": Evil()}, str(tmp_path / "evil.bin"))
    with pytest.raises(GPTSANError, match="unsupported object"):
        tensorio.read_torch_bin(str(tmp_path / "evil.bin"))


def test_checkpoint_writer_groups_and_restore_casts(tmp_path):
    rng = np.random.default_rng(1)
    values = {f"layer{k}/kernel": rng.standard_normal((16, 8)).astype(np.float32)
              for k in range(5)}
    values["half"] = rng.standard_normal(10).astype(np.float16)
    values["global_step"] = np.int64(7)
    prefix = str(tmp_path / "model.ckpt-7")
    writer = tensorio.CheckpointWriter(prefix, group_bytes=1000)  # ~2 kernels per group
    for name, value in values.items():
        writer.add(name, value, np.float16 if name == "layer4/kernel" else None)
    writer.close()
    tensorio.write_checkpoint_state(str(tmp_path), "model.ckpt-7")
    assert tf.train.latest_checkpoint(str(tmp_path)) == prefix
    data = sorted(f for f in os.listdir(tmp_path) if ".data-" in f)
    assert len(data) > 2 and sorted(os.listdir(tmp_path)) == sorted(
        data + ["model.ckpt-7.index", "checkpoint"])  # the temporary parts are merged away
    reader = tf.train.load_checkpoint(prefix)
    for name, value in values.items():
        stored = reader.get_tensor(name)
        want = np.asarray(value).astype(np.float16) if name == "layer4/kernel" else value
        assert stored.dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(stored, want)

    graph = tf.Graph()
    with graph.as_default():
        targets = {"layer0/kernel": tf.Variable(tf.zeros([16, 8], tf.bfloat16)),
                   "half": tf.Variable(tf.zeros([10], tf.float32))}
        with tf.Session() as session:
            done = []
            tensorio.restore_variables(session, targets, prefix, progress=done.append)
            assert done == list(targets)
            got = session.run(targets)
    np.testing.assert_array_equal(got["layer0/kernel"],
                                  values["layer0/kernel"].astype(tensorio.bfloat16()))
    np.testing.assert_array_equal(got["half"], values["half"].astype(np.float32))


def test_aligned_buffers_are_shared_when_fed():
    value = np.arange(12, dtype=np.float32)[1:]  # offset by 4 bytes: not aligned
    out = tensorio.aligned(value)
    assert out.ctypes.data % tensorio.TF_ALIGNMENT == 0
    np.testing.assert_array_equal(out, value)
    assert tensorio.aligned(out) is out
    assert tensorio.aligned(out, np.float16).dtype == np.float16
    json.dumps(tensorio.FLOAT_DTYPES)  # plain strings for CLI choices
