"""The one table between HF transformers' tensor names and our parameter paths.

Each `Entry` says which HF tensor fills which slice of which parameter leaf, with which transform,
and the shapes on both sides, so loading and conversion can assert every shape and refuse missing,
unexpected or duplicate tensors. Layers are stacked: an entry for layer i of a segment fills
`leaf[j]` where j is i's index inside the segment.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen2_jax.config import Qwen2Config

# Tensors some HF checkpoints carry that are not parameters (old RoPE buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    path: tuple[str, ...]  # path of the parameter leaf in the params tree
    index: tuple[int, ...]  # which slice of the stacked leaf: () whole leaf, (layer,), (layer, expert)
    hf_shape: tuple[int, ...]
    param_shape: tuple[int, ...]  # shape of leaf[index]
    kind: str  # identity | transpose | heads_in (W.T -> [d, n, h]) | heads_out (W.T -> [n, h, d]) | heads_bias

    def to_param(self, hf_array: np.ndarray) -> np.ndarray:
        if self.kind == "identity":
            return hf_array
        if self.kind == "transpose":
            return hf_array.T
        if self.kind in ("heads_in", "heads_out"):
            return hf_array.T.reshape(self.param_shape)
        if self.kind == "heads_bias":
            return hf_array.reshape(self.param_shape)
        raise ValueError(self.kind)

    def to_hf(self, param_array: np.ndarray) -> np.ndarray:
        if self.kind == "identity":
            return param_array
        if self.kind == "transpose":
            return param_array.T
        if self.kind == "heads_in":
            return param_array.reshape(self.param_shape[0], -1).T
        if self.kind == "heads_out":
            return param_array.reshape(-1, self.param_shape[-1]).T
        if self.kind == "heads_bias":
            return param_array.reshape(self.hf_shape)
        raise ValueError(self.kind)


def _attention_entries(cfg: Qwen2Config, prefix: str, seg: str, j: int) -> list[Entry]:
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    attn = (seg, "self_attn")
    out = [
        Entry(f"{prefix}.self_attn.q_proj.weight", attn + ("q_kernel",), (j,), (n * h, d), (d, n, h), "heads_in"),
        Entry(f"{prefix}.self_attn.k_proj.weight", attn + ("k_kernel",), (j,), (k * h, d), (d, k, h), "heads_in"),
        Entry(f"{prefix}.self_attn.v_proj.weight", attn + ("v_kernel",), (j,), (k * h, d), (d, k, h), "heads_in"),
        Entry(f"{prefix}.self_attn.o_proj.weight", attn + ("o_kernel",), (j,), (d, n * h), (n, h, d), "heads_out"),
    ]
    if cfg.qkv_bias:
        out += [
            Entry(f"{prefix}.self_attn.q_proj.bias", attn + ("q_bias",), (j,), (n * h,), (n, h), "heads_bias"),
            Entry(f"{prefix}.self_attn.k_proj.bias", attn + ("k_bias",), (j,), (k * h,), (k, h), "heads_bias"),
            Entry(f"{prefix}.self_attn.v_proj.bias", attn + ("v_bias",), (j,), (k * h,), (k, h), "heads_bias"),
        ]
    return out


def _mlp_entries(prefix: str, path: tuple[str, ...], index: tuple[int, ...], d: int, f: int) -> list[Entry]:
    return [
        Entry(f"{prefix}.gate_proj.weight", path + ("gate_kernel",), index, (f, d), (d, f), "transpose"),
        Entry(f"{prefix}.up_proj.weight", path + ("up_kernel",), index, (f, d), (d, f), "transpose"),
        Entry(f"{prefix}.down_proj.weight", path + ("down_kernel",), index, (d, f), (f, d), "transpose"),
    ]


def _moe_entries(cfg: Qwen2Config, prefix: str, seg: str, j: int) -> list[Entry]:
    """Per-expert HF keys <-> stacked [layers, experts, ...] leaves; router; shared expert and its gate."""
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    mlp = (seg, "mlp")
    out = [Entry(f"{prefix}.gate.weight", mlp + ("router_kernel",), (j,), (e, d), (d, e), "transpose")]
    for x in range(e):
        out += _mlp_entries(f"{prefix}.experts.{x}", mlp + ("experts",), (j, x), d, f)
    if cfg.shared_expert_intermediate_size > 0:
        out += _mlp_entries(
            f"{prefix}.shared_expert", mlp + ("shared_expert",), (j,), d, cfg.shared_expert_intermediate_size
        )
        out.append(
            Entry(
                f"{prefix}.shared_expert_gate.weight",
                mlp + ("shared_expert_gate_kernel",),
                (j,),
                (1, d),
                (d, 1),
                "transpose",
            )
        )
    return out


def hf_table(cfg: Qwen2Config) -> list[Entry]:
    d = cfg.hidden_size
    table = [
        Entry("model.embed_tokens.weight", ("embed_tokens",), (), (cfg.vocab_size, d), (cfg.vocab_size, d), "identity")
    ]
    for seg, layer_ids in cfg.layer_segments():
        for j, i in enumerate(layer_ids):
            prefix = f"model.layers.{i}"
            table += [
                Entry(
                    f"{prefix}.input_layernorm.weight", (seg, "input_layernorm", "scale"), (j,), (d,), (d,), "identity"
                ),
                Entry(
                    f"{prefix}.post_attention_layernorm.weight",
                    (seg, "post_attention_layernorm", "scale"),
                    (j,),
                    (d,),
                    (d,),
                    "identity",
                ),
            ]
            table += _attention_entries(cfg, prefix, seg, j)
            if cfg.is_sparse_layer(i):
                table += _moe_entries(cfg, f"{prefix}.mlp", seg, j)
            else:
                table += _mlp_entries(f"{prefix}.mlp", (seg, "mlp"), (j,), d, cfg.intermediate_size)
    table.append(Entry("model.norm.weight", ("norm", "scale"), (), (d,), (d,), "identity"))
    if not cfg.tie_word_embeddings:
        table.append(Entry("lm_head.weight", ("lm_head",), (), (cfg.vocab_size, d), (d, cfg.vocab_size), "transpose"))
    return table


def leaf_shapes(cfg: Qwen2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Full shape of every parameter leaf, from the table (stacked dims prepended)."""
    counts: dict[tuple[str, ...], list[int]] = {}
    slice_shape: dict[tuple[str, ...], tuple[int, ...]] = {}
    for e in hf_table(cfg):
        dims = counts.setdefault(e.path, [0] * len(e.index))
        for a, i in enumerate(e.index):
            dims[a] = max(dims[a], i + 1)
        slice_shape[e.path] = e.param_shape
    return {p: tuple(counts[p]) + slice_shape[p] for p in counts}


def is_ignored(hf_key: str, cfg: Qwen2Config) -> bool:
    if hf_key.endswith(IGNORED_SUFFIXES):
        return True
    # Some tied checkpoints still carry a copy of the embedding as lm_head.weight.
    return cfg.tie_word_embeddings and hf_key == "lm_head.weight"
