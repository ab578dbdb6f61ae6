"""PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`) <-> our adapters.

The directory is what `peft.PeftModel.from_pretrained(hf_model, dir)` loads and what
`PeftModel.save_pretrained` writes: tensors `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
[r, in] and `...lora_B.weight` [out, r] in torch's [out, in] orientation (in / out flattened as HF
flattens heads). Ours are stacked by layer in the kernels' [in, out] terms (`qwen2_jax.lora`).
Loading checks everything before returning: a bad directory is one `AdapterError` line naming the
file, key or field.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from qwen2_jax import atomic
from qwen2_jax.config import Qwen2Config
from qwen2_jax.lora import TARGET_MODULES, TARGETS, LoraConfig, adapter_shapes, check_adapters, kernel_dims
from qwen2_jax.safetensors_io import CheckpointError, SafetensorsFile, SafetensorsWriter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TEMP_TAG = "peft-adapter"
_PREFIX = "base_model.model.model.layers"


class AdapterError(CheckpointError):
    """An adapter directory that cannot be used with this base model (a ValueError; CLIs exit 2)."""


def peft_key(layer: int, module: str, ab: str) -> str:
    sub = TARGETS[module][0]
    return f"{_PREFIX}.{layer}.{sub}.{module}.lora_{ab.upper()}.weight"


def peft_config_dict(lora_config: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json as peft's LoraConfig writes it, with the fields our adapters depend on."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.rank,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": list(lora_config.target_modules),
        "use_rslora": lora_config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "inference_mode": True,
    }


def save_peft_adapter(
    directory: str | os.PathLike,
    config: Qwen2Config,
    lora_config: LoraConfig,
    adapters: dict,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write a PEFT adapter directory atomically (built beside `directory`, then renamed into place),
    tensors in the adapters' dtype."""
    check_adapters(config, lora_config, adapters)
    dims = kernel_dims(config)
    tensors: list[tuple[str, np.ndarray]] = []
    for i in range(config.num_hidden_layers):
        for module in lora_config.target_modules:
            sub, name = TARGETS[module]
            ab = adapters["layers"][sub][name]
            in_size, out_size = (math.prod(x) for x in dims[module])
            a = np.asarray(ab["a"][i]).reshape(in_size, lora_config.rank)
            b = np.asarray(ab["b"][i]).reshape(lora_config.rank, out_size)
            tensors.append((peft_key(i, module, "a"), np.ascontiguousarray(a.T)))
            tensors.append((peft_key(i, module, "b"), np.ascontiguousarray(b.T)))
    with atomic.directory(directory, TEMP_TAG) as tmp:
        specs = [(key, t.dtype, t.shape) for key, t in tensors]
        with SafetensorsWriter(os.path.join(tmp, WEIGHTS_FILE), specs, metadata={"format": "pt"}) as writer:
            for key, t in tensors:
                writer.write(key, t)
        config_text = json.dumps(peft_config_dict(lora_config, base_model_name_or_path), indent=2) + "\n"
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(config_text)


def read_lora_config(directory: str) -> LoraConfig:
    """The LoraConfig of an adapter_config.json, refusing what our adapters cannot represent."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise AdapterError(f"adapter directory not found: {directory}")
    if not os.path.exists(path):
        raise AdapterError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: not a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_dora": (False, None),
        "bias": ("none", None),
        "fan_in_fan_out": (False, None),
        "modules_to_save": (None, []),
        "layers_to_transform": (None, []),
        "rank_pattern": ({}, None),
        "alpha_pattern": ({}, None),
        "target_parameters": (None, []),
    }
    for field, allowed in unsupported.items():
        if raw.get(field) not in allowed:
            raise AdapterError(f"{path}: {field}={raw[field]!r} is not supported")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]  # peft also takes a regex here; only a plain module name can be one of ours
    if not isinstance(targets, list) or not targets:
        raise AdapterError(f"{path}: target_modules must be a list of module names, got {raw.get('target_modules')!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise AdapterError(f"{path}: unknown target module {unknown[0]!r} (supported: {', '.join(TARGET_MODULES)})")
    try:
        return LoraConfig(
            rank=raw.get("r", 8),
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0),
            target_modules=tuple(targets),
            use_rslora=bool(raw.get("use_rslora", False)),
        )
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None


def load_peft_adapter(directory: str | os.PathLike, config: Qwen2Config, dtype=None) -> tuple[LoraConfig, dict]:
    """(lora_config, adapters) from a PEFT adapter directory for this base config; adapters in the
    stored dtype (or `dtype`) as numpy arrays."""
    directory = os.fspath(directory)
    lora_config = read_lora_config(directory)
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE}")
    if config.is_moe:
        raise AdapterError(f"{directory}: LoRA adapters are supported for dense Qwen2 models only")
    tensors = SafetensorsFile(path)
    try:
        return lora_config, _stacked(tensors, config, lora_config, dtype)
    finally:
        tensors.close()


def _stacked(tensors: SafetensorsFile, config: Qwen2Config, lora_config: LoraConfig, dtype) -> dict:
    r, dims = lora_config.rank, kernel_dims(config)
    expected = {
        peft_key(i, m, ab): (i, m, ab)
        for i in range(config.num_hidden_layers)
        for m in lora_config.target_modules
        for ab in ("a", "b")
    }
    unexpected = [k for k in tensors.keys() if k not in expected]
    if unexpected:
        raise AdapterError(
            f"{tensors.path}: unexpected tensor {unexpected[0]!r} for target modules "
            f"{', '.join(lora_config.target_modules)} on a {config.num_hidden_layers}-layer model"
        )
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise AdapterError(f"{tensors.path}: missing tensor {missing[0]!r}")
    shapes = adapter_shapes(config, lora_config)["layers"]
    out: dict = {}
    for key, (i, module, ab) in expected.items():
        in_size, out_size = (math.prod(x) for x in dims[module])
        want = (r, in_size) if ab == "a" else (out_size, r)
        got = tensors.shape(key)
        if got != want:
            rank_axis = 0 if ab == "a" else 1
            if len(got) == 2 and got[1 - rank_axis] == want[1 - rank_axis]:
                raise AdapterError(
                    f"{tensors.path}: rank mismatch: {key!r} has rank {got[rank_axis]}, {CONFIG_FILE} says r={r}"
                )
            raise AdapterError(
                f"{tensors.path}: tensor {key!r} has shape {list(got)}, the base model implies {list(want)}"
            )
        sub, name = TARGETS[module]
        value = np.asarray(tensors.get(key))
        leaf_dtype = np.dtype(dtype) if dtype is not None else value.dtype
        slot = out.setdefault(sub, {}).setdefault(name, {})
        if ab not in slot:
            slot[ab] = np.empty(shapes[sub][name][ab], leaf_dtype)
        # torch [r, in] / [out, r] -> our [*in, r] / [r, *out] (in and out split as the kernel splits them)
        slot[ab][i] = value.T.reshape(shapes[sub][name][ab][1:])
    return {"layers": out}
