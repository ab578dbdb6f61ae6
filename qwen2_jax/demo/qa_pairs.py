"""The post-training demo's data: questions about the `decimal` module answered by its docstrings.

The exchanges are those of the built-in chat data (`train.data_chat_corpus`) for the module the base
demo pretrains on (`_pydecimal.py`, the pure-Python `decimal`): user "What does `decimal.Context.quantize`
do?", assistant the docstring's first sentence. The names are split once, deterministically, into the
ones SFT and DPO train on and held-out ones that no post-training row mentions; the held-out pairs
measure preference accuracy. A pair's rejected answer is the first sentence of a name of another kind
(`Decimal` method, `Context` method, other) in its own split: plausible `decimal` prose about
something else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

SOURCE_FILE = "_pydecimal.py"  # the corpus file the base demo trains on
PUBLIC_MODULE = "decimal"  # what users import; _pydecimal is its pure-Python implementation
HELD_OUT_EVERY = 5  # every 5th name (in source order) is held out: ~25 of the ~125


@dataclasses.dataclass(frozen=True)
class Exchange:
    name: str  # e.g. decimal.Context.quantize
    answer: str  # the first sentence of its docstring

    @property
    def question(self) -> str:
        return f"What does `{self.name}` do?"


@dataclasses.dataclass(frozen=True)
class Split:
    train: list[Exchange]
    held_out: list[Exchange]


def decimal_exchanges(stdlib_dir: str | os.PathLike | None = None) -> list[Exchange]:
    """The module's exchanges in source order, one per name with a usable first sentence."""
    from train.data_chat_corpus import _exchanges

    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    path = root / SOURCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this Python has no pure-Python decimal module")
    private = Path(SOURCE_FILE).stem + "."
    exchanges, seen = [], set()
    for question, answer in _exchanges(path, root):
        name = question["content"].split("`")[1].replace(private, PUBLIC_MODULE + ".", 1)
        if name not in seen:  # a name defined twice (e.g. under `if`) keeps its first docstring
            seen.add(name)
            exchanges.append(Exchange(name, answer["content"]))
    return exchanges


def split(exchanges: list[Exchange]) -> Split:
    held = [e for i, e in enumerate(exchanges) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return Split([e for i, e in enumerate(exchanges) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1], held)


def kind(exchange: Exchange) -> str:
    """What the name documents: a `Decimal` method, a `Context` method, or anything else (the exception
    classes, the classes themselves, module functions)."""
    parts = exchange.name.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ("Decimal", "Context") else "other"


def preference_pairs(exchanges: list[Exchange]) -> list[tuple[Exchange, str]]:
    """(exchange, rejected answer): for the i-th exchange, the i-th answer (wrapping around) among the
    exchanges of other kinds, so the rejected answers spread over them rather than repeating one.

    Another kind, because that contrast is one a 10M-parameter model can learn from ~100 pairs and
    carry to names it never saw (`Context` methods speak of "the operand" and a, b; `Decimal` methods of
    self; exceptions are short phrases); telling apart two names of the same kind is left to a bigger model."""
    pairs = []
    for i, exchange in enumerate(exchanges):
        others = [o for o in exchanges if kind(o) != kind(exchange) and o.answer != exchange.answer]
        pairs.append((exchange, others[i % len(others)].answer))
    return pairs


def chat_row(exchange: Exchange) -> dict:
    """An SFT row in TRL's conversational format."""
    return {
        "messages": [
            {"role": "user", "content": exchange.question},
            {"role": "assistant", "content": exchange.answer},
        ]
    }


def preference_row(exchange: Exchange, rejected: str) -> dict:
    """A DPO row in TRL's conversational preference format."""
    return {
        "prompt": [{"role": "user", "content": exchange.question}],
        "chosen": [{"role": "assistant", "content": exchange.answer}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
