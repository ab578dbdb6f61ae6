"""From the data pipeline's per-process numpy batches to global, sharded jax.Arrays.

Every process reads only its share of each global batch and contributes it to one global array with
`jax.make_array_from_process_local_data`: no process ever holds the whole batch on its devices. Its
share is the block of rows that the batch sharding puts on its devices (`process_share`): with the
data-parallel axes over processes, process p of P holds rows p*B/P ... (p+1)*B/P - 1; processes whose
devices hold the same rows (a model axis across hosts) read the same block. `Corpus` is the one place
that calls the data pipeline (`train.data`); tests pass any object with the same two methods.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding

from qwen2_jax.cli_support import UsageError
from train.config import DataConfig
from train.data_format import META_FILE


class StatefulIterator(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...


class DataProvider(Protocol):
    def train_iterator(
        self, *, global_batch_size: int, seed: int, process_index: int, process_count: int
    ) -> StatefulIterator: ...

    def eval_iterator(
        self, *, global_batch_size: int, process_index: int, process_count: int
    ) -> Iterator[dict[str, np.ndarray]]: ...


class CorpusError(UsageError, ValueError):
    """Sources that cannot be prepared (unsupported file, empty directory): bad input, exit status 2."""


class Corpus:
    """The tokenized corpus of `data.sources` (the built-in real-text corpus when empty), prepared on
    first use into `<data.cache_dir>/prepared/<name>` and reused afterwards. The name carries the
    sources, seq_len and split options, so runs with other settings never overwrite each other.
    A single source that is a directory written by `qwen2-train prepare` is read as it is (its
    seq_len must be the run's; its held-out split is the one it was prepared with)."""

    def __init__(self, cfg: DataConfig, seq_len: int, *, progress: bool = True):
        from train import data

        cache_dir = os.path.expanduser(cfg.cache_dir)
        sources = [os.path.abspath(os.path.expanduser(s)) for s in cfg.sources]
        for source in sources:
            if not os.path.exists(source):
                raise FileNotFoundError(f"corpus not found: {source}")
        self._data = data
        if len(sources) == 1 and os.path.isfile(os.path.join(sources[0], META_FILE)):
            self.data_dir = sources[0]
            try:
                prepared_len = data.read_meta(self.data_dir)["seq_len"]
            except ValueError as e:
                raise CorpusError(f"corpus: {e}") from None
            if prepared_len != seq_len:
                raise CorpusError(
                    f"corpus: {self.data_dir} was prepared with --seq-len {prepared_len}, but the run's "
                    f"seq_len is {seq_len}"
                )
            return
        try:
            if not sources:
                sources = [str(p) for p in data.default_corpus_sources(cache_dir)]
            options = {
                "sources": sources,
                "seq_len": seq_len,
                "text_key": cfg.text_key,
                "eval_sequences": cfg.eval_sequences,
            }
            digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
            label = os.path.splitext(os.path.basename(sources[0]))[0] if len(sources) == 1 else "corpus"
            self.data_dir = os.path.join(cache_dir, "prepared", f"{label}-{seq_len}-{digest}")
            kwargs = {"eval_sequences": cfg.eval_sequences} if cfg.eval_sequences is not None else {}
            data.ensure_prepared(
                sources, self.data_dir, seq_len=seq_len, text_key=cfg.text_key, progress=progress, **kwargs
            )
        except ValueError as e:
            raise CorpusError(f"corpus: {e}") from None

    def train_iterator(self, *, global_batch_size, seed, process_index, process_count):
        return self._data.make_train_iterator(
            self.data_dir,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )

    def eval_iterator(self, *, global_batch_size, process_index, process_count):
        return iter(
            self._data.make_eval_iterator(
                self.data_dir,
                global_batch_size=global_batch_size,
                process_index=process_index,
                process_count=process_count,
            )
        )


def process_share(sharding: NamedSharding, global_batch_size: int, seq_len: int) -> tuple[int, int]:
    """(index, count): this process's devices hold rows index*B/count ... (index+1)*B/count - 1 of
    every global batch of B rows. UsageError when they hold a set of rows that is not one such block
    (a mesh whose data-parallel axes do not split the batch into one contiguous block per process)."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size, seq_len)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    first, n = min(rows), len(rows)
    if max(rows) - first + 1 != n or global_batch_size % n or first % n:
        raise UsageError(
            f"the devices of process {jax.process_index()} hold {n} rows of each batch of {global_batch_size} "
            f"between rows {first} and {max(rows)}, not one aligned block; order the mesh so that each "
            "process's devices hold one contiguous block of the batch"
        )
    return first // n, global_batch_size // n


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, global_batch_size: int) -> dict[str, jax.Array]:
    """One global array per field from this process's rows (the rows of its addressable devices)."""
    out = {}
    for name, rows in local.items():
        rows = np.asarray(rows)
        if name in ("input_ids", "labels", "attention_mask", "segment_ids"):
            rows = rows.astype(np.int32, copy=False)
        shape = (global_batch_size,) + rows.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, rows, shape)
    return out
