"""qwen2-convert on bad input: exit 2, one line on stderr naming the culprit, no traceback, nothing
created; existing destinations; a conversion killed with SIGKILL; the writer and array helpers."""

import os
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from convert_utils import (
    copy_dir,
    edit_config,
    leftovers,
    rewrite_shard,
    run_cli,
    save_hf,
    shard_of,
    tensors_of,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER0_Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def source(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"src-{request.param}") / "hf"
    save_hf(path, dtype=request.param)
    return str(path)


def _truncate(d):
    shard = shard_of(d, LAYER0_Q)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    return os.path.basename(shard)


def _corrupt_header(d):
    shard = shard_of(d, LAYER0_Q)
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"{garbage!")
    return os.path.basename(shard)


def _missing_shard(d):
    shard = shard_of(d, LAYER0_Q)
    os.remove(shard)
    return os.path.basename(shard)


def _missing_tensor(d):
    rewrite_shard(d, shard_of(d, LAYER0_Q), drop=LAYER0_Q)
    return LAYER0_Q


def _unexpected_tensor(d):
    rewrite_shard(d, shard_of(d, LAYER0_Q), add=("model.layers.0.mlp.extra.weight", np.zeros((2, 2), np.float32)))
    return "model.layers.0.mlp.extra.weight"


def _shape_mismatch(d):
    edit_config(d, intermediate_size=80)
    return "mlp.gate_proj.weight"


def _model_type(d):
    edit_config(d, model_type="llama")
    return "llama"


def _no_config(d):
    os.remove(os.path.join(d, "config.json"))
    return "config.json"


BREAKERS = {
    "truncated-shard": _truncate,
    "corrupt-header": _corrupt_header,
    "missing-shard": _missing_shard,
    "missing-tensor": _missing_tensor,
    "unexpected-tensor": _unexpected_tensor,
    "config-shape-mismatch": _shape_mismatch,
    "unsupported-model-type": _model_type,
    "no-config": _no_config,
}


def _assert_clean_failure(rc, err, dst, culprit):
    assert rc == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("qwen2-convert: error: "), err
    assert culprit in lines[0], (culprit, err)
    assert "Traceback" not in err
    assert not os.path.exists(dst) and not leftovers(dst)


@pytest.mark.parametrize("breaker", sorted(BREAKERS))
def test_bad_hf_source(breaker, source, tmp_path, capfd):
    d = copy_dir(source, tmp_path / "hf")
    culprit = BREAKERS[breaker](d)
    dst = tmp_path / "out" / "ckpt"
    rc, _, err = run_cli(capfd, "hf-to-orbax", d, dst)
    _assert_clean_failure(rc, err, dst, culprit)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf"])
def test_missing_source_and_bad_options(direction, source, tmp_path, capfd):
    dst = tmp_path / "dst"
    _assert_clean_failure(*run_cli(capfd, direction, tmp_path / "nope", dst)[::2], dst, "nope")
    src = source if direction == "hf-to-orbax" else tmp_path / "not-orbax"
    os.makedirs(tmp_path / "not-orbax", exist_ok=True)
    _assert_clean_failure(*run_cli(capfd, direction, src, dst, "--dtype", "int8")[::2], dst, "int8")
    _assert_clean_failure(*run_cli(capfd, direction, src, dst, "--bogus")[::2], dst, "--bogus")
    if direction == "orbax-to-hf":
        _assert_clean_failure(*run_cli(capfd, direction, src, dst)[::2], dst, "not-orbax")  # not a checkpoint
        _assert_clean_failure(*run_cli(capfd, direction, source, dst)[::2], dst, "hf")  # an HF dir


def test_existing_destination(source, tmp_path, capfd):
    dst = tmp_path / "dst"
    os.makedirs(dst)
    (dst / "keep.txt").write_text("precious")
    rc, _, err = run_cli(capfd, "hf-to-orbax", source, dst, "--quiet")
    assert rc == 2 and "not empty" in err and str(dst) in err and len(err.strip().split("\n")) == 1
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
    assert run_cli(capfd, "hf-to-orbax", source, dst, "--quiet", "--overwrite")[0] == 0
    assert not (dst / "keep.txt").exists() and (dst / "params").is_dir() and not leftovers(dst)
    empty = tmp_path / "empty"
    os.makedirs(empty)
    assert run_cli(capfd, "hf-to-orbax", source, empty, "--quiet")[0] == 0  # an empty DST is fine


