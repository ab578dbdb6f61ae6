"""Qwen2Config: the architecture of a Qwen2 / Qwen2-MoE model, and nothing else.

Frozen and hashable so it can be a static argument of `jax.jit`. Reads config.json as written by
transformers 4.x (`rope_theta`, `rope_scaling` with `type` or `rope_type`) and 5.x (`rope_parameters`,
`layer_types`); writes a config.json that transformers 5 loads back to an equal config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")


class ConfigError(ValueError):
    """A config.json that cannot describe a model we run."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE variant and its parameters (transformers' `rope_parameters` minus `rope_theta`)."""

    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _rope_from_dict(d: Mapping[str, Any] | None, where: str) -> RopeScaling:
    if not d:
        return RopeScaling()
    d = dict(d)
    rope_type = d.pop("rope_type", None) or d.pop("type", None) or "default"
    d.pop("type", None)
    d.pop("rope_theta", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{where}: unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown rope parameter(s) {unknown} for rope type {rope_type!r}")
    rope = RopeScaling(rope_type=rope_type, **d)
    if rope_type in ("linear", "dynamic") and (rope.factor is None or rope.factor < 1.0):
        raise ConfigError(f"{where}: rope type {rope_type!r} needs factor >= 1, got {rope.factor!r}")
    if rope_type == "yarn" and rope.factor is not None and rope.factor <= 0:
        raise ConfigError(f"{where}: yarn factor must be > 0, got {rope.factor!r}")
    return rope


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Every field of transformers' Qwen2Config and Qwen2MoeConfig, with their defaults."""

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
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: tuple[str, ...] | None = None
    attention_dropout: float = 0.0
    qkv_bias: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Qwen2-MoE (num_experts == 0 means a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    # The checkpoint's storage dtype as config.json states it (informational).
    torch_dtype: str | None = None

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
        """transformers >= 4.56 rule: layers at index >= max_window_layers slide (qwen2_moe: see facts §1.6)."""
        window = self.sliding_window if self.use_sliding_window else None
        types = []
        for i in range(self.num_hidden_layers):
            if self.model_type == "qwen2_moe":
                sliding = window is not None and (i + 1) % 2 == 1 and i < self.max_window_layers
            else:
                sliding = window is not None and i >= self.max_window_layers
            types.append("sliding_attention" if sliding else "full_attention")
        return tuple(types)

    def is_sparse_layer(self, i: int) -> bool:
        return (
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        # As HF: a "sliding_attention" layer without a window (use_sliding_window off) attends fully.
        return tuple(t == "sliding_attention" and bool(self.sliding_window) for t in self.layer_types)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> "Qwen2Config":
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------------------------- checking
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"invalid Qwen2 config: {msg}")

        need(self.model_type in SUPPORTED_MODEL_TYPES,
             f"unsupported model_type {self.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0,
                 f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                 f"({self.num_attention_heads}) and no head_dim is given")
        need(self.head_size % 2 == 0 and self.head_size > 0, f"head_dim must be even, got {self.head_size}")
        need(self.hidden_act == "silu", f"unsupported hidden_act {self.hidden_act!r} (Qwen2 uses 'silu')")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.use_sliding_window:
            need(isinstance(self.sliding_window, int) and self.sliding_window > 0,
                 f"use_sliding_window is set but sliding_window is {self.sliding_window!r}")
        if self.layer_types is not None:
            need(len(self.layer_types) == self.num_hidden_layers,
                 f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            need(not bad, f"unknown layer_types {bad}")
        if self.model_type == "qwen2_moe" and self.num_experts > 0:
            need(0 < self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0")
            need(self.decoder_sparse_step >= 1, f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            need(not bad, f"mlp_only_layers {bad} are not layer indices")
        need(self.intermediate_size > 0 or (self.is_moe and all(
            self.is_sparse_layer(i) for i in range(self.num_hidden_layers))),
             f"intermediate_size must be > 0, got {self.intermediate_size}")

    # ---------------------------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | os.PathLike) -> "Qwen2Config":
        """From a config.json dict, a config.json path, or a checkpoint directory."""
        where = "config"
        if not isinstance(source, Mapping):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json: {path} does not exist")
            try:
                with open(path) as f:
                    source = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(source, Mapping):
            raise ConfigError(f"{where}: expected a JSON object")
        d = dict(source)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

        # transformers 5 keeps theta inside rope_parameters; 4.x has rope_theta + rope_scaling.
        rope_params = d.get("rope_parameters") or {}
        rope_scaling = d.get("rope_scaling") or {}
        theta = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
        rope = _rope_from_dict(rope_params if rope_params else rope_scaling, where)

        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in fields}
        kwargs["rope_theta"] = float(theta)
        kwargs["rope_scaling"] = rope
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        if kwargs.get("torch_dtype") is None and isinstance(d.get("dtype"), str):
            kwargs["torch_dtype"] = d["dtype"]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        if kwargs.get("mlp_only_layers") is not None:
            kwargs["mlp_only_layers"] = tuple(kwargs["mlp_only_layers"])
        else:
            kwargs.pop("mlp_only_layers", None)
        if kwargs.get("layer_types") is not None:
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        if not d.get("use_sliding_window", False) or kwargs.get("sliding_window") == 0:
            kwargs["sliding_window"] = None  # transformers drops the window when disabled (qwen2_moe v5: 0)
        if model_type == "qwen2":
            kwargs.pop("qkv_bias", None)  # HF's dense Qwen2 always has q/k/v biases
        if model_type == "qwen2_moe":
            defaults = dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                            shared_expert_intermediate_size=5632, hidden_size=2048, intermediate_size=5632,
                            num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16)
            for k, v in defaults.items():
                kwargs.setdefault(k, v)
        for k in ("head_dim",):
            if kwargs.get(k) is None:
                kwargs.pop(k, None)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """config.json in transformers 5 spelling (also readable by 4.x through rope_theta/rope_scaling)."""
        arch = "Qwen2MoeForCausalLM" if self.model_type == "qwen2_moe" else "Qwen2ForCausalLM"
        out: dict[str, Any] = {"architectures": [arch], "model_type": self.model_type}
        skip = {"model_type", "rope_scaling", "rope_theta", "torch_dtype", "head_dim"}
        if self.model_type == "qwen2":
            skip |= {"num_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                     "mlp_only_layers", "router_aux_loss_coef", "output_router_logits", "qkv_bias"}
        for f in dataclasses.fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        rope = {"rope_theta": self.rope_theta, **self.rope_scaling.to_dict()}
        out["rope_parameters"] = rope
        out["rope_theta"] = self.rope_theta
        if self.rope_scaling.rope_type != "default":
            out["rope_scaling"] = self.rope_scaling.to_dict()
        if self.torch_dtype:
            out["dtype"] = self.torch_dtype
        return out

    def save_hf(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_hf(), f, indent=2, sort_keys=True)
        os.replace(tmp, path)


PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")


def preset(name: str) -> Qwen2Config:
    """A preset from configs/models (e.g. 'qwen2-0.5b', 'qwen2-7b-instruct')."""
    path = os.path.join(PRESETS_DIR, f"{name}.json")
    if not os.path.exists(path):
        names = sorted(p[:-5] for p in os.listdir(PRESETS_DIR) if p.endswith(".json")) if os.path.isdir(
            PRESETS_DIR) else []
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(names) or 'none found'})")
    return Qwen2Config.from_hf(path)

