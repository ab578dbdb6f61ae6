"""DPO step speed: ours (qwen2-train's task dpo step: pairs as two segments of one row, chunked
per-token log-probs, the reference model run in the step, AdamW, jitted, state donated) against TRL's
DPOTrainer (chosen and rejected as padded rows of one batch, fused chunked LM head, its reference
model run in the step), float32 on both sides (TRL's default bf16 autocast and gradient
checkpointing off), 2 threads.

The same random Qwen2-0.5B-shaped model on both sides (HF saves, we load; --layers of them), the
reference the starting model on both sides, the same pairs (the built-in preference data,
train/data_pref_corpus.py), the same batch: --batch pairs per step, in file order on both sides (no
shuffling), one pair per row of --seq tokens on ours (data.packing false), padded to the longest
sequence of the batch on TRL's. Both AdamW, global-norm clipping 1.0, beta 0.1. Prints seconds per
step, pairs per second and the ratio ours / TRL (> 1: we are faster); --rounds alternates the two,
the ratio is that of the medians.

    .venv/bin/python bench/dpo_step.py [--layers 2] [--batch 8] [--seq 128] [--steps 3] [--rounds 2]
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


def preference_rows(n: int, cache_dir: str) -> list[dict]:
    import json

    from train.data_pref_corpus import default_preference_sources

    with open(default_preference_sources(cache_dir)[0]) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def bench_trl(model_dir, rows, args) -> list[float]:
    """Seconds per timed step of DPOTrainer.train()."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2ForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    config = DPOConfig(
        output_dir=None,
        report_to=[],
        use_cpu=True,
        # TRL's configs default to bf16=True (CPU bf16 autocast) and gradient_checkpointing=True (the forward
        # recomputed in the backward); ours is float32 with no remat
        bf16=False,
        gradient_checkpointing=False,
        beta=0.1,
        max_length=args.seq,
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        dataloader_drop_last=True,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[Clock()],
    )
    print(
        f"TRL: mixed precision {trainer.accelerator.mixed_precision}, "
        f"gradient checkpointing {trainer.model.is_gradient_checkpointing}",
        flush=True,
    )
    trainer.train()
    return times[args.warmup :]


def bench_ours(model_dir, rows_path, args) -> tuple[list[float], float]:
    import numpy as np

    import qwen2_jax
    from train.batches import global_batch
    from train.config import OptimizerConfig, load_config
    from train.dpo_data import PreferenceCorpus
    from train.dpo_run import dpo_objective
    from train.model_setup import ModelSetup, batch_sharding, build_mesh, replicated
    from train.optimizer import make_optimizer
    from train.train_step import jit_train_step, make_train_step, new_state, state_shardings

    mesh = build_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})
    config, params = qwen2_jax.load_checkpoint(model_dir, dtype="float32", mesh=mesh)
    run = load_config(
        None,
        [
            "task=dpo",
            f"seq_len={args.seq}",
            f"loss.chunk_length={args.chunk}",
            "data.packing=false",
            f"data.sources=[{rows_path}]",
            f"data.cache_dir={args.cache_dir}",
        ],
    )
    data = PreferenceCorpus(run, model_dir, config.vocab_size)
    assert data.stats.cut == data.stats.dropped == 0, data.summary(args.seq, False, "cut")
    setup = ModelSetup(config, mesh, dtype="float32", param_dtype="float32")
    tx, schedule = make_optimizer(
        OptimizerConfig(learning_rate=1e-6, b2=0.95, weight_decay=0.0, clip_norm=1.0, schedule="constant"), 100
    )
    shardings = state_shardings(setup, tx, replicated(mesh))
    objective, reference_shardings = dpo_objective(setup, run)
    step_fn = jit_train_step(
        make_train_step(objective, tx, schedule, 1),
        shardings,
        batch_sharding(mesh),
        replicated(mesh),
        reference_shardings,
    )
    reference = jax_copy(params)
    state = {"s": new_state(params, tx, 0, shardings)}
    del params
    rows = data.train_rows  # one pair per row, in file order: TRL's batches
    batches = []
    for i in range(args.warmup + args.steps):
        local = {f: v[i * args.batch : (i + 1) * args.batch] for f, v in rows.items()}
        batches.append(global_batch(local, batch_sharding(mesh), args.batch))
    start = time.perf_counter()
    compiled = step_fn.lower(state["s"], batches[0], reference).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        state["s"], metrics = compiled(state["s"], batch, reference)
        float(np.asarray(metrics["loss"]))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times, compile_s


def jax_copy(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.copy, tree)  # the state donates the policy's buffers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--seq", type=int, default=128, help="our row length (a pair's two sequences together)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side and round (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="TRL, ours alternations")
    ap.add_argument("--chunk", type=int, default=64, help="our loss chunk length (0 = unchunked)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default="~/.cache/qwen2-jax/data")
    args = ap.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import json

    import torch
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    from qwen2_jax.config import preset
    from qwen2_jax.tokenizer_build import IM_END, write_qwen2_tokenizer

    torch.set_num_threads(args.threads)
    shape = preset("qwen2-0.5b").to_hf()
    shape.update(num_hidden_layers=args.layers)
    for key in ("dtype", "torch_dtype", "layer_types", "architectures", "model_type"):
        shape.pop(key, None)
    rows = preference_rows(args.batch * (args.warmup + args.steps), args.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(HFConfig(**shape)).float()
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        write_qwen2_tokenizer(tmp, eos_token=IM_END)
        rows_path = os.path.join(tmp, "pairs.jsonl")
        with open(rows_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        gc.collect()
        print(
            f"model: Qwen2-0.5B shape, {args.layers} layers, {n_params / 1e6:.0f}M params, float32; "
            f"{len(rows)} pairs, {args.batch} pairs per step (reference in the step on both sides); "
            f"torch threads {torch.get_num_threads()}",
            flush=True,
        )
        results = {"TRL DPOTrainer": [], "ours": []}
        for r in range(args.rounds):
            times = bench_trl(tmp, rows, args)
            gc.collect()
            results["TRL DPOTrainer"].extend(times)
            print(f"round {r + 1} TRL:  step s {[round(t, 2) for t in times]}", flush=True)
            times, compile_s = bench_ours(tmp, rows_path, args)
            gc.collect()
            results["ours"].extend(times)
            print(f"round {r + 1} ours: step s {[round(t, 2) for t in times]} (compile {compile_s:.0f} s)", flush=True)
    rates = {}
    print(f"{'':16}{'s/step':>8} {'pairs/s':>9}")
    for name, times in results.items():
        seconds = statistics.median(times)
        rates[name] = args.batch / seconds
        print(f"{name:16}{seconds:>8.2f} {rates[name]:>9.2f}")
    print(f"ratio ours/TRL (pairs/s): {rates['ours'] / rates['TRL DPOTrainer']:.2f}x")


if __name__ == "__main__":
    main()
