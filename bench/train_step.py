"""Training-step speed: ours (the qwen2-train step: forward, backward, AdamW update, jitted, state
donated) against HF transformers + torch.optim.AdamW, one run, float32, 2 threads.

Qwen2-0.5B shape (24 layers, the real 151,936-token vocabulary, tied embeddings), the same random
weights on both sides (HF saves, we load), batch 4 x 256 by default. Both optimizers: AdamW
lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on every parameter, no clipping. Prints the
first-step losses (they must agree), seconds per step, tokens per second and the ratio ours / HF
(> 1: we are faster). The two never share memory: each side is loaded, timed and freed in turn, and
--rounds alternates them (HF, ours, HF, ours, ...) so that load from other processes on a shared
machine falls on both; the ratio printed is that of the median step times over all rounds.

    .venv/bin/python bench/train_step.py [--layers 24] [--batch 4] [--seq 256] [--steps 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed_steps(step, warmup: int, steps: int) -> tuple[list[float], float]:
    """Per-step seconds of `steps` calls after `warmup` calls; step() returns the loss (synchronised)."""
    first_loss = None
    for i in range(warmup):
        loss = step()
        first_loss = loss if i == 0 else first_loss
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times, first_loss


def bench_torch(model_dir, ids, args):
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids_t = torch.from_numpy(ids).long()

    def step():
        loss = model(input_ids=ids_t, labels=ids_t).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss)

    return timed_steps(step, args.warmup, args.steps)  # model and optimizer are freed on return


def bench_ours(model_dir, ids, args):
    import numpy as np

    import qwen2_jax
    from train.batches import global_batch
    from train.config import LossConfig, OptimizerConfig
    from train.model_setup import ModelSetup, batch_sharding, build_mesh, replicated
    from train.objective import Objective
    from train.optimizer import make_optimizer
    from train.train_step import jit_train_step, make_train_step, new_state, state_shardings

    mesh = build_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})
    config, params = qwen2_jax.load_checkpoint(model_dir, dtype="float32", mesh=mesh)
    setup = ModelSetup(config, mesh, dtype="float32", param_dtype="float32", remat=args.remat)
    tx, schedule = make_optimizer(
        OptimizerConfig(
            learning_rate=1e-4,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            decay_norms_biases_embeddings=True,
            clip_norm=0.0,
            schedule="constant",
        ),
        total_steps=100,
    )
    shardings = state_shardings(setup, tx, replicated(mesh))
    step_fn = jit_train_step(
        make_train_step(Objective(setup, LossConfig(chunk_length=args.chunk)), tx, schedule, 1),
        shardings,
        batch_sharding(mesh),
        replicated(mesh),
    )
    state = {"s": new_state(params, tx, 0, shardings)}
    del params
    batch = global_batch({"input_ids": ids}, batch_sharding(mesh), ids.shape[0])
    compile_start = time.perf_counter()
    compiled = step_fn.lower(state["s"], batch).compile()
    compile_s = time.perf_counter() - compile_start

    def step():
        state["s"], metrics = compiled(state["s"], batch)
        return float(np.asarray(metrics["loss"]))

    times, first = timed_steps(step, args.warmup, args.steps)
    return times, first, compile_s  # the state is freed on return


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per side and round (after --warmup)")
    ap.add_argument("--rounds", type=int, default=2, help="HF, ours alternations")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=128, help="our loss chunk length (0 = unchunked)")
    ap.add_argument("--remat", default="none", choices=("none", "dots", "full"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np
    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from qwen2_jax.config import preset

    torch.set_num_threads(args.threads)
    shape = preset("qwen2-0.5b").to_hf()
    shape.update(num_hidden_layers=args.layers)
    for key in ("dtype", "torch_dtype", "layer_types", "architectures", "model_type"):
        shape.pop(key, None)
    hf_cfg = HFConfig(**shape)
    ids = np.random.RandomState(0).randint(0, 151643, (args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(hf_cfg).float()
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        gc.collect()
        print(
            f"model: Qwen2-0.5B shape, {args.layers} layers, {n_params / 1e6:.0f}M params, float32; "
            f"batch {args.batch} x {args.seq}; torch threads {torch.get_num_threads()}; "
            f"ours: loss chunk {args.chunk}, remat {args.remat}",
            flush=True,
        )
        t_hf, t_ours = [], []
        for r in range(args.rounds):
            times, loss_hf = bench_torch(tmp, ids, args)
            gc.collect()
            t_hf += times
            print(
                f"round {r + 1} HF + torch AdamW: first loss {loss_hf:.6f}, step s {[round(t, 2) for t in times]}",
                flush=True,
            )
            times, loss_ours, compile_s = bench_ours(tmp, ids, args)
            gc.collect()
            t_ours += times
            print(
                f"round {r + 1} ours:             first loss {loss_ours:.6f}, step s "
                f"{[round(t, 2) for t in times]} (compile {compile_s:.0f} s)",
                flush=True,
            )
    hf_s, ours_s = statistics.median(t_hf), statistics.median(t_ours)
    print(f"{'':18}{'s/step':>8} {'tokens/s':>9}")
    print(f"{'HF + torch AdamW':18}{hf_s:>8.2f} {tokens / hf_s:>9.1f}")
    print(f"{'ours':18}{ours_s:>8.2f} {tokens / ours_s:>9.1f}")
    print(f"ratio ours/HF (tokens/s): {hf_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
