"""`qwen2-train --dry-run`: compile the run's real training step for the target hardware from abstract
inputs (nothing is allocated) and hold its per-device memory against the device's.

The step is the one training runs: `build_run` (the recipe's mesh, remat, micro-batches, optimizer)
over the target's devices, traced as on the target's platform (`qwen2_jax.backend.compiling_for`, so
the model picks the TPU / GPU kernels), lowered from `jax.ShapeDtypeStruct`s carrying the run's
shardings and compiled by the target's own compiler (libtpu, XLA:GPU) on this machine. On TPU the
compiler itself refuses a program that does not fit in HBM; on GPU it only warns, so the peak
(arguments + outputs - aliased + temporaries) is compared with the memory JAX's allocator takes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Any

import jax

from qwen2_jax.backend import compiling_for
from qwen2_jax.cli_support import EXIT_FAILURE, EXIT_OK
from train import model_setup as ms
from train.config import TrainConfig
from train.memory import bytes_per_device, memory_report
from train.metrics import peak_flops_per_device
from train.topology import GiB, Target, resolve


def attached_target() -> Target:
    """This job's own devices (no --topology): the platform it runs on, the memory it reports."""
    devices = jax.devices()
    limit = None
    try:
        limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # CPU backends report none
        pass
    platform = jax.default_backend()
    return Target(
        "attached",
        platform,
        list(devices),
        f"this job's {len(devices)} {devices[0].device_kind} device{'s' * (len(devices) > 1)}",
        limit,
        limit,
        "the allocator's limit" if limit else "",
        compiler_checks_memory=platform == "tpu",
    )


def plan(
    config: TrainConfig,
    target: Target,
    *,
    tokens_per_second: float | None = None,
    config_path: str | None = None,
) -> dict[str, Any]:
    """Compile the training step for `target` and return the report (see `format_report`)."""
    from train.loop import build_run

    with compiling_for(target.platform):
        run = build_run(config, devices=target.devices)
        state, batch = run.abstract_state(), run.abstract_batch()
        n_devices = len(target.devices)
        n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(state.params))
        report: dict[str, Any] = {
            "config": config_path,
            "topology": target.name,
            "target": target.description,
            "platform": target.platform,
            "device_kind": target.device_kind,
            "devices": n_devices,
            "processes": target.processes,
            "approximate": target.approximate,
            "model": config.model,
            "parameters": n_params,
            "mesh": dict(run.mesh.shape),
            "batch_size": config.batch_size,
            "grad_accum_steps": config.grad_accum_steps,
            "seq_len": config.seq_len,
            "remat": config.remat,
            "dtype": config.dtype,
            "param_dtype": config.param_dtype,
            "per_device": {
                "parameters": bytes_per_device(state.params),
                "optimizer_state": bytes_per_device(state.opt_state),
                "frozen": bytes_per_device(state.frozen),  # a LoRA run's base (its parameters are the adapters)
                "batch": bytes_per_device(batch),
            },
            "device_memory": target.memory_bytes,
            "usable_memory": target.usable_bytes,
            "usable_note": target.usable_note,
        }
        report.update(_flops(config, run.setup.config, n_devices, target.peak_flops, tokens_per_second))
        start = time.perf_counter()
        try:
            compiled = run.compile_train_step()
        except Exception as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            report["compile_seconds"] = time.perf_counter() - start
            report.update(_refused(str(e), target))
            return report
    report["compile_seconds"] = time.perf_counter() - start
    m = memory_report(compiled)
    report["per_device"].update(
        {
            "arguments": m["argument_bytes"],
            "outputs": m["output_bytes"],
            "aliased": m["alias_bytes"],
            "temporaries": m["temp_bytes"],
            "generated_code": m["generated_code_bytes"],
            "host_temporaries": m["host_temp_bytes"],
            "peak": m["total_bytes"],
        }
    )
    peak = m["total_bytes"]
    if target.usable_bytes is not None:
        report["headroom"] = target.usable_bytes - peak
        report["fits"] = peak <= target.usable_bytes
    else:
        report["headroom"] = None
        report["fits"] = None  # nothing to compare with (CPU)
    return report


def _flops(model_config, cfg_model, n_devices: int, peak: float | None, tokens_per_second: float | None):
    per_token = ms.flops_per_token(cfg_model, model_config.seq_len)
    tokens = model_config.batch_size * model_config.seq_len
    out = {
        "flops_per_token": per_token,
        "flops_per_step": per_token * tokens,
        "flops_per_step_per_device": per_token * tokens / n_devices,
        "peak_flops_per_device": peak,
        "tokens_per_second_at_full_mfu": peak * n_devices / per_token if peak else None,
        "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * per_token / (peak * n_devices) if peak and tokens_per_second else None,
    }
    return out


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _refused(message: str, target: Target) -> dict[str, Any]:
    """The TPU compiler's RESOURCE_EXHAUSTED: the figures it gives (needed, available)."""
    line = next((s.strip() for s in message.splitlines() if "RESOURCE_EXHAUSTED" in s), message.strip())
    out: dict[str, Any] = {"fits": False, "compiler_message": line}
    need = re.search(r"required for [^(]*\(" + _SIZE + r"\)", line) or re.search(r"Used " + _SIZE + " of", line)
    have = re.search(r"available HBM \(" + _SIZE + r"\)", line) or re.search(r"of " + _SIZE + " hbm", line)
    if need:
        out["per_device_required"] = int(float(need.group(1)) * _UNITS[need.group(2)])
    if have:
        out["compiler_hbm"] = int(float(have.group(1)) * _UNITS[have.group(2)])
    if need and target.usable_bytes is not None:
        out["headroom"] = target.usable_bytes - out["per_device_required"]
    return out


