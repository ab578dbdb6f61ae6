"""The serving engine and its loop (serve/engine.py, serve/scheduler.py), without HTTP: continuous
batching gives every request the tokens it gets alone, a fixed set of compiled programs, chunked
prefill, log-probabilities, stop / length / cancel, and the same tokens on a mesh."""

from __future__ import annotations

import asyncio

import jax
import numpy as np
import pytest

import qwen2_jax
from hf_utils import hf_dense_config, make_hf_model
from qwen2_jax.forward import forward
from qwen2_jax.generate import GenerateOptions, Generator
from qwen2_jax.sharding import make_mesh
from serve.engine import Engine, key_data
from serve.requests import GenerationRequest, PromptLogprobs, SamplingSettings, ServeError
from serve.scheduler import Scheduler
from tolerances import CACHE_REL, SHARDED_REL

GREEDY = SamplingSettings(temperature=0.0)
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # sliding window narrower than the longer requests on one layer: windows slide per row
    hf = make_hf_model(hf_dense_config(use_sliding_window=True, sliding_window=24, max_window_layers=2), seed=11)
    path = tmp_path_factory.mktemp("serve_model")
    hf.save_pretrained(path)
    config, params = qwen2_jax.load_checkpoint(path)
    return str(path), config, params


def _scheduler(config, params) -> Scheduler:
    # 4 slots, chunks of at most 32 tokens: the longer prompts below are prefilled in several chunks;
    # decode steps attend to 32, 64, 128 or all 192 cache slots, as the longest row needs
    engine = Engine(config, params, max_batch_size=4, max_model_len=160, max_prefill_chunk=32, kv_bucket_min=32)
    sched = Scheduler(engine, max_queue=64)
    sched.start()
    return sched


@pytest.fixture(scope="module")
def scheduler(model):
    _, config, params = model
    sched = _scheduler(config, params)
    yield sched
    sched.shutdown()


@pytest.fixture(scope="module")
def generator(model):
    _, config, params = model
    return Generator(config, params)


async def _collect(handle):
    events = [ev async for ev in handle]
    tokens = [ev.token_id for ev in events if not isinstance(ev, PromptLogprobs) and ev.token_id is not None]
    return tokens, events


async def _run_staggered(sched, requests, gap_s=0.003):
    """Submit the requests a few ms apart (each arrives while the earlier ones decode); their tokens."""
    tasks = []
    for request in requests:
        tasks.append(asyncio.ensure_future(_collect(sched.submit(request))))
        await asyncio.sleep(gap_s)
    return [t[0] for t in await asyncio.gather(*tasks)]


def _prompts(rng, n, vocab, low=1, high=90):
    return [[int(x) for x in rng.integers(0, vocab, rng.integers(low, high))] for _ in range(n)]


def test_greedy_in_a_crowd_equals_generate_alone(scheduler, generator, model):
    """16 staggered greedy requests of different lengths (1 to 80 tokens: chunked prefill over
    several decode steps; rows crossing from one cache prefix to the next), mixed with 4 sampled
    ones, on 4 slots: each gets exactly the tokens of `generate` of its prompt alone (float32).
    Lengths fall in few of generate's buckets (it compiles a program per bucket)."""
    _, config, _ = model
    rng = np.random.default_rng(0)
    prompts = _prompts(rng, 16, config.vocab_size, high=48) + _prompts(rng, 2, config.vocab_size, 60, 80)
    prompts = prompts[:14] + prompts[16:]
    max_tokens = [int(x) for x in rng.integers(1, 17, 16)]
    requests = [GenerationRequest(tuple(p), m, GREEDY) for p, m in zip(prompts, max_tokens)]
    sampled = [GenerationRequest((5, 6, 7), 20, SamplingSettings(temperature=1.0, top_p=0.9, seed=i)) for i in range(4)]
    mixed = requests[:8] + sampled + requests[8:]
    served = asyncio.run(_run_staggered(scheduler, mixed))
    served = served[:8] + served[12:]
    for p, m, got in zip(prompts, max_tokens, served):
        alone = generator.generate([p], GenerateOptions(m, eos_token_ids=[]))[0]
        assert got == alone


