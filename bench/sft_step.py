"""SFT step speed: ours (qwen2-train's task sft step: packed rows with segment ids, chunked loss, AdamW,
jitted, state donated) against TRL's SFTTrainer (packing, best-fit decreasing, padding-free rows with
position ids: transformers keeps attention inside each conversation), float32 on both sides (TRL's
default bf16 autocast and gradient checkpointing off), 2 threads.

The same random Qwen2-0.5B-shaped model on both sides (HF saves, we load; --layers of them), the same
conversations (the built-in chat data, train/data_chat_corpus.py), the same batch: --batch packed
sequences of at most --seq tokens per step. Loss on every token on both sides (TRL's assistant-only
loss needs a template with generation markers; masking changes no compute). Both AdamW, global-norm
clipping 1.0. Throughput counts real tokens (TRL's padding-free batches have no padding; our rows
are padded to --seq). Prints seconds per step, real tokens per second and the ratio ours / TRL
(> 1: we are faster); --rounds alternates the two, the ratio is that of the medians.

    .venv/bin/python bench/sft_step.py [--layers 2] [--batch 4] [--seq 256] [--steps 3] [--rounds 2]
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


def conversations(n: int, cache_dir: str) -> list[dict]:
    import json

    from train.data_chat_corpus import default_chat_sources

    with open(default_chat_sources(cache_dir)[0]) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def bench_trl(model_dir, tok_dir, rows, args) -> tuple[list[float], list[int]]:
    """(seconds per timed step, real tokens per timed step) of SFTTrainer.train()."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2ForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    config = SFTConfig(
        output_dir=None,
        report_to=[],
        use_cpu=True,
        # TRL's configs default to bf16=True (accelerate then runs the step under CPU bf16 autocast) and
        # gradient_checkpointing=True (the forward recomputed in the backward); ours is float32 with no remat
        bf16=False,
        gradient_checkpointing=False,
        packing=True,
        max_length=args.seq,
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        dataloader_drop_last=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tok_dir),
        callbacks=[Clock()],
    )
    print(
        f"TRL: mixed precision {trainer.accelerator.mixed_precision}, "
        f"gradient checkpointing {trainer.model.is_gradient_checkpointing}",
        flush=True,
    )
    collate = trainer.data_collator
    loader = trainer.get_train_dataloader()
    for i, batch in enumerate(loader):  # the real tokens of the batches it will train on, in order
        if i >= args.warmup + args.steps:
            break
        tokens.append(int(batch["input_ids"].numel()))
    del collate, loader
    trainer.train()
    return times[args.warmup :], tokens[args.warmup :]


def bench_ours(model_dir, rows_path, args) -> tuple[list[float], list[int], float]:
    import numpy as np

    import qwen2_jax
    from train.batches import global_batch
    from train.config import LossConfig, OptimizerConfig, load_config
    from train.model_setup import ModelSetup, batch_sharding, build_mesh, replicated
    from train.objective import Objective
    from train.optimizer import make_optimizer
    from train.sft_data import ChatCorpus
    from train.train_step import jit_train_step, make_train_step, new_state, state_shardings

    mesh = build_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})
    config, params = qwen2_jax.load_checkpoint(model_dir, dtype="float32", mesh=mesh)
    run = load_config(
        None,
        [
            "task=sft",
            f"seq_len={args.seq}",
            f"data.sources=[{rows_path}]",
            f"data.cache_dir={args.cache_dir}",
            "loss.assistant_only=false",
        ],
    )
    data = ChatCorpus(run, model_dir, config.vocab_size)
    it = data.train_iterator(global_batch_size=args.batch, seed=0, process_index=0, process_count=1)
    setup = ModelSetup(config, mesh, dtype="float32", param_dtype="float32")
    tx, schedule = make_optimizer(
        OptimizerConfig(learning_rate=1e-4, b2=0.95, weight_decay=0.1, clip_norm=1.0, schedule="constant"), 100
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
    batches = [global_batch(next(it), batch_sharding(mesh), args.batch) for _ in range(args.warmup + args.steps)]
    it.close()
    start = time.perf_counter()
    compiled = step_fn.lower(state["s"], batches[0]).compile()
    compile_s = time.perf_counter() - start
    times, tokens = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        state["s"], metrics = compiled(state["s"], batch)
        float(np.asarray(metrics["loss"]))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(int(np.sum(np.asarray(batch["segment_ids"]) > 0)))
    return times, tokens, compile_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--conversations", type=int, default=400)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side and round (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="TRL, ours alternations")
    ap.add_argument("--chunk", type=int, default=128, help="our loss chunk length (0 = unchunked)")
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
    rows = conversations(args.conversations, args.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(HFConfig(**shape)).float()
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        write_qwen2_tokenizer(tmp, eos_token=IM_END)
        rows_path = os.path.join(tmp, "chat.jsonl")
        with open(rows_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        gc.collect()
        print(
            f"model: Qwen2-0.5B shape, {args.layers} layers, {n_params / 1e6:.0f}M params, float32; "
            f"{len(rows)} conversations, {args.batch} packed sequences of <= {args.seq} tokens per step; "
            f"torch threads {torch.get_num_threads()}",
            flush=True,
        )
        results = {"TRL SFTTrainer": ([], []), "ours": ([], [])}
        for r in range(args.rounds):
            times, tokens = bench_trl(tmp, tmp, rows, args)
            gc.collect()
            results["TRL SFTTrainer"][0].extend(times)
            results["TRL SFTTrainer"][1].extend(tokens)
            print(f"round {r + 1} TRL:  step s {[round(t, 2) for t in times]}, real tokens {tokens}", flush=True)
            times, tokens, compile_s = bench_ours(tmp, rows_path, args)
            gc.collect()
            results["ours"][0].extend(times)
            results["ours"][1].extend(tokens)
            print(
                f"round {r + 1} ours: step s {[round(t, 2) for t in times]}, real tokens {tokens} "
                f"(compile {compile_s:.0f} s)",
                flush=True,
            )
    rates = {}
    print(f"{'':16}{'s/step':>8} {'real tokens/step':>17} {'tokens/s':>9}")
    for name, (times, tokens) in results.items():
        seconds, per_step = statistics.median(times), statistics.mean(tokens)
        rates[name] = per_step / seconds
        print(f"{name:16}{seconds:>8.2f} {per_step:>17.0f} {rates[name]:>9.1f}")
    print(f"ratio ours/TRL (real tokens/s): {rates['ours'] / rates['TRL SFTTrainer']:.2f}x")


if __name__ == "__main__":
    main()
