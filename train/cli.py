"""qwen2-train: pretrain or continue training a Qwen2 / Qwen2-MoE model.

    qwen2-train --config FILE [--set key=value ...] [--dry-run]
                [--coordinator-address HOST:PORT --num-processes N --process-id I]
    qwen2-train prepare SRC... --out DIR [...]      tokenize a corpus ahead of time

Exit codes: 0 success (also after SIGTERM, which saves first); 2 bad input or usage (one line on
stderr, no traceback): unknown config key or wrong type, mesh that does not match the devices, batch
not divisible by the data axes, missing corpus or model; 1 anything else, including a non-finite loss.
The device count comes from the platform (tests set fake CPU devices through XLA_FLAGS), never from here.
Several processes: the three flags on every process, or none on a Cloud TPU VM, under SLURM or Open MPI
(train/distributed.py); a failure on any process stops all of them with its message and exit code.
"""

from __future__ import annotations

import argparse
import sys

from qwen2_jax.cli_support import EXIT_FAILURE, EXIT_OK, ArgumentParser, run_cli

PROG = "qwen2-train"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Train a Qwen2 / Qwen2-MoE model (see configs/train/).")
    parser.add_argument("--config", required=True, help="training recipe (YAML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, dotted for sections (mesh.data=4, optimizer.learning_rate=1e-3)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="compile the training step without allocating it and print its memory per device",
    )
    multi = parser.add_argument_group("multi-process (jax.distributed)")
    multi.add_argument("--coordinator-address", metavar="HOST:PORT")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prepare":
        from train.data import prepare_main

        return prepare_main(argv[1:])
    from train import distributed

    # with several processes, a failure ends this process at once (the others stop on its message)
    return distributed.exit_code(run_cli(PROG, _main, argv))


def _main(argv: list[str]) -> int:
    """Bad input raises a UsageError (config keys, mesh, batch, corpus), FileNotFoundError, ConfigError or
    CheckpointError: run_cli reports each as one line and exit 2; anything else (a non-finite loss
    included) as one line and exit 1."""
    args = build_parser().parse_args(argv)
    from train import distributed

    distributed.start(args.coordinator_address, args.num_processes, args.process_id, prog=PROG)
    with distributed.failures_stop_all():
        from train.config import load_config

        config = load_config(args.config, args.overrides)
        if args.dry_run:
            return _dry_run(config)
        from train.loop import train
        from train.model_setup import resolve_model

        if not resolve_model(config.model, config.model_overrides).config.is_moe:
            distributed.start_local_gloo()  # the same sums as a multi-process run (train/distributed.py)

        train(config)
    return EXIT_OK


def _dry_run(config) -> int:
    """Compile the step for this run's mesh from abstract inputs only and report per-device memory."""
    import jax

    from train.loop import build_run
    from train.memory import memory_report

    run = build_run(config)
    compiled = run.compile_train_step()
    report = memory_report(compiled)
    limit = _device_memory_limit(jax.devices()[0])
    lines = [f"{k}: {v / 2**30:.3f} GiB" for k, v in report.items()]
    if limit is not None:
        lines.append(f"device memory: {limit / 2**30:.3f} GiB")
    print("\n".join(lines))
    return EXIT_OK if limit is None or report["total_bytes"] <= limit else EXIT_FAILURE


def _device_memory_limit(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # CPU backends have none
        return None
    return (stats or {}).get("bytes_limit")


if __name__ == "__main__":
    sys.exit(main())
