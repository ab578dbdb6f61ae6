"""The post-training demo's data: questions about the `decimal` module answered by its docstrings.

The exchanges are those of the built-in chat data (`train.data_chat_corpus`) for the module the base
demo pretrains on (`_pydecimal.py`, the pure-Python `decimal`): user "What does `decimal.Context.quantize`
do?", assistant the docstring's first sentence. The names are split once, deterministically, into the
ones SFT and DPO train on and held-out ones that no post-training row mentions; the held-out pairs
measure preference accuracy. A pair's rejected answer is the first sentence of the next name in its
own split (wrapping around): plausible `decimal` prose about something else.
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


def preference_pairs(exchanges: list[Exchange]) -> list[tuple[Exchange, str]]:
    """(exchange, rejected answer): the next exchange's answer, skipping any equal to the chosen one."""
    pairs = []
    for i, exchange in enumerate(exchanges):
        for step in range(1, len(exchanges)):
            other = exchanges[(i + step) % len(exchanges)].answer
            if other != exchange.answer:
                pairs.append((exchange, other))
                break
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