# ------------------------------------------------------------------------------------------ output
def _gib(b) -> str:
    return "-" if b is None else f"{b / GiB:,.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
    d = r["per_device"]
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    accum = f" in {r['grad_accum_steps']} micro-batches" if r["grad_accum_steps"] > 1 else ""
    lines = [
        f"qwen2-train --dry-run: {r['config'] or 'config'} on {r['topology']}"
        + ("  [APPROXIMATE: fake CPU devices]" if r["approximate"] else ""),
        f"  target      {r['target']}",
        f"  model       {r['model']}, {r['parameters'] / 1e9:.2f}B parameters ({r['param_dtype']} master, "
        f"{r['dtype']} compute, remat {r['remat']})",
        f"  run         mesh {mesh}; batch {r['batch_size']} x {r['seq_len']} tokens{accum}",
        "per device",
        f"  parameters          {_gib(d['parameters']):>14}",
        f"  optimizer state     {_gib(d['optimizer_state']):>14}",
        *([f"  frozen base (LoRA)  {_gib(d['frozen']):>14}"] if d.get("frozen") else []),
        f"  batch               {_gib(d['batch']):>14}",
    ]
    if "peak" in d:
        lines += [
            f"  arguments           {_gib(d['arguments']):>14}   (compiler: the state and batch above, step, rng key)",
            f"  outputs - aliased   {_gib(d['outputs'] - d['aliased']):>14}   (the state is donated: updated in place)",
            f"  temporaries         {_gib(d['temporaries']):>14}   (activations, gradients, update, workspace)",
            f"  peak                {_gib(d['peak']):>14}   (arguments + outputs - aliased + temporaries)",
        ]
        if d.get("host_temporaries"):
            lines.append(f"  host temporaries    {_gib(d['host_temporaries']):>14}   (offloaded to host memory)")
    else:
        lines.append(
            f"  peak                {_gib(r.get('per_device_required')):>14}   (the TPU compiler's figure: it refused)"
        )
    if r["device_memory"] is not None:
        lines.append(f"  device memory       {_gib(r['device_memory']):>14}")
        if r["usable_memory"] != r["device_memory"] or r["usable_note"]:
            lines.append(f"  usable              {_gib(r['usable_memory']):>14}   ({r['usable_note']})")
        if r.get("headroom") is not None:
            share = r["headroom"] / r["usable_memory"] * 100
            lines.append(f"  headroom            {_gib(r['headroom']):>14}   ({share:.1f}% of usable)")
    if r.get("compiler_message"):
        lines.append(f"  compiler            {r['compiler_message']}")
    lines.append(
        f"FLOPs per step      {r['flops_per_step']:.3e} ({r['flops_per_token']:.3e} per token, model formula: "
        f"6 x active matmul params + attention); {r['flops_per_step_per_device']:.3e} per device"
    )
    if r["peak_flops_per_device"]:
        lines.append(
            f"MFU                 peak {r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s bf16 per device; 100% MFU = "
            f"{r['tokens_per_second_at_full_mfu']:,.0f} tokens/s"
            + (
                f"; {r['tokens_per_second']:,.0f} tokens/s = {r['mfu'] * 100:.1f}% MFU"
                if r.get("mfu") is not None
                else " (give --tokens-per-second for the MFU of a measured rate)"
            )
        )
    lines.append(f"compiled in {r['compile_seconds']:.1f} s")
    if r["fits"] is None:
        lines.append("fits: unknown (no device memory to compare with; give --device-memory GIB)")
    elif r["fits"]:
        lines.append("fits: yes" + (" (approximate)" if r["approximate"] else ""))
    else:
        lines.append("DOES NOT FIT" + (" (approximate)" if r["approximate"] else ""))
    return "\n".join(lines)


def exit_status(report: dict[str, Any]) -> int:
    return EXIT_FAILURE if report["fits"] is False else EXIT_OK


def run_dry_run(config: TrainConfig, args, config_path: str | None, out=print) -> int:
    if args.topology:
        target = resolve(args.topology, args.num_slices, args.device_memory)
    else:
        target = attached_target()
        if args.device_memory is not None:
            target = dataclasses.replace(
                target,
                memory_bytes=int(args.device_memory * GiB),
                usable_bytes=int(args.device_memory * GiB),
                usable_note="given by --device-memory",
            )
    report = plan(config, target, tokens_per_second=args.tokens_per_second, config_path=config_path)
    out(json.dumps(report, indent=1) if args.json else format_report(report))
    return exit_status(report)


__all__ = ["plan", "format_report", "exit_status", "run_dry_run", "attached_target", "peak_flops_per_device"]
