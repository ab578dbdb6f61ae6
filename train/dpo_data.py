"""The data of `task: dpo`: preference JSONL -> token pairs -> rows holding whole pairs.

Rows, as TRL's DPOTrainer takes them (one JSON object a line):
  standard        {"prompt": str, "chosen": str, "rejected": str}          plain text, EOS appended
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}   chat template

Tokenized as TRL does: the prompt alone (conversational: rendered with the generation prompt) and
prompt + chosen, prompt + rejected each tokenized whole; the completion starts where the prompt's
tokens and the whole's first differ. Only completion tokens count (a sequence's log-probability is
the sum over them); for a conversation that is everything after the generation prompt, the
template's end-of-turn text included, as TRL has it.

A row of seq_len holds whole pairs, each as two segments: 2k-1 = prompt + chosen, 2k = prompt +
rejected (pair k of the row; 0 = padding). The model keeps attention inside each segment and
restarts positions there (as for SFT packing), so both sequences of a pair are in the same row and
so the same step, device and micro-batch. data.packing: several pairs per row (best fit decreasing),
else one. A pair longer than seq_len (both sequences together) is cut (data.truncation "cut": both
sequences cut at one length, the longest that fits, keeping their starts, as TRL's max_length with
keep_start cuts each) or dropped ("drop"); a cut pair with no completion token left is dropped too.
Both are counted in the log.

Every row of every source is read and checked before the model is built (a bad row: one line naming
its file, line and field, exit 2); the packed rows are kept in `<data.cache_dir>/dpo/`, named by a
hash of every input that made them, as the SFT rows are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qwen2_jax.tokenizer import TOKENIZER_FILE, load_tokenizer
from train.chat_render import ChatDataError, ChatRenderer, _messages, jsonl_files, read_rows
from train.config import TrainConfig
from train.data_loader import TrainBatches
from train.data_pref_corpus import default_preference_sources
from train.data_prepare import DEFAULT_EVAL_FRACTION, held_out_rows
from train.packing import IGNORE_INDEX, PackStats, assign_rows
from train.row_cache import held_out_batches, load_cached_rows, save_cached_rows
from train.sft_data import _file_sha256, tokenizer_dir, write_chat_assets

TOKEN_FIELDS = ("input_ids", "labels", "segment_ids")
CACHE_VERSION = "qwen2-jax-dpo-rows-1"  # packed rows under <data.cache_dir>/dpo/; change with their layout
COMPLETIONS = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: np.ndarray  # int32 token ids
    chosen: np.ndarray  # completion token ids
    rejected: np.ndarray

    def sequences(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([self.prompt, self.chosen]), np.concatenate([self.prompt, self.rejected])


# ------------------------------------------------------------------------------------------ a row
class PairRenderer:
    """Rows -> Pairs through the checkpoint's chat template. `where` in every error: "FILE:LINE"."""

    def __init__(self, chat: ChatRenderer):
        self.chat = chat
        self.tokenizer = chat.tokenizer

    def pair(self, row: Any, where: str) -> Pair:
        if not isinstance(row, Mapping):
            raise ChatDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        for field in ("prompt", *COMPLETIONS):
            if field not in row:
                found = ", ".join(map(str, row)) or "none"
                raise ChatDataError(
                    f"{where}: {field}: missing (a preference row has prompt, chosen and rejected; found: {found})"
                )
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
            texts = self._standard(prompt, chosen, rejected, where)
        elif all(isinstance(v, list) for v in (prompt, chosen, rejected)):
            texts = self._conversational(prompt, chosen, rejected, where)
        else:
            kinds = ", ".join(type(v).__name__ for v in (prompt, chosen, rejected))
            raise ChatDataError(f"{where}: prompt, chosen, rejected: all strings or all message lists, got {kinds}")
        if chosen == rejected:
            raise ChatDataError(f"{where}: rejected: equals chosen (a pair must prefer one completion to another)")
        prompt_ids, chosen_ids, rejected_ids = (self._encode(t) for t in texts)
        # the completion starts where the tokens of the prompt alone and of the whole part (TRL's rule)
        start = min(_common_prefix(prompt_ids, chosen_ids), _common_prefix(prompt_ids, rejected_ids))
        pair = Pair(prompt_ids[:start], chosen_ids[start:], rejected_ids[start:])
        for field in COMPLETIONS:
            if len(getattr(pair, field)) == 0:
                raise ChatDataError(f"{where}: {field}: renders to no token after the prompt (nothing to learn)")
        if np.array_equal(pair.chosen, pair.rejected):
            raise ChatDataError(f"{where}: rejected: the same tokens as chosen (a pair must differ)")
        return pair

    def _standard(self, prompt: str, chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
        eos = self.chat._eos
        completions = []
        for field, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise ChatDataError(f"{where}: {field}: empty")
            completions.append(text if not eos or text.endswith(eos) else text + eos)  # as TRL: learn to stop
        return prompt, prompt + completions[0], prompt + completions[1]

    def _conversational(self, prompt: list, chosen: list, rejected: list, where: str) -> tuple[str, str, str]:
        prompt_messages = _messages(prompt, f"{where}: prompt")
        rendered = [self._render(prompt_messages, True, where, "prompt")]
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            messages = _messages(value, f"{where}: {field}")
            if not any(m["role"] == "assistant" for m in messages):
                raise ChatDataError(f"{where}: {field}: no assistant turn (nothing to learn)")
            rendered.append(self._render(prompt_messages + messages, False, where, field))
        return tuple(rendered)

    def _render(self, messages: list[dict], generation_prompt: bool, where: str, field: str) -> str:
        try:
            return self.chat.template.render(messages, generation_prompt)
        except Exception as e:  # a template's raise_exception, or a jinja error on an odd message
            raise ChatDataError(f"{where}: {field}: the chat template refuses it: {e}") from None

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.backend.encode(text, add_special_tokens=False).ids, np.int32)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


