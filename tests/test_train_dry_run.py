"""`qwen2-train --dry-run [--topology NAME]`: the real training step compiled ahead of time for hardware
this machine does not have, its per-device memory held against the device's.

Always: fake CPU devices (`cpu:8`, labelled approximate), user errors (unknown topology, a mesh the
topology's devices do not fill, plan flags without --dry-run) exit 2 with one line, a step that does
not fit exits 1, topology names map to the slices Google Cloud sells, and the library makes every
choice of kernel through `qwen2_jax.backend` (what lets a CPU-only machine trace a TPU program).
With libtpu installed (the aot-tpu extra; skipped without it): a v5e:2x2 slice, the TPU compiler's
own refusal of a step that does not fit, each generation's HBM against the compiler's figure, and a
two-slice mesh. With the CUDA plugin and cuDNN (the aot-gpu extra; skipped without): one H100.
"""

import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest

from train.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny-cpu.yaml")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


HAS_LIBTPU = _has("libtpu")
HAS_CUDA_AOT = _has("jax_plugins.xla_cuda12") and _has("nvidia.cudnn")
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[aot-tpu]' to compile for TPU topologies)"
)
needs_cuda_aot = pytest.mark.skipif(
    not HAS_CUDA_AOT, reason="the CUDA plugin and cuDNN are not installed (pip install -e '.[aot-gpu]')"
)

SMALL = ["--set", "seq_len=64", "--set", "loss.chunk_length=32"]


