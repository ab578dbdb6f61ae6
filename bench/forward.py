"""Prefill speed: ours (jit, after compilation) against HF transformers (PyTorch, 2 threads), one run.

Qwen2-0.5B-shaped model with random weights, the same weights in both (HF saves float32, we load
them converted to --dtype as torch's `.to(dtype)` converts them: round to nearest even). Every
repeat times ours and HF back to back (the machine may be shared: the ratio of interleaved runs is
the number to trust). Prints seconds per forward (best of the repeats), the ratio HF/ours (> 1
means we are faster), the ratio per repeat, and our GFLOP/s (matmul flops: the projections, the
LM head and causal attention).

    .venv/bin/python bench/forward.py [--dtype float32|bfloat16] [--layers 24] [--seq 512]
                                      [--batches 1,4] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_flops(config, batch: int, seq: int) -> float:
    """Multiply-adds x 2 of one forward: projections, LM head, causal attention (half the scores)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h = config.head_size
    q, kv = config.num_attention_heads * h, config.num_key_value_heads * h
    per_token_layer = d * (q + 2 * kv) + q * d + 3 * d * f
    attention = config.num_attention_heads * h * seq * seq  # QK^T and PV, each half of [seq, seq]
    tokens = batch * seq
    return 2.0 * (config.num_hidden_layers * (tokens * per_token_layer + batch * attention) + tokens * d * v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    import qwen2_jax
    from qwen2_jax.config import preset

    torch.set_num_threads(args.threads)
    shape = preset("qwen2-0.5b").to_hf()
    shape.update(num_hidden_layers=args.layers, torch_dtype="float32")
    shape.pop("dtype", None)
    shape.pop("layer_types", None)
    hf_cfg = HFConfig(**{k: v for k, v in shape.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(hf_cfg).float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        config, params = qwen2_jax.load_checkpoint(tmp, dtype=args.dtype)
    hf = hf.to(getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in hf.parameters())
    device = __import__("jax").devices()[0]
    print(
        f"model: Qwen2-0.5B shape, {args.layers} layers, {n_params / 1e6:.0f}M params, {args.dtype} (both); "
        f"torch threads={torch.get_num_threads()}, jax {device.platform} devices={len(__import__('jax').devices())}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    print(f"{'batch':>5} {'seq':>5} {'HF s':>8} {'ours s':>8} {'HF/ours':>8}  {'GFLOP/s':>8}  per repeat", flush=True)
    results = {"dtype": args.dtype, "layers": args.layers, "seq": args.seq, "rows": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = np.random.RandomState(batch).randint(0, 151643, (batch, args.seq))

        def run_hf(ids=ids):
            with torch.no_grad():
                hf(input_ids=torch.from_numpy(ids)).logits.float()

        def run_ours(ids=ids):
            qwen2_jax.forward(config, params, ids).block_until_ready()

        run_ours()  # compile
        run_hf()  # warm-up
        t_ours, t_hf = [], []
        for _ in range(args.repeats):  # interleaved
            t_ours.append(timed(run_ours))
            t_hf.append(timed(run_hf))
        per_repeat = [h / o for h, o in zip(t_hf, t_ours)]
        gflops = matmul_flops(config, batch, args.seq) / min(t_ours) / 1e9
        print(
            f"{batch:>5} {args.seq:>5} {min(t_hf):>8.3f} {min(t_ours):>8.3f} {min(t_hf) / min(t_ours):>7.2f}x  "
            f"{gflops:>8.0f}  " + ", ".join(f"{r:.2f}" for r in per_repeat),
            flush=True,
        )
        results["rows"].append(
            dict(
                batch=batch,
                hf_s=min(t_hf),
                ours_s=min(t_ours),
                ratio=min(t_hf) / min(t_ours),
                ratio_per_repeat=per_repeat,
                ours_gflops=gflops,
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
