"""Translation between transformers' config.json and our config fields.

transformers 4.x writes `rope_theta` + `rope_scaling` (with `type` or `rope_type`); 5.x writes
`rope_parameters` (theta inside) and `layer_types`; qwen2_moe checkpoints omit fields whose
defaults differ from the dense model's. This module reads all of them into plain dicts of our
field names (architecture fields, and the checkpoint facts that are not architecture: token ids and
storage dtype), and writes a config.json that transformers 5 loads back to an equal config.

It depends on nothing else in the package: `config.Qwen2Config.from_hf` / `to_hf` call it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from qwen2_jax import atomic

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")

# transformers' Qwen2MoeConfig defaults where they differ from the dense Qwen2Config's.
_MOE_DEFAULTS = dict(
    num_experts=60,
    num_experts_per_tok=4,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
)
_MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "router_aux_loss_coef",
)
# Fields transformers' config carries that change nothing we compute; written back with HF's values.
_HF_ONLY_DEFAULTS = {"use_cache": True, "attention_dropout": 0.0}
_HF_ONLY_MOE_DEFAULTS = {"output_router_logits": False}


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


@dataclasses.dataclass(frozen=True)
class DualChunkSettings:
    """Dual Chunk Attention (`dual_chunk_attention_config` in config.json, the keys vLLM reads):
    chunks of chunk_size - local_size tokens; query position indices never pass chunk_size.
    original_max_position_embeddings > 0 also scales each query's logits with the length it sees
    (`qwen2_jax.dual_chunk`). vLLM's sparse-attention keys are read and ignored: attention stays dense."""

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    def check(self) -> str | None:
        """What is wrong with these settings (one line), or None."""
        for name in ("chunk_size", "local_size", "original_max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                return f"{name} must be an integer >= 0, got {value!r}"
        if not 0 <= self.local_size < self.chunk_size:
            return f"local_size ({self.local_size}) must be below chunk_size ({self.chunk_size})"
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DUAL_CHUNK_KEY = "dual_chunk_attention_config"
_DUAL_CHUNK_IGNORED = ("sparse_attention_config", "sparse_attention_enabled", "sparse_attention_threshold",
                       "sparse_attention_last_q")  # fmt: skip


def dual_chunk_from_dict(d: Mapping[str, Any] | None, where: str) -> DualChunkSettings | None:
    """`dual_chunk_attention_config` as vLLM reads it (defaults chunk_size 8192, local_size 1024,
    original_max_position_embeddings 0); None when absent."""
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: {DUAL_CHUNK_KEY} must be an object, got {d!r}")
    known = {f.name for f in dataclasses.fields(DualChunkSettings)}
    unknown = sorted(set(d) - known - set(_DUAL_CHUNK_IGNORED))
    if unknown:
        raise ConfigError(f"{where}: unknown {DUAL_CHUNK_KEY} key(s) {unknown}")
    settings = DualChunkSettings(
        chunk_size=d.get("chunk_size", 8192),
        local_size=d.get("local_size", 1024),
        original_max_position_embeddings=d.get("original_max_position_embeddings") or 0,
    )
    problem = settings.check()
    if problem:
        raise ConfigError(f"{where}: {DUAL_CHUNK_KEY}: {problem}")
    return settings


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says besides its architecture: special token ids and storage dtype.

    Generation reads the stop tokens from here; the converters write `torch_dtype` back."""

    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> CheckpointInfo:
        return dataclasses.replace(self, **changes)


def rope_from_dict(d: Mapping[str, Any] | None, where: str) -> RopeScaling:
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


def read_config_json(source: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(the config.json dict, where it came from) from a dict, a config.json path or a directory."""
    if isinstance(source, Mapping):
        return dict(source), "config"
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json: {path} does not exist")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, Mapping):
        raise ConfigError(f"{path}: expected a JSON object")
    return dict(d), path


def fields_from_hf(d: Mapping[str, Any], where: str, field_names: set[str]) -> tuple[dict[str, Any], CheckpointInfo]:
    """(our architecture field values, checkpoint info) from a config.json dict."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{where}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    rope_params = d.get("rope_parameters") or {}
    theta = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
    kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in field_names}
    kwargs["rope_theta"] = float(theta)
    kwargs["rope_scaling"] = rope_from_dict(rope_params if rope_params else d.get("rope_scaling") or {}, where)
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = d.get("num_attention_heads", 32)
    for name in ("mlp_only_layers", "layer_types"):
        if kwargs.get(name) is not None:
            kwargs[name] = tuple(kwargs[name])
        else:
            kwargs.pop(name, None)
    if not d.get("use_sliding_window", False) or kwargs.get("sliding_window") == 0:
        kwargs["sliding_window"] = None  # transformers drops the window when disabled (qwen2_moe v5 writes 0)
    if model_type == "qwen2":
        kwargs.pop("qkv_bias", None)  # HF's dense Qwen2 always has q/k/v biases
    else:
        for k, v in _MOE_DEFAULTS.items():
            kwargs.setdefault(k, v)
    if kwargs.get("head_dim") is None:
        kwargs.pop("head_dim", None)
    kwargs["dual_chunk_attention"] = dual_chunk_from_dict(d.get(DUAL_CHUNK_KEY), where)
    eos = d.get("eos_token_id")
    dtype = d.get("torch_dtype") or d.get("dtype")
    info = CheckpointInfo(
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"),
        torch_dtype=dtype if isinstance(dtype, str) else None,
    )
    return kwargs, info


def fields_to_hf(fields: Mapping[str, Any], info: CheckpointInfo) -> dict[str, Any]:
    """config.json in transformers 5 spelling (also readable by 4.x through rope_theta / rope_scaling)."""
    moe = fields["model_type"] == "qwen2_moe"
    out: dict[str, Any] = {"architectures": ["Qwen2MoeForCausalLM" if moe else "Qwen2ForCausalLM"]}
    skip = {"rope_scaling", "rope_theta", "head_dim", "dual_chunk_attention"} | (
        set() if moe else set(_MOE_FIELDS) | {"qkv_bias"}
    )
    for name, value in fields.items():
        if name not in skip:
            out[name] = list(value) if isinstance(value, tuple) else value
    if fields.get("head_dim") is not None:
        out["head_dim"] = fields["head_dim"]
    out.update(_HF_ONLY_DEFAULTS)
    if moe:
        out.update(_HF_ONLY_MOE_DEFAULTS)
    rope: RopeScaling = fields["rope_scaling"]
    out["rope_parameters"] = {"rope_theta": fields["rope_theta"], **rope.to_dict()}
    out["rope_theta"] = fields["rope_theta"]
    if rope.rope_type != "default":
        out["rope_scaling"] = rope.to_dict()
    if fields.get("dual_chunk_attention") is not None:
        out[DUAL_CHUNK_KEY] = fields["dual_chunk_attention"].to_dict()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(info, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    if info.torch_dtype:
        out["dtype"] = info.torch_dtype
    return out


def save_config_json(hf_dict: Mapping[str, Any], directory: str | os.PathLike) -> None:
    os.makedirs(directory, exist_ok=True)
    atomic.write_json(os.path.join(directory, "config.json"), dict(hf_dict), sort_keys=True)
