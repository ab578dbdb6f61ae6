"""Helpers for the qwen2-serve tests: a tiny random checkpoint with the real Qwen2 tokenizer, a free
port, and a `qwen2-serve` subprocess started and stopped as a user would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from xla_env import xla_flags

REPO = Path(__file__).resolve().parent.parent
EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>: an Instruct checkpoint's generation_config.json
# An Instruct-style generation_config.json: sampling defaults the server must apply when a request
# leaves them unset (repetition_penalty applies to greedy requests too).
GENERATION_CONFIG = {
    "do_sample": True,
    "eos_token_id": EOS_IDS,
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


def write_checkpoint(path: Path, seed: int = 0, max_position_embeddings: int = 256) -> Path:
    """A tiny random Qwen2 (every parameter random, the real 151,936-token vocabulary) saved by
    transformers, with the Qwen2 tokenizer and chat template and the generation_config.json above."""
    from hf_utils import hf_dense_config, make_hf_model
    from qwen2_jax.tokenizer_build import write_qwen2_tokenizer

    config = hf_dense_config(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=151645,
    )
    make_hf_model(config, seed=seed).save_pretrained(path)
    write_qwen2_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """The installed console script, as a user runs it (python -m serve when it is not installed)."""
    script = Path(sys.executable).parent / "qwen2-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "serve"]


class Server:
    """`qwen2-serve` on 127.0.0.1 and a free port. `start()` returns once it printed its ready line;
    `stop()` sends SIGTERM and returns the exit code. stderr is collected in `lines`."""

    def __init__(self, checkpoint, *args: str, devices: int = 1, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.argv = [*serve_command(), "--checkpoint", str(checkpoint), "--port", str(self.port), *args]
        self.env = {**os.environ, "XLA_FLAGS": xla_flags(devices), **(env or {})}
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout_s: float = 240.0, wait_ready: bool = True) -> Server:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_ready:
            self.wait_ready(timeout_s)
        return self

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "ready on http://" in line:
                self._ready.set()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"qwen2-serve did not become ready:\n{self.stderr()}")

    def wait_line(self, text: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} in:\n{self.stderr()}")

    def stderr(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 60.0) -> int:
        rc = self.proc.wait(timeout_s)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Server:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        try:
            if self.proc.poll() is None:
                self.stop()
        finally:
            self.kill()
