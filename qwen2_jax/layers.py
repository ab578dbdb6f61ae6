"""Building blocks shared by dense Qwen2 and Qwen2-MoE: RMSNorm, rotary tables, attention, SwiGLU MLP.

Shapes are in the names: b batch, t query length, s key length, d hidden, n query heads, k kv heads,
h head_dim, f MLP width. Numerics follow HF transformers: norms, rotary tables and the attention
softmax in float32; everything else in the compute dtype.

Every layer module reads its runtime choices from one `RunOptions`; `kernel_layout="out_in"` creates
the attention and MLP kernels output-major (`OUT_IN_AXES` says how each one is permuted), and
`quantize="int8"` creates them as int8 values plus per-output-channel scales. Every attention and MLP
product goes through `project` (`qwen2_jax.matmul` chooses its form). A kernel with a LoRA adapter
beside it in the params (`qwen2_jax.lora.apply`) comes back from `kernel` as a `lora.LoraKernel`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2_jax import dual_chunk, lora, sequence_parallel
from qwen2_jax.backend import backend
from qwen2_jax.config import Qwen2Config
from qwen2_jax.matmul import Int8Kernel, apply_kernel
from qwen2_jax.options import RunOptions

Dtype = Any

# Kernel name -> permutation from the checkpoint's [in, out] orientation to [out, in]. The same
# permutation applies to the shape and to the logical axis names.
OUT_IN_AXES = {
    "q_kernel": (1, 2, 0),  # [d, n, h] -> [n, h, d]
    "k_kernel": (1, 2, 0),
    "v_kernel": (1, 2, 0),
    "o_kernel": (2, 0, 1),  # [n, h, d] -> [d, n, h]
    "gate_kernel": (1, 0),  # [d, f] -> [f, d]
    "up_kernel": (1, 0),
    "down_kernel": (1, 0),  # [f, d] -> [d, f]
}
# Kernel name -> how many leading dims of its [in, out] shape are input dims (the rest are output
# channels: an int8 kernel has one scale per output channel).
INPUT_DIMS = {name: 2 if name == "o_kernel" else 1 for name in OUT_IN_AXES}


def param(module: nn.Module, name: str, init, shape, dtype, logical_axes):
    return module.param(name, nn.with_logical_partitioning(init, logical_axes), shape, dtype)


def kernel(module: nn.Module, options: RunOptions, name: str, init, shape, logical_axes):
    """A matmul kernel declared in [in, out] terms, created in the options' kernel layout (an
    Int8Kernel: int8 values `name` and float32 scales `name + "_scale"` over the output dims, when
    options.quantize == "int8")."""
    n_in = INPUT_DIMS[name]
    scale_shape, scale_axes = tuple(shape[n_in:]), tuple(logical_axes[n_in:])
    if options.transposed_kernels:
        perm = OUT_IN_AXES[name]
        shape, logical_axes = tuple(shape[i] for i in perm), tuple(logical_axes[i] for i in perm)
    if options.quantize == "int8":
        values = param(module, name, nn.initializers.zeros, shape, jnp.int8, logical_axes)
        scale = param(module, name + "_scale", nn.initializers.ones, scale_shape, jnp.float32, scale_axes)
        w = Int8Kernel(values, scale)
    else:
        w = param(module, name, init, shape, options.param_dtype, logical_axes)
    adapter_name = name + lora.ADAPTER_SUFFIX  # placed beside the kernel by `lora.apply`; absent otherwise
    if module.has_variable("params", adapter_name):
        return lora.LoraKernel(w, module.get_variable("params", adapter_name))
    return w


def project(x, w, in_out_spec: str, options: RunOptions, name: str):
    """Activations times the kernel `name`, whichever layout and format it is in. `in_out_spec` is
    the einsum written for the [in, out] kernel (e.g. "btd,dnh->btnh"); out_in kernels permute its
    letters as OUT_IN_AXES permutes the kernel. Result in the compute dtype; a LoraKernel adds its
    adapter's product (`lora.adapter_product`, always on the [in, out] spec)."""
    if isinstance(w, lora.LoraKernel):
        return lora.adapter_product(project(x, w.base, in_out_spec, options, name), x, w.adapter, in_out_spec)
    if options.transposed_kernels:
        inputs, out = in_out_spec.split("->")
        x_spec, w_spec = inputs.split(",")
        in_out_spec = f"{x_spec},{''.join(w_spec[i] for i in OUT_IN_AXES[name])}->{out}"
    return apply_kernel(in_out_spec, x, w, matmul=options.matmul, compute_dtype=options.compute_dtype)


def normal_init(config: Qwen2Config):
    return nn.initializers.normal(stddev=config.initializer_range)


