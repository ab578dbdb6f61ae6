"""A directory built once per test session, across pytest-xdist workers.

pytest's session fixtures run once per worker: a run that several modules read (a reference training
run of tens of seconds) would run on each worker that needs it. Here the first worker to ask builds it
under a file lock in the session's shared temporary root; the others wait for it and reuse it (the
pattern pytest-xdist documents for session fixtures run once). Its users only read it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`root/name`, filled by `build(path)` the first time any worker of this session asks for it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's root: each worker's basetemp is a child of it
    path = root / f"once-{name}"
    with FileLock(str(root / f"once-{name}.lock")):
        if not (path / ".built").exists():
            if path.exists():  # an earlier attempt failed: start again
                shutil.rmtree(path)
            path.mkdir()
            build(path)
            (path / ".built").touch()
    return path
