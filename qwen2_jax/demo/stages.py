"""The demo's stage runner: a name, a time and the paths written per stage; commands run as users run them.

Commands run as `sys.executable -m <package> ...` subprocesses (the console scripts' own entry
points), with their output going straight to the terminal, so the demo shows exactly what a user
of `qwen2-train`, `qwen2-convert` and `qwen2-generate` sees. A command that exits non-zero, or a
check that fails, raises `StageFailed`; `Stages.run` turns it into one line naming the stage.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

# console script -> the module `python -m` runs for it
COMMANDS = {"qwen2-train": "train", "qwen2-convert": "convert", "qwen2-generate": "qwen2_jax"}


class StageFailed(Exception):
    """A stage's command exited non-zero or its result failed a check."""


class Stage:
    def __init__(self, index: int, count: int, name: str):
        self.index, self.count, self.name = index, count, name
        self.paths: list[str] = []

    def wrote(self, *paths: str) -> None:
        self.paths.extend(str(p) for p in paths)


class Stages:
    """Runs stages in order, timing each; remembers the times for the summary."""

    def __init__(self, count: int, out=None):
        self.count = count
        self.out = out or sys.stdout
        self.times: list[tuple[str, float]] = []

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[Stage]:
        stage = Stage(len(self.times) + 1, self.count, name)
        self.say(f"\n=== [{stage.index}/{self.count}] {name}: {what}")
        start = time.perf_counter()
        try:
            yield stage
        except StageFailed as e:
            raise StageFailed(f"stage {stage.index}/{self.count} '{name}' failed: {e}") from None
        except Exception as e:  # an error in the demo's own code is still a failed stage
            raise StageFailed(f"stage {stage.index}/{self.count} '{name}' failed: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - start
        self.times.append((name, seconds))
        self.say(f"--- {name}: {seconds:.1f}s")
        for path in stage.paths:
            self.say(f"    wrote {path}")

    def summary(self) -> str:
        total = sum(t for _, t in self.times)
        parts = ", ".join(f"{name} {t:.1f}s" for name, t in self.times)
        return f"{total:.1f}s in all: {parts}"


def command_line(command: str, args: Sequence[str]) -> str:
    return shlex.join([command, *args])


def run_command(
    stages: Stages, command: str, args: Sequence[str], *, capture: bool = False, stdin: str | None = None
) -> str:
    """Run a console script's module in a subprocess, echoing its command line first. Its output
    goes to the terminal (stdout is returned instead when `capture`); `stdin` is typed into it.
    Non-zero exit: StageFailed."""
    piped = "" if stdin is None else f"echo {shlex.quote(stdin.rstrip())} | "
    stages.say(f"$ {piped}{command_line(command, args)}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", COMMANDS[command], *args],
        stdout=subprocess.PIPE if capture else None,
        input=stdin,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise StageFailed(f"{command} exited with status {proc.returncode}")
    return proc.stdout if capture else ""
