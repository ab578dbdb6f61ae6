"""The platform the program is built for, which is the one it runs on except when compiling ahead of time.

Every choice of kernel by platform in the library (cuDNN attention on GPU, the CPU attention blocks and
grouped matmul, kernel layouts) asks `backend()`, never `jax.default_backend()`: `qwen2-train --dry-run
--topology v5p-256` traces on a CPU-only machine inside `compiling_for("tpu")`, so it builds the program
a TPU run builds.
"""

from __future__ import annotations

import contextlib

import jax

_target: str | None = None


def backend() -> str:
    """The platform being compiled for, "cpu", "gpu" or "tpu" (default: JAX's default backend)."""
    return _target if _target is not None else jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str | None):
    """Trace as if on `platform` ("cpu", "gpu", "tpu"; None changes nothing) inside the block."""
    global _target
    previous = _target
    _target = platform if platform is not None else previous
    try:
        yield
    finally:
        _target = previous
