"""The engine loop: a bounded waiting queue, admission into free decode slots, chunked prefill
interleaved with decode steps, and freeing (stop token, max_tokens, cancel).

One thread drives the `Engine`; the asyncio side (the HTTP app) calls `submit` and iterates the
returned `RequestHandle`, which receives the loop thread's events through
`loop.call_soon_threadsafe`. Each loop iteration:
1. frees the slots of cancelled requests (so a disconnect frees its slot within one decode step),
2. admits waiting requests, oldest first, into free slots,
3. prefills one chunk (at most `max_prefill_chunk` tokens; of a long prompt, while others decode,
   no longer than `prefill_stall` decode steps) of the oldest request still prefilling,
4. runs one decode step over every slot when any is decoding, and delivers the new tokens.
A long prompt is so prefilled a chunk at a time between decode steps: the streams already running
keep their pace.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import os
import sys
import threading
import time
import traceback

import numpy as np

from serve.engine import Engine, key_data
from serve.requests import (
    MAX_TOP_LOGPROBS,
    Draining,
    GenerationRequest,
    PromptLogprobs,
    QueueFull,
    ServeError,
    TokenEvent,
    TopLogprobs,
)


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    running: int  # requests holding a slot (prefilling or decoding)
    waiting: int  # requests in the queue
    slots_used: int
    slots_total: int


class RequestHandle:
    """One submitted request: iterate it (async) for its events; `cancel()` to stop it."""

    def __init__(self, request_id: str, request: GenerationRequest, scheduler: Scheduler, loop):
        self.id = request_id
        self.request = request
        self.num_prompt_tokens = len(request.prompt_ids)
        self._scheduler = scheduler
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._finished = False
        self.cancelled = False
        self.arrival = time.monotonic()

    def cancel(self) -> None:
        """Stop the request: its slot is freed before the next decode step; the iteration ends with
        finish_reason "abort" (unless it had already finished). Thread-safe, idempotent."""
        if not self.cancelled:
            self.cancelled = True
            self._scheduler._cancel(self)

    def _deliver(self, event) -> None:  # loop thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._finished:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, TokenEvent) and event.finish_reason is not None:
            self._finished = True
        return event


@dataclasses.dataclass
class _Slot:
    handle: RequestHandle
    prefill_ids: list[int]  # the prompt without its last token (that one is the first decode input)
    cursor: int = 0  # prefill_ids written so far
    started: bool = False  # a first prefill call (start 0: clears the row) was made
    generated: int = 0
    prompt_logprobs: list = dataclasses.field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return not self.started or self.cursor < len(self.prefill_ids)


class Scheduler:
    """Runs `engine` on a thread of its own. max_queue bounds the requests waiting for a slot
    (submit raises QueueFull beyond it). A prompt longer than long_prefill_threshold tokens is, while
    requests decode, prefilled in chunks whose measured time is at most prefill_stall decode steps
    (so it makes the running streams' tokens come at most 1 + prefill_stall steps apart); shorter
    prompts, and any prompt while nothing decodes, go in chunks as large as the engine's
    max_prefill_chunk (a 128-token prompt in one piece: its time to first token stays close to a
    lone request's, where 1.5-step pieces made it 5x that at 8 clients)."""

    def __init__(
        self, engine: Engine, max_queue: int = 64, prefill_stall: float = 1.5, long_prefill_threshold: int = 256
    ):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.engine = engine
        self.max_queue = max_queue
        self.prefill_stall = prefill_stall
        self.long_prefill_threshold = long_prefill_threshold
        self._rows = engine.empty_rows()
        self._slots: list[_Slot | None] = [None] * engine.max_batch_size
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cancelled: set[RequestHandle] = set()
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._draining = False
        self._ready = False
        self.steps = 0  # decode steps run (for tests and metrics)

    # --------------------------------------------------------------------------- asyncio side
    @property
    def ready(self) -> bool:
        return self._ready and not self._draining

    def start(self, progress=None) -> None:
        """Compile every program, then run the loop on a daemon thread."""
        self.engine.warmup(progress)
        self._thread = threading.Thread(target=self._run, name="qwen2-serve-engine", daemon=True)
        self._thread.start()
        self._ready = True

    def check(self, request: GenerationRequest) -> None:
        """Raise ServeError (400) when the request cannot run on this engine."""
        engine, config = self.engine, self.engine.config
        n = len(request.prompt_ids)
        if n == 0:
            raise ServeError("the prompt is empty: give at least one token", "prompt")
        bad = [t for t in request.prompt_ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ServeError(f"token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})", "prompt")
        if request.max_tokens < 0:
            raise ServeError(f"max_tokens must be >= 0, got {request.max_tokens}", "max_tokens")
        if n + request.max_tokens > engine.max_model_len:
            raise ServeError(
                f"this model's maximum context length is {engine.max_model_len} tokens; the request has "
                f"{n} prompt tokens + {request.max_tokens} max_tokens = {n + request.max_tokens}",
                "max_tokens",
            )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(request, name)
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise ServeError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {k}", name)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (call from the event loop's thread)."""
        if self._draining or self._stop:
            raise Draining("the server is shutting down; not accepting requests")
        self.check(request)
        handle = RequestHandle(f"{next(self._ids)}", request, self, asyncio.get_running_loop())
        with self._cv:
            # free slots take requests at the loop's next iteration: until then they wait here too
            if len(self._waiting) >= self.max_queue + self._slots.count(None):
                raise QueueFull(f"the waiting queue is full ({self.max_queue} requests); retry later")
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def stats(self) -> SchedulerStats:
        with self._cv:
            used = sum(s is not None for s in self._slots)
            return SchedulerStats(
                running=used, waiting=len(self._waiting), slots_used=used, slots_total=len(self._slots)
            )

    def begin_drain(self) -> None:
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing runs or waits; False if that took longer than timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.stats()
            if s.running == 0 and s.waiting == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)

    def abort_all(self) -> None:
        with self._cv:
            self._cancelled.update(h for h in self._waiting)
            self._cancelled.update(s.handle for s in self._slots if s is not None)
            self._cv.notify()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cv:
            self._cancelled.add(handle)
            self._cv.notify()

    # ------------------------------------------------------------------------------ loop side
    def _run(self) -> None:
        while True:
            with self._cv:
                while (
                    not self._stop and not self._cancelled and not self._waiting and all(s is None for s in self._slots)
                ):
                    self._cv.wait()
                if self._stop:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                for handle in cancelled:
                    if handle in self._waiting:
                        self._waiting.remove(handle)
                        handle._deliver(TokenEvent(None, finish_reason="abort"))
                admitted = self._admit()
            try:
                for row, slot in enumerate(self._slots):
                    if slot is not None and slot.handle in cancelled:
                        self._finish(row, TokenEvent(None, finish_reason="abort"))
                for row in admitted:
                    self._start(row)
                self._prefill_one()
                if any(s is not None and not s.prefilling for s in self._slots):
                    self._decode()
            except Exception:  # an engine failure: end every request rather than leave clients hanging
                traceback.print_exc(file=sys.stderr)
                for row, slot in enumerate(self._slots):
                    if slot is not None:
                        self._finish(row, TokenEvent(None, finish_reason="abort"))
        for row, slot in enumerate(self._slots):
            if slot is not None:
                self._finish(row, TokenEvent(None, finish_reason="abort"))
        with self._cv:
            for handle in self._waiting:
                handle._deliver(TokenEvent(None, finish_reason="abort"))
            self._waiting.clear()

    def _admit(self) -> list[int]:
        """Move waiting requests into free slots (under the lock); their rows."""
        admitted = []
        for row, slot in enumerate(self._slots):
            if slot is None and self._waiting:
                handle = self._waiting.popleft()
                self._slots[row] = _Slot(handle, list(handle.request.prompt_ids[:-1]))
                admitted.append(row)
        return admitted

    def _start(self, row: int) -> None:
        """Set the row's sampling inputs for its new request."""
        request = self._slots[row].handle.request
        s, rows = request.sampling, self._rows
        seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(8), "little")
        rows.greedy[row] = s.greedy
        rows.logprobs[row] = request.logprobs is not None
        rows.values.temperature[row] = s.temperature if not s.greedy else 1.0
        rows.values.top_k[row] = s.top_k
        rows.values.top_p[row] = s.top_p
        rows.values.min_p[row] = s.min_p
        rows.values.repetition_penalty[row] = s.repetition_penalty
        rows.key_data[row] = key_data(seed)
        rows.step[row] = 0
        rows.active[row] = False
        rows.length[row] = 0

    def _prefill_one(self) -> None:
        """One prefill chunk of the request that has waited longest among those prefilling."""
        candidates = [(s.handle.arrival, row) for row, s in enumerate(self._slots) if s is not None and s.prefilling]
        if not candidates:
            return
        _, row = min(candidates)
        slot = self._slots[row]
        request = slot.handle.request
        want = request.prompt_logprobs is not None
        remaining = len(slot.prefill_ids) - slot.cursor
        budget_s = None
        long_prompt = len(slot.prefill_ids) > self.long_prefill_threshold
        decoding = any(s is not None and not s.prefilling for s in self._slots)
        if long_prompt and decoding and self.engine.decode_seconds is not None:
            budget_s = self.prefill_stall * self.engine.decode_seconds
        n = min(remaining, self.engine.chunk_size_for(remaining, want, slot.cursor == 0, budget_s))
        ids = slot.prefill_ids[slot.cursor : slot.cursor + n]
        targets = list(request.prompt_ids[slot.cursor + 1 : slot.cursor + 1 + n]) if want else None
        result = self.engine.prefill(row, ids, slot.cursor, targets)
        if want and n:
            slot.prompt_logprobs.extend(_top_entries(targets, *result, request.prompt_logprobs))
        slot.started = True
        slot.cursor += n
        self._rows.length[row] = slot.cursor  # free decode steps write (invalid) keys where the next chunk goes
        if slot.prefilling:
            return
        if want:
            slot.handle._deliver(PromptLogprobs((None, *slot.prompt_logprobs)))
        if request.max_tokens == 0:
            self._finish(row, TokenEvent(None, finish_reason="length"))
            return
        self._rows.feed[row] = request.prompt_ids[-1]
        self._rows.active[row] = True

    def _decode(self) -> None:
        rows = self._rows
        live = [(row, s) for row, s in enumerate(self._slots) if s is not None and not s.prefilling]
        out = self.engine.decode(rows)
        self.steps += 1
        for row, slot in live:
            request = slot.handle.request
            token = int(out["tokens"][row])
            lp = None
            if request.logprobs is not None:
                lp = _top_entries(
                    [token],
                    out["logprob"][row : row + 1],
                    out["top_ids"][row : row + 1],
                    out["top_logprobs"][row : row + 1],
                    request.logprobs,
                )[0]
            slot.generated += 1
            rows.feed[row] = token
            rows.length[row] += 1
            rows.step[row] += 1
            reason = None
            if token in request.stop_token_ids:
                reason = "stop"
            elif slot.generated >= request.max_tokens or rows.length[row] + 1 > self.engine.max_model_len:
                reason = "length"
            event = TokenEvent(token, lp, reason)
            if reason is None:
                slot.handle._deliver(event)
            else:
                self._finish(row, event)

    def _finish(self, row: int, event: TokenEvent) -> None:
        slot = self._slots[row]
        with self._cv:
            self._slots[row] = None
        rows = self._rows
        rows.active[row] = False
        rows.length[row] = 0
        slot.handle._deliver(event)


def _top_entries(tokens, logprob, top_ids, top_logprobs, k: int) -> list[TopLogprobs]:
    return [
        TopLogprobs(int(t), float(lp), tuple((int(i), float(v)) for i, v in zip(ids[:k], lps[:k])))
        for t, lp, ids, lps in zip(tokens, np.asarray(logprob), np.asarray(top_ids), np.asarray(top_logprobs))
    ]