def _dry_run(capsys, *args):
    rc = main(["--config", TINY, "--dry-run", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _json(capsys, *args):
    rc, out, err = _dry_run(capsys, "--json", *args)
    assert rc in (0, 1), err
    return rc, json.loads(out)


# ------------------------------------------------------------------------------------ fake CPU devices
def test_cpu_topology_is_labelled_approximate(capsys):
    from train.dry_run import format_report

    rc, r = _json(capsys, "--topology", "cpu:8", "--set", "mesh.data=4", "--set", "mesh.fsdp=2", *SMALL)
    assert rc == 0 and r["fits"] is None  # a CPU has no device memory to hold the step against
    d = r["per_device"]
    assert r["approximate"] and r["devices"] == 8
    assert r["mesh"] == {"data": 4, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}
    # the state's bytes from its shapes and shardings are the compiler's arguments (plus step and rng key)
    assert 0 <= d["arguments"] - (d["parameters"] + d["optimizer_state"] + d["batch"]) <= 64
    assert d["peak"] == d["arguments"] + d["outputs"] - d["aliased"] + d["temporaries"]
    # AdamW: two float32 moments per float32 parameter; fsdp=2 halves both
    assert abs(d["optimizer_state"] - 2 * d["parameters"]) <= 64
    assert d["parameters"] * 2 == pytest.approx(r["parameters"] * 4, rel=0.02)
    assert r["flops_per_step"] == pytest.approx(r["flops_per_token"] * 8 * 64)
    assert r["flops_per_step_per_device"] == pytest.approx(r["flops_per_step"] / 8)
    assert r["mfu"] is None  # no peak FLOP/s for CPUs

    out = format_report(r)
    assert "APPROXIMATE" in out.splitlines()[0] and "fits: unknown" in out
    for row in ("parameters", "optimizer state", "batch", "temporaries", "peak"):
        assert re.search(rf"^  {row} +[\d.]+ GiB", out, re.M), (row, out)


def test_step_that_does_not_fit_exits_1(capsys):
    rc, out, _ = _dry_run(capsys, "--topology", "cpu:8", "--device-memory", "0.01", *SMALL)
    assert rc == 1
    assert "DOES NOT FIT (approximate)" in out
    assert re.search(r"headroom +-[\d.]+ GiB", out)


def test_fits_exits_0_with_headroom(capsys):
    rc, r = _json(capsys, "--topology", "cpu:8", "--device-memory", "16", *SMALL)
    assert rc == 0 and r["fits"] is True
    assert r["headroom"] == 16 * 2**30 - r["per_device"]["peak"]


# --------------------------------------------------------------------------------------- user errors
@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology", "v9z-256"], "unknown topology 'v9z-256'"),
        (["--topology", "v5p-12"], "not a power of two"),
        (["--topology", "v5p-7"], "counts TensorCores"),
        (["--topology", "h100:2x16"], "1 to 8 GPUs per host"),
        (["--topology", "cpu:8", "--set", "mesh.data=3"], "mesh:"),
        (["--topology", "cpu:8", "--num-slices", "2"], "--num-slices is for TPU slices"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, args, message):
    rc, out, err = _dry_run(capsys, *args, *SMALL)
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and message in err, err


def test_plan_flags_need_dry_run(capsys):
    rc = main(["--config", TINY, "--topology", "cpu:8"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--topology: only with --dry-run" in err


def test_missing_plugin_names_the_extra(monkeypatch):
    import train.topology as topology

    monkeypatch.setattr(topology, "_installed", lambda module: False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        topology.importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a)
    )
    with pytest.raises(topology.TopologyError, match=r"qwen2-jax\[aot-tpu\]"):
        topology.resolve("v5p-256")
    with pytest.raises(topology.TopologyError, match=r"qwen2-jax\[aot-gpu\]"):
        topology.resolve("h100:8x8")


# ----------------------------------------------------------------------------------- topology names
@pytest.mark.parametrize(
    "kind, chips, shape",
    [
        ("v5p", 4, (2, 2, 1)),
        ("v5p", 8, (2, 2, 2)),
        ("v5p", 64, (4, 4, 4)),
        ("v5p", 128, (4, 4, 8)),
        ("v5p", 256, (4, 8, 8)),
        ("v5p", 1024, (8, 8, 16)),
        ("v4", 128, (4, 4, 8)),
        ("v5e", 1, (1, 1)),
        ("v5e", 8, (2, 4)),
        ("v5e", 256, (16, 16)),
        ("v6e", 64, (8, 8)),
    ],
)
def test_cloud_slice_shapes(kind, chips, shape):
    from train.topology import tpu_chip_shape

    assert tpu_chip_shape(kind, chips) == shape


def test_peak_flops_by_device_kind():
    from train.metrics import peak_flops_per_device

    # the device kinds JAX reports: v5p is "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite"
    assert peak_flops_per_device("TPU v5") == 459e12
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("TPU v6 lite") == 918e12
    assert peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("cpu") is None


# ------------------------------------------------------------------------ kernels chosen for the target
def test_library_chooses_kernels_through_the_backend_hook():
    """`jax.default_backend()` is the machine's platform, not the one a dry run compiles for."""
    pkg = os.path.join(REPO, "qwen2_jax")
    offenders = [
        name
        for name in sorted(os.listdir(pkg))
        if name.endswith(".py") and name != "backend.py" and "default_backend()" in open(os.path.join(pkg, name)).read()
    ]
    assert not offenders, f"use qwen2_jax.backend.backend() in {offenders}"


def test_compiling_for_changes_the_kernel_choices():
    from qwen2_jax import moe
    from qwen2_jax.backend import backend, compiling_for
    from qwen2_jax.options import default_kernel_layout

    assert backend() == "cpu" and moe._resolve_impl("auto") == "tiled"
    with compiling_for("tpu"):
        assert backend() == "tpu"
        assert moe._resolve_impl("auto") == "ragged_dot"
        assert default_kernel_layout(on_mesh=False) == "in_out"
    assert backend() == "cpu" and default_kernel_layout(on_mesh=False) == "out_in"


# ---------------------------------------------------------------------------------------------- TPU
@needs_libtpu
def test_tpu_v5e_2x2(capsys):
    rc, r = _json(capsys, "--topology", "v5e:2x2", "--tokens-per-second", "1e5", *SMALL)
    assert rc == 0 and r["fits"] is True and not r["approximate"]
    assert r["platform"] == "tpu" and r["device_kind"] == "TPU v5 lite" and r["devices"] == 4
    assert r["device_memory"] == int(15.75 * 2**30)
    assert 0 < r["per_device"]["peak"] < r["device_memory"]
    assert r["mfu"] == pytest.approx(1e5 * r["flops_per_token"] / (197e12 * 4))


@needs_libtpu
def test_tpu_compiler_refusal_is_does_not_fit(capsys):
    big = ["--set", "seq_len=8192", "--set", "batch_size=32", "--set", "loss.chunk_length=512"]
    rc, out, err = _dry_run(
        capsys, "--topology", "v5e:2x2", "--set", "model_overrides.max_position_embeddings=8192", *big
    )
    assert rc == 1, err
    assert "RESOURCE_EXHAUSTED" in out and "DOES NOT FIT" in out
    assert re.search(r"peak +[\d.]+ GiB +\(the TPU compiler's figure", out)


@needs_libtpu
@pytest.mark.parametrize("kind", ["v5p", "v5e", "v6e", "v4"])
def test_tpu_hbm_table_is_the_compilers(kind):
    """Each generation's HBM in train/topology.py is what its compiler says is available."""
    from jax.sharding import NamedSharding, PartitionSpec

    from train.topology import TPU_KINDS, resolve

    target = resolve(f"{kind}:{'x'.join(['2', '2', '1'][: TPU_KINDS[kind].dims])}")
    mesh = jax.sharding.Mesh(target.devices, ("x",))
    too_big = jax.ShapeDtypeStruct((4 * 2**28, 64), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("x")))
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as e:
        jax.jit(lambda a: a * 2 + 1).lower(too_big).compile()
    available = float(re.search(r"available HBM \(([\d.]+)G\)", str(e.value)).group(1))
    assert TPU_KINDS[kind].hbm_bytes == int(available * 2**30)


@needs_libtpu
def test_two_slices_put_the_data_axis_across_them():
    from qwen2_jax.sharding import ShardingError, make_mesh
    from train.topology import resolve

    target = resolve("v5e:2x2", num_slices=2)
    assert target.processes == 2 and len(target.devices) == 8
    mesh = make_mesh(data=2, fsdp=4, devices=target.devices)
    slices = [[d.slice_index for d in row.flat] for row in mesh.devices]
    assert slices == [[0] * 4, [1] * 4]
    with pytest.raises(ShardingError, match="multiple of the 2 slices"):
        make_mesh(data=1, fsdp=8, devices=target.devices)


# ---------------------------------------------------------------------------------------------- GPU
@needs_cuda_aot
def test_gpu_h100(capsys):
    rc, r = _json(capsys, "--topology", "h100:1x1", "--set", "dtype=bfloat16", *SMALL)
    assert rc == 0 and r["platform"] == "gpu" and r["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert r["usable_memory"] == int(84942979072 * 0.75)  # JAX's allocator share by default


# ------------------------------------------------------------------------------------------ recipes
RECIPES = [
    ("qwen2-72b-v5p-256", "v5p-256", needs_libtpu),
    ("qwen2-57b-a14b-v5p-128", "v5p-128", needs_libtpu),
    ("qwen2-0.5b-1xh100", "h100:1x1", needs_cuda_aot),
    ("qwen2-7b-8xh100", "h100:1x8", needs_cuda_aot),
    ("qwen2-7b-sft-8xh100", "h100:1x8", needs_cuda_aot),
    ("qwen2-7b-dpo-8xh100", "h100:1x8", needs_cuda_aot),
    ("qwen2-7b-32k-8xh100", "h100:1x8", needs_cuda_aot),
    ("qwen2-72b-64xh100", "h100:8x8", needs_cuda_aot),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, topology", [pytest.param(r, t, marks=m, id=r) for r, t, m in RECIPES]
)  # the TPU ones compile for 2.5-4 min each on 2 cores
def test_recipe_fits_its_topology(capsys, recipe, topology):
    config = os.path.join(REPO, "configs", "train", f"{recipe}.yaml")
    rc = main(["--config", config, "--dry-run", "--topology", topology, "--json"])
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert rc == 0 and r["fits"] is True and not r["approximate"], err
    assert 0.1 * r["usable_memory"] < r["headroom"] < r["usable_memory"]
