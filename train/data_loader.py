"""Reading prepared token shards: a grain data source, the training batch stream, the held-out batches.

Order and sharding rule (what makes resume exact and elastic):
  * The training rows form one endless global stream: epoch e is a permutation of all rows made by
    grain's index shuffle, seeded with the run seed and e, so every epoch is reshuffled and the
    order depends on nothing but (seed, number of rows).
  * Global batch k starting from stream position s holds stream samples s + k*B ... s + k*B + B - 1
    (B = global_batch_size). Process p of P reads only rows p*B/P ... (p+1)*B/P - 1 of it, so the
    processes' local batches concatenated in process order are the global batch.
  * The iterator state is the global stream position of the next batch (`next_sample`) plus the
    identity of the order (seed, data hash). It is the same on every process, so one copy can be
    saved, and it can be restored with any process count or batch size: the run continues at the
    same global sample, each process deriving its own rows from the position.
"""

from __future__ import annotations

import os
from pathlib import Path

import grain
import numpy as np

from train.data_format import read_meta, split_info

STATE_VERSION = 1
# grain reshuffles epoch e with seed + e, so run seeds s and s + 1 would share all but one epoch
# order. Spreading the run seed over 32 bits (an odd multiplier: a bijection) keeps runs apart.
_SEED_MULTIPLIER = 0x9E3779B1
_STREAM_SAMPLES = 2**62


class PackedTokenSource:
    """grain `RandomAccessDataSource` over one split: row i as int32 [seq_len].

    Shards are memory-mapped (np.load with mmap_mode="r"): opening reads only the headers, and a
    row read touches only that row's pages. Pickles as (directory, split) and maps the files again
    in the receiving process, as grain's worker processes need."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self._data_dir = Path(data_dir).expanduser().absolute()
        self._split = split
        self.meta = read_meta(self._data_dir)
        self.seq_len: int = self.meta["seq_len"]
        info = split_info(self.meta, split)
        self.sha256: str = info["sha256"]
        self._shards = [self._open_shard(shard) for shard in info["shards"]]
        self._ends = np.cumsum([len(shard) for shard in self._shards], dtype=np.int64)
        if int(self._ends[-1] if len(self._ends) else 0) != info["sequences"]:
            raise ValueError(
                f"{self._data_dir}: the {split} shards hold {int(self._ends[-1])} sequences, "
                f"meta.json says {info['sequences']}"
            )

    def _open_shard(self, shard: dict) -> np.ndarray:
        path = self._data_dir / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard missing: {path}")
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
        if rows.dtype != np.int32 or rows.ndim != 2 or rows.shape != (shard["sequences"], self.seq_len):
            raise ValueError(
                f"{path}: expected int32 [{shard['sequences']}, {self.seq_len}], found {rows.dtype} {list(rows.shape)}"
            )
        return rows

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def shards(self) -> tuple[np.ndarray, ...]:
        """The memory-mapped shard arrays (np.memmap), int32 [rows, seq_len] each."""
        return tuple(self._shards)

    @property
    def split(self) -> str:
        return self._split

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for the {self._split} split of {len(self)} rows")
        shard = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[shard - 1]) if shard else 0
        return np.array(self._shards[shard][index - start])  # a copy: batches must not pin the mapping

    def __repr__(self) -> str:
        return f"PackedTokenSource({str(self._data_dir)!r}, split={self._split!r})"

    def __getstate__(self) -> dict:
        return {"data_dir": str(self._data_dir), "split": self._split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["data_dir"], state["split"])


def _process_layout(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """(process_index, process_count, local batch size), defaulting to JAX's process layout."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in range for process_count {process_count}")
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    return process_index, process_count, global_batch_size // process_count


