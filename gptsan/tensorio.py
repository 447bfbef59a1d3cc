"""Tensor files read and written one tensor at a time (bounded memory at any model size).

* `TensorRef`: a tensor not read yet (shape, dtype, `load()`); the readers below return
  {name: TensorRef} so a 2.8B model is never held whole.
* safetensors: read by seeking to each tensor's bytes (`read_safetensors`) and written by
  streaming each tensor after the header (`write_safetensors`), byte for byte what
  `safetensors.numpy.save_file` writes. The library's own `safe_open` memory-maps the file:
  every page read then stays in the process's RSS until the file is closed, so reading a
  5.6 GB file through it shows 5.6 GB of RSS.
* PyTorch `pytorch_model.bin` (zip format, torch >= 1.6): the pickle is read with a restricted
  unpickler that only records where each tensor's storage lies in the zip; a tensor is read
  from its storage record when loaded. Needs no torch and runs no pickled code.
* TF checkpoints: `tf_checkpoint_refs` reads through `tf.train.NewCheckpointReader` (any
  file system TF knows); `CheckpointWriter` saves bounded groups of tensors with `SaveV2`
  into temporary shards and joins them with `MergeV2Checkpoints`; `restore_variables` fills
  graph variables one by one (casting the stored dtype to the variable's).
"""
import collections
import dataclasses
import functools
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np

from gptsan.errors import GPTSANError

WRITE_GROUP_BYTES = 256 * 2 ** 20  # CheckpointWriter: tensors saved per SaveV2 call (bounded RSS)
SAFETENSORS_ALIGNMENT = 8  # the header is padded with spaces to a multiple of 8 (format spec)
SAFETENSORS_MAX_HEADER = 100_000_000  # the format's limit on the JSON header (bytes)
SAFETENSORS_FORMAT = {"format": "pt"}  # metadata transformers' from_pretrained requires
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # storage dtypes a user may choose
TF_ALIGNMENT = 64  # TensorFlow's EIGEN_MAX_ALIGN_BYTES on x86: a fed array so aligned is not copied


def use_plain_cpu_allocator():
    """Makes TensorFlow (imported later) return freed tensor memory to the system.

    TF's oneDNN CPU allocator pools freed memory and never gives it back, so a tool that
    streams tensors through TF would keep the largest ones it saw. Conversions compute
    nothing, so they lose nothing without oneDNN. Call before TensorFlow is imported.
    """
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def aligned_empty(shape, dtype):
    """An uninitialised array in memory aligned for TensorFlow (EIGEN_MAX_ALIGN_BYTES): fed to
    a session, TF shares its buffer instead of copying it."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + TF_ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % TF_ALIGNMENT
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def aligned(value, dtype=None):
    """`value` (cast to `dtype` if given) in TF-aligned memory; no copy when it already is."""
    value = np.asarray(value)
    dtype = value.dtype if dtype is None else np.dtype(dtype)
    if value.dtype == dtype and value.flags.c_contiguous and \
            value.ctypes.data % TF_ALIGNMENT == 0:
        return value
    out = aligned_empty(value.shape, dtype)
    out[...] = value
    return out


def bfloat16():
    """numpy's bfloat16 (ml_dtypes, installed with TensorFlow)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def storage_dtype(name):
    """np.dtype for 'float32' | 'float16' | 'bfloat16'."""
    if name not in FLOAT_DTYPES:
        raise GPTSANError(f"unknown dtype {name!r}; use one of {', '.join(FLOAT_DTYPES)}")
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def is_floating(dtype):
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype == bfloat16()


