"""Shared by the training-data tests: a small corpus of random documents, its prepared shards, and
helpers to read them back; tests/conftest.py turns the builders into session fixtures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from train.data import PackedTokenSource, prepare, read_meta
from train.data_prepare import held_out_rows

EOS = 151643  # Qwen2's <|endoftext|>, spelled out so a wrong constant in the code cannot agree with itself
SEQ_LEN = 16
WORDS = (
    "the model reads every token of a document and learns which word comes next; numbers like 1984 "
    "and 3.14 split into digits, while naïve café résumé keep their accents — 東京 and Zürich too"
).split()


def document(rng: random.Random) -> str:
    paragraphs = []
    for _ in range(rng.randint(1, 4)):
        paragraphs.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))).capitalize() + ".")
    return rng.choice(["\n\n", "\n", "\r\n\r\n", "\n\n  "]).join(paragraphs)


def reference_tokenizer(tok_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def make_corpus(tmp_path_factory) -> tuple[list[Path], list[str]]:
    """Three .txt files (one document each) and a .jsonl file; returns (sources, documents in order)."""
    rng = random.Random(0)
    directory = tmp_path_factory.mktemp("corpus")
    sources, documents = [], []
    for i in range(3):
        text = document(rng)
        path = directory / f"doc{i}.txt"
        path.write_bytes(text.encode("utf-8"))
        sources.append(path)
        documents.append(text)
    jsonl_documents = [document(rng) for _ in range(40)]
    lines = [json.dumps({"text": text, "id": i}) for i, text in enumerate(jsonl_documents)]
    lines.insert(5, "")  # blank lines are skipped
    (directory / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sources.append(directory / "docs.jsonl")
    documents.extend(jsonl_documents)
    return sources, documents


def prepare_corpus(data_corpus, tok_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(
        data_corpus[0],
        out,
        seq_len=SEQ_LEN,
        eval_sequences=5,
        tokenizer_dir=tok_dir,
        num_workers=1,
        progress=False,
        sequences_per_shard=16,
    )
    return out


def stream_rows(data_dir: Path) -> np.ndarray:
    """All rows in stream order, re-merging the two splits."""
    meta = read_meta(data_dir)
    train, held_out = PackedTokenSource(data_dir, "train"), PackedTokenSource(data_dir, "eval")
    mask = held_out_rows(len(train) + len(held_out), len(held_out))
    rows = np.empty((len(mask), meta["seq_len"]), np.int32)
    rows[~mask] = [train[i] for i in range(len(train))]
    rows[mask] = [held_out[i] for i in range(len(held_out))]
    return rows


def take(iterator, steps: int) -> list[np.ndarray]:
    return [next(iterator)["input_ids"] for _ in range(steps)]