def test_seeded_sampling_alone_equals_in_a_crowd(scheduler, model):
    """A sampled request with a seed gets the same tokens alone and among 15 others (greedy and
    sampled, other seeds and settings); without a seed two runs differ."""
    _, config, _ = model
    target = GenerationRequest(
        (9, 8, 7, 6, 5, 4, 3), 30, SamplingSettings(temperature=0.8, top_k=40, top_p=0.95, min_p=0.01, seed=1234)
    )
    alone = asyncio.run(_run_staggered(scheduler, [target]))[0]
    rng = np.random.default_rng(1)
    others = []
    for i, p in enumerate(_prompts(rng, 15, config.vocab_size)):
        s = GREEDY if i % 3 == 0 else SamplingSettings(temperature=1.2, top_k=int(rng.integers(0, 50)), seed=i)
        others.append(GenerationRequest(tuple(p), int(rng.integers(5, 40)), s))
    crowd = asyncio.run(_run_staggered(scheduler, others[:7] + [target] + others[7:], gap_s=0.001))
    assert crowd[7] == alone
    assert len(alone) == 30
    unseeded = GenerationRequest(target.prompt_ids, 30, SamplingSettings(temperature=1.0))
    a, b = asyncio.run(_run_staggered(scheduler, [unseeded, unseeded]))
    assert a != b


def test_no_compilation_after_warmup(model):
    """On a fresh engine, 50 requests of random lengths and settings (greedy, sampled, penalties,
    logprobs, prompt logprobs, max_tokens 0) compile nothing: the programs are the warm-up's."""
    _, config, params = model
    scheduler = _scheduler(config, params)
    before = dict(scheduler.engine.trace_counts)
    # chunks 16 and 32, first or later, with and without prompt logprobs; steps of 1, 2 or 4 slots
    # over 32, 64, 128 or 192 cache positions
    assert before == {"prefill": 8, "decode": 12}
    rng = np.random.default_rng(2)
    requests = []
    for p in _prompts(rng, 50, config.vocab_size, high=120):
        kind = int(rng.integers(0, 4))
        sampling = (
            GREEDY
            if kind == 0
            else SamplingSettings(
                temperature=float(rng.uniform(0.1, 2.0)),
                top_k=int(rng.integers(0, 300)),
                top_p=float(rng.uniform(0.5, 1.0)),
                min_p=float(rng.uniform(0, 0.2)),
                repetition_penalty=float(rng.uniform(0.8, 1.5)),
                seed=int(rng.integers(0, 2**40)),
            )
        )
        max_tokens = int(rng.integers(0, 160 - len(p)))
        requests.append(
            GenerationRequest(
                tuple(p),
                max_tokens,
                sampling,
                logprobs=int(rng.integers(0, 21)) if kind == 2 else None,
                prompt_logprobs=int(rng.integers(0, 5)) if kind == 3 else None,
            )
        )
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event) if event == BACKEND_COMPILE else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        served = asyncio.run(_run_staggered(scheduler, requests, gap_s=0.0005))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        scheduler.shutdown()
    assert [len(t) for t in served] == [r.max_tokens for r in requests]
    assert dict(scheduler.engine.trace_counts) == before
    assert compiles == []  # not even a re-lowering of a traced program for new input placements