def test_internal_error_exit_1_and_cleanup(source, tmp_path, capfd, monkeypatch):
    """A failure mid-conversion: exit 1, one line, and neither DST, its temporary tree nor the
    parent directories the run created are left behind."""
    import convert.hf_to_orbax

    def explode(plan, dst, progress):
        os.makedirs(os.path.join(dst, "params"))
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(convert.hf_to_orbax, "convert", explode)
    dst = tmp_path / "new" / "deeper" / "ckpt"
    rc, _, err = run_cli(capfd, "hf-to-orbax", source, dst, "--quiet")
    assert rc == 1 and err.count("\n") == 1 and "disk on fire" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def _convert_cmd(src, dst, direction="hf-to-orbax"):
    return [sys.executable, "-m", "convert", direction, str(src), str(dst), "--quiet"]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")


def test_cli_subprocess_exit_code(tmp_path):
    """The real entry point: exit status 2 and one stderr line, no traceback."""
    proc = subprocess.run(
        _convert_cmd(tmp_path / "missing", tmp_path / "dst"), env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "dst").exists()


def test_sigkill_leaves_no_complete_destination(tmp_path, capfd):
    """SIGKILL once the conversion is writing (its temporary directory exists): DST must not
    exist; rerunning the same command then succeeds and gives a correct checkpoint."""
    src = tmp_path / "hf"
    save_hf(
        src,
        dtype="bfloat16",
        layers=12,
        hidden_size=128,
        intermediate_size=512,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    dst = tmp_path / "ckpt"
    tmp_name = tmp_path / ".ckpt.qwen2-convert-tmp"
    for delay in (0.0, 0.3):
        proc = subprocess.Popen(_convert_cmd(src, dst), env=_env(), stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not tmp_name.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == 0:  # it finished first: a complete, valid destination is fine
            break
        assert not dst.exists(), f"killed run (delay {delay}) left {os.listdir(dst)}"
    assert subprocess.run(_convert_cmd(src, dst), env=_env(), timeout=300).returncode == 0
    assert not leftovers(dst)
    assert run_cli(capfd, "orbax-to-hf", dst, tmp_path / "back", "--quiet")[0] == 0
    assert tensors_of(tmp_path / "back") == tensors_of(src)


# ---------------------------------------------------------------------------- building blocks
def test_safetensors_writer_round_trip(tmp_path):
    from qwen2_jax.safetensors_io import SafetensorsFile, SafetensorsWriter

    arrays = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.ones(3, ml_dtypes.bfloat16),
        "c": np.zeros((0, 4), np.float16),
    }
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in arrays.items()], {"format": "pt"}) as w:
        for k, v in arrays.items():
            w.write(k, v)
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    assert (8 + int.from_bytes(open(path, "rb").read(8), "little")) % 8 == 0
    for k, v in arrays.items():
        assert f.read(k).dtype == v.dtype and f.read(k).tobytes() == v.tobytes() and f.get(k).shape == v.shape
    f.close()
    import safetensors.numpy

    assert safetensors.numpy.load_file(str(path))["a"].tolist() == arrays["a"].tolist()
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        SafetensorsWriter(tmp_path / "y.safetensors", [("a", np.float32, (1,))]).write("b", np.zeros(1, np.float32))


def test_materialize_matches_numpy():
    from convert.arrays import materialize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 64)).astype(np.float32)
    views = [w.T, w.T.reshape(64, 4, 24), w[:, :48].T.reshape(2, 24, 96), w[:1].T, w[3], w]
    for v in views:
        for dtype in (None, ml_dtypes.bfloat16, np.float16):
            got, want = materialize(v, dtype), np.ascontiguousarray(v).astype(dtype or v.dtype)
            assert got.flags.c_contiguous and got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes()


def test_parse_size():
    from convert.orbax_to_hf import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("20KB") == 20000 and parse_size("1GiB") == 2**30
    assert parse_size("123") == 123
    for bad in ("x", "-1GB", "GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