def cast_floating(value, dtype):
    """`value` as `dtype` if it is floating point (copy only when the dtype changes)."""
    if dtype is None or not is_floating(value.dtype) or value.dtype == dtype:
        return value
    return value.astype(dtype)


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor not read yet: `shape`, `dtype`, and `load()` -> np.ndarray."""
    shape: tuple
    dtype: np.dtype
    load: object = dataclasses.field(repr=False, compare=False)


def value_of(tensor):
    """np.ndarray of an array or a TensorRef."""
    return tensor.load() if isinstance(tensor, TensorRef) else np.asarray(tensor)


def array_ref(array):
    """A TensorRef of an array already in memory."""
    array = np.asarray(array)
    return TensorRef(tuple(array.shape), array.dtype, lambda: array)


class LoadCache:
    """Keeps the last `capacity` loaded tensors (one TF tensor feeds several HF tensors)."""

    def __init__(self, capacity=2):
        self.capacity = capacity
        self._items = collections.OrderedDict()

    def get(self, key, load):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = load()
        self._items[key] = value
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value


# ----------------------------------------------------------------------------------------------
# safetensors

# safetensors dtype names (format spec) <-> numpy; BF16 through ml_dtypes
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                       "U8": "uint8", "BOOL": "bool"}
# safetensors writes tensors by descending dtype (its Rust enum order), then by name
_SAFETENSORS_DTYPE_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                            "F64", "I64", "U64")


def _np_dtype(st_dtype, path):
    if st_dtype not in _SAFETENSORS_DTYPES:
        raise GPTSANError(f"{path}: unsupported tensor dtype {st_dtype}")
    name = _SAFETENSORS_DTYPES[st_dtype]
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def _st_dtype(dtype):
    name = "bfloat16" if dtype == bfloat16() else np.dtype(dtype).name
    return next(k for k, v in _SAFETENSORS_DTYPES.items() if v == name)


def read_safetensors(path):
    """{name: TensorRef} of a .safetensors file; each load reads only that tensor's bytes."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(SAFETENSORS_MAX_HEADER, os.path.getsize(path) - 8):
                raise ValueError(f"header length {header_len}")
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise GPTSANError(f"cannot read {path}: not a safetensors file ({err})") from None
    data_start = 8 + header_len
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _np_dtype(info["dtype"], path)
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise GPTSANError(f"{path}: tensor {name} has {end - begin} bytes, not {shape} "
                              f"{info['dtype']}")
        refs[name] = TensorRef(shape, dtype, functools.partial(
            _read_range, path, data_start + begin, dtype, shape))
    return refs


def _read_range(path, offset, dtype, shape):
    array = aligned_empty(shape, dtype)
    with open(path, "rb") as f:
        f.seek(offset)
        read = f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
    if read != array.nbytes:
        raise GPTSANError(f"{path} is truncated")
    return array


