"""qwen2-serve: an OpenAI-compatible server with continuous batching for a Qwen2 checkpoint.

    qwen2-serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]
                [--max-batch-size 8] [--max-model-len N] [--max-prefill-chunk N] [--max-queue N]
                [--dtype ...] [--quantize int8] [--adapter PEFT_LORA_DIR] [--mesh tensor=4] [--api-key KEY]
                [--drain-timeout S] [--dual-chunk-attention CHUNK,LOCAL]

--adapter serves the checkpoint with a PEFT LoRA adapter merged into its weights at load (W + scale *
B @ A in float32, then --dtype / --quantize): requests then cost exactly what the base costs.
The port answers at once (GET /health: 503) while the checkpoint loads and every program compiles;
then one line `qwen2-serve: ready on http://HOST:PORT (...)` on stderr, and /health answers 200.
SIGTERM drains (see serve/server.py) and exits 0. Bad flags, a missing checkpoint or a mesh the
devices cannot hold: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

from qwen2_jax.checkpoint import require_checkpoint_dir
from qwen2_jax.cli_support import (
    ArgumentParser,
    UsageError,
    add_dual_chunk_flag,
    parse_dual_chunk,
    run_cli,
    with_dual_chunk,
)
from qwen2_jax.config import Qwen2Config
from qwen2_jax.sharding import MESH_AXES

PROG = "qwen2-serve"
API_KEY_ENV = "QWEN2_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Serve a Qwen2 checkpoint with an OpenAI-compatible HTTP API.")
    p.add_argument("--checkpoint", required=True, help="HF directory (config.json + safetensors) or Orbax checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: the directory's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="decode slots: requests generating at once")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="prompt + output tokens per request (default: the context)"
    )
    p.add_argument("--max-prefill-chunk", type=int, default=512, help="longest prompt piece between decode steps")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="convert weights on load")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 weights, one scale per output channel")
    p.add_argument(
        "--adapter",
        default=None,
        help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), merged into the "
        "weights at load",
    )
    p.add_argument("--mesh", default=None, help="device mesh, e.g. tensor=4 or data=1,tensor=2 (default: one device)")
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds to let requests finish")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20, help="largest request body (default: 16 MiB)")
    add_dual_chunk_flag(p)
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning")
    return p


# `sequence` splits training rows across devices (context parallelism); decoding one token per step has
# no sequence to split, so the server takes the other axes only.
SERVE_MESH_AXES = tuple(axis for axis in MESH_AXES if axis != "sequence")


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """`tensor=4,data=2` -> {"tensor": 4, "data": 2}; None for no mesh."""
    if text is None:
        return None
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in SERVE_MESH_AXES:
            axes = ", ".join(SERVE_MESH_AXES)
            raise UsageError(f"--mesh takes AXIS=SIZE pairs with AXIS in {axes}; got {text!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UsageError(f"--mesh {name} must be an integer, got {value!r}") from None
    return sizes


def check_args(args) -> None:
    for name, low in (("port", 0), ("max_batch_size", 1), ("max_prefill_chunk", 1), ("max_queue", 0)):
        value = getattr(args, name)
        if value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.port > 65535:
        raise UsageError(f"--port must be <= 65535, got {args.port}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UsageError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if not args.drain_timeout >= 0:
        raise UsageError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.max_request_bytes < 1:
        raise UsageError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")


def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class _Loader:
    """Everything slow, in order: the mesh, the checkpoint, the engine and its programs. Fast checks
    (`prepare`) run before the port opens, so a bad flag exits 2 without a server ever answering."""

    def __init__(self, args):
        self.args = args
        self.name = args.served_model_name or _default_name(args.checkpoint)
        self.dual_chunk = parse_dual_chunk(args.dual_chunk_attention)
        try:
            require_checkpoint_dir(args.checkpoint, config_hint=" (not an HF or Orbax checkpoint)")
            self.config = with_dual_chunk(Qwen2Config.from_hf(args.checkpoint), self.dual_chunk)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
        context = self.config.context_length  # None: no limit (dual chunk attention)
        if args.max_model_len is not None and context is not None and args.max_model_len > context:
            raise UsageError(f"--max-model-len {args.max_model_len} is more than the model's context of {context}")
        self.mesh = self._mesh()
        if args.adapter is not None:  # checked before the port opens: a bad adapter exits 2 at once
            from qwen2_jax.peft_adapter import load_peft_adapter

            try:
                load_peft_adapter(args.adapter, self.config)
            except ValueError as e:  # AdapterError
                raise UsageError(str(e)) from None
        from serve.served_model import load_tokenizer_if_any

        try:
            self.tokenizer = load_tokenizer_if_any(args.checkpoint)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load the tokenizer: {e}") from None
        if self.tokenizer is None:
            _log(f"{args.checkpoint} has no tokenizer.json: only token-id prompts will be served")
        from serve.served_model import served_model

        try:  # max_model_len is the engine's to decide: set once it is built
            self.model = served_model(
                args.checkpoint, self.config, name=self.name, max_model_len=0, tokenizer=self.tokenizer
            )
        except ValueError as e:  # a generation_config.json that cannot be used
            raise UsageError(str(e)) from None

    def _mesh(self):
        sizes = parse_mesh(self.args.mesh)
        if sizes is None:
            return None
        from qwen2_jax.sharding import ShardingError, make_mesh

        try:
            return make_mesh(**sizes)
        except ShardingError as e:
            raise UsageError(f"--mesh {self.args.mesh}: {e}") from None

    def load(self):
        """(ServedModel, started Scheduler): runs on a thread while the port answers 503."""
        from qwen2_jax.checkpoint import load_checkpoint
        from serve.engine import Engine
        from serve.scheduler import Scheduler

        args = self.args
        start = time.perf_counter()
        _log(f"loading {args.checkpoint}")
        try:
            config, params = load_checkpoint(
                args.checkpoint, dtype=args.dtype, quantize=args.quantize, mesh=self.mesh, adapter=args.adapter
            )
            config = with_dual_chunk(config, self.dual_chunk)
            engine = Engine(
                config,
                params,
                max_batch_size=args.max_batch_size,
                max_model_len=args.max_model_len,
                max_prefill_chunk=args.max_prefill_chunk,
                quantize=args.quantize,
                consume=True,
            )
        except (FileNotFoundError, ValueError) as e:  # CheckpointError, ConfigError, the engine's limits
            raise UsageError(str(e)) from None
        del params
        _log(f"loaded in {time.perf_counter() - start:.1f} s; compiling")
        scheduler = Scheduler(engine, max_queue=args.max_queue)
        scheduler.start(progress=lambda line: _log(f"compiling {line}"))
        model = dataclasses.replace(self.model, max_model_len=engine.max_model_len)
        _log(f"warm after {time.perf_counter() - start:.1f} s")
        return model, scheduler


def _default_name(checkpoint: str) -> str:
    from serve.served_model import default_model_name

    return default_model_name(checkpoint)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None  # an empty key is no key
    loader = _Loader(args)

    from serve import server
    from serve.app import AppState, create_app
    from serve.metrics import ServeMetrics

    try:
        sock = server.bind(args.host, args.port)
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    state = AppState(
        model_name=loader.name,
        metrics=ServeMetrics(loader.name),
        api_key=api_key,
        max_request_bytes=args.max_request_bytes,
    )
    url_host = f"[{host}]" if ":" in host else host
    _log(f"listening on http://{url_host}:{port} (GET /health answers 503 until the model is ready)")

    def on_ready() -> None:
        model = state.model
        _log(
            f"ready on http://{url_host}:{port} (model {model.name}, {args.max_batch_size} slots, "
            f"max_model_len {model.max_model_len})"
        )

    finished = asyncio.run(
        server.serve(
            create_app(state),
            state,
            sock,
            load=loader.load,
            on_ready=on_ready,
            drain_timeout=args.drain_timeout,
            log=_log,
            log_level=args.log_level,
        )
    )
    _log("stopped")
    if not finished:  # stopped while loading: the loading thread is inside XLA, do not wait for it
        sys.stderr.flush()
        os._exit(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
