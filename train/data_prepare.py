"""Text / JSONL files -> a prepared directory of packed int32 token shards (layout in `train.data_format`).

`prepare` tokenizes the sources in parallel with a progress bar into one token stream (each
document followed by `<|endoftext|>`), cuts the stream into non-overlapping rows of `seq_len`
tokens (the tail shorter than a row is dropped and counted in meta.json), and assigns rows to the
held-out split evenly spaced over the stream, so the held-out rows sample every source. A row next
to a held-out row may continue the same document in the training split; for strictly disjoint
documents, prepare a separate held-out corpus.

The directory appears atomically: everything is written to a temporary sibling, which is renamed
into place at the end, so a failure or interruption leaves no (or the previous) directory.
`ensure_prepared` prepares on first use and reuses the directory while the sources and options are
unchanged, so a training run can name raw text and still start fast the second time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from train.data_format import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    TOKEN_DTYPE,
    TOKENIZER_DIR,
    read_meta_if_present,
    shard_file_name,
)
from train.data_sources import expand_sources, file_sha256, iter_pieces, source_record
from train.data_tokenize import (
    TOKENIZER_FILE,
    encode_chunks,
    install_tokenizer,
    load_encoder,
    separator_token_id,
    tokenizer_fingerprint,
)

DEFAULT_EVAL_FRACTION = 0.01
SHARD_BYTES = 128 << 20
CHUNK_CHARS = 1 << 18  # text handed to a worker at a time
SMALL_CORPUS_BYTES = 32 << 20


def prepare(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    seq_len: int,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    eval_sequences: int | None = None,
    text_key: str = "text",
    tokenizer_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    sequences_per_shard: int | None = None,
) -> dict:
    """Tokenize and pack `sources` into `out_dir`; returns the meta.json dict.

    sources: .txt files (one document each), .jsonl files (field `text_key` of each line), or
        directories of them. seq_len: tokens per row. The held-out split gets `eval_sequences` rows
        when given, else round(eval_fraction * rows), at least one. tokenizer_dir: a directory with
        tokenizer.json (None: Qwen2's tokenizer). num_workers: encoding processes (None: one per CPU,
        or this process alone below SMALL_CORPUS_BYTES of sources). Worker processes are spawned, so
        a script calling this with num_workers > 1 needs the `if __name__ == "__main__":` guard.
    overwrite: replace an existing prepared directory (never a directory without meta.json).
    """
    options = _checked_options(seq_len, eval_fraction, eval_sequences, text_key, tokenizer_dir)
    files = expand_sources(sources)
    num_workers = _checked_workers(num_workers, files)
    out_dir = Path(out_dir).expanduser().absolute()
    _check_destination(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta = _prepare_into(staging, files, options, num_workers, progress, sequences_per_shard)
        _publish(staging, out_dir, replace=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def ensure_prepared(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    seq_len: int,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    eval_sequences: int | None = None,
    text_key: str = "text",
    tokenizer_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """`prepare` into `data_dir` unless it already holds this data; returns its meta.json dict.

    Reused when the options match and every source has its recorded path and size and either its
    recorded mtime or its recorded SHA-256; otherwise prepared again in place of the old directory.
    Safe to call from several processes at once on a shared file system: one publishes, the others
    find its result and discard their own."""
    options = _checked_options(seq_len, eval_fraction, eval_sequences, text_key, tokenizer_dir)
    files = expand_sources(sources)
    existing = read_meta_if_present(data_dir)
    if existing is not None and _is_current(existing, files, options):
        return existing
    try:
        return prepare(
            files,
            data_dir,
            seq_len=seq_len,
            eval_fraction=eval_fraction,
            eval_sequences=eval_sequences,
            text_key=text_key,
            tokenizer_dir=tokenizer_dir,
            num_workers=num_workers,
            overwrite=existing is not None,
            progress=progress,
        )
    except FileExistsError:
        raced = read_meta_if_present(data_dir)
        if raced is not None and _is_current(raced, files, options):
            return raced
        raise


# ---------------------------------------------------------------------------------------------
# Options and destination


def _checked_options(seq_len, eval_fraction, eval_sequences, text_key, tokenizer_dir) -> dict:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if eval_sequences is not None:
        if isinstance(eval_sequences, bool) or not isinstance(eval_sequences, int) or eval_sequences < 1:
            raise ValueError(f"eval_sequences must be an integer >= 1, got {eval_sequences!r}")
    elif not isinstance(eval_fraction, (int, float)) or not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction!r}")
    if not isinstance(text_key, str) or not text_key:
        raise ValueError(f"text_key must be a non-empty string, got {text_key!r}")
    return {
        "seq_len": seq_len,
        "eval_fraction": None if eval_sequences is not None else float(eval_fraction),
        "eval_sequences": eval_sequences,
        "text_key": text_key,
        "tokenizer": tokenizer_fingerprint(tokenizer_dir),
        "tokenizer_dir": None if tokenizer_dir is None else str(Path(tokenizer_dir).absolute()),
    }


def _checked_workers(num_workers: int | None, files: list[Path]) -> int:
    if num_workers is None:
        # Starting a worker (interpreter, imports, tokenizer) costs about a second: not worth it for
        # a small corpus, which the `tokenizers` library's own threads encode in a few seconds.
        small = sum(path.stat().st_size for path in files) < SMALL_CORPUS_BYTES
        return 1 if small else os.cpu_count() or 1
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    return num_workers


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists (overwrite to replace it)")
    if not (out_dir / META_FILE).is_file():
        raise FileExistsError(f"refusing to replace {out_dir}: it is not a prepared data directory (no {META_FILE})")


def _publish(staging: Path, out_dir: Path, replace: bool) -> None:
    """Rename the finished staging directory to `out_dir` (replacing a previous one only if `replace`)."""
    previous = None
    if replace and out_dir.is_dir() and any(out_dir.iterdir()):
        # Moved aside, not deleted, until the new directory is in place.
        previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, previous)
    try:
        os.rename(staging, out_dir)
    except OSError:
        if out_dir.is_dir() and any(out_dir.iterdir()):
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
            raise FileExistsError(f"output directory {out_dir} was created by another process meanwhile") from None
        if previous is not None:
            os.replace(previous, out_dir)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _is_current(meta: dict, files: Sequence[Path], options: dict) -> bool:
    if meta.get("options") != _json_roundtrip(options):
        return False
    recorded = meta.get("sources", [])
    if len(recorded) != len(files):
        return False
    for record, path in zip(recorded, files):
        now = source_record(path, with_hash=False)
        if record["path"] != now["path"] or record["size"] != now["size"]:
            return False
        if record["mtime_ns"] != now["mtime_ns"] and record["sha256"] != file_sha256(path):
            return False
    return True


def _json_roundtrip(value):
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------------------------------------
# Tokenizing, packing, writing


def _prepare_into(
    staging: Path, files: list[Path], options: dict, num_workers: int, progress: bool, sequences_per_shard: int | None
) -> dict:
    seq_len = options["seq_len"]
    sources = [source_record(path) for path in files]
    tokenizer_dir = install_tokenizer(options["tokenizer_dir"], staging / TOKENIZER_DIR)
    tokenizer = load_encoder(tokenizer_dir / TOKENIZER_FILE)
    separator = separator_token_id(tokenizer)

    stream_path = staging / "stream.tmp"
    _tokenize_to_stream(
        files,
        options["text_key"],
        tokenizer_dir / TOKENIZER_FILE,
        separator,
        stream_path,
        sources,
        num_workers,
        progress,
    )
    total_tokens = sum(s["tokens"] for s in sources)
    if total_tokens == 0:
        raise ValueError(f"the sources hold no text ({len(files)} file(s), all empty)")
    num_rows = total_tokens // seq_len
    if num_rows < 2:
        raise ValueError(
            f"the corpus has {total_tokens} tokens, too few for two sequences of seq_len {seq_len} "
            "(one to train on, one held out): lower seq_len or add text"
        )
    num_eval = options["eval_sequences"] or max(1, round(options["eval_fraction"] * num_rows))
    if num_eval >= num_rows:
        raise ValueError(
            f"a held-out split of {num_eval} sequences leaves none to train on: the corpus packs "
            f"into {num_rows} sequences of {seq_len} tokens"
        )

    rows = np.memmap(stream_path, dtype=np.int32, mode="r", shape=(num_rows, seq_len))
    held_out = held_out_rows(num_rows, num_eval)
    per_shard = sequences_per_shard or max(1, SHARD_BYTES // (seq_len * np.dtype(TOKEN_DTYPE).itemsize))
    splits = {
        "train": _write_split(rows, np.flatnonzero(~held_out), staging, "train", per_shard),
        "eval": _write_split(rows, np.flatnonzero(held_out), staging, "eval", per_shard),
    }
    del rows
    stream_path.unlink()

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "dtype": TOKEN_DTYPE,
        "eos_token_id": separator,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "tokenizer_dir": TOKENIZER_DIR,
        "documents": sum(s["documents"] for s in sources),
        "tokens": total_tokens,
        "tokens_dropped": total_tokens - num_rows * seq_len,
        "splits": splits,
        "sources": sources,
        "options": _json_roundtrip(options),
    }
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def held_out_rows(num_rows: int, num_eval: int) -> np.ndarray:
    """Boolean mask with exactly `num_eval` True entries spread evenly over `num_rows`."""
    index = np.arange(num_rows, dtype=np.int64)
    return (index + 1) * num_eval // num_rows > index * num_eval // num_rows


def _piece_chunks(files: list[Path], text_key: str) -> Iterator[tuple[list[tuple[int, bool, int]], list[str]]]:
    """(tags, texts) chunks of about CHUNK_CHARS; a tag is (source index, ends_document, nbytes)."""
    tags, texts, chars = [], [], 0
    for source_index, path in enumerate(files):
        for piece in iter_pieces(path, text_key):
            tags.append((source_index, piece.ends_document, piece.nbytes))
            texts.append(piece.text)
            chars += len(piece.text)
            if chars >= CHUNK_CHARS:
                yield tags, texts
                tags, texts, chars = [], [], 0
    if texts:
        yield tags, texts


def _tokenize_to_stream(
    files: list[Path],
    text_key: str,
    tokenizer_json: Path,
    separator: int,
    stream_path: Path,
    sources: list[dict],
    num_workers: int,
    progress: bool,
) -> None:
    """Append every document's tokens and a separator to `stream_path`; count them into `sources`."""
    for record in sources:
        record.update(documents=0, tokens=0)
    separator_array = np.array([separator], dtype=np.int32)
    total_bytes = sum(record["size"] for record in sources)
    with (
        open(stream_path, "wb") as stream,
        tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, dynamic_ncols=True
        ) as bar,
    ):
        for tags, token_arrays in encode_chunks(_piece_chunks(files, text_key), tokenizer_json, num_workers):
            parts = []
            for (source_index, ends_document, nbytes), tokens in zip(tags, token_arrays):
                parts.append(tokens)
                record = sources[source_index]
                record["tokens"] += len(tokens)
                if ends_document:
                    parts.append(separator_array)
                    record["tokens"] += 1
                    record["documents"] += 1
                bar.update(nbytes)
            stream.write(np.concatenate(parts).tobytes())
        bar.update(total_bytes - bar.n)  # blank lines and skipped empty documents


def _write_split(rows: np.ndarray, indices: np.ndarray, directory: Path, split: str, per_shard: int) -> dict:
    digest = hashlib.sha256()
    shards = []
    for shard_index, start in enumerate(range(0, len(indices), per_shard)):
        block = np.ascontiguousarray(rows[indices[start : start + per_shard]])
        name = shard_file_name(split, shard_index)
        np.save(directory / name, block, allow_pickle=False)
        digest.update(block.tobytes())
        shards.append({"file": name, "sequences": int(block.shape[0])})
    return {
        "sequences": int(len(indices)),
        "tokens": int(len(indices)) * rows.shape[1],
        "sha256": digest.hexdigest(),
        "shards": shards,
    }
