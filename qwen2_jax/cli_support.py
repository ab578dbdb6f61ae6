"""What both console scripts (qwen2-generate, qwen2-convert) share: usage errors and exit codes.

Exit codes: 0 success; 2 bad input or usage, reported as one line `PROG: error: MESSAGE` on stderr
with no traceback; 1 anything else (also one line; set QWEN2_JAX_DEBUG=1 to get the traceback);
130 interrupted (Ctrl-C). Bad input is a `UsageError`, a `FileNotFoundError`, or a `ConfigError` /
`CheckpointError` (a config.json or checkpoint that cannot be used).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from qwen2_jax.config import ConfigError
from qwen2_jax.safetensors_io import CheckpointError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "QWEN2_JAX_DEBUG"


class UsageError(Exception):
    """A bad command line or input the user can fix: exit 2 with the message on one line."""


USER_ERRORS: tuple[type[BaseException], ...] = (UsageError, FileNotFoundError, ConfigError, CheckpointError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UsageError (one line) instead of printing the whole
    usage and exiting. Pass it as `parser_class` to `add_subparsers` too."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def one_line(message: Any) -> str:
    """`message` as a single line: newlines become spaces; an empty message becomes its type's name."""
    return " ".join(str(message).split("\n")).strip() or type(message).__name__


def report_error(prog: str, message: Any) -> None:
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
    sys.stderr.flush()


def _silence_stdout() -> None:
    # After a closed pipe (`... | head`), Python's final flush of stdout would raise again and print
    # a traceback at exit; pointing stdout at /dev/null makes that flush a no-op.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def run_cli(prog: str, main_fn: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """`main_fn(*args, **kwargs)`'s exit code, with every exception turned into its exit code and
    one line on stderr (see the module docstring). SystemExit (argparse's --help) passes through."""
    try:
        return main_fn(*args, **kwargs)
    except USER_ERRORS as e:
        report_error(prog, e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        report_error(prog, "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_FAILURE
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        report_error(prog, f"{type(e).__name__}: {e}")
        return EXIT_FAILURE


DUAL_CHUNK_FLAG = "--dual-chunk-attention"


def add_dual_chunk_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        DUAL_CHUNK_FLAG,
        metavar="CHUNK,LOCAL",
        default=None,
        help="Dual Chunk Attention for prompts past the trained context: chunks of CHUNK - LOCAL tokens, "
        "position indices below CHUNK (e.g. the trained context, and LOCAL an eighth of it); overrides "
        "config.json's dual_chunk_attention_config",
    )


def parse_dual_chunk(text: str | None) -> tuple[int, int] | None:
    """`--dual-chunk-attention CHUNK,LOCAL` as (chunk_size, local_size); None when not given."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        chunk, local = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        chunk = local = None
    if chunk is None or not 0 <= local < chunk:
        raise UsageError(f"{DUAL_CHUNK_FLAG} takes CHUNK,LOCAL: two integers with 0 <= LOCAL < CHUNK, got {text!r}")
    return chunk, local


def with_dual_chunk(config, chunk_local: tuple[int, int] | None):
    """config with Dual Chunk Attention at (chunk_size, local_size), keeping config.json's
    original_max_position_embeddings; config itself when the flag was not given. A config that
    cannot take DCA (sliding windows, dynamic RoPE) raises ConfigError."""
    if chunk_local is None:
        return config
    from qwen2_jax.hf_config import DualChunkSettings

    previous = config.dual_chunk_attention
    original = previous.original_max_position_embeddings if previous is not None else 0
    return config.replace(dual_chunk_attention=DualChunkSettings(*chunk_local, original))
