"""The KV cache: an explicit pytree passed into and returned from jitted functions (and donated).

Two layouts of the same data, matching the two ways of running the layer stack:
- stacked (layer_layout "stacked", nn.scan): one [layers, batch, slots, kv_heads, head_dim] array
  per layer segment for keys and one for values;
- per-layer (layer_layout "per_layer"): one [batch, slots, kv_heads, head_dim] array per layer, so
  no decode step slices a layer out of a stacked buffer.
Both carry `pos` [batch, slots], the RoPE position of the token held in each slot (-1 = empty or
padding). Attention masks are built from `pos` (valid keys, sliding windows) and slot order
(causality), so a left-padded batch of prompts of different lengths shares one write index.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

from qwen2_jax.config import Qwen2Config

CACHE_AXES = ("batch", "cache_length", "act_kv_heads", None)


@flax.struct.dataclass
class KVCache:
    k: tuple  # per segment [layers_in_segment, b, s, kv_heads, head_dim], or per layer [b, s, kv, hd]
    v: tuple
    pos: jnp.ndarray  # [b, s] int32

    @property
    def num_slots(self) -> int:
        return self.pos.shape[1]

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def per_layer(self) -> bool:
        return self.k[0].ndim == 4


def cache_shapes(config: Qwen2Config, batch_size: int, num_slots: int, per_layer: bool = False):
    """Shapes of the k (= v) arrays, one per segment or per layer."""
    shape = (batch_size, num_slots, config.num_key_value_heads, config.head_size)
    if per_layer:
        return [shape] * config.num_hidden_layers
    return [(len(layers),) + shape for _, layers in config.layer_segments()]


def init_cache(
    config: Qwen2Config, batch_size: int, num_slots: int, dtype=jnp.bfloat16, per_layer: bool = False, sharding=None
) -> KVCache:
    """An empty cache (all slots pos -1), each array created straight into its sharding when
    `sharding` (a ShardingContext) is given: batch over the data axes, kv heads over tensor."""
    shapes = cache_shapes(config, batch_size, num_slots, per_layer)
    if sharding is None:
        placed = KVCache(k=(None,) * len(shapes), v=(None,) * len(shapes), pos=None)
    else:
        placed = cache_shardings(config, batch_size, num_slots, per_layer, sharding)
    dtype = jnp.dtype(dtype)
    return KVCache(
        k=tuple(jnp.zeros(s, dtype, device=d) for s, d in zip(shapes, placed.k)),
        v=tuple(jnp.zeros(s, dtype, device=d) for s, d in zip(shapes, placed.v)),
        pos=jnp.full((batch_size, num_slots), -1, jnp.int32, device=placed.pos),
    )


def cache_shardings(config: Qwen2Config, batch_size: int, num_slots: int, per_layer: bool, sharding):
    shapes = cache_shapes(config, batch_size, num_slots, per_layer)
    kv = tuple(sharding.sharding(((None,) if len(s) == 5 else ()) + CACHE_AXES, s) for s in shapes)
    return KVCache(k=kv, v=kv, pos=sharding.sharding(("batch", "cache_length"), (batch_size, num_slots)))
