"""Hardware to plan a run for: topology names -> compile-only devices, their memory and peak FLOP/s.

    v5p-256, v5p:4x4x8      TPU v5p: the Cloud name counts TensorCores (2 per chip), so v5p-256 is
                            128 chips, 4x4x8; JAX sees one device per chip (megacore)
    v4-128, v4:4x4x4        TPU v4: the same convention as v5p
    v5e-256, v5e:16x16      TPU v5e (v5litepod-N): the Cloud name counts chips, one device each
    v6e-256, v6e:16x16      TPU v6e (Trillium): chips, as v5e
    h100:HOSTSxGPUS         NVIDIA H100 SXM 80GB, e.g. h100:8x8 = 8 hosts of 8 GPUs
    h200:HOSTSxGPUS         NVIDIA H200 141GB
    cpu:N                   N fake CPU devices: exact parameter and state sizes, temporaries only
                            approximate (XLA:CPU schedules and fuses unlike a TPU or GPU)

TPU devices come from `jax.experimental.topologies.get_topology_desc(platform="tpu", ...)`, which needs
libtpu (`pip install 'qwen2-jax[aot-tpu]'`); GPU devices from the CUDA plugin's compile-only topology
with a GpuTargetConfigProto describing the GPU (`pip install 'qwen2-jax[aot-gpu]'`, which also brings
cuDNN: the model's GPU attention is cuDNN's fused kernel, which XLA compiles through cuDNN). Nothing
here needs the hardware itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

from qwen2_jax.cli_support import UsageError
from train.metrics import peak_flops_per_device

GiB = 2**30


class TopologyError(UsageError, ValueError):
    """A topology name that does not parse, or hardware that this machine cannot compile for."""


# ----------------------------------------------------------------------------------------------- TPU
@dataclasses.dataclass(frozen=True)
class TpuKind:
    libtpu_name: str  # the generation in libtpu's topology names ("v5" is v5p)
    chip_config: str  # "megacore": one JAX device per chip of two TensorCores
    cores_per_chip_in_name: int  # the Cloud name counts TensorCores (2) or chips (1)
    dims: int  # torus dimensions
    hbm_bytes: int  # per device, as the TPU compiler counts it (its RESOURCE_EXHAUSTED message)
    chips_per_host: int


# HBM: the "available HBM" the TPU compiler reports when a program does not fit (libtpu 0.0.42, the one
# jax[tpu]==0.10.2 pins); tests/test_train_dry_run.py checks each against the compiler when libtpu is there.
TPU_KINDS = {
    "v5p": TpuKind("v5", "megacore", 2, 3, int(95.74 * GiB), 4),
    "v4": TpuKind("v4", "megacore", 2, 3, int(30.75 * GiB), 4),
    "v5e": TpuKind("v5e", "default", 1, 2, int(15.75 * GiB), 4),
    "v6e": TpuKind("v6e", "default", 1, 2, int(31.25 * GiB), 4),
}
TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


def tpu_chip_shape(kind: str, chips: int) -> tuple[int, ...]:
    """The torus Google Cloud gives a slice of `chips` chips (a power of two): v5p/v4 from 2x2x1 up by
    doubling the smallest dimension (4x4x8 for 128 chips), v5e/v6e 2-D (16x16 for 256)."""
    spec = TPU_KINDS[kind]
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"{kind}: {chips} chips is not a power of two; give the shape, e.g. {kind}:4x4x8")
    if spec.dims == 3:
        if chips < 4:
            raise TopologyError(f"{kind} slices start at 4 chips ({kind}-8)")
        shape = [2, 2, 1]
        while math.prod(shape) < chips:
            shape[shape.index(min(shape))] *= 2
            shape.sort()
        return tuple(shape) if chips > 4 else (2, 2, 1)
    shape = [1, 1]
    while math.prod(shape) < chips:
        shape[shape.index(min(shape))] *= 2
        shape.sort()
    return tuple(shape)


# ----------------------------------------------------------------------------------------------- GPU
@dataclasses.dataclass(frozen=True)
class GpuKind:
    name: str  # the device_kind JAX reports
    memory_bytes: int  # what CUDA reports as the device's total memory
    memory_bandwidth: int  # bytes/s
    core_count: int  # SMs


# Device facts as CUDA reports them (the same figures as XLA's own target-config specs for these GPUs).
GPU_KINDS = {
    "h100": GpuKind("NVIDIA H100 80GB HBM3", 84942979072, 3352320000000, 132),
    "h200": GpuKind("NVIDIA H200 141GB HBM3e", 151397597184, 4800000000000, 132),
}
JAX_GPU_MEMORY_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default: JAX's GPU allocator takes 75%


def gpu_target_config(kind: GpuKind) -> str:
    """A GpuTargetConfigProto (text) for a Hopper GPU: what XLA:GPU needs to compile without one."""
    scalar = [(4, 64, 1), (8, 64, 1), (10, 128, 2), (11, 128, 1), (12, 64, 1), (16, 128, 2)]
    matrix = [(2, 1024), (6, 1024), (10, 512), (11, 256), (16, 512), (19, 1024), (20, 1024), (23, 1024)]
    matrix += [(24, 1024), (25, 1024), (28, 1024), (29, 1024), (33, 1024), (35, 1024), (36, 1024)]
    rates = "".join(
        f"rate_infos {{ key: {k} value {{ clock_rate_ghz: 1.98 units_per_core: {u} ops_per_clock: {o} }} }}\n"
        for k, u, o in scalar
    )
    mma = "".join(
        f"rate_infos {{ key: {k} value {{ clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: {o} }} }}\n"
        for k, o in matrix
    )
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048 core_count: {kind.core_count} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  memory_bandwidth: {kind.memory_bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {kind.memory_bytes}
  cuda_compute_capability {{ major: 9 feature_extension: ACCELERATED_FEATURES }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  scalar_unit_description {{ {rates} }}
  matrix_unit_description {{ {mma} }}
  device_vendor: "NVIDIA Corporation" name: "{kind.name}"
  device_interconnect_info {{ active_links: 18 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{kind.name}"
"""


