"""The XLA_FLAGS and compilation cache of the test session, for this process and the CLIs and training
processes the tests start (imported by conftest.py before jax).

A persistent XLA compilation cache: most of the suite's time is the compilation of the same small
programs, run after run. It is set through the environment (jax reads JAX_* at import), so
subprocesses share it. Thresholds at 0: the small programs are the ones the tests compile most. A size
limit turns on jax's file lock around reads and writes, which the parallel workers (pytest-xdist) and
the subprocesses need: without it an entry is written in place and another process could read it
half-written. The cache key holds XLA_FLAGS, so the SSE4.2-capped run (make test-numerics-isa) keeps
entries of its own. QWEN2_JAX_TEST_COMPILATION_CACHE=0 turns it off; =DIR puts it elsewhere.

With the cache on, XLA:CPU's concurrency-optimized scheduler is off. An executable loaded from the cache
with that scheduler on can run the collectives of a sharded program in another order on different
devices and hang: measured with jaxlib 0.10.2 on tests/test_train_chunked_loss.py's MoE case on 8
fake devices (compiled fresh it passes; loaded from the cache 6 devices wait in an all-reduce while 2
wait in an all-gather, until XLA aborts the process). The flag changes the order in which XLA runs
independent operations, not what any operation computes.

The tests compile with two XLA:CPU flags that make compilation several times cheaper: backend
optimization level 0 (`--xla_backend_optimization_level=0`, the level XLA hands LLVM when it turns fused
HLO into machine code) and the older elemental IR emitters for fusions instead of the MLIR fusion
emitters (`--xla_cpu_use_fusion_emitters=false`). The suite's programs are tiny and run a few times
each, so the compiler's effort costs far more than it saves. Measured on this project's 2-core machine,
cache off: a tiny model's value-and-grad compiles in 2.6 s by default, 1.1 s at level 0 and 0.25 s with
both; tests/test_train_packing.py + test_parity_dense.py + test_serve_engine.py take 155 s of CPU at
level 0 and 83 s with both (a default-flags run of the first two alone: 102 s against 57 s at level 0).
They change how XLA:CPU turns a program into machine code, so results may differ by float rounding
order, which every tolerance here allows for. `make test-numerics-isa` runs the numerics-heavy tests
again with XLA's defaults (and the ISA capped), so the code users run is still checked.
QWEN2_JAX_TEST_XLA_OPT=full turns both off. The qwen2-train and demo processes the tests start keep
XLA's defaults instead (`run_xla_flags`): they run many steps of few programs, so execution outweighs
compilation there."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE = os.environ.get("QWEN2_JAX_TEST_COMPILATION_CACHE", os.path.join(ROOT, ".cache", "jax-compilation"))
CACHE_ON = _CACHE != "0"
CACHE_SAFE_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false" if CACHE_ON else ""
FULL_OPTIMIZATION = os.environ.get("QWEN2_JAX_TEST_XLA_OPT", "0") == "full"
FAST_COMPILE_FLAGS = (
    "" if FULL_OPTIMIZATION else "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
)


def xla_flags(devices: int, base: str = "", *, fast_compile: bool = True) -> str:
    """XLA_FLAGS with `devices` fake CPU devices, on top of `base` (for instance an ISA cap)."""
    fast = FAST_COMPILE_FLAGS if fast_compile else ""
    flags = (base, f"--xla_force_host_platform_device_count={devices}", CACHE_SAFE_FLAGS, fast)
    return " ".join(f for f in flags if f)


def run_xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process that runs far more than it compiles (qwen2-train runs of many steps, the
    demos): XLA's default code generation, on the same cache. Their steps are dominated by fusions over
    the 151,936-token vocabulary (the loss, its gradient, the embedding update), which level-0 machine code
    runs about twice as slowly; measured on configs/train/tiny-cpu.yaml's 12-step run on 4 devices, whole
    process: 19.8 s cold and 18.3 s warm at level 0, 18.0 s and 10.7 s with XLA's defaults. Not for
    qwen2-serve: its warm-up compiles every prefill and decode program and runs each a few times (its two
    test files: 36 s cold, 28 s warm at level 0; 50 s and 25 s with the defaults)."""
    return xla_flags(devices, fast_compile=False)


def set_session_environment(devices: int = 8) -> None:
    os.environ["XLA_FLAGS"] = xla_flags(devices, os.environ.get("XLA_FLAGS", ""))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if CACHE_ON:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
