"""Loading checkpoints: an HF directory (config.json + safetensors) or an Orbax checkpoint.

HF tensors are read through the one name table (`hf_keys.hf_table`), every shape asserted, and
placed layer by layer straight into each parameter's sharding: host memory holds one HF tensor at a
time, never a whole stacked leaf.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qwen2_jax import lora, orbax_checkpoint
from qwen2_jax.config import ConfigError, Qwen2Config
from qwen2_jax.dtypes import parse_dtype
from qwen2_jax.hf_keys import Entry, hf_table, is_ignored, leaf_shapes
from qwen2_jax.matmul import check_quantize
from qwen2_jax.params import param_shardings, tree_get
from qwen2_jax.peft_adapter import load_peft_adapter
from qwen2_jax.quantize import quantize_params
from qwen2_jax.safetensors_io import CheckpointError, SafetensorsDir


def require_checkpoint_dir(path: str, what: str = "checkpoint", config_hint: str | None = None) -> None:
    """The one check of a checkpoint path every entry point makes: it exists and is a directory, and
    with `config_hint` it has a config.json (the hint says what its absence means)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{what} must be a directory: {path}")
    if config_hint is not None and not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json{config_hint}")


def is_hf_dir(path: str) -> bool:
    return (
        os.path.isdir(path)
        and os.path.exists(os.path.join(path, "config.json"))
        and any(p.endswith(".safetensors") or p == "model.safetensors.index.json" for p in os.listdir(path))
    )


def load_checkpoint(
    path: str | os.PathLike,
    dtype=None,
    mesh: Mesh | None = None,
    quantize: str | None = None,
    adapter: str | os.PathLike | None = None,
) -> tuple[Qwen2Config, Any]:
    """(config, params) from an Orbax checkpoint written by qwen2-convert or training, or an HF dir.

    dtype: None keeps the stored dtype; "float32", "bfloat16" or "float16" converts (round to nearest
    even). mesh: place every parameter straight into its sharding on this mesh. quantize: None, or
    "int8": attention, MLP and LM-head matrices become int8 with one float32 scale per output channel
    (`qwen2_jax.quantize`; embeddings and norms keep `dtype`), for generation and `forward`.
    adapter: a PEFT LoRA adapter directory merged into the params (W + scale * A @ B in float32,
    rounded to the loaded dtype) before any quantization; a bad one is an AdapterError.
    """
    path = os.fspath(path)
    check_quantize(quantize)
    require_checkpoint_dir(path)
    target_dtype = parse_dtype(dtype) if dtype is not None else None
    if orbax_checkpoint.is_orbax_checkpoint(path):
        config, params = orbax_checkpoint.restore(path, dtype=target_dtype, mesh=mesh)
    elif os.path.isfile(os.path.join(path, "adapter", "adapter_config.json")) and not is_hf_dir(path):
        raise CheckpointError(
            f"{path}: a LoRA training run's checkpoints (adapters, no model): load its base model with "
            f"adapter={os.path.join(path, 'adapter')} (qwen2-generate / qwen2-serve --adapter)"
        )
    else:
        require_checkpoint_dir(path, config_hint=" (not an HF checkpoint) and no Orbax checkpoint")
        config, params = load_hf(path, target_dtype, mesh)
    if adapter is not None:
        lora_config, adapters = load_peft_adapter(adapter, config)
        params = lora.merge(params, adapters, lora_config, config)
    if quantize is not None:
        params = quantize_params(config, params, quantize=quantize, consume=True)
    return config, params


def check_hf_tensors(config: Qwen2Config, tensors: SafetensorsDir) -> list[Entry]:
    """The table for this config, after checking the directory has exactly its tensors and shapes."""
    table = hf_table(config)
    expected = {e.hf_key for e in table}
    missing = [e.hf_key for e in table if e.hf_key not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{tensors.directory}: missing tensor {missing[0]!r}{more}")
    unexpected = [k for k in tensors.keys() if k not in expected and not is_ignored(k, config)]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{tensors.file_of(unexpected[0])}: unexpected tensor {unexpected[0]!r}{more} "
            f"for a {config.model_type} model with this config"
        )
    for e in table:
        shape = tensors.shape(e.hf_key)
        if shape != e.hf_shape:
            raise CheckpointError(
                f"{tensors.file_of(e.hf_key)}: tensor {e.hf_key!r} has shape {list(shape)}, "
                f"config.json implies {list(e.hf_shape)}"
            )
    return table


def load_hf(path: str, dtype: np.dtype | None = None, mesh: Mesh | None = None):
    config = Qwen2Config.from_hf(path)
    tensors = SafetensorsDir(path)
    try:
        table = check_hf_tensors(config, tensors)
        dtype = tensors.param_dtype((e.hf_key for e in table), dtype)
        params = _assemble(config, table, tensors, dtype, mesh)
    finally:
        tensors.close()
    return config, params


def _assemble(config: Qwen2Config, table: list[Entry], tensors: SafetensorsDir, dtype: np.dtype, mesh):
    """Build every leaf on its devices, one HF tensor at a time (host memory: one tensor)."""
    by_leaf: dict[tuple[str, ...], list[Entry]] = {}
    for e in table:
        by_leaf.setdefault(e.path, []).append(e)
    shapes = leaf_shapes(config)
    shardings = param_shardings(config, mesh, dtype)
    flat: dict[tuple[str, ...], jax.Array] = {}
    for path, entries in by_leaf.items():
        sharding = tree_get(shardings, path)
        flat[path] = _build_leaf(shapes[path], dtype, sharding, entries, tensors)
    params: dict = {}
    for path, array in flat.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    expected_paths = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(shardings)}
    if expected_paths != set(flat):
        raise ConfigError(f"name table and model disagree on parameters: {sorted(expected_paths ^ set(flat))}")
    return params


def _build_leaf(shape, dtype, sharding, entries: list[Entry], tensors: SafetensorsDir) -> jax.Array:
    """One leaf: each device gets its shard, assembled from per-slice HF tensors.

    A stacked leaf (layers, or layers x experts) is filled one HF tensor at a time; each device keeps
    only its piece of each slice it holds (experts may be sharded, so not every device holds every
    slice). Host memory: one HF tensor.
    """
    index_map = sharding.addressable_devices_indices_map(shape)
    devices = list(index_map)
    stacked = len(entries[0].index)
    ranges = {d: [range(*index_map[d][a].indices(shape[a])) for a in range(stacked)] for d in devices}
    pieces: dict[Any, list] = {d: [] for d in devices}
    for e in sorted(entries, key=lambda e: e.index):
        value = np.asarray(e.to_param(tensors.get(e.hf_key)))
        value = value.astype(dtype) if value.dtype != dtype else value
        for device in devices:
            if all(i in r for i, r in zip(e.index, ranges[device])):
                local = index_map[device][stacked:]
                pieces[device].append(jax.device_put(np.ascontiguousarray(value[local]), device))
        del value
    shards = []
    for device in devices:
        if stacked == 0:
            shards.append(pieces[device][0])
        else:
            block = jnp.stack(pieces[device])
            shards.append(block.reshape(tuple(len(r) for r in ranges[device]) + block.shape[1:]))
        pieces[device] = None
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)