class RMSNorm(nn.Module):
    """HF order: normalise in float32, cast back to the input dtype, then multiply by the weight."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype, ("norm",))
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return scale.astype(jnp.promote_types(scale.dtype, x.dtype)) * y


# ------------------------------------------------------------------------------------------ rotary
def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: Qwen2Config, max_position=None):
    """(inv_freq [h/2] float32, attention_scaling) for the config's RoPE type.

    `max_position` (traced scalar: the largest position in this call) is needed only by `dynamic`,
    whose base grows once the sequence passes max_position_embeddings (HF's dynamic_rope_update).
    """
    dim = config.head_size
    base = config.rope_theta
    rope = config.rope_scaling
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    if rope.rope_type == "default":
        return 1.0 / (base**exponents), 1.0
    if rope.rope_type == "linear":
        return 1.0 / (base**exponents) / rope.factor, 1.0
    if rope.rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = (
            jnp.float32(max_pos)
            if max_position is None
            else jnp.maximum(max_position.astype(jnp.float32) + 1.0, max_pos)
        )
        grown = base * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (grown**exponents), 1.0
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(config)
    raise ValueError(f"unsupported rope type {rope.rope_type!r}")


def _yarn_inv_freq(config: Qwen2Config):
    """transformers >= 4.56 YaRN: static tables, with the user's factor honoured (older versions
    recomputed the factor from max_position_embeddings)."""
    rope = config.rope_scaling
    dim = config.head_size
    base = config.rope_theta
    original = rope.original_max_position_embeddings or config.max_position_embeddings
    factor = rope.factor if rope.factor is not None else config.max_position_embeddings / original
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_get_mscale(factor, rope.mscale) / _yarn_get_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate is None or rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1.0 - ramp
    inv_freq = inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def rotary_tables(config: Qwen2Config, positions_bt, dtype):
    """cos, sin [b, t, h] in float32 math, cast to the activation dtype as HF does."""
    max_position = jnp.max(positions_bt) if config.rope_scaling.rope_type == "dynamic" else None
    inv_freq, scaling = rope_inv_freq(config, max_position)
    freqs_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    emb_bth = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)
    return (jnp.cos(emb_bth) * scaling).astype(dtype), (jnp.sin(emb_bth) * scaling).astype(dtype)


def apply_rotary(x_btnh, cos_bth, sin_bth):
    """NeoX half-split rotation: x*cos + rotate_half(x)*sin."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]


# --------------------------------------------------------------------------------------- attention
def attention_mask(q_slot, q_pos_bt, k_slot_s, k_pos_bs, window: int | None):
    """Boolean [b, 1, t, s]: causal by cache slot, valid keys only (pos >= 0), optional sliding window.

    q_slot: the queries' cache slots, [t] shared by the batch or [b, t] per row (rows written at
    their own cache index). The window is counted in positions, HF >= 4.56: a query sees W keys
    including itself.
    """
    q_slot_bt = q_slot if q_slot.ndim == 2 else q_slot[None]
    causal_bts = k_slot_s[None, None, :] <= q_slot_bt[:, :, None]
    allowed_bts = causal_bts & (k_pos_bs >= 0)[:, None, :]
    if window is not None:
        allowed_bts &= k_pos_bs[:, None, :] > (q_pos_bt[:, :, None] - window)
    return allowed_bts[:, None]


def update_block(full, part, starts):
    """dynamic_update_slice at `starts` (one index per axis). XLA:CPU converts a 16-bit float buffer
    to float32 and back around a dynamic_update_slice (a pass over the whole buffer: per layer and
    decode step, the whole KV cache); as uint16 the update is in place and costs what `part` does."""
    bits = jnp.issubdtype(full.dtype, jnp.floating) and full.dtype.itemsize == 2
    as_u16 = (lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)) if bits else (lambda x: x)
    out = jax.lax.dynamic_update_slice(as_u16(full), as_u16(part), tuple(starts))
    return jax.lax.bitcast_convert_type(out, full.dtype) if bits else out


def update_slice(full, part, index, axis: int):
    """`update_block` along one axis."""
    starts = [0] * full.ndim
    starts[axis] = index
    return update_block(full, part, starts)


