"""Products of activations with the model's kernels (attention, MLP, LM head): three forms, one entry
point (`apply_kernel`).

- "einsum": `jnp.einsum` with the kernel cast to the compute dtype (GPU/TPU, float32 everywhere).
- "gemm": the same product as one 2-D dot [rows, in] x [in, out] (or [out, in]) with float32
  accumulation, on the kernel as stored. On XLA:CPU (jaxlib 0.10.2) this is what reaches its
  bfloat16 GEMM library (YNNPACK: bf16 operands, float32 accumulation); every other bf16 dot is
  rewritten to a float32 dot over a converted float32 copy of the weights, and inside the decode
  loop XLA hoists those converts out of the loop (a float32 copy of every kernel per generate call).
  Measured on this project's 2-core CPU, Qwen2-0.5B shapes, bf16 [1, 896] x [896, 151936]: 143 ms as
  einsum, 26 ms as a 2-row dot (float32 weights: 24 ms). A single bf16 row is padded to two: XLA:CPU
  sends 1-row bf16 dots to its float32 path. For float32 kernels the 2-D form avoids a transposed
  copy XLA:CPU makes of every 3-D attention kernel ([heads, head_dim, d]) at every decode step:
  float32 decode at batch 1 went from 171 to 94 ms per step (same run, contended machine).
- int8 kernels (`Int8Kernel`: int8 values, one float32 scale per output channel) use `int8_dot`
  for few rows (decode; everywhere on GPU/TPU): the activations are written as two int8 digits per
  row (hi * s + lo * s / 254, a 16-bit fixed-point split of each row, finer than bfloat16 for every
  value above 1/128 of the row's largest), multiplied with the int8 weights by an int8 dot
  accumulated exactly in int32, and scaled in float32. Weight-only in accuracy (the activations
  keep 16 bits), and it reads the weights as int8: dequantizing them instead materialises a float
  copy per piece, which on XLA:CPU (no fusion of a convert into a dot) measured 109 ms per decode
  step against 44 ms for this form (Qwen2-0.5B shapes, batch 1; bfloat16 kernels: 85 ms). XLA:CPU's
  int8 dot is compute-bound, though, and the two digits double its rows: from `INT8_AS_FLOAT_ROWS`
  rows on (prefill, large batches) the CPU converts the int8 kernel to the activations' float type
  instead (exact) and runs one float GEMM,
  where the conversion's cost is shared by many rows (`int8_as_float_dot`).

The "cache-sized pieces" formulation (convert row pieces of the weight to float32 inside a loop, one
float32 dot per piece) was measured and not used: XLA:CPU's convert fusions ran at ~9 G elements/s,
2.4x the time of the float32 dots they fed (121 ms per decode step against 72 ms for float32
weights), and XLA upcasts any bf16 slice or barrier, so pieces of a bf16 array cost two converts.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen2_jax.backend import backend

MATMULS = ("auto", "einsum", "gemm")
QUANTIZE_FORMATS = ("int8",)


class Int8Kernel(NamedTuple):
    """A kernel as int8 values (the float kernel's shape and layout) and one float32 scale per output
    channel (the kernel's output dims)."""

    values: jax.Array
    scale: jax.Array


def check_quantize(quantize) -> str | None:
    """`quantize` as given (None or "int8"), or a one-line ValueError."""
    if quantize is None or quantize in QUANTIZE_FORMATS:
        return quantize
    raise ValueError(f"unknown quantize {quantize!r} (choose from {', '.join(QUANTIZE_FORMATS)}, or None)")


def uses_gemm(matmul: str, kernel_dtype, compute_dtype) -> bool:
    """Whether a float kernel is multiplied as a 2-D GEMM: asked for, or "auto" on CPU for float32 and
    bfloat16 kernels computed in their own dtype (float16 has no library path on XLA:CPU: it is
    converted to float32 either way)."""
    if matmul == "gemm":
        return True
    if matmul == "einsum":
        return False
    kernel_dtype = jnp.dtype(kernel_dtype)
    return (
        backend() == "cpu"
        and kernel_dtype == jnp.dtype(compute_dtype)
        and kernel_dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    )


@functools.cache
def _plan(spec: str) -> tuple[int, int, bool] | None:
    """For an einsum spec "x,w->out": (free dims of x, contracted dims, whether the kernel's
    contracted dims come first), when x is [free..., contracted...], the kernel is [contracted...,
    free...] or [free..., contracted...] with the contracted dims in x's order, and the output is
    [x free..., kernel free...]. None otherwise."""
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    contracted = "".join(c for c in x_spec if c in w_spec and c not in out)
    k = len(contracted)
    if not k or x_spec[len(x_spec) - k :] != contracted:
        return None
    x_free = x_spec[: len(x_spec) - k]
    if w_spec.startswith(contracted):
        in_first, w_free = True, w_spec[k:]
    elif w_spec.endswith(contracted):
        in_first, w_free = False, w_spec[: len(w_spec) - k]
    else:
        return None
    if out != x_free + w_free:
        return None
    return len(x_free), k, in_first


def apply_kernel(spec: str, x, w, *, matmul: str, compute_dtype, out_dtype=None):
    """einsum(spec, x, w) for a kernel `w` (a float array or an Int8Kernel) in the form described in
    the module docstring. out_dtype: the result's dtype (default: the compute dtype); the einsum
    form accumulates into it directly, as it always has."""
    out_dtype = jnp.dtype(out_dtype or compute_dtype)
    x = x.astype(compute_dtype)
    quantized = isinstance(w, Int8Kernel)
    if not quantized and not uses_gemm(matmul, w.dtype, compute_dtype):
        preferred = jnp.float32 if out_dtype == jnp.float32 else None
        return jnp.einsum(spec, x, w.astype(compute_dtype), preferred_element_type=preferred).astype(out_dtype)
    plan = _plan(spec)
    values = w.values if quantized else w
    if plan is None:
        raise ValueError(f"einsum {spec!r} is not a product of leading activation dims with a kernel")
    n_free, k, in_first = plan
    lead_shape = x.shape[:n_free]
    in_size = 1
    for d in x.shape[n_free:]:
        in_size *= d
    rows = x.reshape(-1, in_size)
    if in_first:
        w_shape_out = values.shape[k:]
        w2 = values.reshape(in_size, -1)
    else:
        w_shape_out = values.shape[: values.ndim - k]
        w2 = values.reshape(-1, in_size)
    if quantized and rows.shape[0] >= INT8_AS_FLOAT_ROWS and backend() == "cpu":
        y = int8_as_float_dot(rows, w2, w.scale.reshape(-1), in_first)
    elif quantized:
        y = int8_dot(rows, w2, w.scale.reshape(-1), in_first)
    else:
        y = gemm_dot(rows, w2.astype(compute_dtype), in_first)
    return y.reshape(lead_shape + tuple(w_shape_out)).astype(out_dtype)


def _dot(rows_mk, w, in_first: bool, preferred):
    contract = (0,) if in_first else (1,)
    return jax.lax.dot_general(rows_mk, w, (((1,), contract), ((), ())), preferred_element_type=preferred)


def gemm_dot(rows_mk, w, in_first: bool):
    """[m, k] x kernel ([k, n] if in_first else [n, k]) -> float32 [m, n], float32 accumulation; one
    row of 16-bit operands is padded to two (see the module docstring)."""
    m = rows_mk.shape[0]
    if m == 1 and jnp.dtype(w.dtype).itemsize == 2:
        rows_mk = jnp.concatenate([rows_mk, jnp.zeros_like(rows_mk)], axis=0)
    return _dot(rows_mk, w, in_first, jnp.float32)[:m]


def int8_digits(rows_mk):
    """Each row as two int8 digits: rows ~= hi * s_hi + lo * s_lo with s_lo = s_hi / 254, s_hi the
    row's absmax / 127. Returns (digits int8 [2m, k]: hi rows then lo rows, s_hi [m, 1], s_lo [m, 1])."""
    x = rows_mk.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    s_hi = jnp.where(amax > 0, amax / 127.0, 1.0)
    hi = jnp.round(x / s_hi)
    s_lo = s_hi / 254.0
    lo = jnp.clip(jnp.round((x - hi * s_hi) / s_lo), -127, 127)
    return jnp.concatenate([hi, lo], axis=0).astype(jnp.int8), s_hi, s_lo


def int8_dot(rows_mk, values, scale_n, in_first: bool):
    """[m, k] activations x int8 kernel ([k, n] if in_first else [n, k]) with per-output-channel
    scales [n] -> float32 [m, n]. Integer products accumulate exactly in int32 (|sum| <= 127 * 127 * k,
    below 2**31 for k < 133000)."""
    m = rows_mk.shape[0]
    digits, s_hi, s_lo = int8_digits(rows_mk)
    acc = _dot(digits, values, in_first, jnp.int32).astype(jnp.float32)
    return (acc[:m] * s_hi + acc[m:] * s_lo) * scale_n.astype(jnp.float32)


# XLA:CPU's int8 dot is compute-bound from a few rows on: per [k=896, n=4864] kernel, measured on this
# project's 2-core CPU (ms, two-digit int8 / int8 converted to bf16 + bf16 GEMM): 1 row 0.21 / 0.62,
# 8 rows 0.38 / 0.68, 32 rows 0.87 / 1.11, 64 rows 1.73 / 1.53, 128 rows 3.21 / 1.59, 256 rows
# 6.66 / 3.07. From 64 rows on (prefill, large batches) the converted form is faster.
INT8_AS_FLOAT_ROWS = 64


def int8_as_float_dot(rows_mk, values, scale_n, in_first: bool):
    """The int8 product for many rows on CPU: the int8 kernel converted to the activations' 16-bit
    float (exact: every int8 value is a bfloat16 and a float16) or to float32, one float GEMM with
    float32 accumulation, then the per-channel scale. Same numbers as `int8_dot` up to the order of
    the float32 sums; float16 activations take float32 (XLA:CPU has no float16 GEMM)."""
    dtype = jnp.bfloat16 if rows_mk.dtype == jnp.bfloat16 else jnp.float32
    acc = gemm_dot(rows_mk.astype(dtype), values.astype(dtype), in_first)
    return acc * scale_n.astype(jnp.float32)


def quantize_int8(w, in_axes: tuple[int, ...]) -> Int8Kernel:
    """Symmetric absmax int8 over `in_axes` (the input dims): one scale per output channel."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    values = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return Int8Kernel(values, jnp.squeeze(scale, axis=in_axes))


def dequantize(kernel: Int8Kernel, in_axes: tuple[int, ...], dtype=jnp.float32):
    """The float kernel an Int8Kernel stands for (tests, accuracy checks)."""
    return (kernel.values.astype(jnp.float32) * jnp.expand_dims(kernel.scale, in_axes)).astype(dtype)
