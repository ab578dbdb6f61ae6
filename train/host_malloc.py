"""glibc's allocator set for a training run on the CPU backend.

XLA:CPU allocates each step's temporaries with malloc and frees them when the step ends. Tens of MB each
(a chunk of vocabulary logits is already 39 MB for 2 x 32 tokens of Qwen2's 151,936 ids), so glibc
serves them with mmap and unmaps them on free, and every step faults in fresh zeroed pages again. Measured
on 2 cores, the demo's recipe (a 10M-parameter model on one CPU device): 5.8M page faults and 10.4 s of
kernel time in 60 steps with glibc's defaults, 0.26M and 1.6 s with one heap that keeps freed memory
(no mmap, one arena, no trimming), the steps 27% faster, the same losses and the same peak memory.

Applied only when the run is on the CPU (JAX_PLATFORMS names only cpu, or no accelerator plugin is
installed): on a TPU or GPU host the large buffers live on the device, and host memory held back could
crowd the data pipeline. Skipped where the user set glibc's MALLOC_* variables, or
QWEN2_JAX_CPU_MALLOC=default; a libc without mallopt (musl, macOS) is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP_FREED = 2**31 - 1  # M_TRIM_THRESHOLD is an int: memory past the top of the heap is kept up to 2 GiB


def cpu_only() -> bool:
    """Whether jax will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return all(p == "cpu" for p in platforms)
    from importlib.metadata import entry_points

    if list(entry_points(group="jax_plugins")):
        return False
    plugins = ("libtpu", "jax_plugins", "jaxlib.cuda", "jax_cuda12_plugin")
    return not any(importlib.util.find_spec(name) for name in plugins)


def keep_freed_memory() -> bool:
    """Set glibc to serve large allocations from one heap and keep freed memory (see the module
    docstring). Call before jax starts its backends. Returns whether it was set."""
    if os.environ.get("QWEN2_JAX_CPU_MALLOC") == "default" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if not sys.platform.startswith("linux") or not cpu_only():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 for everything
    return bool(mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, KEEP_FREED))
