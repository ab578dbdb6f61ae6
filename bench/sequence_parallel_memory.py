"""Per-device memory of a long-context training step as the mesh's sequence axis grows.

Compiles the recipe's real training step ahead of time for the target (`qwen2-train --dry-run`'s
`plan`: nothing is allocated) once per sequence size S, with the other 8 / S devices on fsdp and one
sequence per fsdp rank in each micro-batch (batch_size rows in S micro-batches of 8 / S rows): every
device then holds seq_len / S tokens of one sequence, and the optimizer step is the same for every S.
Prints one table row per S: the tokens each device holds, parameters + optimizer state (the same
for every S: sharded over fsdp x sequence), the compiler's temporaries (activations, gradients,
workspace) and the peak.

    PYTHONPATH=. .venv/bin/python bench/sequence_parallel_memory.py \\
        [--config configs/train/qwen2-7b-32k-8xh100.yaml] [--topology h100:1x8] [--sequence 1 2 4 8] [--seq-len N]

h100/h200 topologies need the aot-gpu extra (pip install -e '.[aot-gpu]'); cpu:8 runs anywhere
(approximate: XLA:CPU's memory figures).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "train", "qwen2-7b-32k-8xh100.yaml"))
    parser.add_argument("--topology", default="h100:1x8")
    parser.add_argument("--sequence", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seq-len", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--set", action="append", default=[], help="more key=value overrides of the recipe")
    args = parser.parse_args(argv)

    from train.topology import prepare_host

    prepare_host(args.topology)  # before anything starts JAX's backends

    from train.config import load_config
    from train.dry_run import plan
    from train.topology import GiB, resolve

    target = resolve(args.topology)
    devices = len(target.devices)
    print(f"{args.config} on {target.name} ({target.description}); usable {_gib(target.usable_bytes, GiB)} per device")
    columns = [("sequence", 8), ("mesh", 18), ("tokens/device", 13), ("params+opt", 11)]
    columns += [("temporaries", 12), ("peak", 10)]
    print(" ".join(f"{name:>{width}}" for name, width in columns) + " fits")
    for s in args.sequence:
        if devices % s:
            print(f"{s:>8} (does not divide {devices} devices)")
            continue
        fsdp = devices // s
        overrides = [
            f"mesh.sequence={s}",
            f"mesh.fsdp={fsdp}",
            "mesh.data=1",
            "mesh.tensor=1",
            "mesh.expert=1",
            f"batch_size={devices}",
            f"grad_accum_steps={s}",
            *([f"seq_len={args.seq_len}"] if args.seq_len else []),
            *args.set,
        ]
        config = load_config(args.config, overrides)
        r = plan(config, target, config_path=args.config)
        d = r["per_device"]
        tokens = config.micro_batch_size * config.seq_len // devices
        state = d["parameters"] + d["optimizer_state"]
        fits = {True: "yes", False: "NO", None: "?"}[r["fits"]]
        peak = d.get("peak", r.get("per_device_required"))
        print(
            f"{s:>8} {f'fsdp={fsdp} x sequence={s}':>18} {tokens:>13,} {_gib(state, GiB):>11} "
            f"{_gib(d.get('temporaries'), GiB):>12} {_gib(peak, GiB):>10} {fits}",
            flush=True,
        )
    return 0


def _gib(b, unit) -> str:
    return "-" if b is None else f"{b / unit:.2f} GiB"


if __name__ == "__main__":
    sys.exit(main())
