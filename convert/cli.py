"""qwen2-convert: HF safetensors <-> Orbax.

    qwen2-convert hf-to-orbax SRC_HF_DIR DST_DIR [--dtype bfloat16|float16|float32]
    qwen2-convert orbax-to-hf SRC_DIR DST_HF_DIR [--dtype ...] [--max-shard-size 5GB]
    common: [--overwrite] [--quiet] [--verify]

Exit codes: 0 success; 2 bad input or usage (one line on stderr, nothing created); 1 anything else
(including --verify over tolerance). The result is written under a hidden temporary name beside DST
and renamed into place at the end, so a killed conversion never leaves a DST that looks complete,
and rerunning the command cleans the leftover and starts again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from qwen2_jax.orbax_checkpoint import DTYPES

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command line or destination: exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message over several lines; we want one
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qwen2-convert", description="Convert Qwen2 checkpoints: HF safetensors <-> Orbax.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, helptext in (("hf-to-orbax", "HF directory (config.json + *.safetensors) -> Orbax checkpoint"),
                           ("orbax-to-hf", "Orbax checkpoint (converted or training) -> HF directory")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--dtype", help=f"convert parameters to {'|'.join(DTYPES)} (round to nearest even); "
                                       "default: keep the stored dtype")
        if name == "orbax-to-hf":
            p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--verify", action="store_true",
                       help="compare logits of both checkpoints (needs torch + transformers)")
    return parser


def main(argv=None) -> int:
    from qwen2_jax.config import ConfigError
    from qwen2_jax.safetensors_io import CheckpointError

    try:
        args = build_parser().parse_args(argv)
        _check_args(args)
        return _run(args)
    except (UsageError, CheckpointError, ConfigError, FileNotFoundError) as e:
        _error(e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as e:  # one line, no traceback, unless asked
        if os.environ.get("QWEN2_CONVERT_DEBUG"):
            raise
        _error(f"{type(e).__name__}: {e}")
        return EXIT_FAILURE


def _error(message) -> None:
    text = " ".join(str(message).split("\n")).strip() or type(message).__name__
    sys.stderr.write(f"qwen2-convert: error: {text}\n")
    sys.stderr.flush()


def _check_args(args) -> None:
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"invalid --dtype {args.dtype!r} (choose from {', '.join(DTYPES)})")
    if getattr(args, "max_shard_size", None) is not None:
        from convert.orbax_to_hf import parse_size

        try:
            args.max_shard_bytes = parse_size(args.max_shard_size)
        except ValueError as e:
            raise UsageError(f"--max-shard-size: {e}") from None
    src, dst = os.path.abspath(args.src), os.path.abspath(args.dst)
    if not os.path.exists(src):
        raise FileNotFoundError(f"source not found: {args.src}")
    if src == dst or dst.startswith(src + os.sep):
        raise UsageError(f"destination {args.dst} must not be the source or inside it")
    if os.path.exists(dst) or os.path.islink(dst):
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise UsageError(f"destination exists and is not a directory: {args.dst}")
        if os.listdir(dst) and not args.overwrite:
            raise UsageError(f"destination exists and is not empty: {args.dst} (pass --overwrite to replace it)")


def temp_path(dst: str, kind: str = "tmp") -> str:
    dst = os.path.abspath(dst)
    return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.qwen2-convert-{kind}")


def _return_freed_memory() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap, returned to the OS on
    free. By default the threshold rises to 32 MiB after the first large free, and tensor-sized
    buffers then come from the heap, whose fragmentation grows RSS with every layer converted."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _quiet_logs() -> None:
    import logging

    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    for name in ("jax", "orbax", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _run(args) -> int:
    _return_freed_memory()
    _quiet_logs()
    from convert import hf_to_orbax, orbax_to_hf
    from convert.orbax_stream import fsync_tree
    from convert.progress import Progress

    to_orbax = args.command == "hf-to-orbax"
    # Validation first: every bad-input error is raised before anything is created.
    plan = (hf_to_orbax.SourcePlan if to_orbax else orbax_to_hf.CheckpointPlan)(args.src, args.dtype)
    dst = os.path.abspath(args.dst)
    tmp = temp_path(dst)
    created = _first_missing(os.path.dirname(dst))
    try:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)  # left by a killed run
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        progress = Progress(len(plan.table), plan.total_bytes, args.command, enabled=not args.quiet)
        if to_orbax:
            hf_to_orbax.convert(plan, tmp, progress)
        else:
            orbax_to_hf.convert(plan, tmp, args.max_shard_bytes, progress)
        progress.close()
        fsync_tree(tmp)  # the data is durable before the rename makes it visible
        _commit(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(os.path.dirname(dst), created)
        raise
    finally:
        plan.close()
    if args.verify:
        return _verify(args.src, dst, to_orbax)
    return EXIT_OK


def _first_missing(path: str) -> str | None:
    """The highest ancestor of `path` (itself included) that does not exist yet."""
    missing = None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _remove_created(path: str, created: str | None) -> None:
    """Remove the (empty) parent directories this run created, up to `created`."""
    while created is not None:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == created:
            return
        path = os.path.dirname(path)


def _commit(tmp: str, dst: str) -> None:
    """Rename the finished tree into place. An existing DST (--overwrite) is first renamed aside,
    then deleted, so at no moment does a partial tree sit at DST."""
    if os.path.isdir(dst) and not os.path.islink(dst) and not os.listdir(dst):
        os.rmdir(dst)
    old = temp_path(dst, "old")
    if os.path.lexists(old):
        shutil.rmtree(old)  # left by a run killed between the two renames below
    if os.path.lexists(dst):
        os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _verify(src: str, dst: str, to_orbax: bool) -> int:
    from convert.verify import compare

    hf_dir, orbax_dir = (src, dst) if to_orbax else (dst, src)
    result = compare(hf_dir, orbax_dir)
    if result is None:
        print("verify: skipped (torch and transformers are not importable)", file=sys.stderr)
        return EXIT_OK
    rel, tol, what = result
    ok = rel <= tol
    print(f"verify: max relative logit difference {rel:.3e} ({what}, tolerance {tol:.0e}): "
          f"{'ok' if ok else 'FAILED'}")
    return EXIT_OK if ok else EXIT_FAILURE
