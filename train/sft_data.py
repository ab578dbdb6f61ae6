"""The data of `task: sft`: chat JSONL -> rendered documents -> packed rows, as the trainer's DataProvider.

Every row of every source is rendered and checked before the model is built or anything compiled
(train/chat_render.py: a bad row is one line naming its file, line and field, exit 2), then packed
into rows of seq_len (train/packing.py). The rows are held in memory and kept in
`<data.cache_dir>/sft/`, named by a hash of every input that made them (file contents, tokenizer,
template, settings), so a rerun or a resume reads them instead of rendering again (a bad row never
reaches the cache). A held-out split is kept only when
the run evaluates (`eval_every` > 0: `data.eval_sequences` rows, or DEFAULT_EVAL_FRACTION of them).
Training batches come from the pretraining stream (train/data_loader.py's TrainBatches, over these
rows): the same seeded epoch shuffles, the same per-process rows, the same resumable state (its
data hash is that of the packed training rows, so a resume onto other data or settings is refused).

The tokenizer is the checkpoint's when `model` is a checkpoint directory with a tokenizer.json,
else Qwen2's own (built offline, ChatML template, `<|im_end|>` as EOS). `write_assets` puts it, with
the chat template used, into the run's checkpoint directory, so `qwen2-generate --chat` and
`qwen2-serve` use an SFT checkpoint as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from qwen2_jax import atomic
from qwen2_jax.orbax_checkpoint import copy_assets
from qwen2_jax.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, load_tokenizer
from train.chat_render import ChatDataError, ChatRenderer, jsonl_files, read_rows
from train.config import TrainConfig
from train.data_chat_corpus import default_chat_sources
from train.data_loader import TrainBatches
from train.data_prepare import DEFAULT_EVAL_FRACTION, held_out_rows
from train.packing import PackedRows, PackStats, pack
from train.row_cache import held_out_batches, load_cached_rows, save_cached_rows

BATCH_FIELDS = ("input_ids", "labels", "segment_ids")
BUILTIN_TOKENIZER = "qwen2-chatml"  # under <data.cache_dir>/tokenizers/
CACHE_VERSION = "qwen2-jax-sft-rows-1"  # packed rows under <data.cache_dir>/sft/; change with their layout


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_rows(path: Path) -> tuple[PackedRows, PackStats]:
    arrays, stats = load_cached_rows(path, BATCH_FIELDS)
    return PackedRows(*(arrays[field] for field in BATCH_FIELDS)), stats


class RowSource:
    """grain random-access source over packed rows: row i as {"input_ids", "labels", "segment_ids"}."""

    def __init__(self, rows: PackedRows, name: str):
        self.rows = rows
        self.data_dir = name  # what error messages call it
        digest = hashlib.sha256()
        for field in BATCH_FIELDS:
            digest.update(np.ascontiguousarray(getattr(rows, field)).tobytes())
        self.sha256 = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {field: np.array(getattr(self.rows, field)[int(index)]) for field in BATCH_FIELDS}


def tokenizer_dir(model_dir: str | None, cache_dir: str) -> Path:
    """The checkpoint's tokenizer when it has one, else Qwen2's (written once into the cache)."""
    if model_dir and os.path.isfile(os.path.join(model_dir, TOKENIZER_FILE)):
        return Path(model_dir)
    path = Path(os.path.expanduser(cache_dir)) / "tokenizers" / BUILTIN_TOKENIZER
    if not (path / TOKENIZER_FILE).is_file() or not (path / TOKENIZER_CONFIG_FILE).is_file():
        from qwen2_jax.tokenizer_build import IM_END, write_qwen2_tokenizer

        write_qwen2_tokenizer(path, eos_token=IM_END)
    return path


class ChatCorpus:
    """DataProvider for task sft (see the module docstring)."""

    def __init__(self, config: TrainConfig, model_dir: str | None, vocab_size: int):
        self.tokenizer_dir = tokenizer_dir(model_dir, config.data.cache_dir)
        self.renderer = ChatRenderer(load_tokenizer(self.tokenizer_dir), assistant_only=config.loss.assistant_only)
        sources = list(config.data.sources) or [str(p) for p in default_chat_sources(config.data.cache_dir)]
        self.files = jsonl_files(sources)
        cache = self._cache_path(config)
        self.cached = cache.is_file()
        rows, self.stats = _load_rows(cache) if self.cached else self._render_and_pack(config, cache)
        if len(rows) == 0:
            raise ChatDataError(f"data.sources: no row left after data.truncation={config.data.truncation}")
        largest = int(rows.input_ids.max())
        if largest >= vocab_size:
            whose = "the model's tokenizer" if self.tokenizer_dir == Path(model_dir or "") else "Qwen2's tokenizer"
            raise ChatDataError(
                f"data.sources: {whose} ({self.tokenizer_dir}) makes token id {largest}, past the model's "
                f"vocab_size {vocab_size}"
            )
        held_out = 0
        if config.eval_every:
            held_out = config.data.eval_sequences or max(1, round(DEFAULT_EVAL_FRACTION * len(rows)))
            if held_out >= len(rows):
                raise ChatDataError(
                    f"data.eval_sequences: {held_out} held-out rows leave none to train on ({len(rows)} rows)"
                )
        is_eval = held_out_rows(len(rows), held_out)  # spread evenly over the rows
        self.train_rows, self.eval_rows = rows.take(np.flatnonzero(~is_eval)), rows.take(np.flatnonzero(is_eval))
        self._name = ", ".join(self.files)

    def _cache_path(self, config: TrainConfig) -> Path:
        """Where the packed rows of these sources and settings are kept: the name hashes every input of
        rendering and packing (file contents, tokenizer, template, settings), so a change re-renders."""
        digest = hashlib.sha256(CACHE_VERSION.encode())
        for path in self.files:
            digest.update(_file_sha256(path).encode())
        digest.update(_file_sha256(str(self.tokenizer_dir / TOKENIZER_FILE)).encode())
        tok = self.renderer.tokenizer
        settings = [tok.config["chat_template"], tok.eos_token_id, tok.pad_token_id, config.seq_len]
        settings += [config.data.packing, config.data.truncation, config.loss.assistant_only]
        digest.update(json.dumps(settings).encode())
        label = Path(self.files[0]).stem if len(self.files) == 1 else "chat"
        return Path(os.path.expanduser(config.data.cache_dir)) / "sft" / f"{label}-{digest.hexdigest()[:16]}.npz"

    def _render_and_pack(self, config: TrainConfig, cache: Path) -> tuple[PackedRows, PackStats]:
        """Every row rendered and checked (the first bad one raises), packed, and kept in `cache`."""
        documents = [self.renderer.document(row, where) for path in self.files for row, where in read_rows(path)]
        if not documents:
            raise ChatDataError(f"data.sources: no rows in {', '.join(self.files)}")
        tok = self.renderer.tokenizer
        pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
        rows, stats = pack(
            documents, config.seq_len, packing=config.data.packing, truncation=config.data.truncation, pad_id=pad_id
        )
        save_cached_rows(cache, {field: getattr(rows, field) for field in BATCH_FIELDS}, stats)
        return rows, stats

    def summary(self, seq_len: int, packing: bool, truncation: str) -> str:
        s: PackStats = self.stats
        how = "packed" if packing else "one per row"
        return (
            f"sft data: {s.documents} conversations from {len(self.files)} file(s) -> {s.rows} rows of {seq_len} "
            f"tokens ({how}, {s.fill:.0%} filled), {s.targets} trained tokens; longer than seq_len: {s.cut} cut, "
            f"{s.dropped} dropped (data.truncation={truncation}); {len(self.eval_rows)} rows held out"
            + (" (rendered before, read from the cache)" if self.cached else "")
        )

    def train_iterator(self, *, global_batch_size, seed, process_index, process_count):
        return TrainBatches(
            None,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            source=RowSource(self.train_rows, self._name),
        )

    def eval_iterator(self, *, global_batch_size, process_index, process_count):
        """The held-out rows in order, this process's share of each global batch, the last batch filled
        with padding rows (segment 0: no token counts)."""
        if len(self.eval_rows) == 0:
            raise ChatDataError("eval_every: this SFT run holds out no rows")
        return held_out_batches(
            {field: getattr(self.eval_rows, field) for field in BATCH_FIELDS},
            global_batch_size=global_batch_size,
            process_index=process_index,
            process_count=process_count,
        )

    def write_assets(self, directory: str) -> None:
        """The tokenizer files, with the chat template this run rendered with, into a checkpoint directory."""
        write_chat_assets(self.tokenizer_dir, self.renderer, directory)


def write_chat_assets(tokenizer_dir: Path, renderer: ChatRenderer, directory: str) -> None:
    """The tokenizer files of tokenizer_dir into a checkpoint directory, with the template `renderer`
    renders with (Qwen2's ChatML when the tokenizer has none), so the checkpoint chats as trained."""
    copy_assets(str(tokenizer_dir), directory)
    if renderer.template.is_fallback and not os.path.isfile(os.path.join(directory, CHAT_TEMPLATE_FILE)):
        path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["chat_template"] = renderer.tokenizer.config["chat_template"]
        atomic.write_json(path, config, indent=2)
