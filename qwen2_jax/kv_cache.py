"""The KV cache: an explicit pytree passed into and returned from jitted functions (and donated).

Two layouts of the same data, matching the two ways of running the layer stack:
- stacked (`Qwen2ForCausalLM`, nn.scan): one [layers, batch, slots, kv_heads, head_dim] array per
  layer segment for keys and one for values;
- per-layer (generation's unstacked decode, see generate.py): one [batch, slots, kv_heads, head_dim]
  array per layer, so no step slices a layer out of a stacked buffer.
Both carry `pos` [batch, slots], the RoPE position of the token held in each slot (-1 = empty or
padding). Attention masks are built from `pos` (valid keys, sliding windows) and slot order
(causality), so a left-padded batch of prompts of different lengths shares one write index.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
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
    from qwen2_jax.model import layer_segments

    return [(len(layers),) + shape for _, layers in layer_segments(config)]


def init_cache(config: Qwen2Config, batch_size: int, num_slots: int, dtype=jnp.bfloat16,
               per_layer: bool = False, sharding=None) -> KVCache:
    """An empty cache (all slots pos -1). `sharding`: a ShardingContext to place it on its mesh
    (batch over the data axes, kv heads over tensor)."""
    return _init_fn(config, batch_size, num_slots, jnp.dtype(dtype), per_layer, sharding)()


@functools.lru_cache(maxsize=64)
def _init_fn(config: Qwen2Config, batch_size: int, num_slots: int, dtype, per_layer: bool, sharding):
    shapes = cache_shapes(config, batch_size, num_slots, per_layer)

    def make():
        ks = tuple(jnp.zeros(s, dtype) for s in shapes)
        vs = tuple(jnp.zeros(s, dtype) for s in shapes)
        return KVCache(k=ks, v=vs, pos=jnp.full((batch_size, num_slots), -1, jnp.int32))

    if sharding is None:
        return jax.jit(make)
    return jax.jit(make, out_shardings=cache_shardings(config, batch_size, num_slots, per_layer, sharding))


def cache_shardings(config: Qwen2Config, batch_size: int, num_slots: int, per_layer: bool, sharding):
    shapes = cache_shapes(config, batch_size, num_slots, per_layer)
    kv = tuple(sharding.sharding(((None,) if len(s) == 5 else ()) + CACHE_AXES, s) for s in shapes)
    return KVCache(k=kv, v=kv, pos=sharding.sharding(("batch", "cache_length"), (batch_size, num_slots)))
