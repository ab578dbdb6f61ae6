"""The KV cache: an explicit pytree passed into and returned from jitted functions (and donated).

Layout: one [layers, batch, slots, kv_heads, head_dim] array per layer segment for keys and values,
plus `pos` [batch, slots], the RoPE position of the token held in each slot (-1 = empty or padding).
Attention masks are built from `pos` (valid keys, sliding windows) and slot order (causality), so a
left-padded batch of prompts of different lengths shares one write index.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

from qwen2_jax.config import Qwen2Config


@flax.struct.dataclass
class KVCache:
    k: tuple  # per segment: [layers_in_segment, b, s, kv_heads, head_dim]
    v: tuple
    pos: jnp.ndarray  # [b, s] int32

    @property
    def num_slots(self) -> int:
        return self.pos.shape[1]

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]


def init_cache(config: Qwen2Config, batch_size: int, num_slots: int, dtype=jnp.bfloat16) -> KVCache:
    from qwen2_jax.model import layer_segments

    shape = (batch_size, num_slots, config.num_key_value_heads, config.head_size)
    ks, vs = [], []
    for _, layers in layer_segments(config):
        ks.append(jnp.zeros((len(layers),) + shape, dtype))
        vs.append(jnp.zeros((len(layers),) + shape, dtype))
    return KVCache(k=tuple(ks), v=tuple(vs), pos=jnp.full((batch_size, num_slots), -1, jnp.int32))
