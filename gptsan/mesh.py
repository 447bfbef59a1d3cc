"""Mesh-TensorFlow plumbing: dimension names, mesh shapes, layout rules, devices, dtype policy.

A GPTSAN mesh has two dimensions, `batch` (data parallel) and `model` (heads and experts
are split over it). Layout rules are plain data; a tensor dimension whose size the mesh
dimension does not divide is simply not split (e.g. a batch of 1 on a `batch:2` mesh).
"""
import re

from gptsan.compat import mtf, set_logical_cpu_devices, tf
from gptsan.errors import GPTSANError

# Tensor dimension names: the one place they are defined.
BATCH = "batch"
LENGTH = "length"  # input (query) positions of this call
MEMORY = "memory"  # key/value positions incl. spout/past slots
VOCAB = "vocab"
CONTEXTS = "contexts"  # rows of the position tables wpe/ete
D_MODEL = "d_model"
D_MODEL_OUT = "d_model_out"  # output side of a square [d_model, d_model] kernel
HEADS = "heads"
HEAD_DIM = "head_dim"
QKV = "qkv"  # the 3 (query, key, value) projections of att{i}/qkv/kernel
KV = "kv"  # key / value of the spout projection
LAYERS = "layers"
EXPERTS = "experts"
MOE_HIDDEN = "moe_hidden"
EXT_HIDDEN = "ext_hidden"
GROUPS = "groups"  # Switch routing groups
GROUP = "group"  # tokens of one routing group
CAPACITY = "capacity"  # expert capacity (tokens per expert per group)
SPOUT = "spout"
SPOUT_HIDDEN = "spout_hidden"  # output side of a square spout dense layer
SPOUT_KV = "spout_kv"  # flattened layers * 2 * d_model output of pasts/out

# Mesh dimension names.
MESH_BATCH = "batch"
MESH_MODEL = "model"

LAYOUT_RULES = [(BATCH, MESH_BATCH), (GROUPS, MESH_BATCH), (HEADS, MESH_MODEL),
                (EXPERTS, MESH_MODEL)]

ACTIVATION_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}

_MESH_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*([0-9]+)\s*$")


class DivisibleLayoutRules(mtf.LayoutRules):
    """`mtf.LayoutRules` that leave a dimension unsplit when the mesh size does not divide it."""

    def tensor_dimension_to_mesh_axis(self, tensor_dimension, mesh_shape):
        axis = super().tensor_dimension_to_mesh_axis(tensor_dimension, mesh_shape)
        if axis is not None and tensor_dimension.size % mesh_shape[axis].size:
            return None
        return axis


def layout_rules(rules=None):
    """Layout rules for `rules` (pairs tensor dim -> mesh dim; default LAYOUT_RULES)."""
    return DivisibleLayoutRules(LAYOUT_RULES if rules is None else rules)


def parse_mesh_shape(text):
    """Parses "batch:2,model:2" into an `mtf.Shape` (any order; missing dims have size 1)."""
    if isinstance(text, mtf.Shape):
        return text
    if text is None or not str(text).strip():
        return mtf.Shape([mtf.Dimension(MESH_BATCH, 1), mtf.Dimension(MESH_MODEL, 1)])
    sizes = {}
    for item in str(text).split(","):
        match = _MESH_ITEM.match(item)
        if not match:
            raise GPTSANError(f"malformed mesh shape {text!r}: expected e.g. 'batch:2,model:2'")
        name, size = match.group(1), int(match.group(2))
        if name not in (MESH_BATCH, MESH_MODEL):
            raise GPTSANError(f"mesh shape {text!r}: unknown mesh dimension {name!r}; "
                              f"use {MESH_BATCH} and {MESH_MODEL}")
        if name in sizes:
            raise GPTSANError(f"mesh shape {text!r}: dimension {name!r} given twice")
        if size < 1:
            raise GPTSANError(f"mesh shape {text!r}: dimension {name!r} must be >= 1")
        sizes[name] = size
    return mtf.Shape([mtf.Dimension(MESH_BATCH, sizes.get(MESH_BATCH, 1)),
                      mtf.Dimension(MESH_MODEL, sizes.get(MESH_MODEL, 1))])


def mesh_size(mesh_shape):
    return parse_mesh_shape(mesh_shape).size


def model_parallel_size(mesh_shape):
    shape = parse_mesh_shape(mesh_shape)
    return shape.get_dim_by_name(MESH_MODEL).size if MESH_MODEL in shape.dimension_names else 1


def cpu_devices_for(mesh_shape):
    """Creates (if needed) and returns one logical CPU device name per mesh position."""
    count = mesh_size(mesh_shape)
    devices = set_logical_cpu_devices(count)
    if len(devices) < count:
        raise GPTSANError(f"mesh {format_mesh_shape(mesh_shape)} needs {count} devices but only "
                          f"{len(devices)} logical CPU devices exist (TensorFlow was initialised "
                          "before the mesh was chosen)")
    return devices[:count]


def make_mesh_impl(mesh_shape, devices=None, tpu_device_assignment=None, rules=None):
    """A `PlacementMeshImpl` over `devices` (CPU/GPU) or a `SimdMeshImpl` on TPU."""
    shape = parse_mesh_shape(mesh_shape)
    layout = layout_rules(rules)
    if tpu_device_assignment is not None:
        return mtf.simd_mesh_impl.SimdMeshImpl(shape, layout, devices, tpu_device_assignment)
    if devices is None:
        devices = cpu_devices_for(shape)
    devices = list(devices)
    if len(devices) != shape.size:
        raise GPTSANError(f"mesh {format_mesh_shape(shape)} needs {shape.size} devices, "
                          f"got {len(devices)}")
    return mtf.placement_mesh_impl.PlacementMeshImpl(shape, layout, devices)


def format_mesh_shape(mesh_shape):
    shape = parse_mesh_shape(mesh_shape)
    return ",".join(f"{d.name}:{d.size}" for d in shape.dims)


def dtype_policy(name="float32"):
    """The one dtype policy: float32 master and slice variables, `name` activations."""
    if isinstance(name, mtf.VariableDType):
        return name
    if name not in ACTIVATION_DTYPES:
        raise GPTSANError(f"unknown activation dtype {name!r}; use one of "
                          f"{', '.join(ACTIVATION_DTYPES)}")
    return mtf.VariableDType(master_dtype=tf.float32, slice_dtype=tf.float32,
                             activation_dtype=ACTIVATION_DTYPES[name])
