"""Serving: qwen2-serve under closed-loop concurrent clients, against our sequential `generate` and HF
transformers' `generate` one request at a time, in one run.

    .venv/bin/python bench/serve.py                                   # Qwen2-0.5B shapes, bf16, random weights
    .venv/bin/python bench/serve.py --concurrency 1,8 --no-hf --requests-per-client 1   # quicker
    .venv/bin/python bench/serve.py --checkpoint DIR --dtype float32  # any checkpoint qwen2-serve takes

Without --checkpoint, a checkpoint of the preset's shapes with random weights is written once to
.cache/bench/ (Orbax, with the Qwen2 tokenizer). Every request: --prompt-len random token ids (a fresh
prompt each time), --new-tokens new tokens (ignore_eos: no early stop), greedy, streamed.

1. Baselines, before the server starts (nothing else running): our `Generator.generate` and HF's
   `model.generate` (torch threads = --threads), one request at a time, after one untimed warm-up.
2. `qwen2-serve` as a subprocess (`--max-batch-size`, `--max-prefill-chunk`); for each concurrency c,
   c clients each send --requests-per-client requests back to back (closed loop), client i starting
   i/c of one sequential request's time after the first (users do not arrive in the same
   millisecond). Throughput is taken over the window in which every client is busy (the steady
   state), TTFT over the requests sent in it. TTFT: from sending a request to its first token;
   inter-token latency: between consecutive tokens of one request (each token arrives in a chunk of
   its own: `return_token_ids`).
3. The long-prompt case: 8 clients decoding, and a --long-prompt-token prompt arriving mid-run; the
   8 clients' inter-token latency p99 / p50 once all 8 streams run (chunked prefill keeps them
   going), and over the whole run (their own 8 prompts arriving together stall the first ones once).

4. Our sequential `generate` again, after the server has stopped: the ratios are over the mean of the
   two sequential runs (a shared machine's speed drifts within a run).

Printed: request throughput, output tokens/s, TTFT and inter-token p50 / p99 per concurrency, and the
ratios the serving goals are stated in. The machine may be shared: run it on an idle one.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen2-0.5b", help="model shapes for the random checkpoint")
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint instead of a random one")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--long-prompt", type=int, default=2048, help="the long-prompt case's prompt (0: skip the case)")
    p.add_argument("--max-batch-size", type=int, default=8, help="the server's decode slots")
    p.add_argument("--max-prefill-chunk", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None, help="default: long prompt + new tokens, or less")
    p.add_argument("--baseline-requests", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads for HF")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- checkpoint
def random_checkpoint(preset_name: str, dtype: str) -> str:
    """A checkpoint of the preset's shapes with random weights (written once, then reused)."""
    import jax
    import jax.numpy as jnp

    from qwen2_jax import orbax_checkpoint
    from qwen2_jax.config import preset
    from qwen2_jax.params import init_params
    from qwen2_jax.tokenizer_build import write_qwen2_tokenizer

    path = os.path.join(ROOT, ".cache", "bench", f"serve-{preset_name}-{dtype}")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    print(f"writing a random {preset_name} {dtype} checkpoint to {path}", flush=True)
    config = preset(preset_name)
    params = init_params(config, jax.random.key(0), param_dtype=jnp.dtype(dtype))
    orbax_checkpoint.save(path, config, params, source="bench/serve.py (random weights)")
    write_qwen2_tokenizer(path)  # last: its presence marks a finished checkpoint
    return path


def prompts(rng, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[int(x) for x in rng.integers(0, min(vocab, 151643), length)] for _ in range(n)]


# ----------------------------------------------------------------------------------- baselines
def baseline_ours(checkpoint: str, dtype: str, args, rng) -> dict:
    from qwen2_jax import load_checkpoint
    from qwen2_jax.generate import GenerateOptions, Generator

    config, params = load_checkpoint(checkpoint, dtype=dtype)
    generator = Generator(config, params, consume=True)
    options = GenerateOptions(args.new_tokens, eos_token_ids=[])
    generator.generate(prompts(rng, 1, args.prompt_len, config.vocab_size), options)  # compile + warm up
    times = []
    for p in prompts(rng, args.baseline_requests, args.prompt_len, config.vocab_size):
        t = time.perf_counter()
        out = generator.generate([p], options)[0]
        times.append(time.perf_counter() - t)
        assert len(out) == args.new_tokens
    del generator, params
    gc.collect()
    return _sequential("ours: sequential generate", times, args.new_tokens)


