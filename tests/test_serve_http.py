"""qwen2-serve as users talk to it: a `qwen2-serve` subprocess on 127.0.0.1 and a free port, driven by
the official `openai` package (sync and async, streaming and not) and plain `httpx`, on a tiny random
checkpoint with the real Qwen2 tokenizer; greedy answers compared with `qwen2_jax.generate` alone."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import qwen2_jax
from qwen2_jax.tokenizer import load_tokenizer
from serve_utils import EOS_IDS, Server, write_checkpoint

KEY = "sk-test-key"
CONTEXT = 256
BODY_LIMIT = 64 << 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("serve_http") / "tiny-qwen2", seed=3, max_position_embeddings=2048)
    config, params = qwen2_jax.load_checkpoint(path)
    return path, config, params


@pytest.fixture(scope="module")
def server(checkpoint):
    """8 slots, 256 tokens of context, prefill chunks of at most 32 tokens, an API key from the
    environment, a 64 KiB body limit; jax logs every compilation (JAX_LOG_COMPILES)."""
    path = checkpoint[0]
    args = ("--max-model-len", str(CONTEXT), "--max-prefill-chunk", "32", "--max-request-bytes", str(BODY_LIMIT))
    with Server(path, *args, env={"QWEN2_API_KEY": KEY, "JAX_LOG_COMPILES": "1"}) as s:
        yield s
        assert s.stop() == 0, s.stderr()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tok(checkpoint):
    return load_tokenizer(checkpoint[0])


def _alone(checkpoint, ids, max_tokens) -> list[int]:
    """What the server must answer to a greedy request that leaves the sampling defaults unset: the
    checkpoint's repetition_penalty 1.05 applies, and its eos ids stop."""
    _, config, params = checkpoint
    return qwen2_jax.generate(config, params, [ids], max_tokens, eos_token_ids=EOS_IDS, repetition_penalty=1.05)[0]


