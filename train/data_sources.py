"""Documents from text sources, read as bounded pieces for parallel tokenization.

Source kinds:
  * `.txt`: the whole file is one document (UTF-8; a leading BOM is dropped, line endings kept).
  * `.jsonl`: one JSON object per line, the document is its `text_key` field (default "text").
    Blank lines are skipped; empty documents are skipped (they would only add a separator).
  * a directory: every `.txt` / `.jsonl` file below it, in sorted path order.

A large `.txt` document is handed to the tokenizer in pieces of about `max_piece_chars`, cut only
just before a character that is not whitespace and follows a newline. Qwen2's pre-tokenizer always
ends a pre-token there (none of its patterns runs from a newline into a non-space character), and
byte-level BPE never merges across pre-tokens, so the pieces encode to exactly the tokens of the
whole document. Memory stays bounded by the piece size, not the file size.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_SUFFIXES = (".txt", ".jsonl")
READ_BLOCK_BYTES = 1 << 20
DEFAULT_MAX_PIECE_CHARS = 1 << 20
# A newline followed by a non-whitespace character (`re`'s \s is `str.isspace`).
_SAFE_CUT = re.compile(r"\n(?=\S)")


@dataclass(frozen=True)
class TextPiece:
    """Part of one document. `ends_document` marks its last piece; `nbytes` is the source bytes it
    accounts for (for progress: the bytes of all pieces of a file sum to the file's size)."""

    text: str
    ends_document: bool
    nbytes: int


def expand_sources(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """Absolute paths of the source files, in the order given (directories expanded, sorted)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser().absolute()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
            if not found:
                raise ValueError(f"source directory {path} holds no {' or '.join(SUPPORTED_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in SUPPORTED_SUFFIXES:
                raise ValueError(
                    f"unsupported source {path}: expected a {' or '.join(SUPPORTED_SUFFIXES)} file "
                    "or a directory of them"
                )
            files.append(path)
        else:
            raise FileNotFoundError(f"source not found: {path}")
    if not files:
        raise ValueError("no sources given")
    return files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def source_record(path: Path, with_hash: bool = True) -> dict:
    """What identifies a source's content: path, size, mtime and (optionally) its SHA-256."""
    stat = path.stat()
    record = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if with_hash:
        record["sha256"] = file_sha256(path)
    return record


def iter_pieces(
    path: Path, text_key: str = "text", max_piece_chars: int = DEFAULT_MAX_PIECE_CHARS
) -> Iterator[TextPiece]:
    """The documents of one source file as pieces (see the module docstring)."""
    if path.suffix == ".jsonl":
        return _jsonl_pieces(path, text_key)
    return _text_file_pieces(path, max_piece_chars)


def _jsonl_pieces(path: Path, text_key: str) -> Iterator[TextPiece]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if text_key not in record:
                raise ValueError(f"{path}:{lineno}: no {text_key!r} field (fields: {', '.join(sorted(record))})")
            text = record[text_key]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_key!r} is {type(text).__name__}, expected a string")
            if text:
                yield TextPiece(text, True, len(line))


def _text_file_pieces(path: Path, max_piece_chars: int) -> Iterator[TextPiece]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    buffer = ""
    unreported_bytes = 0
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK_BYTES)
            try:
                buffer += decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: not UTF-8 text (invalid byte near offset {offset + err.start})") from None
            offset += len(block)
            unreported_bytes += len(block)
            if not block:
                break
            while len(buffer) >= max_piece_chars:
                cut = _last_safe_cut(buffer, max_piece_chars) or _next_safe_cut(buffer, max_piece_chars)
                if cut <= 0:
                    break  # no safe cut yet (one very long line): keep reading
                yield TextPiece(buffer[:cut], False, unreported_bytes)
                buffer, unreported_bytes = buffer[cut:], 0
    if buffer:
        yield TextPiece(buffer, True, unreported_bytes)


def _next_safe_cut(text: str, start: int) -> int:
    """Smallest safe cut >= start (see `_last_safe_cut`); 0 if there is none."""
    match = _SAFE_CUT.search(text, max(start - 1, 0))
    return match.start() + 1 if match else 0


def _last_safe_cut(text: str, limit: int) -> int:
    """Largest i <= limit with text[i-1] == "\\n" and text[i] not whitespace; 0 if there is none."""
    end = min(limit, len(text) - 1)
    while end > 0:
        newline = text.rfind("\n", 0, end)
        if newline < 0:
            return 0
        if not text[newline + 1].isspace():
            return newline + 1
        end = newline
    return 0
