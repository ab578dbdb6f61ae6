"""The default SFT data: questions and answers about the Python standard library, built from the same
docstrings as the default pretraining corpus (train/data_corpus.py), so every machine has it.

Each documented public class or function whose docstring opens with a sentence of 3 to 40 words is
one exchange: user "What does `module.name` do?", assistant that first sentence. Consecutive
exchanges of one module are paired into two-turn conversations (the last one of an odd count stays
single), so the data has multi-turn rows. About 3,800 exchanges on CPython 3.11; written as JSONL
({"messages": [...]}, TRL's conversational format) on first use. License: PSF-2.0, as the corpus.
"""

from __future__ import annotations

import ast
import os
import platform
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from train.data_corpus import _definition_docstrings, _module_files, write_jsonl

_FIRST_SENTENCE = re.compile(r"(.+?[.!?])(\s|$)")
MIN_WORDS, MAX_WORDS = 3, 40


def default_chat_name() -> str:
    return f"python-{platform.python_version()}-stdlib-chat"


def default_chat_sources(cache_dir: str | os.PathLike) -> list[Path]:
    """The default SFT data: one JSONL file in `cache_dir`, written on first use."""
    path = Path(cache_dir).expanduser() / f"{default_chat_name()}.jsonl"
    if not path.is_file():
        write_stdlib_chat(path)
    return [path]


def write_stdlib_chat(path: str | os.PathLike, stdlib_dir: str | os.PathLike | None = None) -> Path:
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    return write_jsonl(path, ({"messages": messages} for messages in stdlib_conversations(root)))


def stdlib_conversations(root: Path) -> Iterator[list[dict[str, str]]]:
    for module_path in _module_files(root):
        exchanges = list(_exchanges(module_path, root))
        for i in range(0, len(exchanges), 2):
            yield [message for exchange in exchanges[i : i + 2] for message in exchange]


def _exchanges(path: Path, root: Path) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return
    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    for name, docstring in _definition_docstrings(tree.body, ""):
        if name.split(".")[-1].startswith("_"):
            continue
        answer = first_sentence(docstring)
        if answer is not None:
            question = {"role": "user", "content": f"What does `{module}.{name}` do?"}
            yield question, {"role": "assistant", "content": answer}


def first_sentence(docstring: str) -> str | None:
    """The docstring's first sentence on one line, when it has MIN_WORDS to MAX_WORDS words."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = _FIRST_SENTENCE.match(paragraph)
    if match is None or not MIN_WORDS <= len(match.group(1).split()) <= MAX_WORDS:
        return None
    return match.group(1)
