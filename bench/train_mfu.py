"""Model FLOPs utilisation of the qwen2-train step on one accelerator: forward, backward and AdamW
update of the real training step (float32 master weights, bfloat16 compute, chunked loss), on
random tokens, for Qwen2-0.5B and 1.5B shapes with the real vocabulary.

    python bench/train_mfu.py [--presets qwen2-0.5b,qwen2-1.5b] [--seq 2048] [--steps 5]
                              [--peak-tflops 989]

MFU = flops_per_token (6 x matmul params + causal attention, forward + backward) x tokens/s / peak;
989 TFLOP/s is the H100 SXM's dense bfloat16 peak. Each preset tries its (batch, remat) settings in
order and reports each that fits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {  # per preset: (global batch, remat) tried in order
    "qwen2-0.5b": [(16, "none"), (32, "dots")],
    "qwen2-1.5b": [(8, "none"), (16, "dots")],
}


def run_one(preset_name: str, batch: int, seq: int, remat: str, steps: int, peak: float, chunk: int):
    import jax
    import numpy as np

    from qwen2_jax.config import preset
    from train.batches import global_batch
    from train.config import LossConfig, OptimizerConfig
    from train.model_setup import ModelSetup, batch_sharding, build_mesh, flops_per_token, replicated
    from train.objective import Objective
    from train.optimizer import make_optimizer
    from train.train_step import jit_train_step, make_train_step, new_state, state_shardings

    config = preset(preset_name)
    mesh = build_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})
    setup = ModelSetup(config, mesh, dtype="bfloat16", param_dtype="float32", remat=remat)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-4, schedule="constant"), total_steps=100)
    shardings = state_shardings(setup, tx, replicated(mesh))
    step_fn = jit_train_step(
        make_train_step(Objective(setup, LossConfig(chunk_length=chunk)), tx, schedule, 1),
        shardings,
        batch_sharding(mesh),
        replicated(mesh),
    )
    state = new_state(setup.init_params(0), tx, 0, shardings)
    ids = np.random.RandomState(0).randint(0, 151643, (batch, seq)).astype(np.int32)
    data = global_batch({"input_ids": ids}, batch_sharding(mesh), batch)
    start = time.perf_counter()
    compiled = step_fn.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    for _ in range(2):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data)
    loss = float(np.asarray(metrics["loss"]))
    sec = (time.perf_counter() - start) / steps
    tokens_s = batch * seq / sec
    mfu = flops_per_token(config, seq) * tokens_s / (peak * 1e12)
    temp_gb = getattr(mem, "temp_size_in_bytes", 0) / 1e9
    print(
        f"{preset_name:11s} batch {batch:3d} x {seq} remat {remat:5s}: {sec * 1e3:7.1f} ms/step, "
        f"{tokens_s:9.0f} tok/s, MFU {100 * mfu:5.1f}%  (loss {loss:.3f}, compile {compile_s:.0f} s, "
        f"temp {temp_gb:.1f} GB)",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="qwen2-0.5b,qwen2-1.5b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=256, help="loss chunk length in positions")
    ap.add_argument("--batch", type=int, default=None, help="one setting: this batch (with --remat)")
    ap.add_argument("--remat", default="none", choices=("none", "dots", "full"))
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    import jax

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    for name in args.presets.split(","):
        for batch, remat in [(args.batch, args.remat)] if args.batch else SETTINGS[name]:
            try:
                run_one(name, batch, args.seq, remat, args.steps, args.peak_tflops, args.chunk)
            except Exception as e:  # out of memory for this setting: report it and try the next
                print(f"{name} batch {batch} remat {remat}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