# -------------------------------------------------------------------------------------------- target
@dataclasses.dataclass
class Target:
    """Devices to compile for, and what to hold the compiled program against."""

    name: str  # as the user gave it
    platform: str  # "tpu" | "gpu" | "cpu": what the model's kernel choices are made for
    devices: list[Any]
    description: str  # one line: chips, shape, hosts
    memory_bytes: int | None  # device memory (HBM) per device
    usable_bytes: int | None  # what a program may use of it (GPU: JAX's allocator fraction)
    usable_note: str = ""
    approximate: bool = False  # fake CPU devices: temporaries are XLA:CPU's
    compiler_checks_memory: bool = False  # TPU: the compiler refuses a program that does not fit

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def peak_flops(self) -> float | None:
        return peak_flops_per_device(self.device_kind)

    @property
    def processes(self) -> int:
        return len({d.process_index for d in self.devices})


_TPU_CLOUD = re.compile(r"^(v5p|v4|v5e|v6e|v5litepod|v5lite)-(\d+)$")
_TPU_SHAPE = re.compile(r"^(v5p|v4|v5e|v6e|v5litepod|v5lite):(\d+(?:x\d+)+)$")
_GPU = re.compile(r"^(h100|h200):(\d+)x(\d+)$")
_CPU = re.compile(r"^cpu:(\d+)$")
NAMES_HELP = "v5p-256, v5e-256, v6e-256, v4-128 (or v5p:4x4x8, v5e:16x16), h100:HOSTSx8, h200:HOSTSx8, cpu:N"


