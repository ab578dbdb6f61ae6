"""What the SFT and DPO corpora share: their packed rows kept on disk, and their held-out batches.

Both hold their rows in memory as arrays of one row each per field; the cache file (`.npz`) holds those
arrays and the packing statistics, written under a temporary name and renamed (never half a file)."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from qwen2_jax import atomic
from train.packing import IGNORE_INDEX, PackStats


def save_cached_rows(cache: Path, rows: Mapping[str, np.ndarray], stats: PackStats) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, stats=np.array(json.dumps(dataclasses.asdict(stats))), **rows)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(cache, buffer.getvalue())


def load_cached_rows(cache: Path, fields: tuple[str, ...]) -> tuple[dict[str, np.ndarray], PackStats]:
    with np.load(cache, allow_pickle=False) as cached:
        rows = {field: cached[field] for field in fields}
        return rows, PackStats(**json.loads(str(cached["stats"])))


def held_out_batches(
    rows: Mapping[str, np.ndarray], *, global_batch_size: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
    """The held-out rows in order, this process's share of each global batch, the last batch filled with
    padding rows (segment 0, every label ignored: they count for nothing)."""
    n = len(rows["input_ids"])
    local = global_batch_size // process_count
    for first in range(0, n, global_batch_size):
        take = np.arange(first + process_index * local, min(first + (process_index + 1) * local, n))
        batch = {}
        for field, values in rows.items():
            block = np.full((local,) + values.shape[1:], IGNORE_INDEX if field == "labels" else 0, values.dtype)
            block[: len(take)] = values[take]
            batch[field] = block
        yield batch