def write_safetensors(path, tensors, metadata=None, progress=None):
    """Writes {name: array or TensorRef} as safetensors, loading one tensor at a time.

    The layout is the library's (tensors by descending dtype, then name; header padded with
    spaces to 8 bytes), so the file equals `safetensors.numpy.save_file`'s byte for byte.
    `progress(name)` is called after each tensor.
    """
    order = sorted(tensors, key=lambda n: (-_SAFETENSORS_DTYPE_ORDER.index(
        _st_dtype(tensors[n].dtype)), n))
    header = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
        header[name] = {"dtype": _st_dtype(tensor.dtype), "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % SAFETENSORS_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in order:
            value = np.ascontiguousarray(value_of(tensors[name]))
            if tuple(value.shape) != tuple(tensors[name].shape) or value.dtype != \
                    tensors[name].dtype:
                raise AssertionError(f"{name}: loaded {value.shape} {value.dtype}, announced "
                                     f"{tensors[name].shape} {tensors[name].dtype}")
            f.write(memoryview(value.reshape(-1).view(np.uint8)))
            del value
            if progress:
                progress(name)


# ----------------------------------------------------------------------------------------------
# PyTorch zip checkpoints (pytorch_model.bin)

_TORCH_STORAGE_DTYPES = {"FloatStorage": "float32", "HalfStorage": "float16",
                         "BFloat16Storage": "bfloat16", "DoubleStorage": "float64",
                         "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                         "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


@dataclasses.dataclass(frozen=True)
class _TorchStorage:
    key: str
    dtype: np.dtype


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


class _LazyTorchUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into TensorRefs; refuses every other global."""

    def __init__(self, file, read_tensor, path):
        super().__init__(file)
        self._read_tensor, self._path = read_tensor, path

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda tensor, requires_grad, hooks, *rest: tensor
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            dtype = _TORCH_STORAGE_DTYPES[name]
            return _StorageType(bfloat16() if dtype == "bfloat16" else np.dtype(dtype))
        raise GPTSANError(f"{self._path}: unsupported object {module}.{name} in a PyTorch state "
                          "dict (only tensors are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise GPTSANError(f"{self._path}: unsupported storage record {pid!r}")
        return _TorchStorage(str(pid[2]), pid[1].dtype)

    def _rebuild_tensor(self, storage, offset, size, stride, *rest):
        shape = tuple(int(s) for s in size)
        return TensorRef(shape, storage.dtype, functools.partial(
            self._read_tensor, storage, int(offset), shape, tuple(int(s) for s in stride)))


def _read_torch_tensor(path, record_offsets, storage, offset, shape, stride):
    """One tensor of a torch zip: its storage record is stored uncompressed, read in place."""
    dtype = storage.dtype
    if storage.key not in record_offsets:
        raise GPTSANError(f"{path}: storage record data/{storage.key} is missing")
    start, size = record_offsets[storage.key]
    contiguous = all(st == int(np.prod(shape[k + 1:], dtype=np.int64))
                     for k, st in enumerate(stride) if shape[k] > 1)
    if contiguous:
        return _read_range(path, start + offset * dtype.itemsize, dtype, shape)
    flat = _read_range(path, start, dtype, (size // dtype.itemsize,))  # the whole storage
    return np.lib.stride_tricks.as_strided(flat[offset:], shape,
                                           [s * dtype.itemsize for s in stride]).copy()


_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header (APPNOTE 4.3.7)


def read_torch_bin(path):
    """{name: TensorRef} of a PyTorch zip checkpoint (torch.save format since torch 1.6)."""
    if not zipfile.is_zipfile(path):
        raise GPTSANError(f"{path} is a legacy (pre-1.6) PyTorch file; re-save it with "
                          "torch.save (zip format) or as safetensors")
    record_offsets = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise GPTSANError(f"{path}: no data.pkl in the PyTorch archive")
        root = pickles[0][:-len("data.pkl")]
        pickled = archive.read(pickles[0])
        for info in archive.infolist():
            if not info.filename.startswith(root + "data/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise GPTSANError(f"{path}: {info.filename} is compressed; torch.save stores "
                                  "tensors uncompressed")
            raw.seek(info.header_offset)
            fields = _ZIP_LOCAL_HEADER.unpack(raw.read(_ZIP_LOCAL_HEADER.size))
            start = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
            record_offsets[info.filename[len(root + "data/"):]] = (start, info.file_size)
    reader = functools.partial(_read_torch_tensor, path, record_offsets)
    try:
        state = _LazyTorchUnpickler(io.BytesIO(pickled), reader, path).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as err:
        raise GPTSANError(f"cannot read {path}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, TensorRef) for v in state.values()):
        raise GPTSANError(f"{path} does not hold a state dict of tensors")
    return dict(state)


# ----------------------------------------------------------------------------------------------
# TF checkpoints


def tf_checkpoint_refs(prefix):
    """{name: TensorRef} of every tensor in the TF checkpoint `prefix`."""
    from gptsan.compat import tf

    try:
        reader = tf.train.NewCheckpointReader(prefix)
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except tf.errors.OpError as err:
        raise GPTSANError(f"cannot read checkpoint {prefix}: "
                          f"{err.message.splitlines()[0]}") from None

    def load(name):
        try:
            return np.asarray(reader.get_tensor(name))
        except tf.errors.OpError as err:
            raise GPTSANError(f"cannot read {name} from checkpoint {prefix}: "
                              f"{err.message.splitlines()[0]}") from None

    return {name: TensorRef(tuple(shapes[name]), np.dtype(dtypes[name].as_numpy_dtype),
                            functools.partial(load, name)) for name in shapes}


class CheckpointWriter:
    """Writes one TF checkpoint (`prefix`.index + data shards) a bounded group at a time.

    `add(name, array)` collects tensors; every `group_bytes` they are saved by one `SaveV2`
    into a temporary checkpoint next to `prefix`; `close()` joins the temporary checkpoints
    into `prefix` with `MergeV2Checkpoints` (which renames their data files: nothing is
    copied). Readers see one checkpoint holding every tensor, as `tf.train.Saver` writes it.
    """

    def __init__(self, prefix, group_bytes=None):
        from gptsan.compat import tf

        self._tf = tf
        self.prefix = prefix
        self.group_bytes = group_bytes or WRITE_GROUP_BYTES
        self._group, self._group_size, self._parts = [], 0, []
        self._graph = tf.Graph()
        self._session = tf.Session(graph=self._graph,
                                   config=tf.ConfigProto(device_count={"GPU": 0}))
        with self._graph.as_default():
            self._noop = tf.no_op()

    def add(self, name, value, dtype=None):
        """Queues `value` (cast to `dtype` if given); saves the group once it is full."""
        value = np.asarray(value)
        nbytes = value.size * (value.dtype if dtype is None else np.dtype(dtype)).itemsize
        if self._group and self._group_size + nbytes > self.group_bytes:
            self._flush()
        self._group.append((name, aligned(value, dtype)))
        self._group_size += nbytes
        if self._group_size >= self.group_bytes:  # a large tensor is saved at once
            self._flush()

    def _flush(self):
        tf = self._tf
        part = f"{self.prefix}_temp_part{len(self._parts):05d}"
        with self._graph.as_default():
            placeholders = [tf.placeholder(tf.as_dtype(v.dtype), v.shape) for _, v in self._group]
            save = tf.raw_ops.SaveV2(prefix=part, tensor_names=[n for n, _ in self._group],
                                     shape_and_slices=[""] * len(self._group),
                                     tensors=placeholders)
        self._session.run(save, dict(zip(placeholders, (v for _, v in self._group))))
        self._parts.append(part)
        self._group, self._group_size = [], 0
        # TF releases fed numpy arrays only at the start of the next run (its delayed decref):
        # run a no-op so this group's arrays are freed now, not together with the next group's.
        self._session.run(self._noop)

    def close(self):
        """Saves the last group and merges every part into `prefix`."""
        tf = self._tf
        if self._group:
            self._flush()
        with self._graph.as_default():
            merge = tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=self._parts,
                                                  destination_prefix=self.prefix,
                                                  delete_old_dirs=False)
        self._session.run(merge)
        self._session.close()


def restore_ops(variables, prefix):
    """[(name, op)]: each op assigns one TF variable {checkpoint name: tf.Variable} from
    checkpoint `prefix`, casting the stored dtype (float16/bfloat16/float32) to the variable's.

    Run them one per `session.run` (`restore_variables`): only one restored tensor is then
    alive next to the variables, where one op for all of them may hold every restored tensor
    at once. Builds in the default graph.
    """
    from gptsan.compat import tf

    try:
        stored = tf.train.NewCheckpointReader(prefix).get_variable_to_dtype_map()
    except tf.errors.OpError as err:
        raise GPTSANError(f"cannot read checkpoint {prefix}: "
                          f"{err.message.splitlines()[0]}") from None
    ops = []
    with tf.name_scope("restore_one_by_one"):
        for name, variable in variables.items():
            if name not in stored:
                raise GPTSANError(f"checkpoint {prefix} has no variable {name}")
            value = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[name],
                                         shape_and_slices=[""], dtypes=[stored[name]])[0]
            if stored[name] != variable.dtype.base_dtype:
                value = tf.cast(value, variable.dtype.base_dtype)
            ops.append((name, tf.assign(variable, value).op))
    return ops


def run_one_by_one(session, ops, progress=None):
    """Runs [(name, op)] one `session.run` each (`progress(name)` after each)."""
    for name, op in ops:
        session.run(op)
        if progress:
            progress(name)


def restore_variables(session, variables, prefix, progress=None):
    """`restore_ops` built in the session's graph and run one by one."""
    with session.graph.as_default():
        ops = restore_ops(variables, prefix)
    run_one_by_one(session, ops, progress)


def write_checkpoint_state(directory, prefix_name):
    """The `checkpoint` index file tf.train.latest_checkpoint reads (relative path)."""
    from gptsan import fileio

    text = (f'model_checkpoint_path: "{prefix_name}"\n'
            f'all_model_checkpoint_paths: "{prefix_name}"\n')
    fileio.write_text_atomic(os.path.join(directory, "checkpoint"), text)
