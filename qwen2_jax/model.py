"""The Qwen2 / Qwen2-MoE causal LM as Flax Linen modules: one forward pass, two layer layouts.

`options.layer_layout` chooses how the decoder layers are held and run, with the same `DecoderLayer`
code either way:
- "stacked": layers stacked along a leading `layers` axis and run with `nn.scan` (the checkpoint
  layout; training). A model whose layers differ in kind (MoE configs with `mlp_only_layers` or
  `decoder_sparse_step` > 1) is split into segments, maximal runs of consecutive layers of one kind,
  each scanned on its own: params["layers"] for one segment, params["layers_0"], ... otherwise.
- "per_layer": params["layer_0"], params["layer_1"], ...: a Python loop over one module per layer
  (generation on CPU). `layouts.relayout` converts stacked params to it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2_jax import cpu_kernels, dual_chunk, sequence_parallel
from qwen2_jax.backend import backend
from qwen2_jax.config import Qwen2Config
from qwen2_jax.kv_cache import KVCache
from qwen2_jax.layers import (
    MLP,
    Attention,
    RMSNorm,
    attention_mask,
    normal_init,
    param,
    rotary_tables,
    segment_mask,
    write_at,
)
from qwen2_jax.matmul import Int8Kernel, apply_kernel
from qwen2_jax.moe import SparseMoeBlock
from qwen2_jax.options import RunOptions

REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute elementwise ops
    "full": jax.checkpoint_policies.nothing_saveable,  # keep each layer's input only
}


def per_layer_name(i: int) -> str:
    return f"layer_{i}"


class DecoderLayer(nn.Module):
    config: Qwen2Config
    options: RunOptions
    sparse: bool = False
    output_hidden_states: bool = False
    output_router_logits: bool = False

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, mask_full, mask_sliding, write_index, is_sliding, cache_k, cache_v):
        cfg, opt = self.config, self.options
        mask = mask_full if mask_sliding is None else jnp.where(is_sliding, mask_sliding, mask_full)
        residual = x_btd
        h = RMSNorm(cfg.rms_norm_eps, opt.param_dtype, name="input_layernorm")(x_btd)
        attn_out, (cache_k, cache_v) = Attention(cfg, opt, name="self_attn")(
            h, cos_bth, sin_bth, mask, cache_k, cache_v, write_index
        )
        x_btd = residual + attn_out
        residual = x_btd
        h = RMSNorm(cfg.rms_norm_eps, opt.param_dtype, name="post_attention_layernorm")(x_btd)
        router_logits = None
        if self.sparse:
            mlp_out, router_logits = SparseMoeBlock(cfg, opt, name="mlp")(h)
        else:
            mlp_out = MLP(cfg, opt, cfg.intermediate_size, name="mlp")(h)
        x_btd = opt.constrain(residual + mlp_out, ("batch", "length", "act_embed"))
        outputs = {"cache_k": cache_k, "cache_v": cache_v}
        if self.output_hidden_states:
            outputs["hidden"] = x_btd
        if self.output_router_logits and router_logits is not None:
            outputs["router_logits"] = router_logits
        return x_btd, outputs


def vocab_logits(x_btd, head, tied: bool, dtype, matmul: str = "auto"):
    """Float32 logits of final hidden states: head is the embedding [vocab, d] when tied, the LM head
    kernel [d, vocab] when not, or an Int8Kernel [vocab, d] (quantized params, tied or not). The
    product goes through `qwen2_jax.matmul.apply_kernel`, like every other kernel's."""
    spec = "btd,vd->btv" if tied or isinstance(head, Int8Kernel) else "btd,dv->btv"
    return apply_kernel(spec, x_btd, head, matmul=matmul, compute_dtype=dtype, out_dtype=jnp.float32)


