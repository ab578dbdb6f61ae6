"""train/host_malloc.py: on the CPU backend qwen2-train keeps freed memory in one heap, so a step's large
temporaries stop faulting in fresh pages; elsewhere, or where the user chose, glibc is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# mallocs, writes and frees 64 MiB 8 times, as a training step's temporaries come and go (plain malloc as
# XLA's runtime calls it: numpy would ask for huge pages), and prints whether the setting took and the
# page faults of the last 7 rounds.
SCRIPT = """
import ctypes, ctypes.util, resource
from train.host_malloc import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def step():
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    libc.free(p)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(7):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(**env_changes):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "QWEN2_JAX_CPU_MALLOC"}
    env.update(env_changes, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    applied, faults = proc.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults_on_cpu():
    applied, faults = _run(JAX_PLATFORMS="cpu")
    default_applied, default_faults = _run(JAX_PLATFORMS="cpu", QWEN2_JAX_CPU_MALLOC="default")
    assert applied and not default_applied
    pages = 7 * (64 << 20) // 4096
    assert default_faults > pages // 2, default_faults  # glibc's mmap: every round faults its pages again
    assert faults < pages // 20, (faults, default_faults)


def test_left_alone_off_the_cpu_or_where_the_user_set_malloc():
    assert _run(JAX_PLATFORMS="tpu")[0] is False
    assert _run(JAX_PLATFORMS="cuda,cpu")[0] is False
    assert _run(JAX_PLATFORMS="cpu", MALLOC_ARENA_MAX="4")[0] is False