def write_at(buffer_bs, chunk_bt, write_index):
    """buffer with chunk written along axis 1 at write_index: a scalar shared by every row, or a [b]
    vector, one index per row (serving: each decode slot holds a sequence of its own length).

    Per-row single-token writes are a select over the buffer: XLA:CPU runs a per-row scatter
    through a float32 copy of a bfloat16 buffer, and even as uint16 far slower than the select (48
    Qwen2-0.5B layer buffers of 8 rows x 2688 slots: 236 ms against 13 ms)."""
    if jnp.ndim(write_index) == 0:
        return update_slice(buffer_bs, chunk_bt, write_index, axis=1)
    if chunk_bt.shape[1] == 1:
        trailing = (1,) * (buffer_bs.ndim - 2)
        slot_1s = jnp.arange(buffer_bs.shape[1]).reshape((1, -1) + trailing)
        return jnp.where(slot_1s == write_index.reshape((-1, 1) + trailing), chunk_bt, buffer_bs)
    return jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice_in_dim(buf, new, i, axis=0))(
        buffer_bs, chunk_bt, write_index
    )


def segment_mask(q_segment_bt, k_segment_bs):
    """Boolean [b, 1, t, s]: a query sees only keys of its own document. Packed training rows hold
    several documents, numbered 1, 2, ... along the row (0 = padding); ANDed into `attention_mask`'s
    mask, it reaches every attention path (dense, CPU blocks, sharded, cuDNN's bias) unchanged."""
    return (q_segment_bt[:, :, None] == k_segment_bs[:, None, :])[:, None]


# XLA:CPU runs jax.nn.dot_product_attention as one [t, s] score block per head. Measured here
# (Qwen2-0.5B heads, float32, 2 cores): splitting the queries into blocks of 64 that attend only to
# the keys up to their own end is 4.6x faster at b=1 t=512, 2.5x at b=4 t=512 and 2.2x at b=1 t=2048
# (fewer flops above the diagonal, score blocks that stay in cache). Each block still goes through
# the library's dot_product_attention. Not measured on GPU/TPU, so used on CPU only.
_CAUSAL_BLOCK = 64
_MAX_CAUSAL_BLOCKS = 16  # bounds the unrolled program (and compile time) for long prompts


def _fused_attention_available(q_btnh) -> bool:
    """cuDNN flash attention: NVIDIA GPUs, 16-bit activations, head_dim a multiple of 8 up to 256."""
    head_dim = q_btnh.shape[-1]
    return backend() == "gpu" and q_btnh.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 256


def attention_core(q_btnh, k_bskh, v_bskh, mask_b1ts, scale, write_index=None):
    """Softmax attention. write_index: where this chunk's keys start in the cache, None when the keys
    are the chunk's own (uncached). When they start at a static 0 (uncached, or a prefill into an empty
    cache; traced indices are decode steps), key slot i is query i's own token: keys past the last query
    are skipped and, on CPU, queries run in causal blocks."""
    keys_start_at_query_0 = write_index is None or (isinstance(write_index, int) and write_index == 0)
    out_dtype = q_btnh.dtype
    if q_btnh.dtype == jnp.float16 and backend() == "cpu":
        # XLA:CPU has no F16_F16_F32 dot; float32 scores are what the fp16 path accumulates in anyway
        q_btnh, k_bskh, v_bskh = (a.astype(jnp.float32) for a in (q_btnh, k_bskh, v_bskh))
    t = q_btnh.shape[1]
    if keys_start_at_query_0 and k_bskh.shape[1] > t:  # empty cache slots past the prompt: never visible
        k_bskh, v_bskh, mask_b1ts = k_bskh[:, :t], v_bskh[:, :t], mask_b1ts[..., :t]
    if keys_start_at_query_0 and t > 1 and _fused_attention_available(q_btnh):
        # XLA's attention on GPU materialises every [t, s] score block (and the scan keeps one per
        # layer for the backward pass: 42 GiB at Qwen2-0.5B, batch 16 x 2048 on an H100); cuDNN's
        # fused kernel keeps none. The mask (padding, sliding window, packed documents) goes in as a bias.
        out = jax.nn.dot_product_attention(
            q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale, is_causal=True, implementation="cudnn"
        )
        return out.astype(out_dtype)
    block = max(_CAUSAL_BLOCK, -(-t // _MAX_CAUSAL_BLOCKS))
    if not keys_start_at_query_0 or t <= block or backend() != "cpu":
        out = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale, implementation=None)
        return out.astype(out_dtype)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)  # the mask is causal by slot: keys past `end` are invisible to this block
        outs.append(
            jax.nn.dot_product_attention(
                q_btnh[:, start:end],
                k_bskh[:, :end],
                v_bskh[:, :end],
                mask=mask_b1ts[:, :, start:end, :end],
                scale=scale,
                implementation=None,
            )
        )
    return jnp.concatenate(outs, axis=1).astype(out_dtype)


