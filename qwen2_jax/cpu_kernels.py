"""Two XLA:CPU custom calls for decode (`csrc/cpu_kernels.cc`, XLA FFI): `gemv`, a few activation rows
times an [out, in] kernel reading each weight once at the memory bandwidth, and `take_rows`, the
embedding lookup.

Decode reads every weight once per token, so its speed is the rate at which the weights stream
from memory. XLA:CPU's own dot reads bfloat16 weights at the same elements per second as float32
ones (half the bytes per second), and has no float16 GEMM at all. Measured on this project's 2-core
CPU (AVX-512 with BF16), [1, 896] x [151936, 896] (the Qwen2-0.5B LM head), ms and GB/s of weights:
bfloat16 6.6 ms / 41 GB/s here against 10.6 / 26 for XLA's dot (2 rows: it sends one bf16 row to a
float32 path at 159 ms); float32 13.4 / 41 against 22.3 / 25; float16 8.1 / 34 against 159 / 1.7;
int8 (per-channel scale) 5.0 / 27.

`take_rows` copies table rows by index: XLA:CPU gathers from a bfloat16 table through a float32
copy of the whole table (a bitcast to uint16 first makes it a uint16 copy), and in the decode loop
it hoists that copy out of the loop, so every generate call converted the 151936 x 896 Qwen2
embedding: 112 ms of a 220 ms bfloat16 prefill (batch 1, 32 tokens).

The library is compiled from source at first use, for this machine (`-O3 -march=native`), with the
C++ compiler (`$CXX`, else `c++`) and the FFI headers of the installed jaxlib, into a cache directory
(`$QWEN2_JAX_CACHE/kernels`, else `$XDG_CACHE_HOME/qwen2-jax/kernels`, else
`~/.cache/qwen2-jax/kernels`), named by a hash of
everything that goes into it, written under a temporary name and renamed. Where it cannot be built
(no compiler, not x86-64) or `QWEN2_JAX_CPU_GEMV=0`, `available()` is False and `qwen2_jax.matmul`
uses XLA's dot, with one warning saying why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp

# Activation rows up to which `qwen2_jax.matmul` uses this kernel (the kernel handles any count, in
# groups of this many; above it XLA's GEMM reuses each weight better).
MAX_ROWS = 8

_TARGET = "qwen2_gemv"
_TARGET_SCALED = "qwen2_gemv_scaled"
_TARGET_TAKE = "qwen2_take_rows"
_TARGET_INT8 = "qwen2_gemv_int8"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def _cache_dir() -> str:
    root = os.environ.get("QWEN2_JAX_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "qwen2-jax")
    return os.path.join(root, "kernels")


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f.read().splitlines() if line.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _build() -> str:
    """Path of the compiled library, building it if this machine has none yet; RuntimeError if it
    cannot be built."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the CPU kernel is written for x86-64, this machine is {platform.machine()}")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    source = importlib.resources.files("qwen2_jax").joinpath("csrc/cpu_kernels.cc").read_bytes()
    include = jax.ffi.include_dir()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError as e:
        raise RuntimeError(f"cannot run the C++ compiler {compiler!r}: {e.strerror}") from None
    key = hashlib.sha256(
        b"\0".join(
            [source, jax.__version__.encode(), include.encode(), version.encode(), " ".join(_FLAGS).encode()]
            + [_cpu_identity().encode()]
        )
    ).hexdigest()[:16]
    cache = _cache_dir()
    path = os.path.join(cache, f"cpu_kernels-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = os.path.join(tmp, "cpu_kernels.cc")
        with open(src, "wb") as f:
            f.write(source)
        out = os.path.join(tmp, "cpu_kernels.so")
        done = subprocess.run(
            [compiler, *_FLAGS, f"-I{include}", src, "-o", out], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"{compiler} failed: {lines[-1] if lines else 'exit ' + str(done.returncode)}")
        os.replace(out, path)  # atomic: another process building the same key gets a whole file too
    return path


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("QWEN2_JAX_CPU_GEMV", "1") == "0":
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(_build())
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"qwen2_jax: CPU decode kernels unavailable, using XLA's ops ({e})", RuntimeWarning, stacklevel=3)
        return None
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.Qwen2Gemv), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_SCALED, jax.ffi.pycapsule(lib.Qwen2GemvScaled), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_TAKE, jax.ffi.pycapsule(lib.Qwen2TakeRows), platform="cpu")
    jax.ffi.register_ffi_target(_TARGET_INT8, jax.ffi.pycapsule(lib.Qwen2GemvInt8), platform="cpu")
    return lib


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call)."""
    return _library() is not None


def has_bf16_dot() -> bool:
    """Whether the build multiplies bfloat16 activations by bfloat16 weights directly (AVX512-BF16);
    without it bfloat16 activations are widened to float32 first (the same products, exact)."""
    lib = _library()
    return lib is not None and bool(lib.qwen2_gemv_has_bf16_dot())


def has_int8_dot() -> bool:
    """Whether the build multiplies int8 weights by int16 activations (AVX512-VNNI); without it int8
    weights are widened to float32 and multiplied by the float32 activations."""
    lib = _library()
    return lib is not None and bool(lib.qwen2_gemv_has_int8_dot())


def _activations(rows_mk, w_nk):
    if rows_mk.dtype == jnp.bfloat16 and w_nk.dtype == jnp.bfloat16 and has_bf16_dot():
        return rows_mk
    return rows_mk.astype(jnp.float32)


def _call(rows_mk, w_nk, scale_n):
    out = jax.ShapeDtypeStruct((rows_mk.shape[0], w_nk.shape[0]), jnp.float32)
    if w_nk.dtype == jnp.int8 and scale_n is not None and has_int8_dot():
        x = rows_mk if rows_mk.dtype == jnp.bfloat16 else rows_mk.astype(jnp.float32)
        call = jax.ffi.ffi_call(_TARGET_INT8, out, vmap_method="sequential")
        return call(x, w_nk, scale_n.astype(jnp.float32))
    x = _activations(rows_mk, w_nk)
    if scale_n is None:
        return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(x, w_nk)
    return jax.ffi.ffi_call(_TARGET_SCALED, out, vmap_method="sequential")(x, w_nk, scale_n.astype(jnp.float32))


@jax.custom_vjp
def _gemv(rows_mk, w_nk, scale_n):
    return _call(rows_mk, w_nk, scale_n)


def _gemv_fwd(rows_mk, w_nk, scale_n):
    return _call(rows_mk, w_nk, scale_n), (rows_mk, w_nk, scale_n)


def _gemv_bwd(res, dy_mn):
    # The custom call has no derivative of its own; a product differentiated on CPU with few rows
    # (a small test, a tiny batch) takes XLA's dots for its gradients.
    rows_mk, w_nk, scale_n = res
    w = w_nk.astype(jnp.float32)
    dy = dy_mn if scale_n is None else dy_mn * scale_n
    d_rows = (dy @ w).astype(rows_mk.dtype)
    d_w = None
    if jnp.issubdtype(w_nk.dtype, jnp.floating):
        d_w = (dy.T @ rows_mk.astype(jnp.float32)).astype(w_nk.dtype)
    else:
        d_w = jnp.zeros(w_nk.shape, jax.dtypes.float0)
    d_scale = None
    if scale_n is not None:
        d_scale = jnp.sum(dy_mn * (rows_mk.astype(jnp.float32) @ w.T), axis=0).astype(scale_n.dtype)
    return d_rows, d_w, d_scale


_gemv.defvjp(_gemv_fwd, _gemv_bwd)


def gemv(rows_mk, w_nk, scale_n=None):
    """float32 [m, n] = rows [m, k] x w [n, k]^T (x scale [n] when given), float32 accumulation.
    w: float32, bfloat16, float16 or int8. With AVX512-VNNI, int8 weights multiply the rows written
    as int16 with a scale per row (absmax / 32767: 15 bits, finer than bfloat16 above 1/128 of the
    row's largest value), accumulated exactly in int32. Call only when `available()`."""
    return _gemv(rows_mk, w_nk, scale_n)


def _take_rows_call(table_vd, ids):
    flat = ids.reshape(-1).astype(jnp.int32)
    out = jax.ShapeDtypeStruct((flat.shape[0], table_vd.shape[1]), table_vd.dtype)
    rows = jax.ffi.ffi_call(_TARGET_TAKE, out, vmap_method="sequential")(table_vd, flat)
    return rows.reshape(ids.shape + (table_vd.shape[1],))


@jax.custom_vjp
def take_rows(table_vd, ids):
    """table[ids] (ids clamped to the table, any shape) -> ids.shape + [d]. Call only when
    `available()`. Differentiable in the table (a scatter-add, as jnp.take's gradient)."""
    return _take_rows_call(table_vd, ids)


def _take_rows_fwd(table_vd, ids):
    return _take_rows_call(table_vd, ids), (jnp.zeros((0,), table_vd.dtype), table_vd.shape, ids)


def _take_rows_bwd(res, d_rows):
    empty, shape, ids = res
    flat = jnp.clip(ids.reshape(-1), 0, shape[0] - 1)
    d_table = jnp.zeros(shape, d_rows.dtype).at[flat].add(d_rows.reshape(-1, shape[1])).astype(empty.dtype)
    return d_table, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)