class TrainBatches:
    """Endless iterator of this process's rows of each global training batch (see the module docstring).

    Yields {"input_ids": int32 [global_batch_size // process_count, seq_len]}. `get_state()` returns
    a small JSON-serialisable dict, identical on all processes; `set_state(state)` continues from it
    (with any process count and global batch size)."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
        split: str = "train",
        read_threads: int = 2,
        prefetch_batches: int = 4,
        source=None,
    ):
        self.process_index, self.process_count, self.local_batch_size = _process_layout(
            global_batch_size, process_index, process_count
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.global_batch_size = global_batch_size
        self.seed = seed
        # any random-access source with len, sha256 and data_dir: a row is an int32 [seq_len] array, or
        # a dict of them (SFT rows: input_ids, labels, segment_ids; train/sft_data.py)
        self.source = PackedTokenSource(data_dir, split) if source is None else source
        if len(self.source) == 0:
            raise ValueError(f"the {split} split of {self.source.data_dir} is empty")
        self._read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
        # Finitely many epochs (2**62 samples): grain's length arithmetic overflows on an endless
        # (sys.maxsize) dataset once it is batched.
        epochs = max(1, _STREAM_SAMPLES // len(self.source))
        shuffled = grain.MapDataset.source(self.source).shuffle((seed * _SEED_MULTIPLIER) % 2**32)
        self._stream = shuffled.repeat(epochs)
        self._next_sample = 0
        self._iterator = None

    @property
    def num_sequences(self) -> int:
        return len(self.source)

    @property
    def next_sample(self) -> int:
        """Global stream position of the first row of the next global batch."""
        return self._next_sample

    @property
    def epoch(self) -> float:
        """Epochs completed so far (fractional)."""
        return self._next_sample / self.num_sequences

    def _local_batches(self, start: int):
        rows = self._stream[start:]
        local = rows.batch(self.local_batch_size)[self.process_index :: self.process_count]
        return local.map(lambda batch: batch if isinstance(batch, dict) else {"input_ids": batch}).to_iter_dataset(
            self._read_options
        )

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = iter(self._local_batches(self._next_sample))
        batch = next(self._iterator)
        self._next_sample += self.global_batch_size
        return batch

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "next_sample": self._next_sample,
            "seed": self.seed,
            "num_sequences": self.num_sequences,
            "data_sha256": self.source.sha256,
        }

    def set_state(self, state: dict) -> None:
        """Continue at `state["next_sample"]`; refuses a state of another seed or other data."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a training data iterator state of version {STATE_VERSION}: {state!r}")
        for key, mine in (
            ("seed", self.seed),
            ("num_sequences", self.num_sequences),
            ("data_sha256", self.source.sha256),
        ):
            if state.get(key) != mine:
                raise ValueError(f"data iterator state has {key} {state.get(key)!r}, this run has {mine!r}")
        next_sample = state.get("next_sample")
        if isinstance(next_sample, bool) or not isinstance(next_sample, int) or next_sample < 0:
            raise ValueError(f"data iterator state has an invalid next_sample {next_sample!r}")
        self.close()
        self._next_sample = next_sample

    def close(self) -> None:
        """Stop the prefetch threads (iteration may continue afterwards: they restart)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


class EvalBatches:
    """Finite, re-iterable held-out batches in stored order, this process's rows of each global batch.

    Each iteration yields `len(self)` = ceil(rows / global_batch_size) batches
    {"input_ids": int32 [b, seq_len], "attention_mask": int32 [b, seq_len]} with b = global batch size
    / process count. The last global batch is filled up with rows of the separator token whose
    attention_mask is 0, so every process runs the same number of equally shaped steps and the
    padding adds no tokens to a masked loss."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        global_batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
        split: str = "eval",
    ):
        self.process_index, self.process_count, self.local_batch_size = _process_layout(
            global_batch_size, process_index, process_count
        )
        self.global_batch_size = global_batch_size
        self.source = PackedTokenSource(data_dir, split)
        self._padding_token = self.source.meta["eos_token_id"]

    @property
    def num_sequences(self) -> int:
        return len(self.source)

    def __len__(self) -> int:
        return -(-self.num_sequences // self.global_batch_size)

    def __iter__(self):
        seq_len = self.source.seq_len
        for batch_index in range(len(self)):
            first = batch_index * self.global_batch_size + self.process_index * self.local_batch_size
            input_ids = np.full((self.local_batch_size, seq_len), self._padding_token, dtype=np.int32)
            attention_mask = np.zeros((self.local_batch_size, seq_len), dtype=np.int32)
            for row, index in enumerate(range(first, min(first + self.local_batch_size, self.num_sequences))):
                input_ids[row] = self.source[index]
                attention_mask[row] = 1
            yield {"input_ids": input_ids, "attention_mask": attention_mask}


def make_train_iterator(
    data_dir: str | os.PathLike,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    state: dict | None = None,
    split: str = "train",
) -> TrainBatches:
    """The training batch stream of a prepared directory, restored from `state` when given."""
    batches = TrainBatches(
        data_dir,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        split=split,
    )
    if state is not None:
        batches.set_state(state)
    return batches


def make_eval_iterator(
    data_dir: str | os.PathLike,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str = "eval",
) -> EvalBatches:
    """The held-out batches of a prepared directory (iterate it once per evaluation)."""
    return EvalBatches(
        data_dir,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        split=split,
    )
