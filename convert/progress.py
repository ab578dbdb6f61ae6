"""The conversion's progress on stderr (a tqdm bar): bytes and tensors done, rate, elapsed, ETA."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

BAR_FORMAT = (
    "{desc} {percentage:5.1f}% |{bar:24}| {n_fmt}B/{total_fmt}B {rate_fmt}{postfix} elapsed {elapsed} ETA {remaining}"
)


class _Bar(tqdm):
    monitor_interval = 0  # no monitor thread: update() is called once per tensor, often enough


class _Lines:
    """A stream for tqdm on a pipe or a file: each redraw ("\\r" + line + padding) becomes one line."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


class Progress:
    """Redrawn in place on a terminal; on a pipe or a file, one line every `log_every` seconds and a
    last one at `close()`. Disabled (`enabled=False`, `--quiet`): prints nothing."""

    def __init__(
        self,
        total_tensors: int,
        total_bytes: int,
        label: str,
        enabled: bool = True,
        stream: TextIO | None = None,
        log_every: float = 10.0,
    ):
        stream = stream if stream is not None else sys.stderr
        tty = bool(getattr(stream, "isatty", lambda: False)())
        self.total_tensors = total_tensors
        self.tensors = 0
        self._bar = _Bar(
            total=total_bytes,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            bar_format=BAR_FORMAT,
            postfix=self._tensors_text(),
            file=stream if tty else _Lines(stream),
            mininterval=0.1 if tty else log_every,
            miniters=1,
            ascii=not tty,
            disable=not enabled,
        )

    def _tensors_text(self) -> str:
        return f"{self.tensors}/{self.total_tensors} tensors"

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.tensors += tensors
        self._bar.set_postfix_str(self._tensors_text(), refresh=False)
        self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()