# ------------------------------------------------------------------------------------------ rows
def _labels(ids: np.ndarray, prompt_len: int) -> np.ndarray:
    """Targets: the completion tokens; never a segment's first token (nothing before it to predict from)."""
    labels = ids.copy()
    labels[: max(prompt_len, 1)] = IGNORE_INDEX
    return labels


def fit_pairs(pairs: list[Pair], seq_len: int, truncation: str) -> tuple[list[tuple], int, int]:
    """([(chosen ids, chosen labels, rejected ids, rejected labels)] that fit seq_len, cut, dropped)."""
    kept, cut, dropped = [], 0, 0
    for pair in pairs:
        chosen, rejected = pair.sequences()
        too_long = len(chosen) + len(rejected) > seq_len
        if too_long and truncation == "drop":
            dropped += 1
            continue
        cap = _common_cap(len(chosen), len(rejected), seq_len) if too_long else max(len(chosen), len(rejected))
        chosen_labels = _labels(chosen, len(pair.prompt))[:cap]
        rejected_labels = _labels(rejected, len(pair.prompt))[:cap]
        if not (np.any(chosen_labels != IGNORE_INDEX) and np.any(rejected_labels != IGNORE_INDEX)):
            dropped += 1  # the cut left a completion without a token
            continue
        cut += too_long
        kept.append((chosen[:cap], chosen_labels, rejected[:cap], rejected_labels))
    return kept, cut, dropped


def _common_cap(a: int, b: int, seq_len: int) -> int:
    """The largest L with min(a, L) + min(b, L) <= seq_len."""
    short = min(a, b)
    return seq_len // 2 if 2 * short >= seq_len else seq_len - short


