"""One request's run: the scheduler's events -> text deltas, with stop strings, usage and timing.

The same iterator feeds a streamed response (one SSE chunk per delta) and a whole one (the deltas
joined). Leaving it early, for whatever reason (a client gone, an error), cancels the request, so
its decode slot is freed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from serve.metrics import ServeMetrics
from serve.protocol import Job
from serve.requests import PromptLogprobs, TokenEvent, TopLogprobs
from serve.served_model import ServedModel
from serve.text import TextStream


@dataclasses.dataclass
class Delta:
    """What one event adds to the reply. stop_reason: the stop string or stop token id that ended it."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TopLogprobs] = dataclasses.field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclasses.dataclass
class Reply(Delta):
    """A whole reply: the deltas joined (the same fields)."""

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.prompt_logprobs = delta.prompt_logprobs or self.prompt_logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.stop_reason = delta.stop_reason if delta.stop_reason is not None else self.stop_reason


async def deltas(handle, job: Job, model: ServedModel, metrics: ServeMetrics, arrival: float) -> AsyncIterator[Delta]:
    """The reply to `job`, a delta per scheduler event; `arrival` (time.perf_counter()) starts the
    time-to-first-token clock."""
    text = TextStream(model.tokenizer, job.stop)
    last_token_at: float | None = None
    finished = False
    try:
        async for event in handle:
            if isinstance(event, PromptLogprobs):
                yield Delta(prompt_logprobs=event)
                continue
            assert isinstance(event, TokenEvent), event
            delta = Delta()
            if event.token_id is not None:
                now = time.perf_counter()
                if last_token_at is None:
                    metrics.time_to_first_token.observe(now - arrival)
                else:
                    metrics.inter_token_latency.observe(now - last_token_at)
                last_token_at = now
                metrics.generation_tokens.inc()
                delta.token_ids.append(event.token_id)
                if event.logprobs is not None:
                    delta.logprobs.append(event.logprobs)
                if event.finish_reason == "stop" and event.token_id in job.request.stop_token_ids:
                    delta.stop_reason = event.token_id  # the stop token has no text of its own
                else:
                    delta.text = text.push(event.token_id)
                if text.stopped is not None:
                    finished = True
                    handle.cancel()  # the engine knows stop tokens only: end the request here
                    delta.finish_reason, delta.stop_reason = "stop", text.stopped
                    metrics.finished(delta.finish_reason)
                    yield delta
                    return
            if event.finish_reason is not None:
                finished = True
                delta.text += text.finish()
                delta.finish_reason = event.finish_reason
                metrics.finished(delta.finish_reason)
            yield delta
    finally:
        if not finished:
            handle.cancel()
            metrics.finished("abort")
