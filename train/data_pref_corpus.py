"""The default DPO data: preference pairs about the Python standard library, from the default SFT
exchanges (train/data_chat_corpus.py), so every machine has it.

Each exchange "What does `module.name` do?" becomes one pair in TRL's conversational preference
format: chosen is the docstring's first sentence, rejected the answer of another definition of the
same module (the next exchange's, wrapping around; a module with a single exchange takes the next
module's). A plausible-looking but wrong answer: what the model should learn to rank lower. About
3,800 pairs on CPython 3.11, written as JSONL on first use. License: PSF-2.0, as the corpus.
"""

from __future__ import annotations

import os
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from train.data_chat_corpus import _exchanges
from train.data_corpus import _module_files, write_jsonl


def default_preference_name() -> str:
    return f"python-{platform.python_version()}-stdlib-preference"


def default_preference_sources(cache_dir: str | os.PathLike) -> list[Path]:
    """The default DPO data: one JSONL file in `cache_dir`, written on first use."""
    path = Path(cache_dir).expanduser() / f"{default_preference_name()}.jsonl"
    if not path.is_file():
        write_stdlib_preferences(path)
    return [path]


def write_stdlib_preferences(path: str | os.PathLike, stdlib_dir: str | os.PathLike | None = None) -> Path:
    return write_jsonl(path, stdlib_pairs(Path(stdlib_dir or sysconfig.get_paths()["stdlib"])))


def stdlib_pairs(root: Path) -> Iterator[dict]:
    exchanges = [list(_exchanges(module_path, root)) for module_path in _module_files(root)]
    flat = [exchange for module in exchanges for exchange in module]
    for module in exchanges:
        for i, (question, answer) in enumerate(module):
            if len(module) > 1:
                other = module[(i + 1) % len(module)][1]
            else:
                other = flat[(flat.index((question, answer)) + 1) % len(flat)][1]
            if other["content"] == answer["content"]:
                continue
            yield {"prompt": [question], "chosen": [answer], "rejected": [other]}
