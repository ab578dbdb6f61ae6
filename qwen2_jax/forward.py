"""`forward`: the uncached forward pass of design.md §3, jit-compiled once per config and shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.config import Qwen2Config
from qwen2_jax.model import Qwen2ForCausalLM, positions_from_mask
from qwen2_jax.sharding import ShardingContext, mesh_of


def compute_dtype_of(params) -> jnp.dtype:
    """The dtype the model computes in: the embedding's (the checkpoint dtype)."""
    leaf = params["embed_tokens"]
    return jnp.dtype(leaf.dtype)


@functools.lru_cache(maxsize=64)
def _compiled_forward(config: Qwen2Config, dtype, sharding: ShardingContext | None, scan_unroll: int,
                      output_hidden_states: bool, output_router_logits: bool, moe_impl: str, moe_exchange: str):
    model = Qwen2ForCausalLM(config, dtype=dtype, param_dtype=dtype, sharding=sharding, scan_unroll=scan_unroll,
                             moe_impl=moe_impl, moe_exchange=moe_exchange)

    def run(params, input_ids_bt, attention_mask_bt):
        positions_bt = positions_from_mask(attention_mask_bt)
        return model.apply({"params": params}, input_ids_bt, positions_bt, attention_mask_bt,
                           output_hidden_states=output_hidden_states, output_router_logits=output_router_logits)

    return jax.jit(run)


def _batch_input(x, sharding: ShardingContext | None):
    x = jnp.asarray(np.asarray(x), jnp.int32)
    if sharding is not None:
        x = jax.device_put(x, sharding.sharding(("batch", "length"), x.shape))
    return x


def validated_batch(config: Qwen2Config, input_ids, **same_shape) -> dict[str, np.ndarray]:
    """input_ids (and the given same-shaped arrays, None = absent) as numpy, checked: [batch, length],
    equal shapes, token ids inside the vocabulary."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
        raise ValueError(f"token ids must be in [0, {config.vocab_size}), got {input_ids.min()}..{input_ids.max()}")
    batch = {"input_ids": input_ids}
    for name, value in same_shape.items():
        if value is not None:
            value = np.asarray(value)
            if value.shape != input_ids.shape:
                raise ValueError(f"{name} shape {value.shape} != input_ids shape {input_ids.shape}")
            batch[name] = value
    return batch


def forward_outputs(config: Qwen2Config, params, input_ids, attention_mask=None, *, dtype=None,
                    scan_unroll: int = 1, output_hidden_states: bool = False, output_router_logits: bool = False,
                    moe_impl: str = "auto", moe_exchange: str = "auto"):
    """All outputs of the forward pass (logits, and hidden states / router logits when asked).

    moe_impl ("auto" | "ragged_dot" | "tiled") and moe_exchange ("auto" | "allgather" |
    "ragged_all_to_all") choose how MoE layers run; dense models ignore them."""
    from qwen2_jax.moe import EXCHANGES, IMPLS

    if moe_impl not in IMPLS:
        raise ValueError(f"unknown moe_impl {moe_impl!r} (choose from {IMPLS})")
    if moe_exchange not in EXCHANGES:
        raise ValueError(f"unknown moe_exchange {moe_exchange!r} (choose from {EXCHANGES})")
    batch = validated_batch(config, input_ids, attention_mask=attention_mask)
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask", np.ones_like(input_ids))
    mesh = mesh_of(params)
    sharding = ShardingContext(mesh) if mesh is not None else None
    dtype = jnp.dtype(dtype) if dtype is not None else compute_dtype_of(params)
    fn = _compiled_forward(config, dtype, sharding, scan_unroll, output_hidden_states, output_router_logits,
                           moe_impl, moe_exchange)
    return fn(params, _batch_input(input_ids, sharding), _batch_input(attention_mask, sharding))


def forward(config: Qwen2Config, params, input_ids, attention_mask=None):
    """Float32 logits [batch, length, vocab]. attention_mask is 1/0 with padding on either side;
    positions count real tokens only, so padding never changes a real token's logits."""
    return forward_outputs(config, params, input_ids, attention_mask)["logits"]
