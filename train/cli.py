"""qwen2-train: pretrain or continue training a Qwen2 / Qwen2-MoE model.

    qwen2-train --config FILE [--set key=value ...] [--dry-run [--topology NAME [--num-slices N]]
                [--tokens-per-second R] [--device-memory GIB] [--json]]
                [--coordinator-address HOST:PORT --num-processes N --process-id I]
    qwen2-train prepare SRC... --out DIR [...]      tokenize a corpus ahead of time

Exit codes: 0 success (also after SIGTERM, which saves first); 2 bad input or usage (one line on
stderr, no traceback): unknown config key or wrong type, mesh that does not match the devices, batch
not divisible by the data axes, missing corpus or model, unknown topology or missing compiler plugin;
1 anything else, including a non-finite loss and a dry run whose step does not fit the device memory.
The device count comes from the platform (tests set fake CPU devices through XLA_FLAGS), never from here.
Several processes: the three flags on every process, or none on a Cloud TPU VM, under SLURM or Open MPI
(train/distributed.py); a failure on any process stops all of them with its message and exit code.
"""

from __future__ import annotations

import argparse
import sys

from qwen2_jax.cli_support import EXIT_OK, ArgumentParser, UsageError, run_cli

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
        help="compile the training step without allocating it and print its memory per device; "
        "exit 0 if it fits, 1 if not",
    )
    plan = parser.add_argument_group("ahead-of-time plan (with --dry-run)")
    plan.add_argument(
        "--topology",
        metavar="NAME",
        help="compile for this hardware instead of this job's devices: v5p-256, v5e-256, v6e-256, v4-128 "
        "(or v5p:4x4x8 ...; needs the aot-tpu extra), h100:HOSTSx8, h200:HOSTSx8 (aot-gpu extra), or cpu:N "
        "(fake CPU devices, approximate)",
    )
    plan.add_argument("--num-slices", type=int, default=1, metavar="N", help="TPU slices (multislice over DCN)")
    plan.add_argument(
        "--tokens-per-second", type=float, metavar="R", help="a measured global throughput: print its MFU"
    )
    plan.add_argument("--device-memory", type=float, metavar="GIB", help="compare with this much memory per device")
    plan.add_argument("--json", action="store_true", help="print the report as JSON")
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
    plan_flags = [
        flag
        for flag, given in (
            ("--topology", args.topology is not None),
            ("--num-slices", args.num_slices != 1),
            ("--tokens-per-second", args.tokens_per_second is not None),
            ("--device-memory", args.device_memory is not None),
            ("--json", args.json),
        )
        if given
    ]
    if plan_flags and not args.dry_run:
        raise UsageError(f"{', '.join(plan_flags)}: only with --dry-run")
    from train import distributed

    if args.topology is not None:
        if args.coordinator_address is not None or args.num_processes is not None or args.process_id is not None:
            raise UsageError("--topology plans the whole job from one process: drop the multi-process flags")
        from train.topology import prepare_host

        prepare_host(args.topology)  # before anything starts JAX's backends
    else:
        if not args.dry_run:
            from train.host_malloc import keep_freed_memory

            keep_freed_memory()  # before the backends start: each step's temporaries reuse freed memory
        distributed.start(args.coordinator_address, args.num_processes, args.process_id, prog=PROG)
    with distributed.failures_stop_all():
        from train.config import load_config

        config = load_config(args.config, args.overrides)
        if args.dry_run:
            return _dry_run(config, args)
        from train.loop import train
        from train.model_setup import resolve_model

        if not resolve_model(config.model, config.model_overrides).config.is_moe:
            distributed.start_local_gloo()  # the same sums as a multi-process run (train/distributed.py)

        train(config)
    return EXIT_OK


def _dry_run(config, args) -> int:
    """Compile the step from abstract inputs only, for this job's devices or --topology's, and report
    per-device memory against the device's (train/dry_run.py)."""
    from train.dry_run import run_dry_run

    return run_dry_run(config, args, config_path=args.config)


if __name__ == "__main__":
    sys.exit(main())