def baseline_hf(checkpoint: str, dtype: str, args, rng) -> dict:
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from qwen2_jax.config import Qwen2Config

    torch.set_num_threads(args.threads)
    config = Qwen2Config.from_hf(checkpoint)
    hf_cfg = HFConfig(**{k: v for k, v in config.to_hf().items() if k not in ("architectures", "dtype")})
    torch.manual_seed(0)
    with torch.no_grad():  # random weights of the same shapes: the speed is what is compared
        model = Qwen2ForCausalLM(hf_cfg).to(getattr(torch, dtype)).eval()

    def run(p):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == len(p) + args.new_tokens

    run(prompts(rng, 1, args.prompt_len, config.vocab_size)[0])
    times = []
    for p in prompts(rng, args.baseline_requests, args.prompt_len, config.vocab_size):
        t = time.perf_counter()
        run(p)
        times.append(time.perf_counter() - t)
    return _sequential("HF transformers: sequential generate", times, args.new_tokens)


def _sequential(label: str, times: list[float], new_tokens: int) -> dict:
    total = sum(times)
    return {
        "label": label,
        "requests": len(times),
        "request_s": total / len(times),
        "requests_per_s": len(times) / total,
        "output_tok_s": len(times) * new_tokens / total,
    }


# ----------------------------------------------------------------------------------- server
class ServerProcess:
    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.ready = threading.Event()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            print(f"  | {line.rstrip()}", flush=True)
            if "ready on http://" in line:
                self.ready.set()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise SystemExit("qwen2-serve did not start:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------- clients
async def stream_one(client, prompt: list[int], max_tokens: int, on_token=None) -> dict:
    """One streamed greedy request: its send time, token arrival times."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    sent = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            now = time.perf_counter()
            for _ in chunk["choices"][0].get("token_ids") or []:
                arrivals.append(now)
                if on_token is not None:
                    on_token()
    assert len(arrivals) == max_tokens, len(arrivals)
    return {"sent": sent, "arrivals": arrivals}


async def closed_loop(
    base_url: str, concurrency: int, per_client: int, rng, args, vocab: int, ramp_s: float = 0.0
) -> dict:
    """Client i starts after i * ramp_s / concurrency (independent users do not all arrive in the
    same millisecond: a simultaneous start measures one burst of prefills), then sends its requests
    back to back. Throughput and latencies are taken over the window in which every client is busy."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:

        async def one_client(i):
            await asyncio.sleep(i * ramp_s / concurrency)
            return [
                await stream_one(client, prompts(rng, 1, args.prompt_len, vocab)[0], args.new_tokens)
                for _ in range(per_client)
            ]

        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        wall = time.perf_counter() - start
    window = (max(rs[0]["sent"] for rs in results), min(rs[-1]["arrivals"][-1] for rs in results))
    flat = [r for rs in results for r in rs]
    return summarize(f"qwen2-serve, {concurrency} clients", flat, wall, window)


async def long_prompt_case(base_url: str, rng, args, vocab: int) -> dict:
    """8 clients decode; when each has a quarter of its tokens, the long prompt arrives."""
    import httpx

    counts = [0] * 8
    async with httpx.AsyncClient(base_url=base_url, timeout=None) as client:
        start = time.perf_counter()
        streams = [
            asyncio.ensure_future(stream_one(client, p, args.new_tokens, lambda i=i: _bump(counts, i)))
            for i, p in enumerate(prompts(rng, 8, args.prompt_len, vocab))
        ]
        while min(counts) < args.new_tokens // 4:
            await asyncio.sleep(0.01)
        long_result = await stream_one(client, prompts(rng, 1, args.long_prompt, vocab)[0], 8)
        results = await asyncio.gather(*streams)
        wall = time.perf_counter() - start
    row = summarize(f"qwen2-serve, 8 clients + a {args.long_prompt}-token prompt mid-run", results, wall)
    row["long_prompt_ttft_s"] = long_result["arrivals"][0] - long_result["sent"]
    # mid-run: the gaps between tokens that arrive after every stream has started (the 8 clients'
    # own prompts, prefilled as they arrive together, stall the first streams once at the start)
    all_started = max(r["arrivals"][0] for r in results)
    mid = np.concatenate([np.diff([t for t in r["arrivals"] if t >= all_started]) for r in results])
    row["mid_itl_p50_s"], row["mid_itl_p99_s"] = float(np.percentile(mid, 50)), float(np.percentile(mid, 99))
    return row


def _bump(counts: list[int], i: int) -> None:
    counts[i] += 1


def summarize(label: str, results: list[dict], wall: float, window=None) -> dict:
    """Throughput over `window` (start, end) when given and long enough (every client busy: the
    steady state), else over the whole run; TTFT of the requests sent in the window (all, else)."""
    tokens, requests = sum(len(r["arrivals"]) for r in results), len(results)
    if window is not None and window[1] - window[0] > 1.0:
        t0, t1 = window
        wall = t1 - t0
        tokens = sum(int(np.sum((np.array(r["arrivals"]) >= t0) & (np.array(r["arrivals"]) < t1))) for r in results)
        requests = sum(t0 <= r["arrivals"][-1] < t1 for r in results)
        results = [r for r in results if t0 <= r["sent"] < t1] or results
    ttft = np.array([r["arrivals"][0] - r["sent"] for r in results])
    itl = np.concatenate([np.diff(r["arrivals"]) for r in results if len(r["arrivals"]) > 1])
    return {
        "label": label,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": requests / wall,
        "output_tok_s": tokens / wall,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "itl_p50_s": float(np.percentile(itl, 50)),
        "itl_p99_s": float(np.percentile(itl, 99)),
    }


def show(row: dict) -> None:
    if "ttft_p50_s" in row:
        print(
            f"{row['label']:<58} {row['requests']:>4} req  {row['requests_per_s']:7.3f} req/s  "
            f"{row['output_tok_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50_s'] * 1e3:8.1f} ms p99 "
            f"{row['ttft_p99_s'] * 1e3:8.1f} ms  ITL p50 {row['itl_p50_s'] * 1e3:7.1f} ms p99 "
            f"{row['itl_p99_s'] * 1e3:7.1f} ms",
            flush=True,
        )
    else:
        print(
            f"{row['label']:<58} {row['requests']:>4} req  {row['requests_per_s']:7.3f} req/s  "
            f"{row['output_tok_s']:8.1f} tok/s  ({row['request_s']:.2f} s a request)",
            flush=True,
        )


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from qwen2_jax.config import Qwen2Config

    checkpoint = args.checkpoint or random_checkpoint(args.preset, args.dtype)
    config = Qwen2Config.from_hf(checkpoint)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    max_model_len = args.max_model_len or min(
        config.max_position_embeddings, max(args.long_prompt, args.prompt_len) + args.new_tokens
    )
    device = jax.devices()[0]
    print(
        f"device: {device.platform} {device.device_kind}, {os.cpu_count()} CPUs; {checkpoint} ({args.dtype}); "
        f"prompts {args.prompt_len} tokens, {args.new_tokens} new, greedy; server: {args.max_batch_size} slots, "
        f"prefill chunks <= {args.max_prefill_chunk}, max_model_len {max_model_len}",
        flush=True,
    )
    rng = np.random.default_rng(0)
    rows = [baseline_ours(checkpoint, args.dtype, args, rng)]
    show(rows[-1])
    if not args.no_hf:
        rows.append(baseline_hf(checkpoint, args.dtype, args, rng))
        show(rows[-1])

    port = free_port()
    server = ServerProcess(
        [
            sys.executable,
            "-m",
            "serve",
            "--checkpoint",
            checkpoint,
            "--port",
            str(port),
            "--dtype",
            args.dtype,
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-prefill-chunk",
            str(args.max_prefill_chunk),
            "--max-model-len",
            str(max_model_len),
            "--max-queue",
            str(max(64, max(concurrency))),
        ]
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready(1800)
        ramp_s = rows[0]["request_s"]  # one request's time: arrivals spread over it
        for c in concurrency:
            loop = closed_loop(base_url, c, args.requests_per_client, rng, args, config.vocab_size, ramp_s)
            rows.append(asyncio.run(loop))
            show(rows[-1])
        if args.long_prompt:
            rows.append(asyncio.run(long_prompt_case(base_url, rng, args, config.vocab_size)))
            show(rows[-1])
    finally:
        print(f"server exit status {server.stop()}", flush=True)

    # the machine may be shared: our sequential baseline again now, and the ratios over the mean of both
    after = baseline_ours(checkpoint, args.dtype, args, rng)
    after["label"] += " (again, after the server)"
    rows.append(after)
    show(after)
    by_label = {r["label"]: r for r in rows}
    sequential = (rows[0]["output_tok_s"] + after["output_tok_s"]) / 2
    print("\nratios:")
    for c in concurrency:
        row = by_label[f"qwen2-serve, {c} clients"]
        print(f"  output tok/s at {c} clients over our sequential generate: {row['output_tok_s'] / sequential:.2f}x")
        if not args.no_hf:
            hf_ratio = row["output_tok_s"] / rows[1]["output_tok_s"]
            print(f"  output tok/s at {c} clients over HF sequential generate: {hf_ratio:.2f}x")
    if 1 in concurrency and 8 in concurrency:
        lone, eight = by_label["qwen2-serve, 1 clients"], by_label["qwen2-serve, 8 clients"]
        print(f"  TTFT p50 at 8 clients over a lone request's: {eight['ttft_p50_s'] / lone['ttft_p50_s']:.2f}")
    if args.long_prompt:
        row = by_label[f"qwen2-serve, 8 clients + a {args.long_prompt}-token prompt mid-run"]
        print(
            f"  inter-token p99 / p50 at 8 clients with a {args.long_prompt}-token prompt mid-run, once all 8 "
            f"streams run: {row['mid_itl_p99_s'] / row['mid_itl_p50_s']:.2f} "
            f"({row['mid_itl_p99_s'] * 1e3:.1f} / {row['mid_itl_p50_s'] * 1e3:.1f} ms; over the whole run, their "
            f"start included: {row['itl_p99_s'] / row['itl_p50_s']:.2f}; the long prompt's TTFT "
            f"{row['long_prompt_ttft_s']:.2f} s)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "checkpoint": checkpoint, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