class Attention(nn.Module):
    config: Qwen2Config
    options: RunOptions

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, mask_b1ts, cache_k_bskh=None, cache_v_bskh=None, write_index=None):
        cfg, opt = self.config, self.options
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        init = normal_init(cfg)
        wq = kernel(self, opt, "q_kernel", init, (d, n, h), ("embed", "q_heads", "head_dim"))
        wk = kernel(self, opt, "k_kernel", init, (d, k, h), ("embed", "kv_heads", "head_dim"))
        wv = kernel(self, opt, "v_kernel", init, (d, k, h), ("embed", "kv_heads", "head_dim"))
        wo = kernel(self, opt, "o_kernel", init, (n, h, d), ("q_heads", "head_dim", "embed"))
        x = x_btd.astype(opt.compute_dtype)
        q_btnh = project(x, wq, "btd,dnh->btnh", opt, "q_kernel")
        k_btkh = project(x, wk, "btd,dkh->btkh", opt, "k_kernel")
        v_btkh = project(x, wv, "btd,dkh->btkh", opt, "v_kernel")
        if cfg.qkv_bias:
            zeros, pd, dt = nn.initializers.zeros, opt.param_dtype, opt.compute_dtype
            q_btnh += param(self, "q_bias", zeros, (n, h), pd, ("q_heads", "head_dim")).astype(dt)
            k_btkh += param(self, "k_bias", zeros, (k, h), pd, ("kv_heads", "head_dim")).astype(dt)
            v_btkh += param(self, "v_bias", zeros, (k, h), pd, ("kv_heads", "head_dim")).astype(dt)
        unrotated_q_btnh = q_btnh
        q_btnh = apply_rotary(q_btnh, cos_bth, sin_bth)
        k_btkh = apply_rotary(k_btkh, cos_bth, sin_bth)
        q_btnh = opt.constrain(q_btnh, ("batch", "length", "act_heads", None))

        if cache_k_bskh is not None:
            # Write this chunk into the cache at [write_index, write_index + t), then attend over it all.
            cache_k_bskh = write_at(cache_k_bskh, k_btkh.astype(cache_k_bskh.dtype), write_index)
            cache_v_bskh = write_at(cache_v_bskh, v_btkh.astype(cache_v_bskh.dtype), write_index)
            keys, values = cache_k_bskh.astype(opt.compute_dtype), cache_v_bskh.astype(opt.compute_dtype)
        else:
            keys, values = k_btkh, v_btkh
        if isinstance(mask_b1ts, dual_chunk.DualChunkInputs):
            # Dual Chunk Attention: cos/sin are at the keys' in-chunk positions (the intra-chunk
            # queries' too), so the cache holds keys as every later query needs them.
            dca = mask_b1ts
            q_succ_btnh = apply_rotary(unrotated_q_btnh, dca.succ_cos_bth, dca.succ_sin_bth)
            q_inter_btnh = apply_rotary(unrotated_q_btnh, dca.inter_cos_bth, dca.inter_sin_bth)
            out_btnh = dual_chunk.attention(q_btnh, q_succ_btnh, q_inter_btnh, keys, values, dca)
        elif isinstance(mask_b1ts, sequence_parallel.SequenceParallelInputs):
            out_btnh = sequence_parallel.attention(q_btnh, keys, values, mask_b1ts, h**-0.5, opt.sharding)
        else:
            out_btnh = attention_core(
                q_btnh, keys, values, mask_b1ts, h**-0.5, None if cache_k_bskh is None else write_index
            )
        out_btnh = out_btnh.astype(opt.compute_dtype)
        out_btd = project(out_btnh, wo, "btnh,nhd->btd", opt, "o_kernel")
        return opt.constrain(out_btd, ("batch", "length", "act_embed")), (cache_k_bskh, cache_v_bskh)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    config: Qwen2Config
    options: RunOptions
    intermediate_size: int

    @nn.compact
    def __call__(self, x_btd):
        opt = self.options
        init = normal_init(self.config)
        d, f = self.config.hidden_size, self.intermediate_size
        w_gate = kernel(self, opt, "gate_kernel", init, (d, f), ("embed", "mlp"))
        w_up = kernel(self, opt, "up_kernel", init, (d, f), ("embed", "mlp"))
        w_down = kernel(self, opt, "down_kernel", init, (f, d), ("mlp", "embed"))
        x = x_btd.astype(opt.compute_dtype)
        gate_btf = project(x, w_gate, "btd,df->btf", opt, "gate_kernel")
        up_btf = project(x, w_up, "btd,df->btf", opt, "up_kernel")
        hidden_btf = opt.constrain(jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "act_mlp"))
        return project(hidden_btf, w_down, "btf,fd->btd", opt, "down_kernel")
