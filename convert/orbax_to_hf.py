"""Orbax checkpoint (converted or trained) -> HF safetensors directory that transformers loads.

Tensors are produced in the name table's order (HF's own order: layer by layer), read from the
stacked leaves one layer (or expert) slice at a time, and streamed into shards whose headers are
planned up front, so host memory holds one tensor.
"""

from __future__ import annotations

import os

import numpy as np

from convert.arrays import materialize
from convert.orbax_stream import LeafReader
from convert.progress import Progress
from qwen2_jax import atomic
from qwen2_jax import orbax_checkpoint as oc
from qwen2_jax.dtypes import parse_dtype
from qwen2_jax.hf_keys import Entry, hf_table, leaf_shapes
from qwen2_jax.safetensors_io import SafetensorsWriter

INDEX_FILE = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'5GB', '500MB', '20KB', '1GiB' or a plain byte count, as transformers' max_shard_size."""
    s = str(text).strip().upper().replace(" ", "")
    units = {
        "TIB": 2**40,
        "GIB": 2**30,
        "MIB": 2**20,
        "KIB": 2**10,
        "TB": 10**12,
        "GB": 10**9,
        "MB": 10**6,
        "KB": 10**3,
        "B": 1,
    }
    for unit, unit_scale in units.items():
        if s.endswith(unit) and s[: -len(unit)]:
            number, scale = s[: -len(unit)], unit_scale
            break
    else:
        number, scale = s, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"invalid size {text!r} (examples: 5GB, 500MB, 1048576)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * scale)


class CheckpointPlan:
    """A validated Orbax source and the HF tensors it becomes."""

    def __init__(self, src: str, dtype: str | None):
        self.ckpt = oc.open_checkpoint(src)
        self.config = self.ckpt.config
        oc.check_stored_shapes(self.ckpt, leaf_shapes(self.config))
        self.table = hf_table(self.config)
        self.dtype = parse_dtype(dtype if dtype is not None else self.ckpt.dtype)
        self.asset_dirs = tuple(dict.fromkeys((self.ckpt.directory, self.ckpt.metadata_dir)))
        self._reader = None

    def hf_tensor(self, e: Entry) -> np.ndarray:
        """The HF tensor of one table entry, read from its stacked leaf's slice."""
        if self._reader is None:
            self._reader = LeafReader(self.ckpt)
        return e.to_hf(self._reader.read(e.path, e.index))

    @property
    def total_bytes(self) -> int:
        return sum(int(np.prod(e.hf_shape, dtype=np.int64)) for e in self.table) * self.dtype.itemsize

    def close(self):
        pass


def shard_plan(table: list[Entry], dtype: np.dtype, max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive tensors packed greedily into shards of at most max_shard_bytes (one tensor may
    exceed it alone), as transformers' save_pretrained does."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in table:
        nbytes = int(np.prod(e.hf_shape, dtype=np.int64)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def convert(plan, dst: str, max_shard_bytes: int, progress: Progress) -> None:
    """Write `plan`'s tensors as an HF directory: a CheckpointPlan, or any plan with its config,
    table, dtype, total_bytes, hf_tensor(entry) and asset_dirs (`convert.merge_lora.MergePlan`)."""
    os.makedirs(dst, exist_ok=True)
    dtype = plan.dtype
    shards = shard_plan(plan.table, dtype, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for name, entries in zip(names, shards, strict=True):
        specs = [(e.hf_key, dtype, e.hf_shape) for e in entries]
        with SafetensorsWriter(os.path.join(dst, name), specs, metadata={"format": "pt"}) as writer:
            for e in entries:
                value = materialize(plan.hf_tensor(e), dtype)  # round to nearest even
                writer.write(e.hf_key, value)
                progress.update(value.nbytes)
                weight_map[e.hf_key] = name
                del value
    if len(shards) > 1:
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}
        atomic.write_json(os.path.join(dst, INDEX_FILE), index)
    plan.config.with_checkpoint_info(torch_dtype=dtype.name).save_hf(dst)
    for d in plan.asset_dirs:
        if oc.copy_assets(d, dst):
            break
