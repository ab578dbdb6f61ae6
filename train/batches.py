"""From the data pipeline's per-process numpy batches to global, sharded jax.Arrays.

Every process reads only its share of each global batch (`global_batch // process_count` rows) and
contributes it to one global array with `jax.make_array_from_process_local_data`: no process ever
holds the whole batch on its devices. `Corpus` is the one place that calls the data pipeline
(`train.data`); tests pass any object with the same two methods.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding

from train.config import DataConfig


class StatefulIterator(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...


class DataProvider(Protocol):
    def train_iterator(self, *, global_batch_size: int, seed: int, process_index: int,
                       process_count: int) -> StatefulIterator: ...

    def eval_iterator(self, *, global_batch_size: int, process_index: int,
                      process_count: int) -> Iterator[dict[str, np.ndarray]]: ...


class Corpus:
    """The tokenized corpus of `data.sources` (the built-in real-text corpus when empty), prepared into
    `data.cache_dir` on first use and reused afterwards."""

    def __init__(self, cfg: DataConfig, seq_len: int):
        from train import data

        sources = list(cfg.sources) if cfg.sources else data.default_corpus_sources()
        for source in sources:
            if not os.path.exists(os.path.expanduser(source)):
                raise FileNotFoundError(f"corpus not found: {source}")
        self.data_dir = data.ensure_prepared(sources, os.path.expanduser(cfg.cache_dir), seq_len)
        self._data = data

    def train_iterator(self, *, global_batch_size, seed, process_index, process_count):
        return self._data.make_train_iterator(self.data_dir, "train", global_batch_size=global_batch_size, seed=seed,
                                              process_index=process_index, process_count=process_count)

    def eval_iterator(self, *, global_batch_size, process_index, process_count):
        return self._data.make_eval_iterator(self.data_dir, global_batch_size=global_batch_size,
                                             process_index=process_index, process_count=process_count)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, global_batch_size: int) -> dict[str, jax.Array]:
    """One global array per field from this process's rows (the rows of its addressable devices)."""
    out = {}
    for name, rows in local.items():
        rows = np.asarray(rows)
        if name in ("input_ids", "labels", "attention_mask"):
            rows = rows.astype(np.int32, copy=False)
        shape = (global_batch_size,) + rows.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, rows, shape)
    return out