def test_logprobs_equal_the_forward_pass(scheduler, model):
    """Generated tokens' log-probabilities (and their top 5) and the prompt's, against log_softmax of
    the uncached forward pass over prompt + generated tokens."""
    _, config, params = model
    prompt = tuple(range(3, 3 + 40))
    request = GenerationRequest(prompt, 12, GREEDY, logprobs=5, prompt_logprobs=3)

    async def run():
        return await _collect(scheduler.submit(request))

    tokens, events = asyncio.run(run())
    assert isinstance(events[0], PromptLogprobs)
    full = list(prompt) + tokens
    logits = np.asarray(forward(config, params, np.array([full])))[0]
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    prompt_entries = events[0].entries
    assert prompt_entries[0] is None and len(prompt_entries) == len(prompt)
    for i in range(1, len(prompt)):
        e = prompt_entries[i]
        assert e.token_id == prompt[i]
        np.testing.assert_allclose(e.logprob, ref[i - 1, prompt[i]], atol=2e-5)
        assert [t for t, _ in e.top] == list(np.argsort(-ref[i - 1])[:3])
    for j, ev in enumerate(events[1:]):
        pos = len(prompt) - 1 + j
        assert ev.logprobs.token_id == tokens[j]
        np.testing.assert_allclose(ev.logprobs.logprob, ref[pos, tokens[j]], atol=2e-5)
        np.testing.assert_allclose([v for _, v in ev.logprobs.top], np.sort(ref[pos])[::-1][:5], atol=2e-5)


def test_stop_tokens_length_and_cancel(scheduler, generator, model):
    """A stop token ends a request with "stop" (the token is delivered), max_tokens with "length";
    cancel ends a request with "abort" and frees its slot within one decode step."""
    _, config, _ = model
    prompt = [4, 5, 6, 7]
    alone = generator.generate([prompt], GenerateOptions(20, eos_token_ids=[]))[0]
    stop = alone[5]
    first = alone.index(stop)

    async def run():
        tokens, events = await _collect(scheduler.submit(GenerationRequest(tuple(prompt), 20, GREEDY, (stop,))))
        assert tokens == alone[: first + 1] and events[-1].finish_reason == "stop"
        tokens, events = await _collect(scheduler.submit(GenerationRequest(tuple(prompt), 3, GREEDY)))
        assert tokens == alone[:3] and events[-1].finish_reason == "length"
        handle = scheduler.submit(GenerationRequest(tuple(prompt), 150, GREEDY))
        seen = 0
        async for ev in handle:
            seen += 1
            if seen == 3:
                handle.cancel()
                steps = scheduler.steps
            if ev.finish_reason is not None:
                assert ev.finish_reason == "abort"
        assert scheduler.steps - steps <= 1
        await asyncio.sleep(0.05)
        assert scheduler.stats().slots_used == 0

    asyncio.run(run())


def test_requests_the_engine_cannot_run_are_refused(scheduler, model):
    _, config, _ = model

    async def run():
        with pytest.raises(ServeError, match="maximum context length is 160 tokens.*100 prompt tokens \\+ 61"):
            scheduler.submit(GenerationRequest(tuple([1] * 100), 61, GREEDY))
        with pytest.raises(ServeError, match="outside the vocabulary"):
            scheduler.submit(GenerationRequest((1, config.vocab_size), 5, GREEDY))
        with pytest.raises(ServeError, match="empty"):
            scheduler.submit(GenerationRequest((), 5, GREEDY))

    asyncio.run(run())


def test_greedy_on_a_mesh_equals_one_device(model):
    """Served on a data x tensor mesh of the 8 fake CPU devices: every token is one device's argmax
    (teacher-forced, uncached) up to the mesh's float32 rounding: a tensor-parallel sum adds the
    same products in another order, so a near-tie may fall either way."""

    path, config, one_device = model
    _, params = qwen2_jax.load_checkpoint(path, mesh=make_mesh(data=2, tensor=4))
    sched = Scheduler(Engine(config, params, max_batch_size=2, max_model_len=64, max_prefill_chunk=16))
    sched.start()
    try:
        prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3], [2, 7], [1, 8, 2, 8]]
        served = asyncio.run(_run_staggered(sched, [GenerationRequest(tuple(p), 10, GREEDY) for p in prompts]))
    finally:
        sched.shutdown()
    for p, got in zip(prompts, served):
        assert len(got) == 10
        logits = np.asarray(forward(config, one_device, np.array([p + got])))[0, len(p) - 1 : len(p) - 1 + len(got)]
        for step, token in enumerate(got):
            row = logits[step]
            slack = 2 * (SHARDED_REL + CACHE_REL) * max(1.0, float(np.max(np.abs(row))))
            assert row[token] >= row.max() - slack, f"step {step}: {token} is not the argmax {row.argmax()}"


