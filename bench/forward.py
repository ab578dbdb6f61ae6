"""Prefill speed: ours (jit, after compilation) against HF transformers (PyTorch, 2 threads), one run.

Qwen2-0.5B-shaped model with random float32 weights; the same weights in both (HF saves, we load).
Prints seconds per forward and the ratio HF/ours (> 1 means we are faster).

    .venv/bin/python bench/forward.py [--layers 24] [--seq 512] [--batches 1,4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

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
        config, params = qwen2_jax.load_checkpoint(tmp)
    n_params = sum(p.numel() for p in hf.parameters())
    print(
        f"model: Qwen2-0.5B shape, {args.layers} layers, {n_params / 1e6:.0f}M params, float32; "
        f"torch threads={torch.get_num_threads()}, jax devices={len(__import__('jax').devices())}"
    )
    print(f"{'batch':>5} {'seq':>5} {'HF s':>8} {'ours s':>8} {'HF/ours':>8}")
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = np.random.RandomState(batch).randint(0, 151643, (batch, args.seq))

        def run_hf(ids=ids):
            with torch.no_grad():
                hf(input_ids=torch.from_numpy(ids)).logits.float()

        def run_ours(ids=ids):
            qwen2_jax.forward(config, params, ids).block_until_ready()

        run_ours()  # compile
        run_hf()  # warm-up
        t_ours = best_of(run_ours, args.repeats)
        t_hf = best_of(run_hf, args.repeats)
        print(f"{batch:>5} {args.seq:>5} {t_hf:>8.3f} {t_ours:>8.3f} {t_hf / t_ours:>8.2f}x")


if __name__ == "__main__":
    main()