def pack_pairs(
    pairs: list[Pair], seq_len: int, *, packing: bool, truncation: str, pad_id: int
) -> tuple[dict[str, np.ndarray], PackStats]:
    """The pairs as rows of seq_len (module docstring): {"input_ids", "labels", "segment_ids"}."""
    fitted, cut, dropped = fit_pairs(pairs, seq_len, truncation)
    assignment = assign_rows([len(p[0]) + len(p[2]) for p in fitted], seq_len, packing)
    n = len(assignment)
    rows = {
        "input_ids": np.full((n, seq_len), pad_id, np.int32),
        "labels": np.full((n, seq_len), IGNORE_INDEX, np.int32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
    }
    for r, members in enumerate(assignment):
        start, segment = 0, 0
        for i in members:
            chosen, chosen_labels, rejected, rejected_labels = fitted[i]
            for ids, labels in ((chosen, chosen_labels), (rejected, rejected_labels)):
                segment += 1
                end = start + len(ids)
                rows["input_ids"][r, start:end] = ids
                rows["labels"][r, start:end] = labels
                rows["segment_ids"][r, start:end] = segment
                start = end
    stats = PackStats(
        documents=len(pairs),
        rows=n,
        cut=cut,
        dropped=dropped,
        tokens=int(np.sum(rows["segment_ids"] > 0)),
        targets=int(np.sum(rows["labels"] != IGNORE_INDEX)),
        seq_len=seq_len,
    )
    return rows, stats


class ArrayRows:
    """grain random-access source over a dict of row arrays; its sha256 (what a resumed data stream
    checks) names the token fields only, so adding precomputed reference log-probs keeps it."""

    def __init__(self, arrays: dict[str, np.ndarray], name: str):
        self.arrays = arrays
        self.data_dir = name  # what error messages call it
        digest = hashlib.sha256()
        for field in TOKEN_FIELDS:
            digest.update(np.ascontiguousarray(arrays[field]).tobytes())
        self.sha256 = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {field: np.array(values[int(index)]) for field, values in self.arrays.items()}


# ------------------------------------------------------------------------------------------ provider
class PreferenceCorpus:
    """DataProvider for task dpo (see the module docstring)."""

    def __init__(self, config: TrainConfig, model_dir: str | None, vocab_size: int):
        self.tokenizer_dir = tokenizer_dir(model_dir, config.data.cache_dir)
        self.chat = ChatRenderer(load_tokenizer(self.tokenizer_dir))
        self.renderer = PairRenderer(self.chat)
        sources = list(config.data.sources) or [str(p) for p in default_preference_sources(config.data.cache_dir)]
        self.files = jsonl_files(sources)
        cache = self._cache_path(config)
        self.cached = cache.is_file()
        if self.cached:
            rows, self.stats = load_cached_rows(cache, TOKEN_FIELDS)
        else:
            rows, self.stats = self._render_and_pack(config, cache)
        n = len(rows["input_ids"])
        if n == 0:
            raise ChatDataError(
                f"data.sources: no pair left after data.truncation={config.data.truncation} (seq_len {config.seq_len} "
                "holds a pair's two sequences together)"
            )
        largest = int(rows["input_ids"].max())
        if largest >= vocab_size:
            raise ChatDataError(
                f"data.sources: the tokenizer ({self.tokenizer_dir}) makes token id {largest}, past the model's "
                f"vocab_size {vocab_size}"
            )
        held_out = 0
        if config.eval_every:
            held_out = config.data.eval_sequences or max(1, round(DEFAULT_EVAL_FRACTION * n))
            if held_out >= n:
                raise ChatDataError(f"data.eval_sequences: {held_out} held-out rows leave none to train on ({n} rows)")
        is_eval = held_out_rows(n, held_out)
        self.train_rows = {f: v[~is_eval] for f, v in rows.items()}
        self.eval_rows = {f: v[is_eval] for f, v in rows.items()}
        self._name = ", ".join(self.files)

    def _cache_path(self, config: TrainConfig) -> Path:
        digest = hashlib.sha256(CACHE_VERSION.encode())
        for path in self.files:
            digest.update(_file_sha256(path).encode())
        digest.update(_file_sha256(str(self.tokenizer_dir / TOKENIZER_FILE)).encode())
        tok = self.chat.tokenizer
        settings = [tok.config["chat_template"], tok.eos_token_id, tok.pad_token_id, config.seq_len]
        settings += [config.data.packing, config.data.truncation]
        digest.update(json.dumps(settings).encode())
        label = Path(self.files[0]).stem if len(self.files) == 1 else "pairs"
        return Path(os.path.expanduser(config.data.cache_dir)) / "dpo" / f"{label}-{digest.hexdigest()[:16]}.npz"

    def _render_and_pack(self, config: TrainConfig, cache: Path) -> tuple[dict[str, np.ndarray], PackStats]:
        pairs = [self.renderer.pair(row, where) for path in self.files for row, where in read_rows(path)]
        if not pairs:
            raise ChatDataError(f"data.sources: no rows in {', '.join(self.files)}")
        tok = self.chat.tokenizer
        pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
        rows, stats = pack_pairs(
            pairs, config.seq_len, packing=config.data.packing, truncation=config.data.truncation, pad_id=pad_id
        )
        save_cached_rows(cache, rows, stats)
        return rows, stats

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.train_rows)

    def attach(self, field: str, train_values: np.ndarray, eval_values: np.ndarray) -> None:
        """A per-token row field more (the precomputed reference log-probabilities)."""
        self.train_rows[field] = train_values
        self.eval_rows[field] = eval_values

    def summary(self, seq_len: int, packing: bool, truncation: str) -> str:
        s: PackStats = self.stats
        how = "packed" if packing else "one pair per row"
        return (
            f"dpo data: {s.documents} pairs from {len(self.files)} file(s) -> {s.rows} rows of {seq_len} tokens "
            f"({how}, {s.fill:.0%} filled), {s.targets} completion tokens; longer than seq_len: {s.cut} cut, "
            f"{s.dropped} dropped (data.truncation={truncation}); {len(self.eval_rows['input_ids'])} rows held out"
            + (" (rendered before, read from the cache)" if self.cached else "")
        )

    def train_iterator(self, *, global_batch_size, seed, process_index, process_count):
        return TrainBatches(
            None,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            source=ArrayRows(self.train_rows, self._name),
        )

    def eval_iterator(self, *, global_batch_size, process_index, process_count):
        """The held-out rows in order, this process's share of each global batch, the last batch filled
        with padding rows (segment 0: no pair)."""
        if len(self.eval_rows["input_ids"]) == 0:
            raise ChatDataError("eval_every: this DPO run holds out no rows")
        return held_out_batches(
            self.eval_rows,
            global_batch_size=global_batch_size,
            process_index=process_index,
            process_count=process_count,
        )

    def write_assets(self, directory: str) -> None:
        """The tokenizer files, with the chat template this run rendered with, into a checkpoint directory."""
        write_chat_assets(self.tokenizer_dir, self.chat, directory)
