"""Products of activations with the model's kernels (attention, MLP, LM head): four forms, one entry
point (`apply_kernel`).

- "auto" on CPU, for at most `cpu_kernels.MAX_ROWS` activation rows (decode) and an [out, in]
  kernel (the CPU generation layout): `qwen2_jax.cpu_kernels.gemv`, a custom call that reads each
  weight once at the memory bandwidth in its stored dtype (bfloat16, float16, float32, int8) with
  float32 accumulation. XLA:CPU's dot reads bfloat16 at float32's elements per second (half the
  bandwidth) and has no float16 GEMM; Qwen2-0.5B bf16 decode at batch 1 went from 41 to 18-24 ms
  per step (measured in `bench/decode.py`). Where the kernels cannot be built, the forms below.

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
- int8 kernels (`Int8Kernel`: int8 values, one float32 scale per output channel) use `int8_dot`, in
  one of two forms chosen by the number of activation rows (`int8_form`):
  - "digits" (few rows: decode): the activations are written as two int8 digits per row (hi * s +
    lo * s / 254, a 16-bit fixed-point split of each row, finer than bfloat16 for every value above
    1/128 of the row's largest), multiplied with the int8 weights by an int8 dot accumulated exactly
    in int32, and scaled in float32. Weight-only in accuracy, and it reads the weights as int8 (one
    byte a weight: 44 ms per decode step at batch 1 against 85 for bfloat16 kernels when built).
  - "dequantize" (many rows: prefill, large batches): the int8 values converted to bfloat16 (exact),
    the bf16 GEMM above, the scale applied to the float32 product. XLA:CPU's int8 dot (YNNPACK; only
    s8 x s8 reaches it, u8 or s16 operands took 4-10x longer) is compute-bound from a few rows on, at
    or below the bf16 GEMM's rate per row, and the digits double the rows: [m, 896] x [896, 4864],
    m = 256: 6.5 ms as digits, 2.5 ms bf16, 2.8-3.1 ms dequantized. The convert is tied to the
    call's activations (`_zero_from`): untied, XLA:CPU converted every layer at the start of a
    prefill and hoisted the convert out of the decode loop (as a float32 copy of the model).
  Crossover, whole generate calls (Qwen2-0.5B shapes, bf16, decode ms/step, digits vs dequantize vs
  our bf16 kernels, interleaved): batch 4: 34.7 / 38.3 / 46.8; batch 8: 51.0 / 48.2 / 51.8; batch 16:
  79.2 / 70.8 / 63.5; batch 32: 134 / 109 / 93; batch 64: 239 / 196 / 159. Prefill (32-token
  prompts) dequantized: batch 1 208 ms against 217 as digits (bf16 kernels 209), batch 8 470 against
  766 (bf16 440). So digits up to 4 rows, dequantize above; above 8 decode rows int8 costs 10-25%
  over bf16 kernels per step (the convert, ~10 G elements/s, is paid every step). The LM head (more
  than 2**24 elements, its bf16 copy far beyond the caches) dequantizes slowly (136 M elements:
  40-80 ms) and keeps digits up to 128 rows (64 rows: 83 ms as digits, 108 dequantized; 256: 325
  against 207). Not used: a single int8 digit per row (per-row int8 activations, W8A8) halves the
  digit rows but rounds every activation to 1/254 of its row's largest, a large error next to an
  outlier channel; the kernel as the int8 dot's left operand (faster in isolation at 1-4 rows, no
  difference measured in generate).

The "cache-sized pieces" formulation (convert row pieces of the weight to float32 inside a loop, one
float32 dot per piece) was measured and not used: XLA:CPU's convert fusions ran at ~9 G elements/s,
2.4x the time of the float32 dots they fed (121 ms per decode step against 72 ms for float32
weights), and XLA upcasts any bf16 slice or barrier, so pieces of a bf16 array cost two converts.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax import cpu_kernels
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
    plan = _plan(spec)
    gemv = matmul == "auto" and uses_cpu_gemv(plan, x, w, compute_dtype)
    if not gemv and not quantized and not uses_gemm(matmul, w.dtype, compute_dtype):
        preferred = jnp.float32 if out_dtype == jnp.float32 else None
        return jnp.einsum(spec, x, w.astype(compute_dtype), preferred_element_type=preferred).astype(out_dtype)
    values = w.values if quantized else w
    if plan is None:
        raise ValueError(f"einsum {spec!r} is not a product of leading activation dims with a kernel")
    n_free, k, in_first = plan
    lead_shape = x.shape[:n_free]
    in_size = math.prod(x.shape[n_free:])
    rows = x.reshape(-1, in_size)
    if in_first:
        w_shape_out = values.shape[k:]
        w2 = values.reshape(in_size, -1)
    else:
        w_shape_out = values.shape[: values.ndim - k]
        w2 = values.reshape(-1, in_size)
    if gemv:
        y = cpu_kernels.gemv(rows, w2, w.scale.reshape(-1) if quantized else None)
    elif quantized:
        y = int8_dot(rows, w2, w.scale.reshape(-1), in_first)
    else:
        y = gemm_dot(rows, w2.astype(compute_dtype), in_first)
    return y.reshape(lead_shape + tuple(w_shape_out)).astype(out_dtype)


def uses_cpu_gemv(plan, x, w, compute_dtype) -> bool:
    """Whether "auto" multiplies by `qwen2_jax.cpu_kernels.gemv`: on CPU, an [out, in] kernel (`plan`
    from `_plan`), at most `cpu_kernels.MAX_ROWS` activation rows (decode), and a product whose
    numbers it reproduces (int8, or a float kernel in the compute dtype or computed in float32)."""
    if backend() != "cpu" or plan is None or plan[2]:
        return False
    if math.prod(x.shape[: plan[0]]) > cpu_kernels.MAX_ROWS:
        return False
    if not isinstance(w, Int8Kernel):
        if jnp.dtype(compute_dtype) not in (jnp.dtype(w.dtype), jnp.dtype(jnp.float32)):
            return False
        if jnp.dtype(w.dtype) not in tuple(jnp.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.float16)):
            return False
    return cpu_kernels.available()


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


# The int8 product's form by the number of activation rows (module docstring: measured crossovers).
INT8_DIGITS_MAX_ROWS = 4
INT8_DIGITS_MAX_ROWS_LARGE = 128
LARGE_KERNEL_ELEMENTS = 1 << 24  # a float copy of more than this leaves the CPU caches (an LM head)
INT8_FORMS = ("digits", "dequantize")


def int8_form(rows: int, kernel_elements: int) -> str:
    """Which int8 product form `int8_dot` uses for `rows` activation rows (module docstring)."""
    large = kernel_elements > LARGE_KERNEL_ELEMENTS
    return "digits" if rows <= (INT8_DIGITS_MAX_ROWS_LARGE if large else INT8_DIGITS_MAX_ROWS) else "dequantize"


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


def _zero_from(rows_mk):
    """A scalar 0 computed from the activations, which XLA cannot fold (NaN converts to integer 0).
    Added to an int8 kernel before its float convert it makes the convert wait for this call's
    activations: without it XLA:CPU schedules every layer's convert at the start of a prefill (a
    float copy of the whole model live at once), and inside the decode loop it hoists the convert
    (as int8 -> float32, then float32 -> bfloat16 in the loop: a float32 copy of every kernel per
    generate call). An optimization barrier is removed before scheduling and prevents neither."""
    return jnp.minimum(jnp.abs(rows_mk[0, 0].astype(jnp.float32)), 0.0)


def int8_dot(rows_mk, values, scale_n, in_first: bool, form: str | None = None):
    """[m, k] activations x int8 kernel ([k, n] if in_first else [n, k]) with per-output-channel
    scales [n] -> float32 [m, n], in `form` (default: `int8_form`'s choice for m rows). Integer
    products accumulate exactly in int32 (|sum| <= 127 * 127 * k, below 2**31 for k < 133000)."""
    m = rows_mk.shape[0]
    form = form or int8_form(m, values.size)
    scale = scale_n.astype(jnp.float32)
    if form == "dequantize":
        # int8 values are exact in bfloat16 and float32; the scale is applied to the float32 product.
        float_dtype = jnp.bfloat16 if rows_mk.dtype == jnp.bfloat16 else jnp.float32
        w = (values + _zero_from(rows_mk).astype(values.dtype)).astype(float_dtype)
        return gemm_dot(rows_mk.astype(float_dtype), w, in_first) * scale
    if form != "digits":
        raise ValueError(f"unknown int8 form {form!r} (choose from {', '.join(INT8_FORMS)})")
    return _digits_dot(rows_mk, values, scale, in_first)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _digits_dot(rows_mk, values, scale_n, in_first: bool):
    """The "digits" product. Its gradient is the dequantized product's (custom_vjp): autodiff of the
    digits' rounding would give a wrong one (measured 6.8x off on a 2-row product), and LoRA over an
    int8 base differentiates through every kernel, the LM head's digits form included (<= 128 rows)."""
    m = rows_mk.shape[0]
    digits, s_hi, s_lo = int8_digits(rows_mk)
    acc = _dot(digits, values, in_first, jnp.int32).astype(jnp.float32)
    return (acc[:m] * s_hi + acc[m:] * s_lo) * scale_n


def _digits_dot_fwd(rows_mk, values, scale_n, in_first: bool):
    return _digits_dot(rows_mk, values, scale_n, in_first), (rows_mk, values, scale_n)


def _digits_dot_bwd(in_first: bool, residuals, g_mn):
    rows_mk, values, scale_n = residuals
    w = values.astype(jnp.float32)
    # y = (rows @ W) * scale: d rows = (g * scale) @ W^T, d scale = sum over rows of g * (rows @ W)
    d_rows = _dot(g_mn * scale_n, w, not in_first, jnp.float32).astype(rows_mk.dtype)
    d_scale = jnp.sum(g_mn * _dot(rows_mk.astype(jnp.float32), w, in_first, jnp.float32), axis=0)
    return d_rows, np.zeros(values.shape, jax.dtypes.float0), d_scale.astype(scale_n.dtype)


_digits_dot.defvjp(_digits_dot_fwd, _digits_dot_bwd)


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
