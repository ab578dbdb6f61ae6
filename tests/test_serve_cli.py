"""qwen2-serve's command line: what is wrong before the server starts is one line on stderr and exit
status 2, without loading a model (the checkpoint here is a config.json alone)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from qwen2_jax.config import Qwen2Config
from serve import cli


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_cli") / "cfg"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(Qwen2Config(max_position_embeddings=512).to_hf()))
    return str(path)


def _fails(capsys, argv, text):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qwen2-serve: error: ") and text in last, err
    assert "Traceback" not in err


def test_missing_checkpoint(capsys, tmp_path):
    _fails(capsys, ["--checkpoint", str(tmp_path / "nowhere")], "not found")
    _fails(capsys, ["--checkpoint", str(tmp_path)], "no config.json")


@pytest.mark.parametrize(
    "flags, text",
    [
        (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
        (["--port", "70000"], "--port must be <= 65535"),
        (["--max-model-len", "4096"], "more than the model's context of 512"),
        (["--drain-timeout", "-1"], "--drain-timeout"),
        (["--quantize", "int4"], "invalid choice"),
        (["--mesh", "tensor"], "AXIS=SIZE"),
        (["--mesh", "model=2"], "AXIS=SIZE"),
        (["--mesh", "sequence=2"], "AXIS=SIZE"),  # a training axis: nothing to split in decoding
        (["--mesh", "tensor=x"], "must be an integer"),
        (["--mesh", "tensor=3"], "needs 3 devices"),  # the test session has 8 (fake CPU) devices
    ],
)
def test_bad_flags(capsys, config_only, flags, text):
    _fails(capsys, ["--checkpoint", config_only, *flags], text)


def test_port_in_use(capsys, config_only):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _fails(capsys, ["--checkpoint", config_only, "--port", str(port)], f"cannot listen on 127.0.0.1:{port}")


def test_unusable_generation_config(capsys, config_only, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((Path(config_only) / "config.json").read_text())
    (bad / "generation_config.json").write_text(json.dumps({"top_k": 2.5}))
    _fails(capsys, ["--checkpoint", str(bad)], "top_k must be an integer")