def embedding_rows(embedding_vd, ids_bt, on_mesh: bool = False):
    """embedding[ids]. On CPU a 16-bit float table is read by `cpu_kernels.take_rows`: XLA:CPU gathers
    bfloat16 through a float32 copy of the whole table, which inside the decode loop it hoists out of
    the loop, converting the 151936 x 896 Qwen2 table on every generate call (112 ms of a 220 ms
    bfloat16 prefill on this project's 2-core CPU, and a float32 copy held in memory)."""
    if (
        backend() == "cpu"
        and not on_mesh  # a custom call's operands are gathered whole on a mesh
        and jnp.issubdtype(embedding_vd.dtype, jnp.floating)
        and embedding_vd.dtype.itemsize == 2
        and cpu_kernels.available()
    ):
        return cpu_kernels.take_rows(embedding_vd, ids_bt)
    return jnp.take(embedding_vd, ids_bt, axis=0)


def lm_head_of(config: Qwen2Config, params):
    """The LM head as `vocab_logits` takes it: (head, tied)."""
    if "lm_head_int8" in params:
        return Int8Kernel(params["lm_head_int8"], params["lm_head_int8_scale"]), False
    if config.tie_word_embeddings:
        return params["embed_tokens"], True
    return params["lm_head"], False


def lm_head_logits(config: Qwen2Config, params, x_btd, dtype=None, matmul: str = "auto"):
    """The model's own LM head applied to final (normed) hidden states, e.g. chunk by chunk in a loss."""
    head, tied = lm_head_of(config, params)
    return vocab_logits(x_btd, head, tied, dtype or x_btd.dtype, matmul)


