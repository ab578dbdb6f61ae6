"""The app's service states and refusals in-process (serve/app.py on httpx's ASGI transport), with a
scripted stand-in for the scheduler: 503 while starting, draining or with a full queue (Retry-After),
405, and SSE framing with a stop string split across tokens. The real engine behind real HTTP is
tests/test_serve_http.py's."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serve.app import AppState, create_app
from serve.metrics import ServeMetrics
from serve.requests import QueueFull, TokenEvent
from serve.served_model import ServedModel


class ScriptedScheduler:
    """Answers every request with the token ids of `text` (then finish_reason "length"), or refuses it."""

    ready = True
    max_queue = 2

    class engine:  # stands in for the scheduler's Engine: its slot count
        max_batch_size = 1

    def __init__(self, tokens: list[int], refuse: Exception | None = None):
        self.tokens = tokens
        self.refuse = refuse
        self.handles: list[ScriptedHandle] = []

    def submit(self, request):
        if self.refuse is not None:
            raise self.refuse
        handle = ScriptedHandle(self.tokens[: request.max_tokens])
        self.handles.append(handle)
        return handle

    def stats(self):
        from serve.scheduler import SchedulerStats

        return SchedulerStats(running=0, waiting=0, slots_used=0, slots_total=1)


class ScriptedHandle:
    def __init__(self, tokens):
        self.events = [TokenEvent(t) for t in tokens[:-1]] + [TokenEvent(tokens[-1], finish_reason="length")]
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for event in self.events:
            if self.cancelled:
                yield TokenEvent(None, finish_reason="abort")
                return
            await asyncio.sleep(0)
            yield event


@pytest.fixture
def state(tok):
    model = ServedModel(name="m", vocab_size=151936, max_model_len=128, eos_ids=(151645,), defaults={}, tokenizer=tok)
    return AppState(model_name="m", metrics=ServeMetrics("m"), model=model)


def _request(state, method, path, **kw) -> httpx.Response:
    async def run():
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(run())


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    return error["message"]


def test_starting_draining_and_full_queue_answer_503_with_retry_after(state):
    body = {"prompt": [1, 2], "max_tokens": 2}
    r = _request(state, "GET", "/health")
    assert r.status_code == 503 and r.json() == {"status": "starting"} and r.headers["retry-after"]
    r = _request(state, "POST", "/v1/completions", json=body)
    assert "loading" in _error(r, 503, "starting") and r.headers["retry-after"]
    assert _request(state, "GET", "/v1/models").json()["data"][0]["id"] == "m"  # the name is known at once

    state.scheduler = ScriptedScheduler([5, 6], refuse=QueueFull("the waiting queue is full (0 requests)"))
    assert _request(state, "GET", "/health").json() == {"status": "ok"}
    r = _request(state, "POST", "/v1/completions", json=body)
    assert "queue is full" in _error(r, 503, "queue_full") and r.headers["retry-after"]

    state.draining = True
    assert _request(state, "GET", "/health").json() == {"status": "draining"}
    r = _request(state, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]})
    assert "shutting down" in _error(r, 503, "draining")


def test_a_batch_beyond_the_queue_is_refused_whole(state):
    state.scheduler = ScriptedScheduler([5, 6])
    r = _request(state, "POST", "/v1/completions", json={"prompt": [[1], [2], [3], [4]], "max_tokens": 1})
    assert "4 prompts, more than this server holds at once (3" in _error(r, 400, None)
    assert not state.scheduler.handles
    r = _request(state, "POST", "/v1/completions", json={"prompt": [[1], [2], [3]], "max_tokens": 1})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]


def test_wrong_method_and_route(state):
    assert "not allowed" in _error(_request(state, "GET", "/v1/completions"), 405, "method_not_allowed")
    assert "no route" in _error(_request(state, "POST", "/v2/anything"), 404, "not_found")
    assert "does not exist" in _error(_request(state, "GET", "/v1/models/other"), 404, "model_not_found")


def test_sse_framing_and_a_stop_string_split_across_tokens(state, tok):
    """The stream is `data: {json}` events ending with `data: [DONE]`; a stop string that arrives a
    piece per token is never sent, nor the text after it, and the request is cancelled there."""
    ids = tok.encode("one two three four five six")
    state.scheduler = ScriptedScheduler(ids)
    body = {"prompt": "x", "max_tokens": len(ids), "stream": True, "stop": ["ree fo"], "temperature": 0}
    r = _request(state, "POST", "/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "one two th"
    assert (chunks[-1]["choices"][0]["finish_reason"], chunks[-1]["choices"][0]["stop_reason"]) == ("stop", "ree fo")
    assert state.scheduler.handles[0].cancelled
