"""The one place that imports TensorFlow 1.x-style and mesh-tensorflow for GPTSAN.

mesh-tensorflow 0.1.21 calls `ops.register_tensor_conversion_function`, which TF >= 2.13
moved to `tensor_conversion_registry`; we restore the old name before importing it.
Everything else imports `tf` and `mtf` from here:

    from gptsan.compat import tf, mtf
"""
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must be set before TensorFlow loads

import tensorflow.compat.v1 as tf  # noqa: E402
from tensorflow.core.protobuf import config_pb2  # noqa: E402,F401 (CallableOptions)
from tensorflow.python.framework import ops as _tf_ops  # noqa: E402

if not hasattr(_tf_ops, "register_tensor_conversion_function"):
    from tensorflow.python.framework import tensor_conversion_registry as _registry

    _tf_ops.register_tensor_conversion_function = _registry.register_tensor_conversion_function

import mesh_tensorflow as mtf  # noqa: E402

tf.get_logger().setLevel(logging.ERROR)
logging.getLogger("absl").setLevel(logging.ERROR)
tf.disable_v2_behavior()


def set_logical_cpu_devices(count):
    """Splits the host CPU into `count` logical devices (call before any session starts).

    Returns the device names. Sessions with an explicit ConfigProto also need
    `device_count={"CPU": count}` (see `session_config`).
    """
    physical = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(physical[0])
    if current is None or len(current) < count:
        try:
            tf.config.set_logical_device_configuration(
                physical[0], [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:
            pass  # already initialised: keep what exists
    devices = tf.config.list_logical_devices("CPU")
    return [d.name for d in devices]


def session_config(num_cpu_devices=1):
    """A ConfigProto that keeps `num_cpu_devices` logical CPUs visible."""
    return tf.ConfigProto(device_count={"CPU": max(1, num_cpu_devices)},
                          allow_soft_placement=True)
