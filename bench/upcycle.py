"""MoE upcycling, end to end through qwen2-train: does the upcycled MoE start where the dense model left
off? Prints the step-0 loss (the loss of the starting params on the first batch, logged at step 1) of
  dense      the dense checkpoint itself (qwen2-train continuing from it, one step)
  upcycled   the 8-expert MoE of configs/train/tiny-upcycle-cpu.yaml upcycled from it (init.upcycle_from)
  scratch    the same MoE from a fresh init
on the same first batch, the ratios upcycled / dense (goal <= 1.05) and scratch / dense, and the losses
after --steps steps of the upcycled and scratch runs. MoE losses are the LM loss (the logged loss less
router_aux_loss_coef x aux_loss).

The dense model: --dense DIR (an HF or Orbax checkpoint of the demo's architecture, e.g.
`make demo DEMO_ARGS="--keep out/demo"` then --dense out/demo/run/checkpoints), or else trained here
with configs/train/demo.yaml for --dense-steps steps on the built-in corpus.

    .venv/bin/python bench/upcycle.py [--dense DIR] [--dense-steps 150] [--steps 50] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE_CONFIG = os.path.join(ROOT, "configs", "train", "tiny-upcycle-cpu.yaml")
DENSE_CONFIG = os.path.join(ROOT, "configs", "train", "demo.yaml")
AUX_COEF = 0.001  # router_aux_loss_coef of tiny-upcycle-cpu.yaml


def qwen2_train(config: str, output_dir: str, *sets: str) -> list[dict]:
    """Run qwen2-train; its metrics.jsonl records."""
    cmd = [sys.executable, "-m", "train", "--config", config, "--set", f"output_dir={output_dir}", "--set"]
    cmd += ["progress=false", "--set", "eval_every=0"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"upcycle bench: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    print(f"  {os.path.basename(output_dir)}: {time.perf_counter() - start:.0f}s", flush=True)
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def lm_loss(record: dict) -> float:
    return record["loss"] - AUX_COEF * record.get("aux_loss", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense", help="dense checkpoint directory (default: train one with demo.yaml)")
    parser.add_argument("--dense-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=50, help="training steps of the MoE runs")
    parser.add_argument("--work", help="directory for the runs (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="upcycle-bench-")
    os.makedirs(work, exist_ok=True)
    print(f"upcycle bench in {work}", flush=True)
    dense = args.dense
    if dense is None:
        dense_run = os.path.join(work, "dense-train")
        steps = args.dense_steps
        records = qwen2_train(DENSE_CONFIG, dense_run, f"total_steps={steps}", f"checkpoint_every={steps}")
        print(f"  dense training: loss {records[0]['loss']:.3f} at step 1, {records[-1]['loss']:.3f} at {steps}")
        dense = os.path.join(dense_run, "checkpoints")
    dense_0 = qwen2_train(
        MOE_CONFIG, os.path.join(work, "dense"), f"model={dense}", "model_overrides={}", "total_steps=1"
    )
    steps = f"total_steps={args.steps}"
    upcycled = qwen2_train(MOE_CONFIG, os.path.join(work, "upcycled"), f"init.upcycle_from={dense}", steps)
    scratch = qwen2_train(MOE_CONFIG, os.path.join(work, "scratch"), steps)

    d0, u0, s0 = dense_0[0]["loss"], lm_loss(upcycled[0]), lm_loss(scratch[0])
    print(f"\nstep-0 loss on the first batch: dense {d0:.4f}, upcycled {u0:.4f}, scratch {s0:.4f}")
    print(f"upcycled / dense = {u0 / d0:.4f} (goal <= 1.05), scratch / dense = {s0 / d0:.4f}")
    print(
        f"after {upcycled[-1]['step']} steps: upcycled {lm_loss(upcycled[-1]):.4f}, scratch {lm_loss(scratch[-1]):.4f}"
    )
    for label, rows in (("upcycled", upcycled), ("scratch", scratch)):
        marks = [r for r in rows if r["step"] in (1, 10, 20, 30, 40, 50) or r is rows[-1]]
        print(f"  {label:9s}" + "  ".join(f"{r['step']}:{lm_loss(r):.3f}" for r in marks))


if __name__ == "__main__":
    main()
