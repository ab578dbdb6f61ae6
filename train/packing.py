"""Token documents with loss labels -> fixed-length training rows with segment ids.

A document is a pair of int32 arrays (input_ids, labels) of one length, labels -100 where the token
is not a target. Rows are `seq_len` long and carry three arrays: input_ids, labels and segment_ids
(1, 2, ... for the documents of the row in order, 0 on padding). The model keeps attention inside
each segment and restarts positions at its first token, so a packed row computes what its documents
would alone, one per padded row (tested to 1e-6 in float32).

- packing=True puts several documents into a row, best fit by decreasing length (the fullest rows
  for the fewest pad tokens; deterministic: ties keep input order); packing=False one per row.
- A document longer than seq_len is cut to its first seq_len tokens (truncation="cut") or dropped
  ("drop"); a cut one with no target left is dropped too. `PackStats` counts both.
- Each document's first label is -100 whatever it was: in a packed row the position before it
  belongs to the previous document, whose last token must not learn to predict the next one.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100
TRUNCATION_MODES = ("cut", "drop")


@dataclasses.dataclass(frozen=True)
class Document:
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n], IGNORE_INDEX where not a target


@dataclasses.dataclass(frozen=True)
class PackedRows:
    input_ids: np.ndarray  # int32 [rows, seq_len]
    labels: np.ndarray  # int32 [rows, seq_len]
    segment_ids: np.ndarray  # int32 [rows, seq_len]

    def __len__(self) -> int:
        return len(self.input_ids)

    def take(self, indices) -> PackedRows:
        return PackedRows(self.input_ids[indices], self.labels[indices], self.segment_ids[indices])


@dataclasses.dataclass(frozen=True)
class PackStats:
    documents: int  # documents given
    rows: int  # rows made
    cut: int  # documents longer than seq_len, cut to it
    dropped: int  # documents longer than seq_len dropped (truncation "drop", or nothing left to learn)
    tokens: int  # real tokens in the rows
    targets: int  # tokens that count in the loss
    seq_len: int

    @property
    def fill(self) -> float:
        """Real tokens over row capacity."""
        return self.tokens / max(1, self.rows * self.seq_len)


def fit_documents(documents: Sequence[Document], seq_len: int, truncation: str) -> tuple[list[Document], int, int]:
    """(documents that fit seq_len, cut count, dropped count), first labels set to -100."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_MODES)}, got {truncation!r}")
    kept, cut, dropped = [], 0, 0
    for doc in documents:
        too_long = len(doc.input_ids) > seq_len
        if too_long and truncation == "drop":
            dropped += 1
            continue
        ids, labels = doc.input_ids[:seq_len], doc.labels[:seq_len].copy()
        labels[0] = IGNORE_INDEX
        if not np.any(labels != IGNORE_INDEX):  # the cut removed every target
            dropped += 1
            continue
        cut += too_long
        kept.append(Document(np.asarray(ids, np.int32), np.asarray(labels, np.int32)))
    return kept, cut, dropped


def assign_rows(lengths: Sequence[int], seq_len: int, packing: bool) -> list[list[int]]:
    """Document indices per row. Best fit decreasing: the longest documents first, each into the row
    with the least room that still takes it (a new row when none does); within a row, input order."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (seq_len - lengths[i], len(rows) - 1))
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (room - lengths[i], row))
    for row in rows:
        row.sort()
    rows.sort(key=lambda r: r[0])  # rows in the order of their first document
    return rows


def pack(
    documents: Sequence[Document], seq_len: int, *, packing: bool, truncation: str, pad_id: int
) -> tuple[PackedRows, PackStats]:
    """The documents as rows of seq_len tokens (see the module docstring)."""
    fitted, cut, dropped = fit_documents(documents, seq_len, truncation)
    assignment = assign_rows([len(d.input_ids) for d in fitted], seq_len, packing)
    n = len(assignment)
    input_ids = np.full((n, seq_len), pad_id, np.int32)
    labels = np.full((n, seq_len), IGNORE_INDEX, np.int32)
    segment_ids = np.zeros((n, seq_len), np.int32)
    for r, members in enumerate(assignment):
        start = 0
        for segment, i in enumerate(members, start=1):
            doc = fitted[i]
            end = start + len(doc.input_ids)
            input_ids[r, start:end] = doc.input_ids
            labels[r, start:end] = doc.labels
            segment_ids[r, start:end] = segment
            start = end
    stats = PackStats(
        documents=len(documents),
        rows=n,
        cut=cut,
        dropped=dropped,
        tokens=int(np.sum(segment_ids > 0)),
        targets=int(np.sum(labels != IGNORE_INDEX)),
        seq_len=seq_len,
    )
    return PackedRows(input_ids, labels, segment_ids), stats
