"""The on-disk layout of a prepared data directory, shared by the writer and the readers.

    DIR/meta.json               what is below, how it was made, and from which sources
    DIR/tokenizer/              tokenizer.json (+ tokenizer_config.json) used to make the tokens
    DIR/train-00000.npy ...     int32 [sequences, seq_len] shards of the training split
    DIR/eval-00000.npy ...      the same for the held-out split

Each row is `seq_len` consecutive tokens of one stream: every document's tokens followed by the
separator `<|endoftext|>`, documents in source order. Rows do not overlap; the model takes a row as
`input_ids` and the loss shifts it by one internally (position t predicts token t + 1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "qwen2-jax-packed-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
TOKEN_DTYPE = "int32"
SPLITS = ("train", "eval")


def shard_file_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.npy"


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a prepared directory, checked for format and version."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{Path(data_dir)} is not a prepared data directory: {META_FILE} not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} does not describe {FORMAT} data")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {meta.get('format_version')}; this code reads version "
            f"{FORMAT_VERSION}: prepare the data again"
        )
    return meta


def read_meta_if_present(data_dir: str | os.PathLike) -> dict | None:
    """meta.json when the directory holds valid prepared data, else None."""
    try:
        return read_meta(data_dir)
    except (FileNotFoundError, ValueError):
        return None


def split_info(meta: dict, split: str) -> dict:
    if split not in meta.get("splits", {}):
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(meta.get('splits', SPLITS))}")
    return meta["splits"][split]
