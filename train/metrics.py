"""Run metrics: `<output_dir>/metrics.jsonl` (one JSON object per logged step), TensorBoard event files
under `<output_dir>/tensorboard/`, and a one-line progress report per logged step on stdout.

Only process 0 writes. On resume both files are cut back to the restored step first, so a run that
was killed and restarted leaves the same records as an unbroken run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Peak dense bfloat16 matmul FLOP/s per device, by jax `device_kind` prefix, first match wins. MFU is
# reported against these (the usual convention) and left out on devices not listed, e.g. CPUs. The one
# table: training's MFU and `qwen2-train --dry-run`'s both read it. TPU device kinds as JAX reports them:
# v5p is "TPU v5" (one device per chip, megacore), v5e "TPU v5 lite", v6e "TPU v6 lite", v4 "TPU v4".
PEAK_FLOPS = (
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    for prefix, flops in PEAK_FLOPS:
        if device_kind.startswith(prefix):
            return flops
    return None


class MetricsLogger:
    def __init__(
        self, output_dir: str, *, total_steps: int, resume_step: int | None, enabled: bool = True, progress: bool = True
    ):
        self.enabled = enabled
        self.progress = progress and enabled
        self.total_steps = total_steps
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.writer = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        _truncate_jsonl(self.path, resume_step or 0)
        SummaryWriter = _summary_writer_class()
        # purge_step hides events a killed run wrote after the checkpoint it is resumed from
        self.writer = SummaryWriter(
            os.path.join(output_dir, TENSORBOARD_DIR), purge_step=(resume_step + 1) if resume_step else None
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key if key.startswith("eval_") else f"train/{key}", value, step)
        self.writer.flush()
        if self.progress:
            sys.stdout.write(progress_line(step, self.total_steps, record) + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch whenever it is
    installed, only to accept torch tensors as values; this logger writes Python floats, and the import
    costs every run 1-2 s of start-up (measured with `python -X importtime` on 2 cores). With torch
    already imported there is nothing to save and it is used as it is."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX's torch-free path
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]  # a later `import torch` finds the real package
    return SummaryWriter


def progress_line(step: int, total: int, record: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}", f"loss {record['loss']:.6f}"]
    if "aux_loss" in record:
        parts.append(f"aux {record['aux_loss']:.4f}")
    parts.append(f"lr {record['learning_rate']:.3e}")
    parts.append(f"grad_norm {record['grad_norm']:.3f}")
    parts.append(f"{record['tokens_per_second']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f} (ppl {record['eval_perplexity']:.2f})")
    return " | ".join(parts)


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss) if mean_loss < 700 else float("inf")


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Keep only records of steps <= last_step (all of them gone when starting from scratch)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", math.inf) <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                break  # a line cut short by a kill: drop it and everything after
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
