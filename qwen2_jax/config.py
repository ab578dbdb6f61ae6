"""Qwen2Config: the architecture of a Qwen2 / Qwen2-MoE model, and nothing else.

Frozen and hashable so it can be a static argument of `jax.jit`. The config.json spellings of
transformers 4.x and 5.x are translated by `hf_config`; the checkpoint's token ids and storage dtype
ride along in `checkpoint_info`, which is left out of equality and hashing, so two checkpoints of
one architecture share every compiled program.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from collections.abc import Mapping
from typing import Any

from qwen2_jax.hf_config import (
    SUPPORTED_MODEL_TYPES,
    CheckpointInfo,
    ConfigError,
    DualChunkSettings,
    RopeScaling,
    fields_from_hf,
    fields_to_hf,
    read_config_json,
    save_config_json,
)

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """The fields of transformers' Qwen2Config and Qwen2MoeConfig that change the math, with their
    defaults (initializer_range shapes the initial weights; router_aux_loss_coef the training loss)."""

    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: tuple[str, ...] | None = None
    qkv_bias: bool = True
    # Qwen2-MoE (num_experts == 0 means a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # Dual Chunk Attention at inference (config.json's dual_chunk_attention_config); None = off.
    dual_chunk_attention: DualChunkSettings | None = None
    # Not architecture: excluded from ==, hash and to_hf's architecture fields.
    checkpoint_info: CheckpointInfo = dataclasses.field(default=CheckpointInfo(), compare=False)

    def __post_init__(self):
        self.validate()
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", self.derived_layer_types())

    # ----------------------------------------------------------------------------------- derived
    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen2_moe" and self.num_experts > 0

    def derived_layer_types(self) -> tuple[str, ...]:
        """transformers >= 4.56 rule: dense layers at index >= max_window_layers slide; qwen2_moe slides
        the even-indexed layers below max_window_layers."""
        window = self.sliding_window if self.use_sliding_window else None
        types = []
        for i in range(self.num_hidden_layers):
            if self.model_type == "qwen2_moe":
                sliding = window is not None and (i + 1) % 2 == 1 and i < self.max_window_layers
            else:
                sliding = window is not None and i >= self.max_window_layers
            types.append("sliding_attention" if sliding else "full_attention")
        return tuple(types)

    @property
    def context_length(self) -> int | None:
        """The longest sequence (prompt + output) the model takes: max_position_embeddings, or None
        (no position limit) with Dual Chunk Attention, whose position indices stay below chunk_size
        however long the sequence."""
        return None if self.dual_chunk_attention is not None else self.max_position_embeddings

    def is_sparse_layer(self, i: int) -> bool:
        return self.is_moe and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        # As HF: a "sliding_attention" layer without a window (use_sliding_window off) attends fully.
        return tuple(t == "sliding_attention" and bool(self.sliding_window) for t in self.layer_types)

    def layer_segments(self) -> list[tuple[str, tuple[int, ...]]]:
        """[(param name, layer indices)]: maximal runs of consecutive layers of one kind (dense or
        sparse MLP), each stacked and scanned on its own. One run is named "layers"."""
        runs: list[list[int]] = []
        for i in range(self.num_hidden_layers):
            if runs and self.is_sparse_layer(runs[-1][-1]) == self.is_sparse_layer(i):
                runs[-1].append(i)
            else:
                runs.append([i])
        if len(runs) == 1:
            return [("layers", tuple(runs[0]))]
        return [(f"layers_{s}", tuple(r)) for s, r in enumerate(runs)]

    def replace(self, **changes) -> Qwen2Config:
        return dataclasses.replace(self, **changes)

    def with_checkpoint_info(self, **changes) -> Qwen2Config:
        return self.replace(checkpoint_info=self.checkpoint_info.replace(**changes))

    # --------------------------------------------------------------------------------- checking
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"invalid Qwen2 config: {msg}")

        need(
            self.model_type in SUPPORTED_MODEL_TYPES,
            f"unsupported model_type {self.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
        )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
            f"({self.num_key_value_heads})",
        )
        if self.head_dim is None:
            need(
                self.hidden_size % self.num_attention_heads == 0,
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}) and no head_dim is given",
            )
        need(self.head_size % 2 == 0 and self.head_size > 0, f"head_dim must be even, got {self.head_size}")
        need(self.hidden_act == "silu", f"unsupported hidden_act {self.hidden_act!r} (Qwen2 uses 'silu')")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.use_sliding_window:
            need(
                isinstance(self.sliding_window, int) and self.sliding_window > 0,
                f"use_sliding_window is set but sliding_window is {self.sliding_window!r}",
            )
        if self.layer_types is not None:
            need(
                len(self.layer_types) == self.num_hidden_layers,
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers",
            )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            need(not bad, f"unknown layer_types {bad}")
        if self.model_type == "qwen2_moe" and self.num_experts > 0:
            need(
                0 < self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})",
            )
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0")
            need(self.decoder_sparse_step >= 1, f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            need(not bad, f"mlp_only_layers {bad} are not layer indices")
        dca = self.dual_chunk_attention
        if dca is not None:
            need(isinstance(dca, DualChunkSettings), f"dual_chunk_attention must be DualChunkSettings, got {dca!r}")
            problem = dca.check()
            need(problem is None, f"dual_chunk_attention: {problem}")
            need(
                self.rope_scaling.rope_type != "dynamic",
                "dual chunk attention does not combine with dynamic rope scaling",
            )
            types = self.layer_types or self.derived_layer_types()
            need(
                not (self.sliding_window and "sliding_attention" in types),
                "dual chunk attention does not combine with sliding-window layers",
            )
        need(
            self.intermediate_size > 0
            or (self.is_moe and all(self.is_sparse_layer(i) for i in range(self.num_hidden_layers))),
            f"intermediate_size must be > 0, got {self.intermediate_size}",
        )

    # ---------------------------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | os.PathLike) -> Qwen2Config:
        """From a config.json dict, a config.json path, or a checkpoint directory."""
        d, where = read_config_json(source)
        names = {f.name for f in dataclasses.fields(cls)} - {"checkpoint_info"}
        kwargs, info = fields_from_hf(d, where, names)
        try:
            return cls(**kwargs, checkpoint_info=info)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """config.json in transformers 5 spelling (also readable by 4.x through rope_theta / rope_scaling)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "checkpoint_info"}
        return fields_to_hf(fields, self.checkpoint_info)

    def save_hf(self, directory: str | os.PathLike) -> None:
        save_config_json(self.to_hf(), directory)


def preset_names() -> list[str]:
    """Names of the model presets shipped with the package (configs in qwen2_jax/presets/)."""
    files = importlib.resources.files("qwen2_jax").joinpath("presets")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))


def preset(name: str) -> Qwen2Config:
    """A shipped preset (e.g. 'qwen2-0.5b', 'qwen2-7b-instruct'): works from any directory after
    `pip install .`."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(preset_names())})")
    resource = importlib.resources.files("qwen2_jax").joinpath("presets", f"{name}.json")
    with importlib.resources.as_file(resource) as path:
        return Qwen2Config.from_hf(path)