def _metrics(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {
        (s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _random_ids(rng, n) -> list[int]:
    return [int(x) for x in rng.integers(0, 151936, n)]


# ----------------------------------------------------------------------------------- answers
def test_greedy_equals_generate_and_stream_equals_whole(client, checkpoint):
    """Token-id prompts of 5, 40 and 100 tokens (several prefill chunks): the greedy tokens are
    `generate`'s of the prompt alone, and the stream carries the same text and tokens."""
    rng = np.random.default_rng(0)
    for n in (5, 40, 100):
        ids = _random_ids(rng, n)
        kw = dict(model="tiny-qwen2", prompt=ids, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
        whole = client.completions.create(**kw).model_dump()
        choice = whole["choices"][0]
        assert choice["token_ids"] == _alone(checkpoint, ids, 12)
        assert choice["finish_reason"] == ("stop" if choice["token_ids"][-1] in EOS_IDS else "length")
        usage = {k: whole["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        made = len(choice["token_ids"])
        assert usage == {"prompt_tokens": n, "completion_tokens": made, "total_tokens": n + made}
        chunks = [c.model_dump() for c in client.completions.create(**kw, stream=True)]
        assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
        assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == choice["token_ids"]
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
        assert len({c["id"] for c in chunks}) == 1


def test_a_batch_of_prompts_is_answered_choice_by_choice(client, checkpoint):
    """A completion request with three prompts (as evaluation harnesses batch them): one choice per
    prompt, in order, each `generate`'s tokens of its prompt alone; streamed, each index's chunks
    join to its choice."""
    rng = np.random.default_rng(4)
    prompts = [_random_ids(rng, n) for n in (3, 50, 20)]
    kw = dict(model="tiny-qwen2", prompt=prompts, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
    whole = client.completions.create(**kw).model_dump()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    for ids, choice in zip(prompts, whole["choices"]):
        assert choice["token_ids"] == _alone(checkpoint, ids, 12) and choice["prompt_token_ids"] == ids
    made = sum(len(c["token_ids"]) for c in whole["choices"])
    assert whole["usage"]["prompt_tokens"] == 73 and whole["usage"]["completion_tokens"] == made
    texts = ["", "", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c["text"] for c in whole["choices"]]


def test_chat_template_async_streaming(server, tok):
    """The chat template is applied (the prompt's token count says so), and the async client's
    stream carries the non-streamed message, the role first and the usage last."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    expect_prompt = len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)))

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0) as aclient:
            kw = dict(model="tiny-qwen2", messages=messages, max_tokens=10, temperature=0, seed=1)
            whole = await aclient.chat.completions.create(**kw)
            stream = await aclient.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            return whole, chunks

    whole, chunks = asyncio.run(run())
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == expect_prompt
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stop_strings_end_the_reply_streamed_or_not(client, checkpoint):
    """A stop string taken from the middle of a greedy reply: the reply ends just before it, with
    finish_reason stop, and no streamed chunk ever showed any of it."""
    ids = _random_ids(np.random.default_rng(5), 12)
    kw = dict(model="tiny-qwen2", prompt=ids, max_tokens=20, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    cut = full[: full.find(stop)]
    whole = client.completions.create(**kw, stop=[stop, "never appears"]).model_dump()
    assert whole["choices"][0]["text"] == cut
    assert (whole["choices"][0]["finish_reason"], whole["choices"][0]["stop_reason"]) == ("stop", stop)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True))
    assert streamed == cut


def test_echo_logprobs_of_the_prompt(client, checkpoint):
    """echo + logprobs + max_tokens 0 (how evaluation harnesses score a text): the prompt's own
    log-probabilities under the model, as the forward pass gives them."""
    _, config, params = checkpoint
    ids = _random_ids(np.random.default_rng(7), 20)
    r = client.completions.create(model="tiny-qwen2", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"
    logits = np.asarray(qwen2_jax.forward(config, params, np.asarray([ids])))[0]
    logsm = (
        logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1)[:, None]
    )
    expect = [float(logsm[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], expect, rtol=1e-4, atol=1e-4)
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert len(lp.tokens) == len(ids) == len(lp.text_offset)


# ----------------------------------------------------------------------------------- service
def test_health_models_metrics_and_auth(server, http):
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-qwen2"] and models["data"][0]["max_model_len"] == CONTEXT
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server.base_url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    m = _metrics(http)
    assert m["qwen2_serve_slots_total"] == 8 and m["qwen2_serve_requests_running"] == 0
    for name in ("qwen2_serve_requests_waiting", "qwen2_serve_slots_used", "qwen2_serve_prompt_tokens_total"):
        assert name in m
    before = m.get("qwen2_serve_generation_tokens_total", 0), m.get("qwen2_serve_time_to_first_token_seconds_count", 0)
    http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True}).raise_for_status()
    m = _metrics(http)
    assert m["qwen2_serve_generation_tokens_total"] == before[0] + 5
    assert m["qwen2_serve_time_to_first_token_seconds_count"] == before[1] + 1
    assert m["qwen2_serve_inter_token_latency_seconds_count"] >= 4


BAD = [
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 3', 400, "malformed JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "3"}, 400, "valid integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, ">= 0"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400, "maximum context length is 256"),
    ("/v1/completions", {"prompt": list(range(1, 201)), "max_tokens": 100}, 400, "200 in the prompt + 100"),
    ("/v1/completions", {"prompt": [5, 151936]}, 400, "outside the model's vocabulary"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": []}, 400, "empty"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n must be 1"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "at least one"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 3}, 400, "logprobs"),
    ("/v1/embeddings", {"input": "hi"}, 404, "no route"),
    ("/v1/completions", {"prompt": "x" * BODY_LIMIT}, 413, "limit of 65536 bytes"),
]


@pytest.mark.parametrize("path, body, status, text", BAD, ids=[f"{b[2]}-{b[3]}" for b in BAD])
def test_bad_input_is_refused_and_the_server_keeps_serving(http, path, body, status, text):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and text in error["message"], error
    ok = http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_openai_client_raises_on_refusals(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny-qwen2", prompt=list(range(1, 201)), max_tokens=100)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_disconnect_frees_the_slot(server, http):
    """A client that leaves mid-stream, and one that stops waiting for a whole reply: each request is
    cut (abort) well before its 250 tokens, and no slot stays in use."""
    aborted = 'qwen2_serve_requests_finished_total{"finish_reason": "abort"}'
    body = {"prompt": [1, 2, 3], "max_tokens": 250, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}

    def leave_mid_stream():
        with httpx.Client(base_url=server.base_url, headers=headers) as c:
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                lines = r.iter_lines()
                assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data: ")) >= 2

    def give_up_waiting():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.base_url + "/v1/completions", json=body, headers=headers, timeout=0.2)

    for leave in (leave_mid_stream, give_up_waiting):
        before = _metrics(http)
        leave()
        deadline = time.monotonic() + 10
        while True:
            m = _metrics(http)
            if m.get(aborted, 0) == before.get(aborted, 0) + 1 and m["qwen2_serve_slots_used"] == 0:
                break
            assert time.monotonic() < deadline, (leave.__name__, m)
            time.sleep(0.05)
        made = m["qwen2_serve_generation_tokens_total"] - before.get("qwen2_serve_generation_tokens_total", 0)
        assert made < 250, leave.__name__


def test_concurrent_greedy_requests_equal_generate_alone(server, checkpoint):
    """16 staggered streaming and non-streaming greedy requests on 8 slots (the rest wait in the
    queue), prompts of 1 to 64 tokens (up to 2 prefill chunks): each gets `generate`'s tokens of
    its prompt alone."""
    rng = np.random.default_rng(11)
    prompts = [_random_ids(rng, int(n)) for n in rng.integers(1, 65, 16)]
    max_tokens = [int(m) for m in rng.integers(1, 13, 16)]

    async def one(aclient, i):
        await asyncio.sleep(0.01 * i)
        kw = dict(
            model="tiny-qwen2",
            prompt=prompts[i],
            max_tokens=max_tokens[i],
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        if i % 2:
            return (await aclient.completions.create(**kw)).model_dump()["choices"][0]["token_ids"]
        stream = await aclient.completions.create(**kw, stream=True)
        return sum([c.model_dump()["choices"][0]["token_ids"] async for c in stream], [])

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(16)))

    served = asyncio.run(run())
    for ids, m, got in zip(prompts, max_tokens, served):
        # greedy: the first m of 12 tokens are the m tokens (one generate program for every m)
        assert got == _alone(checkpoint, ids, 12)[:m]


def test_seeded_sampling_alone_equals_in_a_crowd(server):
    """A seeded sampled request gets the same tokens alone and among 15 concurrent others (greedy, and
    sampled with other seeds)."""
    target = dict(
        prompt=[9, 8, 7, 6, 5], max_tokens=30, temperature=0.9, top_p=0.95, seed=1234, extra_body={"top_k": 40}
    )
    rng = np.random.default_rng(2)
    others = [
        dict(prompt=_random_ids(rng, int(rng.integers(1, 60))), max_tokens=int(rng.integers(5, 40)), seed=i)
        | ({"temperature": 0} if i % 3 == 0 else {"temperature": 1.2})
        for i in range(15)
    ]

    async def run(bodies):
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0) as aclient:

            async def one(i, body):
                await asyncio.sleep(0.005 * i)
                extra = {"return_token_ids": True, **body.pop("extra_body", {})}
                r = await aclient.completions.create(model="tiny-qwen2", extra_body=extra, **body)
                return r.model_dump()["choices"][0]["token_ids"]

            return await asyncio.gather(*(one(i, dict(b)) for i, b in enumerate(bodies)))

    alone = asyncio.run(run([target]))[0]
    crowd = asyncio.run(run(others[:7] + [target] + others[7:]))
    assert crowd[7] == alone and len(alone) >= 1


def test_no_compilation_after_ready(server, http):
    """50 requests of random lengths and settings (greedy and sampled, filters, penalties, seeds,
    logprobs, echo, stop strings, chat, streamed or not): jax compiles nothing after the ready line."""
    rng = np.random.default_rng(21)

    def body(i):
        n = int(rng.integers(1, 200))
        b = {"max_tokens": int(rng.integers(0 if i % 7 == 0 else 1, min(16, CONTEXT - n))), "stream": bool(i % 2)}
        if i % 3 == 0:
            b |= {"temperature": 0}
        elif i % 3 == 1:
            b |= {"temperature": float(rng.uniform(0.2, 1.5)), "top_k": int(rng.integers(0, 100)), "seed": i}
            b |= {"top_p": float(rng.uniform(0.5, 1)), "min_p": float(rng.uniform(0, 0.2))}
        b |= {"repetition_penalty": float(rng.uniform(0.9, 1.3))} if i % 4 == 0 else {}
        if i % 5 == 0:
            b |= {"logprobs": int(rng.integers(0, 6)), "echo": bool(i % 10 == 0)}
        if i % 6 == 0:
            b |= {"stop": ["a", "the"]}
        if i % 8 == 0:
            chat = {"messages": [{"role": "user", "content": "x " * n}], "logprobs": True, "top_logprobs": 2}
            return "/v1/chat/completions", {**b, **chat, "max_tokens": 8}
        return "/v1/completions", {**b, "prompt": _random_ids(rng, n)}

    for i in range(50):
        path, b = body(i)
        r = http.post(path, json=b)
        assert r.status_code == 200, (b, r.text)
    ready = next(i for i, line in enumerate(server.lines) if "ready on http://" in line)
    compiled = [line for line in server.lines[ready:] if "Compiling" in line]
    assert not compiled, compiled[0][:300]


# ----------------------------------------------------------------------------------- shutdown
def test_health_while_starting_then_sigterm_drains_and_exits_0(checkpoint):
    """/health answers 503 while the model loads, 200 once warm. SIGTERM with two streams running: the
    short one finishes within --drain-timeout, the long one is cut (finish_reason abort, a well-formed
    end), new connections are refused, exit status 0."""
    path = checkpoint[0]
    args = ("--max-prefill-chunk", "16", "--max-batch-size", "2", "--drain-timeout", "3")
    with Server(path, *args).start(wait_ready=False) as server:
        server.wait_line("listening on")  # the port is open before the model loads: 503 until warm
        assert httpx.get(server.base_url + "/health").json() == {"status": "starting"}
        server.wait_ready(240)
        assert httpx.get(server.base_url + "/health").status_code == 200
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        streams = [
            client.completions.create(model="tiny-qwen2", prompt=[1, 2], max_tokens=m, stream=True, extra_body=extra)
            for m, extra in ((40, {"ignore_eos": True}), (2000, {"ignore_eos": True}))
        ]
        firsts = [next(iter(s)) for s in streams]
        assert all(f.choices for f in firsts)
        server.signal(signal.SIGTERM)
        server.wait_line("draining: 2 running")
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.base_url + "/health")
        ends = [[c.choices[0].finish_reason for c in s if c.choices][-1] for s in streams]
        assert ends == ["length", "abort"]
        assert server.wait() == 0, server.stderr()
        assert any("drain timeout: aborting 1" in line for line in server.lines), server.stderr()


@pytest.mark.slow
def test_greedy_on_a_mesh_equals_one_device(checkpoint):
    """`--mesh tensor=2` on 2 CPU devices: the served greedy tokens are `generate`'s on one device.
    The fast test of the same engine path: tests/test_serve_engine.py::test_greedy_on_a_mesh_equals_one_device."""
    ids = _random_ids(np.random.default_rng(0), 40)
    with Server(checkpoint[0], "--mesh", "tensor=2", "--max-model-len", str(CONTEXT), devices=2) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(
            model="tiny-qwen2", prompt=ids, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
        )
        assert r.model_dump()["choices"][0]["token_ids"] == _alone(checkpoint, ids, 12)
        assert server.stop() == 0