class Qwen2ForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm, LM head (tied or not). See RunOptions for `options`."""

    config: Qwen2Config
    options: RunOptions = RunOptions()

    @nn.compact
    def __call__(
        self,
        input_ids_bt,
        positions_bt,
        attention_mask_bt,
        cache: KVCache | None = None,
        write_index=0,
        logits_index_b=None,
        output_hidden_states: bool = False,
        output_router_logits: bool = False,
        return_logits: bool = True,
        segment_ids_bt=None,
        sequence_parallel_rows: bool = False,
    ):
        """Returns a dict: logits [b, t, vocab] float32 (or [b, 1, vocab] at `logits_index_b`; with
        return_logits=False, `final_hidden` [b, t, d] after the final norm instead), and `cache`,
        `hidden_states` (HF's convention: embeddings, each layer's output, the last one after the
        final norm), `router_logits` when asked. `segment_ids_bt` (uncached only): packed rows, a
        document number per token; attention stays inside each document (positions are the caller's:
        `positions_from_segments`). sequence_parallel_rows (uncached training): every [b, t] input is in
        zig-zag order over the mesh's `sequence` axis (`qwen2_jax.sequence_parallel`), and so is the output."""
        cfg, opt = self.config, self.options
        embedding = param(
            self,
            "embed_tokens",
            normal_init(cfg),
            (cfg.vocab_size, cfg.hidden_size),
            opt.param_dtype,
            ("vocab", "embed"),
        )
        x_btd = embedding_rows(embedding, input_ids_bt, opt.sharding is not None).astype(opt.compute_dtype)
        x_btd = opt.constrain(x_btd, ("batch", "length", "act_embed"))
        t = input_ids_bt.shape[1]
        dca = cfg.dual_chunk_attention
        ordinary = dual_chunk.fits_ordinary_attention(dca, t if cache is None else cache.num_slots)
        if ordinary:
            cos_bth, sin_bth = rotary_tables(cfg, positions_bt, opt.compute_dtype)
        new_pos_bt = jnp.where(attention_mask_bt.astype(bool), positions_bt, -1).astype(jnp.int32)
        # write_index: a scalar, or [b] with one cache index per row (serving's decode slots)
        q_slot = (write_index[:, None] if jnp.ndim(write_index) == 1 else write_index) + jnp.arange(t)
        if cache is None:
            k_pos_bs, k_slot_s = new_pos_bt, jnp.arange(t)
        else:
            k_pos_bs = write_at(cache.pos, new_pos_bt, write_index)
            k_slot_s = jnp.arange(cache.num_slots)
        if sequence_parallel_rows:
            _check_sequence_parallel(cfg, opt, cache, ordinary)
            # the rows' token validity and documents take the mask's place: each device builds the mask
            # of its own queries against the gathered keys (qwen2_jax/sequence_parallel.py)
            mask_full = sequence_parallel.make_inputs(attention_mask_bt, segment_ids_bt)
        elif ordinary:
            mask_full = attention_mask(q_slot, positions_bt, k_slot_s, k_pos_bs, None)
        else:
            if segment_ids_bt is not None:
                raise ValueError("dual chunk attention runs unpacked sequences only (no segment_ids_bt)")
            # DCA's inputs take the mask's place (no [t, s] mask for a long prompt); cos/sin are at
            # the keys' in-chunk positions
            (cos_bth, sin_bth), mask_full = dual_chunk.make_inputs(
                dca,
                lambda indices_bt: rotary_tables(cfg, indices_bt, opt.compute_dtype),
                positions_bt,
                q_slot,
                k_pos_bs,
                cfg.head_size**-0.5,
            )
        mask_sliding = (
            attention_mask(q_slot, positions_bt, k_slot_s, k_pos_bs, cfg.sliding_window)
            if any(cfg.layer_is_sliding)
            else None
        )
        if segment_ids_bt is not None and not sequence_parallel_rows:
            if cache is not None:
                raise ValueError("segment_ids_bt are for an uncached forward (packed training rows)")
            same_document = segment_mask(segment_ids_bt, segment_ids_bt)
            mask_full = mask_full & same_document
            mask_sliding = None if mask_sliding is None else mask_sliding & same_document

        layer_cls = DecoderLayer
        if opt.remat != "none":
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=REMAT_POLICIES[opt.remat])
        run = self._per_layer if opt.layer_layout == "per_layer" else self._stacked
        shared = (cos_bth, sin_bth, mask_full, mask_sliding, write_index)
        flags = (output_hidden_states, output_router_logits)
        x_btd, layer_outs = run(layer_cls, x_btd, shared, cache, flags)

        x_btd = RMSNorm(cfg.rms_norm_eps, opt.param_dtype, name="norm")(x_btd)
        out: dict[str, Any] = {}
        if output_hidden_states:
            out["hidden_states"] = tuple(layer_outs["hidden"][:-1]) + (x_btd,)  # HF: the last is after the norm
        if output_router_logits:
            out["router_logits"] = tuple(layer_outs["router_logits"])
        if cache is not None:
            out["cache"] = KVCache(k=tuple(layer_outs["cache_k"]), v=tuple(layer_outs["cache_v"]), pos=k_pos_bs)
        if logits_index_b is not None:
            x_btd = jnp.take_along_axis(x_btd, logits_index_b[:, None, None], axis=1)
        if not return_logits:  # the head is the caller's (the trainer's chunked loss): not even declared
            out["final_hidden"] = x_btd
            return out
        tied = cfg.tie_word_embeddings
        if opt.quantize == "int8":  # an int8 copy of the head matrix, [vocab, d], even when tied
            v, d = cfg.vocab_size, cfg.hidden_size
            head = Int8Kernel(
                param(self, "lm_head_int8", nn.initializers.zeros, (v, d), jnp.int8, ("vocab", "embed")),
                param(self, "lm_head_int8_scale", nn.initializers.ones, (v,), jnp.float32, ("vocab",)),
            )
            tied = False
        elif tied:
            head = embedding
        else:
            head = param(
                self,
                "lm_head",
                normal_init(cfg),
                (cfg.hidden_size, cfg.vocab_size),
                opt.param_dtype,
                ("embed", "vocab"),
            )
        logits = vocab_logits(x_btd, head, tied, opt.compute_dtype, opt.matmul)
        out["logits"] = opt.constrain(logits, ("batch", "length", "act_vocab"))
        return out

    def _stacked(self, layer_cls, x_btd, shared: tuple, cache, flags: tuple[bool, bool]):
        """The layers as nn.scan over each stacked segment. shared: (cos, sin, full mask, sliding
        mask, write index); flags: (output_hidden_states, output_router_logits)."""
        cfg, opt = self.config, self.options
        outs = _new_outputs(x_btd)
        for s, (name, layer_ids) in enumerate(cfg.layer_segments()):
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, 0),
                length=len(layer_ids),
                unroll=min(opt.scan_unroll, len(layer_ids)),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, opt, cfg.is_sparse_layer(layer_ids[0]), *flags, name=name)
            is_sliding_l = jnp.array([cfg.layer_is_sliding[i] for i in layer_ids])
            caches = (cache.k[s], cache.v[s]) if cache is not None else (None, None)
            x_btd, seg = scanned(x_btd, *shared, is_sliding_l, *caches)
            _collect(outs, seg, len(layer_ids))
        return x_btd, outs

    def _per_layer(self, layer_cls, x_btd, shared: tuple, cache, flags: tuple[bool, bool]):
        """The layers as a Python loop over one module per layer (same arguments as _stacked)."""
        cfg, opt = self.config, self.options
        cos_bth, sin_bth, mask_full, mask_sliding, write_index = shared
        outs = _new_outputs(x_btd)
        for i in range(cfg.num_hidden_layers):
            mask = mask_sliding if cfg.layer_is_sliding[i] else mask_full
            layer = layer_cls(cfg, opt, cfg.is_sparse_layer(i), *flags, name=per_layer_name(i))
            caches = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
            x_btd, one = layer(x_btd, cos_bth, sin_bth, mask, None, write_index, False, *caches)
            _collect(outs, one, None)
        return x_btd, outs


