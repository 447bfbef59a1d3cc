"""Peak memory of child processes, and the byte sizes it is compared with.

Peak memory here is always the peak resident set size (RSS) of one child process, read from
the kernel's accounting when it exits (`os.wait4`): what the operating system had to give the
process at its worst, independent of Python's or TensorFlow's allocators.
"""
import dataclasses
import os
import subprocess
import tempfile
import time

import numpy as np

KIB = 1024  # Linux reports ru_maxrss in KiB
# TensorFlow 2.15's switch (read once, when its CPU allocator is made): oneDNN's CPU allocator
# then takes every allocation from the system allocator instead of pooling the large ones
ONEDNN_SYSTEM_ALLOCATOR = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"


def use_system_allocator():
    """Makes TensorFlow (imported later) give freed tensor memory back to the system, keeping
    the oneDNN kernels.

    oneDNN's CPU allocator serves large tensors from a pool (a BFC allocator) that never
    shrinks: a run's RSS stays at the highest sum of pooled blocks it ever touched, holes
    included. One-device fine-tuning on a frozen backbone sets this (run_train.py) so its peak
    is what its tensors need at once; a user's own setting of the variable is kept.
    """
    os.environ.setdefault(ONEDNN_SYSTEM_ALLOCATOR, "1")


@dataclasses.dataclass
class ChildRun:
    """What `run_measured` returns."""
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes
    seconds: float


def run_measured(cmd, env=None, cwd=None):
    """Runs `cmd` (argv list) to completion; returns its exit code, output, peak RSS, time."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return ChildRun(process.returncode, out.read(), err.read(), usage.ru_maxrss * KIB,
                        seconds)


def tensor_bytes(shapes, itemsize=4):
    """(total, largest) byte sizes of tensors {name: shape} stored with `itemsize` bytes."""
    sizes = [int(np.prod(shape, dtype=np.int64)) * itemsize for shape in shapes.values()]
    return sum(sizes), max(sizes)


def gib(num_bytes):
    """Bytes -> GiB rounded to 2 decimals (for reports)."""
    return round(num_bytes / 2 ** 30, 2)
