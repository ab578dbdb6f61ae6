"""qwen2-convert: HF safetensors <-> Orbax.

    qwen2-convert hf-to-orbax SRC_HF_DIR DST_DIR [--dtype bfloat16|float16|float32]
    qwen2-convert orbax-to-hf SRC_DIR DST_HF_DIR [--dtype ...] [--max-shard-size 5GB]
    qwen2-convert merge-lora BASE_DIR ADAPTER_DIR DST_DIR [--to hf|orbax] [--dtype ...] [--max-shard-size 5GB]
    common: [--overwrite] [--quiet] [--verify] (--verify: not merge-lora)

merge-lora folds a PEFT LoRA adapter into a base checkpoint (HF directory or Orbax) as peft's
merge_and_unload would, and writes an HF directory (default) or an Orbax checkpoint (--to orbax).

Exit codes: 0 success; 2 bad input or usage (one line on stderr, nothing created); 1 anything else
(including --verify over tolerance). The result is written under a hidden temporary name beside DST
and renamed into place at the end, so a killed conversion never leaves a DST that looks complete,
and rerunning the command cleans the leftover and starts again.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys

from convert import hf_to_orbax, merge_lora, orbax_to_hf
from convert.progress import Progress
from convert.verify import compare
from qwen2_jax import atomic
from qwen2_jax.cli_support import EXIT_FAILURE, EXIT_OK, ArgumentParser, UsageError, run_cli
from qwen2_jax.dtypes import PARAM_DTYPE_NAMES

try:
    from absl import logging as absl_logging
except ImportError:  # absl comes with orbax-checkpoint; without it there is no absl log to quiet
    absl_logging = None

PROG = "qwen2-convert"
TEMP_TAG = "qwen2-convert"  # DST is built in .DST.qwen2-convert-tmp (see qwen2_jax.atomic.directory)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Convert Qwen2 checkpoints: HF safetensors <-> Orbax.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name, helptext in (
        ("hf-to-orbax", "HF directory (config.json + *.safetensors) -> Orbax checkpoint"),
        ("orbax-to-hf", "Orbax checkpoint (converted or training) -> HF directory"),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument(
            "--dtype",
            help=f"convert parameters to {'|'.join(PARAM_DTYPE_NAMES)} (round to nearest even); "
            "default: keep the stored dtype",
        )
        if name == "orbax-to-hf":
            p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
        _common_args(p)
        p.add_argument(
            "--verify", action="store_true", help="compare logits of both checkpoints (needs torch + transformers)"
        )
    helptext = "base checkpoint (HF or Orbax) + PEFT LoRA adapter directory -> merged checkpoint"
    p = sub.add_parser("merge-lora", help=helptext, description=helptext)
    p.add_argument("src", metavar="base")
    p.add_argument("adapter")
    p.add_argument("dst")
    p.add_argument("--to", choices=["hf", "orbax"], default="hf", help="the merged checkpoint's format (default hf)")
    p.add_argument("--dtype", help=f"merged dtype {'|'.join(PARAM_DTYPE_NAMES)}; default: the base's")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    _common_args(p)
    p.set_defaults(verify=False)
    return parser


def _common_args(p) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    return _run(args)


def _check_args(args) -> None:
    if args.dtype is not None and args.dtype not in PARAM_DTYPE_NAMES:
        raise UsageError(f"invalid --dtype {args.dtype!r} (choose from {', '.join(PARAM_DTYPE_NAMES)})")
    if getattr(args, "max_shard_size", None) is not None:
        try:
            args.max_shard_bytes = orbax_to_hf.parse_size(args.max_shard_size)
        except ValueError as e:
            raise UsageError(f"--max-shard-size: {e}") from None
    src, dst = os.path.abspath(args.src), os.path.abspath(args.dst)
    if not os.path.exists(src):
        raise FileNotFoundError(f"source not found: {args.src}")
    for given in (args.src, getattr(args, "adapter", None)):
        inside = given is not None and os.path.abspath(given)
        if inside and (inside == dst or dst.startswith(inside + os.sep)):
            raise UsageError(f"destination {args.dst} must not be {given} or inside it")
    if os.path.exists(dst) or os.path.islink(dst):
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise UsageError(f"destination exists and is not a directory: {args.dst}")
        if os.listdir(dst) and not args.overwrite:
            raise UsageError(f"destination exists and is not empty: {args.dst} (pass --overwrite to replace it)")


def _return_freed_memory() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap, returned to the OS on
    free. By default the threshold rises to 32 MiB after the first large free, and tensor-sized
    buffers then come from the heap, whose fragmentation grows RSS with every layer converted."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 is M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _quiet_logs() -> None:
    if absl_logging is not None:
        absl_logging.set_verbosity(absl_logging.ERROR)
    for name in ("jax", "orbax", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _run(args) -> int:
    _return_freed_memory()
    _quiet_logs()
    to_orbax = args.command == "hf-to-orbax" or getattr(args, "to", None) == "orbax"
    # Validation first: every bad-input error is raised before anything is created.
    if args.command == "merge-lora":
        plan = merge_lora.MergePlan(args.src, args.adapter, args.dtype)
    else:
        plan = (hf_to_orbax.SourcePlan if to_orbax else orbax_to_hf.CheckpointPlan)(args.src, args.dtype)
    try:
        with atomic.directory(args.dst, TEMP_TAG) as tmp:
            progress = Progress(len(plan.table), plan.total_bytes, args.command, enabled=not args.quiet)
            try:
                if to_orbax:
                    hf_to_orbax.convert(plan, tmp, progress)
                else:
                    orbax_to_hf.convert(plan, tmp, args.max_shard_bytes, progress)
            finally:
                progress.close()  # ends the bar's line, so an error message starts on its own line
    finally:
        plan.close()
    if args.verify:
        return _verify(args.src, os.path.abspath(args.dst), to_orbax)
    return EXIT_OK


def _verify(src: str, dst: str, to_orbax: bool) -> int:
    hf_dir, orbax_dir = (src, dst) if to_orbax else (dst, src)
    result = compare(hf_dir, orbax_dir)
    if result is None:
        print("verify: skipped (torch and transformers are not importable)", file=sys.stderr)
        return EXIT_OK
    rel, tol, what = result
    ok = rel <= tol
    print(f"verify: max relative logit difference {rel:.3e} ({what}, tolerance {tol:.0e}): {'ok' if ok else 'FAILED'}")
    return EXIT_OK if ok else EXIT_FAILURE
