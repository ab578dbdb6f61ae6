"""Atomic writes: a file or a whole directory appears at its path complete, or not at all.

Everything is first written under a hidden temporary name in the destination's own folder (a
rename is atomic only within one file system), fsynced, then renamed into place and the folder
fsynced, so neither a reader nor a crash at any moment sees a half-written result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

PathLike = str | os.PathLike


def temp_path(path: PathLike, tag: str) -> str:
    """`.NAME.TAG` beside `path`: where an atomic write of `path` is prepared."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{tag}")


def fsync_path(path: PathLike) -> None:
    """fsync one file or directory (a directory's fsync makes its entries, such as a rename, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: PathLike) -> None:
    """fsync every file and directory under `directory`."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically. The file gets the mode a plain open() would give it."""
    path = os.fspath(path)
    tmp = temp_path(path, f"{uuid.uuid4().hex[:12]}.tmp")
    # os.open applies the umask to 0o666, as open(path, "w") does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_text(path: PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write `value` as JSON (UTF-8, non-ASCII kept, newline at the end) to `path` atomically."""
    write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copy the bytes of `src` to `dst` atomically."""
    with open(src, "rb") as f:
        write_bytes(dst, f.read())


def _first_missing(path: str) -> str | None:
    """The highest ancestor of `path` (itself included) that does not exist yet."""
    missing = None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _remove_created(path: str, created: str | None) -> None:
    """Remove the empty directories from `path` up to `created` (the first one a run made)."""
    while created is not None:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == created:
            return
        path = os.path.dirname(path)


def replace_directory(tmp: PathLike, dst: PathLike, aside: PathLike) -> None:
    """Rename the finished tree `tmp` to `dst`. An existing `dst` is first renamed to `aside`, then
    deleted, so at no moment does a partial tree sit at `dst`."""
    tmp, dst, aside = os.fspath(tmp), os.fspath(dst), os.fspath(aside)
    if os.path.isdir(dst) and not os.path.islink(dst) and not os.listdir(dst):
        os.rmdir(dst)
    if os.path.lexists(aside):
        shutil.rmtree(aside)  # left by a run killed between the two renames below
    if os.path.lexists(dst):
        os.rename(dst, aside)
    os.rename(tmp, dst)
    fsync_path(os.path.dirname(os.path.abspath(dst)))
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def directory(dst: PathLike, tag: str) -> Iterator[str]:
    """Build a directory atomically: yields `.DST.TAG-tmp` (beside `dst`, emptied of any leftover of
    a killed run) to write into; on success it is fsynced and renamed to `dst`, replacing what was
    there (see `replace_directory`). On failure the temporary tree and the parent folders this
    created are removed, and an existing `dst` is left as it was.
    """
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    tmp = temp_path(dst, f"{tag}-tmp")
    created = _first_missing(parent)
    try:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)  # left by a killed run
        os.makedirs(tmp)
        yield tmp
        fsync_tree(tmp)  # the data is durable before the rename makes it visible
        replace_directory(tmp, dst, temp_path(dst, f"{tag}-old"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(parent, created)
        raise