def _check_sequence_parallel(cfg: Qwen2Config, opt: RunOptions, cache, ordinary: bool) -> None:
    mesh = opt.sharding.mesh if opt.sharding is not None else None
    if mesh is None or mesh.shape.get(sequence_parallel.AXIS, 1) == 1:
        raise ValueError("sequence_parallel_rows needs a mesh with a sequence axis larger than 1")
    if cache is not None:
        raise ValueError("sequence parallelism is for an uncached forward (training rows)")
    if not ordinary or any(cfg.layer_is_sliding):
        raise ValueError("sequence parallelism runs full causal attention only (no sliding window, no dual chunk)")


def _new_outputs(x_btd) -> dict[str, list]:
    return {"hidden": [x_btd], "router_logits": [], "cache_k": [], "cache_v": []}


def _collect(outs: dict[str, list], layer_outs: dict, stacked: int | None) -> None:
    """Append one layer's (or one scanned segment's `stacked` layers') outputs to `outs`."""
    outs["cache_k"].append(layer_outs["cache_k"])
    outs["cache_v"].append(layer_outs["cache_v"])
    for key in ("hidden", "router_logits"):
        if key in layer_outs:
            value = layer_outs[key]
            if stacked:
                outs[key].extend(value[j] for j in range(stacked))
            else:
                outs[key].append(value)


def positions_from_mask(attention_mask_bt):
    """Positions that count real tokens only (HF generate's cumsum(mask) - 1), 0 on padding."""
    mask = attention_mask_bt.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


def positions_from_segments(segment_ids_bt):
    """Positions that restart at 0 where each document of a packed row starts (a document is a run of
    one segment id), 0 on padding (segment id 0)."""
    segment_ids_bt = jnp.asarray(segment_ids_bt, jnp.int32)
    t = segment_ids_bt.shape[1]
    index_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_bt.shape)
    starts_bt = jnp.concatenate(
        [jnp.ones_like(segment_ids_bt[:, :1], bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1
    )
    first_bt = jax.lax.cummax(jnp.where(starts_bt, index_bt, 0), axis=1)
    return jnp.where(segment_ids_bt > 0, index_bt - first_bt, 0)
