"""A progress bar on stderr: tensors and bytes done, rate, ETA."""

from __future__ import annotations

import sys
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Redrawn in place on a terminal; on a pipe or file, one line every `log_every` seconds."""

    def __init__(self, total_tensors: int, total_bytes: int, label: str, enabled: bool = True,
                 stream=None, log_every: float = 10.0):
        self.total_tensors, self.total_bytes, self.label = total_tensors, total_bytes, label
        self.tensors = self.bytes = 0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self._last = time.monotonic()
        self.log_every = log_every if not self.tty else 0.1

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self._last >= self.log_every:
            self._last = now
            self._draw(final=False)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.bytes / elapsed
        frac = self.bytes / self.total_bytes if self.total_bytes else 1.0
        eta = (self.total_bytes - self.bytes) / rate if rate > 0 else 0.0
        width = 24
        bar = "#" * int(width * frac) + "." * (width - int(width * frac))
        return (f"{self.label} [{bar}] {100 * frac:5.1f}% {self.tensors}/{self.total_tensors} tensors "
                f"{human_bytes(self.bytes)}/{human_bytes(self.total_bytes)} {human_bytes(rate)}/s "
                f"elapsed {_duration(elapsed)} ETA {_duration(eta)}")

    def _draw(self, final: bool) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(final=True)
