"""Sequence (context) parallelism: each sequence split over the mesh's `sequence` axis.

Layout. Activations are sharded on their length over `sequence` (the `length` rule of
qwen2_jax/sharding.py). A causal row cut into n contiguous blocks would give the last device n times
the attention work of the first, so rows are put in zig-zag order before the model: the row is cut
into 2n chunks of c tokens and device i holds chunks i and 2n-1-i (`to_zigzag`). The caller permutes
every [b, t] input the same way (token ids, positions, attention mask, segment ids, targets); the
loss is a sum over tokens, so its value does not change, and `from_zigzag` undoes the order of any
per-token output. Attention masks use each token's true index in the row, never its slot.

Attention. Inside a `jax.shard_map` (each device on its own rows, heads and chunks), each device
all-gathers the keys and values of the whole row and attends its own queries to them. All-gather
rather than a ring of `ppermute`s: with grouped-query attention K/V are num_key_value_heads /
num_attention_heads of the activations (1/7 on Qwen2-7B), so gathering them costs little next to the
layer's matmuls, and every device can then call the library's fused attention (cuDNN on GPU) once
per query chunk with a mask: no hand-written online softmax whose backward pass would otherwise keep
every ring step's scores. The backward pass of the all-gather is a reduce-scatter of the K/V
gradients, derived by JAX.

Zig-zag is what keeps this balanced with static shapes: a device's low chunk i < n never sees the
second half of the row, its high chunk 2n-1-i sees the whole first half and part of the second.
So every device runs the same two calls, low queries [c] x first-half keys [n c] and high queries
[c] x all keys [2n c]: 3/4 of the dense [2c] x [2n c] block, the same on every device, where
contiguous blocks would need the dense block everywhere to keep shapes equal.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qwen2_jax.backend import backend
from qwen2_jax.sharding import ShardingContext

AXIS = "sequence"


def zigzag_order(length: int, shards: int) -> np.ndarray:
    """Row indices in zig-zag order: device i's block holds chunks i and 2*shards-1-i."""
    if length % (2 * shards):
        raise ValueError(f"sequence length {length} must be divisible by 2 x the sequence axis ({2 * shards})")
    chunk = length // (2 * shards)
    chunks = [c for i in range(shards) for c in (i, 2 * shards - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def to_zigzag(x_bt, shards: int):
    """x [b, t, ...] with its length in zig-zag order (identity for one shard)."""
    if shards == 1:
        return x_bt
    return jnp.take(x_bt, zigzag_order(x_bt.shape[1], shards), axis=1)


def from_zigzag(x_bt, shards: int):
    """The inverse of `to_zigzag`: x [b, t, ...] back in row order."""
    if shards == 1:
        return x_bt
    return jnp.take(x_bt, np.argsort(zigzag_order(x_bt.shape[1], shards)), axis=1)


@dataclasses.dataclass(frozen=True)
class SequenceParallelInputs:
    """What attention needs in place of a [b, 1, t, s] mask (which, sharded, no device could build
    for its keys): per token of the zig-zag ordered row, whether it is a real token and its document."""

    valid_bt: Any  # bool [b, t]: real tokens (keys a query may see)
    segment_ids_bt: Any  # int32 [b, t]: packed documents (all 1 for unpacked rows)


jax.tree_util.register_dataclass(SequenceParallelInputs, data_fields=["valid_bt", "segment_ids_bt"], meta_fields=[])


def make_inputs(attention_mask_bt, segment_ids_bt) -> SequenceParallelInputs:
    valid_bt = attention_mask_bt.astype(bool)
    if segment_ids_bt is None:
        segment_ids_bt = jnp.ones(valid_bt.shape, jnp.int32)
    return SequenceParallelInputs(valid_bt, jnp.asarray(segment_ids_bt, jnp.int32))


def _dot_product_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, scale):
    fused = (
        backend() == "gpu"
        and q_btnh.dtype in (jnp.bfloat16, jnp.float16)
        and q_btnh.shape[-1] % 8 == 0
        and q_btnh.shape[-1] <= 256
    )
    if q_btnh.dtype == jnp.float16 and backend() == "cpu":  # XLA:CPU has no F16_F16_F32 dot
        q_btnh, k_bskh, v_bskh = (a.astype(jnp.float32) for a in (q_btnh, k_bskh, v_bskh))
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale, implementation="cudnn" if fused else None
    )


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def attention(q_btnh, k_btkh, v_btkh, inputs: SequenceParallelInputs, scale: float, ctx: ShardingContext):
    """Causal attention of zig-zag ordered rows sharded on their length over the mesh's sequence axis:
    [b, t, n, h] out. Each device gathers all keys and values and attends its two query chunks.

    The shard_map is manual over every mesh axis (batch and heads keep their shardings, each device
    computes on its own block): the fused cuDNN kernel then sees plain local arrays, where a
    partly-automatic shard_map would ask its custom partitioner for shardings it cannot read."""
    mesh = ctx.mesh
    shards = mesh.shape[AXIS]
    b, t, n, _ = q_btnh.shape
    group = n // k_btkh.shape[2]
    if t % (2 * shards):
        raise ValueError(f"sequence length {t} must be divisible by 2 x the sequence axis ({2 * shards})")
    chunk = t // (2 * shards)
    # row index of every key after the all-gather: device r's block is chunks r and 2n-1-r
    key_index_s = jnp.asarray(zigzag_order(t, shards), jnp.int32)
    first_half = shards * chunk  # keys of chunks 0 .. n-1: the low query chunks' only keys
    first_half_index_s = jnp.arange(first_half, dtype=jnp.int32)
    q_spec = ctx.spec(("batch", "length", "act_heads", None), q_btnh.shape)
    kv_spec = ctx.spec(("batch", "length", "act_kv_heads", None), k_btkh.shape)
    row_spec = P(q_spec[0], q_spec[1])
    q_head_axes, kv_head_axes = _axes(q_spec[2]), _axes(kv_spec[2])
    # query heads split over an axis that cannot split the (fewer) kv heads: each device picks the kv
    # head of each of its query heads (grouped-query attention: query head j reads kv head j // group)
    pick_kv_heads = q_head_axes != kv_head_axes

    def body(q_bcnh, k_bckh, v_bckh, valid_bc, seg_bc):
        i = jax.lax.axis_index(AXIS)
        if pick_kv_heads:
            n_local = q_bcnh.shape[2]
            kv_head_n = (jax.lax.axis_index(q_head_axes) * n_local + jnp.arange(n_local)) // group
            k_bckh, v_bckh = jnp.take(k_bckh, kv_head_n, axis=2), jnp.take(v_bckh, kv_head_n, axis=2)
        k_all = jax.lax.all_gather(k_bckh, AXIS, axis=1, tiled=True)  # [b, t, k, h] in zig-zag order
        v_all = jax.lax.all_gather(v_bckh, AXIS, axis=1, tiled=True)
        valid_all = jax.lax.all_gather(valid_bc, AXIS, axis=1, tiled=True)
        seg_all = jax.lax.all_gather(seg_bc, AXIS, axis=1, tiled=True)
        offsets = jnp.arange(chunk, dtype=jnp.int32)
        low_index_c = i * chunk + offsets
        high_index_c = (2 * shards - 1 - i) * chunk + offsets

        def first_half_of(x_bt):  # device blocks [low chunk, high chunk] -> the low chunks, in row order
            rows = x_bt.shape[0]
            x = x_bt.reshape((rows, shards, 2, chunk) + x_bt.shape[2:])[:, :, 0]
            return x.reshape((rows, first_half) + x_bt.shape[2:])

        def mask(q_index_c, q_seg_bc, k_index_s, k_valid_bs, k_seg_bs):
            allowed_bcs = (k_index_s[None, None, :] <= q_index_c[None, :, None]) & k_valid_bs[:, None, :]
            allowed_bcs &= q_seg_bc[:, :, None] == k_seg_bs[:, None, :]
            return allowed_bcs[:, None]

        low_mask = mask(
            low_index_c, seg_bc[:, :chunk], first_half_index_s, first_half_of(valid_all), first_half_of(seg_all)
        )
        high_mask = mask(high_index_c, seg_bc[:, chunk:], key_index_s, valid_all, seg_all)
        low_out = _dot_product_attention(q_bcnh[:, :chunk], first_half_of(k_all), first_half_of(v_all), low_mask, scale)
        high_out = _dot_product_attention(q_bcnh[:, chunk:], k_all, v_all, high_mask, scale)
        return jnp.concatenate([low_out, high_out], axis=1).astype(q_bcnh.dtype)

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec),
        out_specs=q_spec,
        check_vma=False,
    )
    return fn(q_btnh, k_btkh, v_btkh, inputs.valid_bt, inputs.segment_ids_bt)
