"""The shared helpers: the dtype table, atomic writes, the console scripts' error handling, progress."""

import io
import os
import stat
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from convert.progress import Progress
from qwen2_jax import atomic, dtypes
from qwen2_jax.cli_support import ArgumentParser, UsageError, run_cli
from qwen2_jax.config import ConfigError
from qwen2_jax.safetensors_io import CheckpointError


# ------------------------------------------------------------------------------------ dtypes
def test_parse_dtype_names_and_dtypes():
    assert dtypes.parse_dtype(None) is None
    assert dtypes.parse_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16) == dtypes.parse_dtype(jnp.bfloat16)
    assert dtypes.parse_dtype("float16") == np.float16 and dtypes.parse_dtype(np.float32) == np.float32
    assert [dtypes.dtype_name(dtypes.parse_dtype(n)) for n in dtypes.PARAM_DTYPE_NAMES] == list(
        dtypes.PARAM_DTYPE_NAMES
    )
    for bad in ("int8", "fp32", np.float64, np.int32, "object"):
        with pytest.raises(ValueError, match="unsupported dtype"):
            dtypes.parse_dtype(bad)
    assert not dtypes.is_param_dtype(np.int64) and dtypes.is_param_dtype("float32")


def test_safetensors_codes_round_trip():
    for code, dtype in dtypes.SAFETENSORS_DTYPES.items():
        assert dtypes.safetensors_code(dtypes.safetensors_dtype(code)) == code and dtype.itemsize >= 1
    assert dtypes.safetensors_code(jnp.bfloat16) == "BF16"
    with pytest.raises(KeyError):
        dtypes.safetensors_dtype("F8_E4M3")


# ------------------------------------------------------------------------------------ atomic writes
def test_write_text_and_json(tmp_path):
    path = tmp_path / "a.json"
    atomic.write_json(path, {"b": "é", "a": [1]}, sort_keys=True)
    assert path.read_text(encoding="utf-8") == '{\n  "a": [\n    1\n  ],\n  "b": "é"\n}\n'
    atomic.write_text(path, "replaced")
    assert path.read_text() == "replaced" and os.listdir(tmp_path) == ["a.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # as a plain open() would create it
    atomic.copy_file(path, tmp_path / "b")
    assert (tmp_path / "b").read_text() == "replaced"


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_text("old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f"]


def test_directory_replaces_only_on_success(tmp_path):
    dst = tmp_path / "out"
    os.makedirs(dst)
    (dst / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.directory(dst, "t") as tmp:
            (Path(tmp) / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(dst) == ["old.txt"]
    os.makedirs(tmp_path / ".out.t-tmp")  # a killed run's leftover is cleaned first
    (tmp_path / ".out.t-tmp" / "stale").write_text("x")
    with atomic.directory(dst, "t") as tmp:
        assert os.listdir(tmp) == []
        (Path(tmp) / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(dst) == ["new.txt"]


def test_directory_failure_removes_the_parents_it_created(tmp_path):
    dst = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic.directory(dst, "t"):
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------ CLI errors
@pytest.mark.parametrize(
    "error, code",
    [
        (UsageError("bad flag"), 2),
        (ConfigError("config.json: bad\nvalue"), 2),
        (CheckpointError("shard missing"), 2),
        (FileNotFoundError("no such dir"), 2),
        (RuntimeError("disk on fire"), 1),
        (ValueError("internal"), 1),
        (KeyboardInterrupt(), 130),
    ],
)
def test_run_cli_exit_codes_and_one_line(error, code, capsys, monkeypatch):
    monkeypatch.delenv("QWEN2_JAX_DEBUG", raising=False)

    def main():
        raise error

    assert run_cli("prog", main) == code
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("prog: error: ") and "Traceback" not in err
    if code == 1:
        assert type(error).__name__ in err


def test_run_cli_passes_the_result_and_debug_reraises(capsys, monkeypatch):
    assert run_cli("prog", lambda a, b=0: a + b, 3, b=4) == 7

    def main():
        raise RuntimeError("x")

    monkeypatch.setenv("QWEN2_JAX_DEBUG", "1")
    with pytest.raises(RuntimeError):
        run_cli("prog", main)


def test_argument_parser_usage_error(capsys):
    parser = ArgumentParser(prog="prog")
    parser.add_argument("--n", type=int, required=True)
    assert run_cli("prog", parser.parse_args, ["--n", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--n" in err and "prog --help" in err


# ------------------------------------------------------------------------------------ progress
class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_progress_lines_on_a_pipe_and_redraws_on_a_terminal():
    pipe, tty = _Stream(False), _Stream(True)
    for stream in (pipe, tty):
        progress = Progress(2, 2000, "hf-to-orbax", stream=stream)
        progress.update(1000)
        progress.update(1000)
        progress.close()
    lines = pipe.getvalue().splitlines()
    assert "\r" not in pipe.getvalue() and len(lines) == 2  # at the start and at the end
    assert lines[-1].startswith("hf-to-orbax 100.0%") and "2/2 tensors" in lines[-1] and "ETA" in lines[-1]
    assert "\r" in tty.getvalue() and "2/2 tensors" in tty.getvalue()
    quiet = _Stream(False)
    progress = Progress(2, 2000, "x", enabled=False, stream=quiet)
    progress.update(1000)
    progress.close()
    assert quiet.getvalue() == ""