def test_key_data_is_jax_random_key():
    for seed in (0, 1, 2**31 - 1, 2**32 - 1):
        np.testing.assert_array_equal(key_data(seed), jax.random.key_data(jax.random.key(seed)))


def test_default_max_model_len_is_capped_by_memory(model, monkeypatch):
    """Without max_model_len the cache takes the model's context unless 30% of the free memory
    holds less; then the longest multiple of 16 that fits (and a clear error when nothing fits)."""
    import serve.engine as engine_module

    _, config, params = model  # 3 layers x 2 kv heads x 16 dims x 4 bytes x 2 (k, v) = 768 bytes a slot
    per_token = engine_module.kv_bytes_per_token(config, 2, np.float32)
    assert per_token == 3 * 2 * 2 * 16 * 4 * 2
    monkeypatch.setattr(engine_module, "free_device_memory", lambda: 10**9)
    engine = Engine(config, params, max_batch_size=2, max_prefill_chunk=16)
    assert engine.max_model_len == config.max_position_embeddings and not engine.max_model_len_capped
    monkeypatch.setattr(engine_module, "free_device_memory", lambda: int((200.5 + 16) * per_token / 0.3))
    engine = Engine(config, params, max_batch_size=2, max_prefill_chunk=16, kv_bucket_min=64)
    assert engine.max_model_len == 192 and engine.max_model_len_capped
    monkeypatch.setattr(engine_module, "free_device_memory", lambda: 0)
    with pytest.raises(ValueError, match="no memory left for a KV cache"):
        Engine(config, params, max_batch_size=2, max_prefill_chunk=16)


def test_bfloat16_greedy_in_a_crowd_equals_served_alone(model):
    """bfloat16: a greedy request gets the same tokens alone and beside longer requests whose rows
    make the decode steps attend to larger cache prefixes (row-independent kernels, masked keys that
    add exact zeros)."""
    path, config, _ = model
    _, params = qwen2_jax.load_checkpoint(path, dtype="bfloat16")
    sched = Scheduler(
        Engine(config, params, max_batch_size=4, max_model_len=150, max_prefill_chunk=16, kv_bucket_min=64)
    )
    sched.start()
    try:
        rng = np.random.default_rng(5)
        targets = [GenerationRequest(tuple(p), 24, GREEDY) for p in _prompts(rng, 3, config.vocab_size, 2, 12)]
        alone = [asyncio.run(_run_staggered(sched, [t]))[0] for t in targets]
        long_rows = [GenerationRequest(tuple(p), 40, GREEDY) for p in _prompts(rng, 3, config.vocab_size, 90, 110)]
        crowd = asyncio.run(
            _run_staggered(sched, [long_rows[0], targets[0], long_rows[1], targets[1], long_rows[2], targets[2]])
        )
    finally:
        sched.shutdown()
    assert [crowd[1], crowd[3], crowd[5]] == alone


