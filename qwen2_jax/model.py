"""The Qwen2 / Qwen2-MoE causal LM as Flax Linen modules.

Decoder layers are stacked along a leading `layers` axis and run with `nn.scan`. A model whose layers
differ in kind (MoE configs with `mlp_only_layers` or `decoder_sparse_step` > 1) is split into
segments, maximal runs of consecutive layers of one kind, each scanned on its own: params["layers"]
when there is one segment, params["layers_0"], params["layers_1"], ... otherwise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2_jax.config import Qwen2Config
from qwen2_jax.kv_cache import KVCache
from qwen2_jax.layers import MLP, Attention, RMSNorm, _param, attention_mask, normal_init, rotary_tables
from qwen2_jax.sharding import ShardingContext

Dtype = Any


def layer_segments(config: Qwen2Config) -> list[tuple[str, tuple[int, ...]]]:
    """[(param name, layer indices)], consecutive layers grouped by whether their MLP is sparse."""
    runs: list[list[int]] = []
    for i in range(config.num_hidden_layers):
        if runs and config.is_sparse_layer(runs[-1][-1]) == config.is_sparse_layer(i):
            runs[-1].append(i)
        else:
            runs.append([i])
    if len(runs) == 1:
        return [("layers", tuple(runs[0]))]
    return [(f"layers_{s}", tuple(r)) for s, r in enumerate(runs)]


class DecoderLayer(nn.Module):
    config: Qwen2Config
    dtype: Dtype
    param_dtype: Dtype
    sparse: bool = False
    sharding: ShardingContext | None = None
    output_hidden_states: bool = False
    output_router_logits: bool = False
    moe_impl: str = "auto"
    moe_exchange: str = "auto"

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, mask_full, mask_sliding, write_index,
                 is_sliding, cache_k, cache_v):
        cfg = self.config
        mask = mask_full if mask_sliding is None else jnp.where(is_sliding, mask_sliding, mask_full)
        residual = x_btd
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_layernorm")(x_btd)
        attn_out, (cache_k, cache_v) = Attention(cfg, self.dtype, self.param_dtype, self.sharding, name="self_attn")(
            h, cos_bth, sin_bth, mask, cache_k, cache_v, write_index)
        x_btd = residual + attn_out
        residual = x_btd
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x_btd)
        router_logits = None
        if self.sparse:
            from qwen2_jax.layers import SparseMoeBlock

            mlp_out, router_logits = SparseMoeBlock(cfg, self.dtype, self.param_dtype, self.sharding, self.moe_impl,
                                                     self.moe_exchange, name="mlp")(h)
        else:
            mlp_out = MLP(cfg.hidden_size, cfg.intermediate_size, cfg, self.dtype, self.param_dtype,
                          self.sharding, name="mlp")(h)
        x_btd = residual + mlp_out
        if self.sharding is not None:
            x_btd = self.sharding.constrain(x_btd, ("batch", "length", "act_embed"))
        outputs = {"cache_k": cache_k, "cache_v": cache_v}
        if self.output_hidden_states:
            outputs["hidden"] = x_btd
        if self.output_router_logits and router_logits is not None:
            outputs["router_logits"] = router_logits
        return x_btd, outputs


class Qwen2ForCausalLM(nn.Module):
    """Embedding, decoder segments, final norm, LM head (tied or not).

    dtype is the compute dtype, param_dtype the dtype parameters are created in (init only: loaded
    parameters keep their own dtype). scan_unroll > 1 unrolls the layer loop (1 = rolled scan).
    moe_impl / moe_exchange choose the MoE grouped matmul and expert-parallel token exchange
    (`qwen2_jax.moe.SparseMoeBlock`); "auto" picks by backend.
    """

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    sharding: ShardingContext | None = None
    scan_unroll: int = 1
    remat: bool = False
    moe_impl: str = "auto"
    moe_exchange: str = "auto"

    @nn.compact
    def __call__(self, input_ids_bt, positions_bt, attention_mask_bt, cache: KVCache | None = None,
                 write_index=0, logits_index_b=None, output_hidden_states: bool = False,
                 output_router_logits: bool = False):
        """Returns a dict: logits [b, t, vocab] float32 (or [b, 1, vocab] at `logits_index_b`), and
        `cache`, `hidden_states` (HF's convention: embeddings, each layer's output, the last one
        after the final norm), `router_logits` when asked."""
        cfg = self.config
        embedding = _param(self, "embed_tokens", normal_init(cfg), (cfg.vocab_size, cfg.hidden_size),
                           self.param_dtype, ("vocab", "embed"))
        x_btd = jnp.take(embedding, input_ids_bt, axis=0).astype(self.dtype)
        x_btd = self._constrain(x_btd, ("batch", "length", "act_embed"))
        cos_bth, sin_bth = rotary_tables(cfg, positions_bt, self.dtype)

        t = input_ids_bt.shape[1]
        valid_bt = attention_mask_bt.astype(bool)
        new_pos_bt = jnp.where(valid_bt, positions_bt, -1).astype(jnp.int32)
        q_slot_t = write_index + jnp.arange(t)
        if cache is None:
            k_pos_bs, k_slot_s = new_pos_bt, jnp.arange(t)
        else:
            k_pos_bs = jax.lax.dynamic_update_slice(cache.pos, new_pos_bt, (0, write_index))
            k_slot_s = jnp.arange(cache.num_slots)
        mask_full = attention_mask(q_slot_t, positions_bt, k_slot_s, k_pos_bs, None)
        any_sliding = any(cfg.layer_is_sliding)
        mask_sliding = (attention_mask(q_slot_t, positions_bt, k_slot_s, k_pos_bs, cfg.sliding_window)
                        if any_sliding else None)

        hidden_states = [x_btd] if output_hidden_states else None
        router_logits = []
        new_k, new_v = [], []
        for s, (name, layer_ids) in enumerate(layer_segments(cfg)):
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, 0),
                length=len(layer_ids),
                unroll=min(self.scan_unroll, len(layer_ids)),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.dtype, self.param_dtype, cfg.is_sparse_layer(layer_ids[0]), self.sharding,
              output_hidden_states, output_router_logits, self.moe_impl, self.moe_exchange, name=name)
            is_sliding_l = jnp.array([cfg.layer_is_sliding[i] for i in layer_ids])
            cache_k = cache.k[s] if cache is not None else None
            cache_v = cache.v[s] if cache is not None else None
            x_btd, outs = scanned(x_btd, cos_bth, sin_bth, mask_full, mask_sliding, write_index,
                                  is_sliding_l, cache_k, cache_v)
            new_k.append(outs["cache_k"])
            new_v.append(outs["cache_v"])
            if output_hidden_states:
                hidden_states.extend(outs["hidden"][i] for i in range(len(layer_ids)))
            if "router_logits" in outs:
                router_logits.extend(outs["router_logits"][i] for i in range(len(layer_ids)))

        x_btd = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="norm")(x_btd)
        if output_hidden_states:
            hidden_states[-1] = x_btd  # as HF: the last entry is after the final norm
        if logits_index_b is not None:
            x_btd = jnp.take_along_axis(x_btd, logits_index_b[:, None, None], axis=1)
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x_btd, embedding.astype(self.dtype),
                                preferred_element_type=jnp.float32)
        else:
            head = _param(self, "lm_head", normal_init(cfg), (cfg.hidden_size, cfg.vocab_size),
                          self.param_dtype, ("embed", "vocab"))
            logits = jnp.einsum("btd,dv->btv", x_btd, head.astype(self.dtype), preferred_element_type=jnp.float32)
        logits = self._constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))

        out: dict[str, Any] = {"logits": logits}
        if cache is not None:
            out["cache"] = KVCache(k=tuple(new_k), v=tuple(new_v), pos=k_pos_bs)
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_router_logits:
            out["router_logits"] = tuple(router_logits)
        return out

    def _constrain(self, x, names):
        return self.sharding.constrain(x, names) if self.sharding is not None else x


def positions_from_mask(attention_mask_bt):
    """Positions that count real tokens only (HF generate's cumsum(mask) - 1), 0 on padding."""
    mask = attention_mask_bt.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask
