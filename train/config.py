"""The training run's configuration: one YAML file plus dotted `--set key=value` overrides, parsed into
small typed dataclasses and validated before anything heavy happens.

Every key is a dataclass field; nested sections (`mesh`, `optimizer`, `loss`, `data`) are dataclasses
of their own. An unknown key or a value of the wrong type raises `ConfigKeyError` naming the dotted
key; the CLI turns it into exit status 2 with one line.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from qwen2_jax.cli_support import UsageError
from qwen2_jax.dtypes import PARAM_DTYPE_NAMES

DTYPES = PARAM_DTYPE_NAMES
REMAT_POLICIES = ("none", "dots", "full")
SCHEDULES = ("cosine", "linear", "constant")
TASKS = ("pretrain", "sft", "dpo")
TRUNCATION_MODES = ("cut", "drop")


class ConfigKeyError(UsageError, ValueError):
    """A config key that does not exist, or a value that does not fit its key."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one may be -1 (all remaining devices). The product must equal the device count."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    sequence: int = 1  # context parallelism: each sequence split over this many devices (zig-zag order)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup then decay, and global-norm clipping."""

    learning_rate: float = 3e-4  # peak, reached at the end of warmup
    warmup_steps: int = 0
    schedule: str = "cosine"  # decay after warmup: cosine | linear | constant
    final_learning_rate_ratio: float = 0.1  # learning rate at total_steps / peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_biases_embeddings: bool = False  # by default only matrices decay
    clip_norm: float = 1.0  # global-norm clipping threshold; 0 = off


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Cross-entropy options. chunk_length > 0 computes the loss in chunks of that many positions per
    sequence (LM head inside the chunk, recomputed in the backward): the [tokens, vocab] logits are
    never live at once."""

    chunk_length: int = 256
    z_loss_coef: float = 0.0  # router z-loss (MoE), off as in HF
    aux_loss_coef: float | None = None  # MoE load-balancing weight; None = the model's router_aux_loss_coef
    assistant_only: bool = True  # sft: loss on assistant turns (and completions) only; false = every token


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from. Empty `sources` means the built-in small real-text corpus."""

    sources: tuple[str, ...] = ()  # .txt / .jsonl files or directories of them
    cache_dir: str = "~/.cache/qwen2-jax/data"  # prepared token shards, reused across runs
    text_key: str = "text"  # the JSONL field holding the text
    eval_sequences: int | None = None  # held-out rows; None = the pipeline's default fraction
    packing: bool = True  # sft/dpo: several conversations (pairs) per row, attention kept inside each; false = one
    truncation: str = "cut"  # sft/dpo: a conversation (pair) longer than seq_len is cut to fit, or dropped ("drop")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """task dpo (train/dpo_objective.py): the sigmoid DPO loss against a frozen reference model."""

    beta: float = 0.1  # how far the policy may move from the reference
    reference: str | None = None  # HF or Orbax checkpoint directory; None = the starting model (`model`)
    label_smoothing: float = 0.0  # the probability that a preference label is flipped (conservative DPO)
    precompute_reference: bool = False  # reference log-probs once before training; the reference is then freed


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """LoRA fine-tuning (train/lora_setup.py): rank 0 = off (full fine-tuning). The base model is
    frozen; only the adapters and their optimizer state are trained and checkpointed."""

    rank: int = 0
    alpha: float = 8.0  # scale = alpha / rank (peft's lora_alpha, default 8)
    dropout: float = 0.0  # on the adapter inputs, training only (peft's lora_dropout)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    use_rslora: bool = False  # scale = alpha / sqrt(rank)
    base_dtype: str | None = None  # the frozen base: null = param_dtype, or a float dtype, or int8 (QLoRA-style)


@dataclasses.dataclass(frozen=True)
class InitSection:
    """Where a fresh model's parameters come from besides random init (train/upcycle.py)."""

    upcycle_from: str | None = None  # a dense checkpoint (HF or Orbax) to upcycle into the MoE `model`
    upcycle_shuffle: bool = True  # shuffle each FFN copy's intermediate channels (seeded) so experts differ
    upcycle_reinit_fraction: float = 0.5  # share of each expert's intermediate channels re-initialised


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    task: str = "pretrain"  # pretrain (packed text) | sft (chat rows: train/sft_data.py) | dpo (train/dpo_data.py)
    # model
    model: str = "qwen2-0.5b"  # preset name, config.json path, or checkpoint directory to continue from
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Qwen2Config fields (fresh init)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # master weights (fresh init) / dtype a loaded checkpoint is cast to
    remat: str = "none"  # none | dots (matmul outputs saved) | full (layer inputs only)
    scan_unroll: int = 1
    moe_impl: str = "auto"
    moe_exchange: str = "auto"
    # batch
    batch_size: int = 8  # global sequences per optimizer step
    grad_accum_steps: int = 1  # micro-batches per step: batch_size / grad_accum_steps sequences each
    seq_len: int = 128
    # run
    output_dir: str = "runs/train"
    total_steps: int = 100
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    eval_every: int = 0  # 0 = never
    eval_batches: int = 4  # held-out batches per evaluation; 0 = the whole held-out split
    progress: bool = True  # one progress line per logged step on stdout
    # sections
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    dpo: DpoConfig = dataclasses.field(default_factory=DpoConfig)
    init: InitSection = dataclasses.field(default_factory=InitSection)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    def to_dict(self) -> dict[str, Any]:
        def plain(x):
            if dataclasses.is_dataclass(x):
                return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
            if isinstance(x, Mapping):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, tuple):
                return list(x)
            return x

        return plain(self)


# ------------------------------------------------------------------------------------------ parsing
def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The YAML file (if any) with `key=value` overrides applied (values read as YAML scalars)."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ConfigKeyError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigKeyError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigKeyError(f"--set {item!r}: expected key=value")
        _set_dotted(raw, key.strip(), _scalar(value))
    config = build(TrainConfig, raw, "")
    validate(config)
    return config


def _scalar(text: str):
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigKeyError(f"config key {'.'.join(parts[: i + 1])!r} is not a section (cannot set {key!r})")
        node = child
    node[parts[-1]] = value


def build(cls, raw: Mapping[str, Any], prefix: str):
    """An instance of dataclass `cls` from a mapping, every value checked against its field type."""
    if not isinstance(raw, Mapping):
        raise ConfigKeyError(f"config key {prefix.rstrip('.')!r} must be a mapping, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            where = f" in section {prefix.rstrip('.')!r}" if prefix else ""
            raise ConfigKeyError(
                f"unknown config key {prefix + str(key)!r}{where} (known: {', '.join(sorted(fields))})"
            )
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, prefix + name)
    return cls(**values)


def _coerce(hint, value, key: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigKeyError(f"config key {key!r} must be true or false, got {_kind(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigKeyError(f"config key {key!r} must be an integer, got {_kind(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigKeyError(f"config key {key!r} must be a number, got {_kind(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigKeyError(f"config key {key!r} must be a string, got {_kind(value)}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigKeyError(f"config key {key!r} must be a list of strings, got {_kind(value)}")
        return tuple(value)
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigKeyError(f"config key {key!r} must be a mapping, got {_kind(value)}")
        return dict(value)
    raise TypeError(f"config field {key!r} has an unsupported type {hint}")


def _kind(value) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


# ------------------------------------------------------------------------------------------ validation
def validate(config: TrainConfig) -> None:
    """Checks that need no devices and no model: choices, ranges, divisibility of the batch."""

    def need(cond: bool, key: str, message: str):
        if not cond:
            raise ConfigKeyError(f"config key {key!r} {message}")

    for key in ("dtype", "param_dtype"):
        need(getattr(config, key) in DTYPES, key, f"must be one of {', '.join(DTYPES)}, got {getattr(config, key)!r}")
    need(config.task in TASKS, "task", f"must be one of {', '.join(TASKS)}, got {config.task!r}")
    need(
        config.data.truncation in TRUNCATION_MODES,
        "data.truncation",
        f"must be one of {', '.join(TRUNCATION_MODES)}, got {config.data.truncation!r}",
    )
    need(config.remat in REMAT_POLICIES, "remat", f"must be one of {', '.join(REMAT_POLICIES)}, got {config.remat!r}")
    need(
        config.optimizer.schedule in SCHEDULES,
        "optimizer.schedule",
        f"must be one of {', '.join(SCHEDULES)}, got {config.optimizer.schedule!r}",
    )
    for key in (
        "batch_size",
        "grad_accum_steps",
        "seq_len",
        "total_steps",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "scan_unroll",
    ):
        need(getattr(config, key) >= 1, key, f"must be >= 1, got {getattr(config, key)}")
    need(config.seq_len >= 2, "seq_len", f"must be >= 2 (a next-token target needs two tokens), got {config.seq_len}")
    need(
        config.batch_size % config.grad_accum_steps == 0,
        "grad_accum_steps",
        f"must divide batch_size ({config.batch_size}), got {config.grad_accum_steps}",
    )
    need(config.eval_every >= 0, "eval_every", f"must be >= 0, got {config.eval_every}")
    need(config.eval_batches >= 0, "eval_batches", f"must be >= 0 (0 = all), got {config.eval_batches}")
    need(config.seed >= 0, "seed", f"must be >= 0, got {config.seed}")
    need(bool(config.model), "model", "must name a preset, a config.json or a checkpoint directory")
    need(bool(config.output_dir), "output_dir", "must not be empty")
    axes = ("data", "fsdp", "expert", "sequence", "tensor")
    for axis in axes:
        size = getattr(config.mesh, axis)
        need(size >= 1 or size == -1, f"mesh.{axis}", f"must be a positive integer or -1, got {size}")
    free = [a for a in axes if getattr(config.mesh, a) == -1]
    need(
        len(free) <= 1,
        f"mesh.{free[-1] if free else 'data'}",
        f"is -1 like mesh.{free[0] if free else ''}: only one axis may be -1",
    )
    opt = config.optimizer
    need(opt.learning_rate > 0, "optimizer.learning_rate", f"must be > 0, got {opt.learning_rate}")
    need(opt.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {opt.warmup_steps}")
    need(
        0 <= opt.final_learning_rate_ratio <= 1,
        "optimizer.final_learning_rate_ratio",
        f"must be in [0, 1], got {opt.final_learning_rate_ratio}",
    )
    need(0 <= opt.b1 < 1, "optimizer.b1", f"must be in [0, 1), got {opt.b1}")
    need(0 <= opt.b2 < 1, "optimizer.b2", f"must be in [0, 1), got {opt.b2}")
    need(opt.eps > 0, "optimizer.eps", f"must be > 0, got {opt.eps}")
    need(opt.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {opt.weight_decay}")
    need(opt.clip_norm >= 0, "optimizer.clip_norm", f"must be >= 0 (0 = off), got {opt.clip_norm}")
    need(
        config.loss.chunk_length >= 0,
        "loss.chunk_length",
        f"must be >= 0 (0 = unchunked), got {config.loss.chunk_length}",
    )
    need(config.loss.z_loss_coef >= 0, "loss.z_loss_coef", f"must be >= 0, got {config.loss.z_loss_coef}")
    need(config.dpo.beta > 0, "dpo.beta", f"must be > 0, got {config.dpo.beta}")
    need(
        0 <= config.dpo.label_smoothing < 0.5,
        "dpo.label_smoothing",
        f"must be in [0, 0.5), got {config.dpo.label_smoothing}",
    )
    need(config.dpo.reference != "", "dpo.reference", "must name a checkpoint directory (or be left out)")
    need(config.init.upcycle_from != "", "init.upcycle_from", "must name a dense checkpoint directory (or be left out)")
    fraction = config.init.upcycle_reinit_fraction
    need(0 <= fraction <= 1, "init.upcycle_reinit_fraction", f"must be in [0, 1], got {fraction}")
    _validate_model_overrides(config.model_overrides)
    _validate_lora(config.lora)


def _validate_model_overrides(overrides: Mapping[str, Any]) -> None:
    from qwen2_jax.config import Qwen2Config

    known = {f.name for f in dataclasses.fields(Qwen2Config)} - {"checkpoint_info"}
    for key in overrides:
        if key not in known:
            raise ConfigKeyError(f"unknown config key {'model_overrides.' + str(key)!r} (not a Qwen2Config field)")


def _validate_lora(section: LoraSection) -> None:
    from qwen2_jax.lora import TARGET_MODULES

    def need(cond: bool, key: str, message: str):
        if not cond:
            raise ConfigKeyError(f"config key 'lora.{key}' {message}")

    base_dtypes = (*DTYPES, "int8")
    need(section.rank >= 0, "rank", f"must be >= 0 (0 = full fine-tuning), got {section.rank}")
    need(section.alpha > 0, "alpha", f"must be > 0, got {section.alpha}")
    need(0 <= section.dropout < 1, "dropout", f"must be in [0, 1), got {section.dropout}")
    need(bool(section.target_modules), "target_modules", f"must name at least one of {', '.join(TARGET_MODULES)}")
    unknown = [m for m in section.target_modules if m not in TARGET_MODULES]
    first = unknown[0] if unknown else None
    need(not unknown, "target_modules", f"has unknown module {first!r} (choose from {', '.join(TARGET_MODULES)})")
    need(
        section.base_dtype is None or section.base_dtype in base_dtypes,
        "base_dtype",
        f"must be one of {', '.join(base_dtypes)} (or null for param_dtype), got {section.base_dtype!r}",
    )
