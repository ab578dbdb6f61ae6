"""`forward`: the uncached forward pass, jit-compiled once per config, options and shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.config import Qwen2Config
from qwen2_jax.model import Qwen2ForCausalLM, positions_from_mask
from qwen2_jax.options import RunOptions
from qwen2_jax.sharding import ShardingContext, mesh_of


def sharding_of(params) -> ShardingContext | None:
    """The sharding context of params placed on a mesh (None on one device)."""
    mesh = mesh_of(params)
    return ShardingContext(mesh) if mesh is not None else None


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


def batch_input(x, sharding: ShardingContext | None):
    """Token ids or a mask as int32, placed with the batch split over the mesh's batch axes."""
    x = jnp.asarray(np.asarray(x), jnp.int32)
    if sharding is not None:
        x = jax.device_put(x, sharding.sharding(("batch", "length"), x.shape))
    return x


@functools.partial(jax.jit, static_argnames=("config", "options", "output_hidden_states", "output_router_logits"))
def _forward(params, input_ids_bt, attention_mask_bt, *, config, options, output_hidden_states, output_router_logits):
    model = Qwen2ForCausalLM(config, options)
    return model.apply(
        {"params": params},
        input_ids_bt,
        positions_from_mask(attention_mask_bt),
        attention_mask_bt,
        output_hidden_states=output_hidden_states,
        output_router_logits=output_router_logits,
    )


def forward_outputs(
    config: Qwen2Config,
    params,
    input_ids,
    attention_mask=None,
    *,
    options: RunOptions | None = None,
    output_hidden_states: bool = False,
    output_router_logits: bool = False,
):
    """All outputs of the forward pass (logits, and hidden states / router logits when asked).

    options: how to run (compute dtype, scan unroll, MoE kernels, ...); its param_dtype and sharding
    are taken from `params`, and dtype None computes in the params' dtype."""
    batch = validated_batch(config, input_ids, attention_mask=attention_mask)
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask", np.ones_like(input_ids))
    sharding = sharding_of(params)
    options = (options or RunOptions()).for_params(params, sharding)
    return _forward(
        params,
        batch_input(input_ids, sharding),
        batch_input(attention_mask, sharding),
        config=config,
        options=options,
        output_hidden_states=output_hidden_states,
        output_router_logits=output_router_logits,
    )


def forward(config: Qwen2Config, params, input_ids, attention_mask=None):
    """Float32 logits [batch, length, vocab]. attention_mask is 1/0 with padding on either side;
    positions count real tokens only, so padding never changes a real token's logits."""
    return forward_outputs(config, params, input_ids, attention_mask)["logits"]