@pytest.mark.slow
def test_int8_served_equals_int8_generate_alone(model):
    """quantize="int8" serves the int8 kernels generate uses: the same greedy tokens. Slow: the engine
    path is test_greedy_in_a_crowd_equals_generate_alone's, the int8 kernels are tests/test_quantize.py's."""
    _, config, params = model
    sched = Scheduler(Engine(config, params, max_batch_size=2, max_model_len=64, max_prefill_chunk=16, quantize="int8"))
    sched.start()
    try:
        prompts = [[5, 9, 2, 7, 1, 3], [8, 8, 1], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 2]]
        served = asyncio.run(_run_staggered(sched, [GenerationRequest(tuple(p), 12, GREEDY) for p in prompts]))
    finally:
        sched.shutdown()
    int8 = Generator(config, params, quantize="int8")
    for p, got in zip(prompts, served):
        assert got == int8.generate([p], GenerateOptions(12, eos_token_ids=[]))[0]


def test_the_queue_holds_max_queue_requests_beyond_the_free_slots(model):
    """4 free slots and max_queue 2: six requests submitted at once are taken, the seventh refused
    (503), however many of the six the loop has admitted meanwhile."""
    from serve.requests import QueueFull

    _, config, params = model
    sched = Scheduler(Engine(config, params, max_batch_size=4, max_model_len=64, max_prefill_chunk=16), max_queue=2)
    sched.start()

    async def run():
        handles = [sched.submit(GenerationRequest((1, 2, 3), 40, GREEDY)) for _ in range(6)]
        with pytest.raises(QueueFull, match="waiting queue is full"):
            sched.submit(GenerationRequest((1, 2, 3), 40, GREEDY))
        for h in handles:
            h.cancel()
        reasons = []
        for h in handles:
            events = [ev async for ev in h]
            reasons.append(events[-1].finish_reason)
        return reasons

    try:
        assert set(asyncio.run(run())) <= {"abort", "length"}
    finally:
        sched.shutdown()


def test_prefill_chunks_shrink_to_the_decode_step_while_others_decode(model, monkeypatch):
    """While a request decodes, a prompt longer than the threshold (64) is prefilled in chunks whose
    measured time fits in 1.5 decode steps (here chunk 32 is made to look slow: only 16-token
    chunks); alone, in the largest; a shorter prompt in the largest while others decode too."""
    _, config, params = model
    sched = Scheduler(
        Engine(config, params, max_batch_size=2, max_model_len=160, max_prefill_chunk=32), long_prefill_threshold=64
    )
    sched.start()
    chunks = []
    prefill = sched.engine.prefill
    monkeypatch.setattr(sched.engine, "prefill", lambda row, ids, *a: chunks.append(len(ids)) or prefill(row, ids, *a))
    sched.engine.prefill_seconds[False, True, 32] = sched.engine.prefill_seconds[False, False, 32] = 1e9
    long_prompt = tuple(range(1, 101))

    async def run(requests, gap_s):
        return await _run_staggered(sched, requests, gap_s)

    try:
        asyncio.run(run([GenerationRequest(long_prompt, 1, GREEDY)], 0))
        assert chunks == [32, 32, 32, 3]  # alone: the largest chunks (99 prompt tokens before the last)
        chunks.clear()
        running = GenerationRequest((1, 2), 120, GREEDY)
        asyncio.run(run([running, GenerationRequest(long_prompt, 1, GREEDY)], 0))  # running: prefilled first
        assert chunks[0] == 1 and chunks[1:] == [16] * 6 + [3]
        chunks.clear()
        asyncio.run(run([running, GenerationRequest(long_prompt[:60], 1, GREEDY)], 0))
        assert chunks == [1, 32, 27]
    finally:
        sched.shutdown()


def test_chunks_longer_than_max_model_len_warm_up(model):
    """max_model_len below max_prefill_chunk: every program still compiles and serves."""
    _, config, params = model
    sched = Scheduler(Engine(config, params, max_batch_size=1, max_model_len=24, max_prefill_chunk=32))
    sched.start()
    try:
        served = asyncio.run(_run_staggered(sched, [GenerationRequest(tuple(range(1, 21)), 4, GREEDY)]))
    finally:
        sched.shutdown()
    assert len(served[0]) == 4
