"""Generated token ids -> the text a client sees: incremental detokenization and stop strings.

A stop string can be split across tokens, so text that could still be the start of one is held back
until the next tokens show it is not; when a stop string appears, the text before it is the last
text the client gets (the stop string itself is not sent).
"""

from __future__ import annotations

from collections.abc import Sequence

from qwen2_jax.tokenizer import Qwen2Tokenizer


class StopMatcher:
    """Text in, text safe to send out: everything except a tail that may begin a stop string.
    `stopped` is the stop string once one is found; nothing more comes out after that."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.stopped: str | None = None
        self._pending = ""

    def push(self, text: str) -> str:
        if self.stopped is not None:
            return ""
        if not self.stops:
            return text
        self._pending += text
        hit = self._first_stop()
        if hit is not None:
            start, stop = hit
            out, self._pending = self._pending[:start], ""
            self.stopped = stop
            return out
        keep = self._held_tail()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """At the end of the reply: the held-back tail (it did not become a stop string)."""
        out, self._pending = ("" if self.stopped is not None else self._pending), ""
        return out

    def _first_stop(self) -> tuple[int, str] | None:
        # The earliest stop wins; at one position the longest (a stop that contains another).
        best = None
        for stop in self.stops:
            i = self._pending.find(stop)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(stop) > len(best[1]))):
                best = (i, stop)
        return best

    def _held_tail(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:k]):
                    longest = k
                    break
        return longest


class TextStream:
    """One reply's token ids -> text pieces, stop strings applied. Without a tokenizer (a checkpoint
    served on token ids alone) the text is empty."""

    def __init__(self, tokenizer: Qwen2Tokenizer | None, stops: Sequence[str] = ()):
        self._decoder = tokenizer.decode_stream(skip_special_tokens=True) if tokenizer is not None else None
        self._ids: list[int] = []
        self.matcher = StopMatcher(stops)

    @property
    def stopped(self) -> str | None:
        return self.matcher.stopped

    def push(self, token_id: int) -> str:
        if self._decoder is None:
            return ""
        self._ids.append(token_id)
        return self.matcher.push(self._decoder.update(self._ids))

    def finish(self) -> str:
        """The rest of the text at the end of the reply (an unfinished UTF-8 character as U+FFFD)."""
        if self._decoder is None:
            return ""
        tail = self.matcher.push(self._decoder.flush())
        return tail + self.matcher.flush()
