"""What flows between the HTTP layer and the engine loop: a request in token ids, and events out.

No JAX and no HTTP here. `protocol.py` turns an OpenAI request into a `GenerationRequest`; the
`Scheduler` (scheduler.py) runs it on the `Engine` (engine.py) and yields `TokenEvent`s, one per
generated token, the last one carrying `finish_reason`.
"""

from __future__ import annotations

import dataclasses
import math

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs; the engine's programs extract this many


class ServeError(Exception):
    """A request the server refuses: `status` is the HTTP status, the message names the problem."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(ServeError):
    status = 503
    code = "queue_full"


class Draining(ServeError):
    status = 503
    code = "draining"


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """One request's sampling, HF semantics (processors in HF's order: repetition penalty,
    temperature, top-k, top-p, min-p). temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and
    repetition_penalty 1 are off. seed None draws a fresh random seed for the request."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        rp = self.repetition_penalty
        if not math.isfinite(rp) or rp <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {rp!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """prompt_ids: at least one token id inside the vocabulary. max_tokens >= 0 (0: only the prompt
    is read, e.g. for prompt_logprobs). stop_token_ids end the request with finish_reason "stop"
    (the stop token is the last event's token). logprobs: None = none; k in 0..20 = each token's
    log-probability under the model's raw distribution plus its k most likely alternatives.
    prompt_logprobs: None, or k in 0..20: the same for every prompt token after the first, delivered
    as one `PromptLogprobs` event before the first token."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingSettings = SamplingSettings()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclasses.dataclass(frozen=True)
class TopLogprobs:
    """One position's log-probabilities: the token's own and the `k` most likely tokens', most
    likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """entries[i] is prompt token i's log-probability given the tokens before it; entries[0] is None."""

    entries: tuple[TopLogprobs | None, ...]


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token (token_id None only on a final event that brings no token: max_tokens 0,
    or a request cut short by shutdown). finish_reason: None while running; "stop" (a stop token),
    "length" (max_tokens or the context), or "abort" (cut by the server) on the last event."""

    token_id: int | None
    logprobs: TopLogprobs | None = None
    finish_reason: str | None = None