def resolve(name: str, num_slices: int = 1, memory_gib: float | None = None) -> Target:
    """The Target a topology name describes. TopologyError (exit 2) for a bad name or a missing plugin."""
    name = name.strip().lower()
    if num_slices < 1:
        raise TopologyError(f"--num-slices must be >= 1, got {num_slices}")
    if m := _TPU_CLOUD.match(name):
        kind = TPU_ALIASES.get(m.group(1), m.group(1))
        count = int(m.group(2))
        per_chip = TPU_KINDS[kind].cores_per_chip_in_name
        if count % per_chip:
            raise TopologyError(f"{name}: {kind}-N counts TensorCores, {per_chip} per chip; N must be even")
        target = _tpu(name, kind, tpu_chip_shape(kind, count // per_chip), num_slices)
    elif m := _TPU_SHAPE.match(name):
        kind = TPU_ALIASES.get(m.group(1), m.group(1))
        shape = tuple(int(x) for x in m.group(2).split("x"))
        if len(shape) != TPU_KINDS[kind].dims:
            raise TopologyError(f"{name}: a {kind} slice has {TPU_KINDS[kind].dims} dimensions")
        target = _tpu(name, kind, shape, num_slices)
    elif m := _GPU.match(name):
        if num_slices != 1:
            raise TopologyError("--num-slices is for TPU slices; give GPU clusters as h100:HOSTSxGPUS")
        target = _gpu(name, m.group(1), int(m.group(2)), int(m.group(3)))
    elif m := _CPU.match(name):
        if num_slices != 1:
            raise TopologyError("--num-slices is for TPU slices")
        target = _cpu(name, int(m.group(1)))
    else:
        raise TopologyError(f"unknown topology {name!r} (known forms: {NAMES_HELP})")
    if memory_gib is not None:
        target.memory_bytes = target.usable_bytes = int(memory_gib * GiB)
        target.usable_note = "given by --device-memory"
    return target


def _tpu(name: str, kind: str, shape: tuple[int, ...], num_slices: int) -> Target:
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError(
            f"{name}: compiling for TPU needs libtpu: pip install 'qwen2-jax[aot-tpu]' "
            f"(or plan approximately on fake CPU devices: --topology cpu:N)"
        )
    spec = TPU_KINDS[kind]
    chips = math.prod(shape)
    quiet_libtpu()
    from jax.experimental import topologies

    # Slices of up to 8 chips are one host (ct5lp-hightpu-8t, ct6e-standard-8t, v5p-8, v4-8); bigger
    # ones have 4 chips per host, libtpu's default.
    bounds = tuple(shape) + (1,) * (3 - len(shape)) if chips <= 8 else None
    kwargs = {"chips_per_host_bounds": bounds} if bounds else {}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    topology = f"{spec.libtpu_name}:{'x'.join(map(str, shape))}"
    try:
        devices = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name=spec.chip_config, **kwargs
        ).devices
    except Exception as e:  # libtpu's INVALID_ARGUMENT for a shape it does not make
        raise TopologyError(f"{name}: libtpu does not make topology {topology}: {_first_line(e)}") from None
    cores = f" ({chips * spec.cores_per_chip_in_name} TensorCores)" if spec.cores_per_chip_in_name > 1 else ""
    slices = f" x {num_slices} slices" if num_slices > 1 else ""
    hosts = len({d.process_index for d in devices})
    description = (
        f"TPU {kind}, {chips} chips{cores} as {'x'.join(map(str, shape))}{slices}: {len(devices)} devices "
        f"({devices[0].device_kind}), {hosts} host{'s' * (hosts > 1)}"
    )
    return Target(name, "tpu", list(devices), description, spec.hbm_bytes, spec.hbm_bytes, compiler_checks_memory=True)


def _gpu(name: str, kind_name: str, hosts: int, per_host: int) -> Target:
    if not 1 <= per_host <= 8 or hosts < 1:
        raise TopologyError(f"{name}: expected HOSTSxGPUS with 1 to 8 GPUs per host, e.g. {kind_name}:8x8")
    if not (_installed("jax_plugins.xla_cuda12") and _installed("nvidia.cudnn")):
        raise TopologyError(
            f"{name}: compiling for NVIDIA GPUs needs the CUDA plugin and cuDNN: pip install 'qwen2-jax[aot-gpu]' "
            f"(or plan approximately on fake CPU devices: --topology cpu:N)"
        )
    kind = GPU_KINDS[kind_name]
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(
            platform="cuda",
            topology_name=kind_name,
            target_config=gpu_target_config(kind),
            topology=f"1x{hosts}x{per_host}",
        ).devices
    except Exception as e:
        raise TopologyError(f"{name}: the CUDA plugin does not make this topology: {_first_line(e)}") from None
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_GPU_MEMORY_FRACTION))
    note = (
        f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:g}"
        + (" (JAX's default)" if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ else "")
        + ": the share of GPU memory JAX's allocator takes; set it when training as well"
    )
    description = (
        f"{kind.name}, {hosts} host{'s' * (hosts > 1)} x {per_host} GPU{'s' * (per_host > 1)} = {len(devices)} devices"
    )
    return Target(name, "gpu", list(devices), description, kind.memory_bytes, int(kind.memory_bytes * fraction), note)


def _cpu(name: str, count: int) -> Target:
    import jax

    if count < 1:
        raise TopologyError(f"{name}: need at least one device")
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise TopologyError(
            f"{name}: JAX has {len(devices)} CPU devices in this process (it started before --topology could set "
            f"them; run with XLA_FLAGS=--xla_force_host_platform_device_count={count})"
        )
    description = f"{count} fake CPU devices (approximate: temporaries as XLA:CPU schedules them)"
    return Target(name, "cpu", devices[:count], description, None, None, approximate=True)


def prepare_host(name: str) -> None:
    """Before JAX starts its backends: compile on the CPU client only (a dry run runs nothing, and a TPU
    or GPU attached to this machine is not the target), with cpu:N's device count."""
    import jax

    m = _CPU.match(name.strip().lower())
    try:
        jax.config.update("jax_platforms", "cpu")
        if m:
            jax.config.update("jax_num_cpu_devices", int(m.group(1)))
    except RuntimeError:  # backends already started (a test process): use what is there
        pass


def quiet_libtpu() -> None:
    """libtpu looks for the Cloud TPU VM it runs on and prints a warning per missing setting, and lets
    one process at a time load it (a lock file in /tmp); a compile-only topology touches no TPU and
    needs none of that, so dry runs may run side by side."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
