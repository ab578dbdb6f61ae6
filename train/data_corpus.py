"""The default corpus: English documentation text that every CPython installation carries.

Built, without importing anything it reads, from the running interpreter's standard library:
  * the docstrings of every module, class and function in its `.py` files (parsed with `ast`),
    one document per module: each docstring under a line naming what it documents;
  * the topics of the Python language reference bundled for `help()` (`pydoc_data/topics.py`),
    one document per topic.
About 1.8 M characters, ~0.4 M Qwen2 tokens on CPython 3.11; enough for a tiny model to learn
from visibly in minutes. License: the Python Software Foundation License (PSF-2.0), under which
CPython's source and documentation are distributed.

The text depends on the Python version (docstrings change between releases) and could differ
between distributions that patch or split the standard library; the packages that some
distributions ship separately (tests, IDLE, tkinter, lib2to3, distutils, ensurepip, venv) are left
out for that reason. The file name carries the full Python version and meta.json records the
file's SHA-256, so a prepared cache is rebuilt whenever the text differs.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

# Parts of the standard library that distributions may leave out or package separately.
_SKIPPED_DIRECTORIES = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "distutils",
    "ensurepip",
    "venv",
    "site-packages",
    "dist-packages",
    "__pycache__",
}
_SKIPPED_FILES = {"turtle.py"}  # needs tkinter; some distributions ship it with it
_DOCUMENTED_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_TOPICS_FILE = Path("pydoc_data") / "topics.py"


def default_corpus_name() -> str:
    return f"python-{platform.python_version()}-stdlib-docs"


def default_corpus_sources(cache_dir: str | os.PathLike) -> list[Path]:
    """Sources of the default corpus: one JSONL file in `cache_dir`, written on first use."""
    path = Path(cache_dir).expanduser() / f"{default_corpus_name()}.jsonl"
    if not path.is_file():
        write_stdlib_docs_corpus(path)
    return [path]


def write_stdlib_docs_corpus(path: str | os.PathLike, stdlib_dir: str | os.PathLike | None = None) -> Path:
    """Write the corpus as JSONL ({"text": ..., "source": ...} per line), atomically."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    return write_jsonl(path, ({"text": text, "source": source} for source, text in stdlib_documents(root)))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """One JSON object a line, written under a temporary name and renamed: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def stdlib_documents(root: Path) -> Iterator[tuple[str, str]]:
    """(source, text) documents in a fixed order: modules by path, then reference topics by name."""
    for module_path in _module_files(root):
        text = _module_docstrings(module_path, root)
        if text:
            yield module_path.relative_to(root).as_posix(), text
    topics = _reference_topics(root / _TOPICS_FILE)
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield f"{_TOPICS_FILE.as_posix()}:{name}", text


def _module_files(root: Path) -> list[Path]:
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [
            d
            for d in subdirectories
            if d not in _SKIPPED_DIRECTORIES and not d.startswith((".", "config-", "lib-dynload"))
        ]
        files.extend(
            Path(directory) / name
            for name in names
            if name.endswith(".py") and name not in _SKIPPED_FILES and not name.startswith("_sysconfigdata")
        )
    # Sorting by relative path makes the order independent of the directory listing order.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_docstrings(path: Path, root: Path) -> str:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return ""  # not Python this interpreter parses (e.g. a test fixture)
    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    sections = []
    docstring = ast.get_docstring(tree)
    if docstring:
        sections.append(f"{module}\n\n{docstring}")
    sections.extend(f"{module}.{name}\n\n{doc}" for name, doc in _definition_docstrings(tree.body, ""))
    return "\n\n\n".join(sections)


def _definition_docstrings(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of classes and functions, nested ones included, in source order."""
    for node in body:
        if isinstance(node, _DOCUMENTED_NODES):
            name = f"{prefix}{node.name}"
            docstring = ast.get_docstring(node)
            if docstring:
                yield name, docstring
            yield from _definition_docstrings(node.body, f"{name}.")


def _reference_topics(path: Path) -> dict[str, str]:
    """The `topics` dict literal of pydoc_data/topics.py, read without importing it ({} if absent)."""
    if not path.is_file():
        return {}
    for node in ast.parse(path.read_bytes(), filename=str(path)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return {str(k): str(v) for k, v in topics.items()} if isinstance(topics, dict) else {}
    return {}
