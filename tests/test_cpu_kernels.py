"""The CPU custom calls (`qwen2_jax.cpu_kernels`): gemv against a float64 product for every weight
type and row count, take_rows against numpy indexing, the choice `matmul.apply_kernel` makes, the
fallback when the kernels are switched off, gradients, and the build cache."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax import cpu_kernels
from qwen2_jax.matmul import Int8Kernel, apply_kernel, quantize_int8

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the CPU kernels are written for x86-64"
)


@pytest.fixture(autouse=True, scope="module")
def _kernels_registered():
    """gemv and take_rows are called only when `available()` (which builds and registers them): any
    test of this module may run first on its worker."""
    cpu_kernels.available()


def test_kernels_build_on_this_machine():
    # CI machines have a C++ compiler: a silent fallback to XLA's dot would hide a broken build.
    assert shutil.which("c++") or shutil.which("g++"), "no C++ compiler to build the CPU kernels"
    assert cpu_kernels.available()


def _reference(x, w, scale=None):
    """The float64 product of numpy arrays (bfloat16 ones widen exactly)."""
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    return y if scale is None else y * np.asarray(scale, np.float64)


@pytest.mark.parametrize("w_dtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("n, k", [(37, 96), (300, 1000), (4, 33)])
def test_gemv_equals_the_float64_product(w_dtype, rows, n, k):
    """Odd output counts (the row blocks' remainder), widths that are no multiple of the vector
    (the tail loops), and more rows than one pass handles (groups of 8). The inputs and the reference
    are numpy (ml_dtypes for bfloat16): the one XLA program per case is the kernel's."""
    rng = np.random.default_rng(rows * 1000 + n + k)
    if w_dtype == "int8":
        w = rng.integers(-127, 128, (n, k)).astype(np.int8)
        scale = rng.uniform(0.001, 0.01, (n,)).astype(np.float32)
    else:
        w = rng.standard_normal((n, k), np.float32).astype(jnp.dtype(w_dtype))
        scale = None
    x32 = rng.standard_normal((rows, k), np.float32)
    for x_dtype in (jnp.float32, jnp.bfloat16):
        if x_dtype == jnp.bfloat16 and w_dtype not in ("bfloat16", "int8"):
            continue
        x = x32.astype(x_dtype)
        got = np.asarray(jax.jit(cpu_kernels.gemv)(x, w, scale))
        want = _reference(x, w, scale)
        assert got.dtype == np.float32 and got.shape == (rows, n)
        # float32 accumulation over k terms: a few ulps of the sum of |products|
        abs_w = np.abs(np.asarray(w, np.float64))
        bound = (
            4
            * np.finfo(np.float32).eps
            * np.sqrt(k)
            * _reference(np.abs(np.asarray(x, np.float64)), abs_w, scale).max()
        )
        if w_dtype == "int8" and cpu_kernels.has_int8_dot():
            # the VNNI kernel rounds each activation row to int16 steps of absmax / 32767
            step_m1 = np.abs(np.asarray(x, np.float64)).max(axis=1, keepdims=True) / 32767
            bound = bound + 0.5 * step_m1 * _reference(np.ones(x.shape), abs_w, scale)
        np.testing.assert_array_less(np.abs(got - want), bound + 1e-30)


def test_int8_activation_rows_keep_15_bits():
    """With AVX512-VNNI the kernel's int16 rows err by at most half a step of 1/32767 of the row's
    largest value per term; without it int8 weights are widened to float32 and the product is exact.
    A row of zeros gives zeros either way (no division by zero)."""
    k = 256
    w = jnp.ones((3, k), jnp.int8)
    scale = jnp.ones((3,), jnp.float32)
    x = jnp.zeros((2, k), jnp.float32).at[1, 0].set(1.0).at[1, 1].set(0.5 / 32767)
    got = np.asarray(cpu_kernels.gemv(x, w, scale))
    assert np.all(got[0] == 0)
    exact = np.float32(1.0) + np.float32(0.5 / 32767)
    if cpu_kernels.has_int8_dot():
        # 1 + 0.5/32767 rounds to 1 + 0 or 1 + 1/32767 (ties to even: 0)
        np.testing.assert_allclose(got[1], 1.0, rtol=0, atol=1.01 / 32767)
    else:
        np.testing.assert_array_equal(got[1], exact)


def test_bf16_activations_take_the_bf16_dot_when_the_cpu_has_it():
    x = jnp.ones((2, 64), jnp.bfloat16)
    w = jnp.ones((8, 64), jnp.bfloat16)
    hlo = jax.jit(cpu_kernels.gemv).lower(x, w).as_text()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert cpu_kernels.has_bf16_dot() == ("avx512_bf16" in flags)
    # with the bf16 dot the activations reach the kernel as they are; without it, widened (exactly)
    x_type = "bf16" if cpu_kernels.has_bf16_dot() else "f32"
    assert f"(tensor<2x64x{x_type}>, tensor<8x64xbf16>) -> tensor<2x8xf32>" in hlo


def test_take_rows_equals_indexing():
    table = jax.random.normal(jax.random.key(0), (50, 24), jnp.float32).astype(jnp.bfloat16)
    ids = jnp.array([[3, 0, 49], [7, 7, 1]], jnp.int32)
    got = jax.jit(cpu_kernels.take_rows)(table, ids)
    assert got.dtype == jnp.bfloat16 and got.shape == (2, 3, 24)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(table, np.float32)[np.asarray(ids)])


def test_decode_embedding_lookup_keeps_the_table_in_bfloat16():
    """The generation program holds no float32 (or integer) copy of a bfloat16 embedding table."""
    from qwen2_jax.config import Qwen2Config
    from qwen2_jax.generate import GenerateOptions, Generator
    from qwen2_jax.params import init_params

    config = Qwen2Config(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    params = init_params(config, jax.random.key(0), param_dtype=jnp.bfloat16)
    generator = Generator(config, params, layer_layout="per_layer")
    job = generator._job([[1, 2, 3]], GenerateOptions(4, eos_token_ids=[]), False)
    hlo = generator._programs_for(job.spec).whole.lower(generator.params, *job.args).compile().as_text()
    copies = [line for line in hlo.splitlines() if "f32[4096,64]" in line or "u16[4096,64]" in line]
    assert not copies, copies[:2]
    assert "qwen2_take_rows" in hlo


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_kernel_auto_uses_the_kernel_for_few_rows_of_out_in_kernels(dtype):
    x = jax.random.normal(jax.random.key(1), (2, 1, 64), jnp.float32).astype(dtype)
    w_out_in = jax.random.normal(jax.random.key(2), (4, 16, 64), jnp.float32).astype(dtype)  # [heads, hd, d]
    spec = "btd,nhd->btnh"

    def hlo(x, w, matmul_form):
        f = jax.jit(lambda x, w: apply_kernel(spec, x, w, matmul=matmul_form, compute_dtype=dtype))
        return f.lower(x, w).as_text()

    assert "qwen2_gemv" in hlo(x, w_out_in, "auto")
    assert "qwen2_gemv" not in hlo(x, w_out_in, "gemm")  # an explicit form is kept
    w_in_out = jnp.transpose(w_out_in, (2, 0, 1))  # [d, heads, hd]
    f = jax.jit(lambda x, w: apply_kernel("btd,dnh->btnh", x, w, matmul="auto", compute_dtype=dtype))
    assert "qwen2_gemv" not in f.lower(x, w_in_out).as_text()
    many = jnp.ones((3, 4, 64), dtype)  # 12 rows > MAX_ROWS
    assert "qwen2_gemv" not in hlo(many, w_out_in, "auto")
    want = jnp.einsum(spec, x.astype(jnp.float32), w_out_in.astype(jnp.float32))
    got = jax.jit(lambda x, w: apply_kernel(spec, x, w, matmul="auto", compute_dtype=dtype, out_dtype=jnp.float32))(
        x, w_out_in
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_int8_kernel_product_equals_the_dequantized_product():
    w = jax.random.normal(jax.random.key(3), (96, 64), jnp.float32)
    q = quantize_int8(w, in_axes=(1,))
    assert isinstance(q, Int8Kernel)
    x = jax.random.normal(jax.random.key(4), (1, 3, 64), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(
        lambda x, q: apply_kernel("btd,fd->btf", x, q, matmul="auto", compute_dtype=jnp.bfloat16, out_dtype=jnp.float32)
    )
    assert "qwen2_gemv" in f.lower(x, q).as_text()
    dequant = np.asarray(q.values, np.float64) * np.asarray(q.scale, np.float64).reshape(-1, 1)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ dequant.T
    np.testing.assert_allclose(np.asarray(f(x, q)), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_gradients_through_the_kernel_equal_xla_dots():
    x = jax.random.normal(jax.random.key(5), (2, 48), jnp.float32)
    w = jax.random.normal(jax.random.key(6), (20, 48), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

    ours = jax.grad(loss(cpu_kernels.gemv), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(lambda x, w: x @ w.T), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_switched_off_falls_back_to_xla_with_the_same_numbers(tmp_path):
    """QWEN2_JAX_CPU_GEMV=0: no custom call in the program, and the product unchanged."""
    script = (
        "import jax, jax.numpy as jnp, numpy as np\n"
        "from qwen2_jax import cpu_kernels\n"
        "from qwen2_jax.matmul import apply_kernel\n"
        "x = jax.random.normal(jax.random.key(0), (1, 1, 64)).astype(jnp.bfloat16)\n"
        "w = jax.random.normal(jax.random.key(1), (32, 64)).astype(jnp.bfloat16)\n"
        "f = jax.jit(lambda x, w: apply_kernel('btd,fd->btf', x, w, matmul='auto', compute_dtype=jnp.bfloat16,"
        " out_dtype=jnp.float32))\n"
        "print(cpu_kernels.available(), 'qwen2_gemv' in f.lower(x, w).as_text())\n"
        "np.save(r'%s', np.asarray(f(x, w)))\n"
    )
    outs = {}
    for flag in ("0", "1"):
        path = tmp_path / f"y{flag}.npy"
        env = dict(os.environ, QWEN2_JAX_CPU_GEMV=flag)
        done = subprocess.run(
            [sys.executable, "-c", script % path], env=env, capture_output=True, text=True, check=True, timeout=300
        )
        outs[flag] = (done.stdout.split(), np.load(path))
    assert outs["0"][0] == ["False", "False"] and outs["1"][0] == ["True", "True"]
    np.testing.assert_allclose(outs["0"][1], outs["1"][1], rtol=1e-5, atol=1e-5)


def test_build_goes_to_the_cache_dir_once(tmp_path):
    """A fresh cache directory gets one library, named by the hash of what went into it; a second
    process reuses it without compiling."""
    script = "from qwen2_jax import cpu_kernels; print(cpu_kernels.available(), cpu_kernels._build())"
    env = dict(os.environ, QWEN2_JAX_CACHE=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    path = first.stdout.split()[1]
    assert first.stdout.split()[0] == "True" and path.startswith(str(tmp_path))
    mtime = os.path.getmtime(path)
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert second.stdout.split()[1] == path and os.path.getmtime(path) == mtime
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [os.path.basename(path)]


def test_a_broken_compiler_warns_once_and_falls_back(tmp_path):
    script = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "from qwen2_jax import cpu_kernels\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    print(cpu_kernels.available(), cpu_kernels.available())\n"
        "print(len(w), str(w[0].message) if w else '')\n"
    )
    env = dict(os.environ, QWEN2_JAX_CACHE=str(tmp_path), CXX="false")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0] == "False False"
    assert lines[1].startswith("1 qwen2_jax: CPU decode kernels unavailable, using XLA's ops (false failed")
    assert not (tmp_path / "kernels").exists() or not any(p.suffix == ".so" for p in (tmp_path / "kernels").iterdir())


def test_take_rows_gradient_equals_jnp_take():
    table = jax.random.normal(jax.random.key(7), (30, 8), jnp.float32).astype(jnp.bfloat16)
    ids = jnp.array([[1, 4, 1], [29, 0, 4]], jnp.int32)
    weights = jax.random.normal(jax.random.key(8), (2, 3, 8), jnp.float32)

    def loss(fn):
        return lambda t: jnp.sum(fn(t, ids).astype(jnp.float32) * weights)

    ours = jax.grad(loss(cpu_kernels.take_rows))(table)
    ref = jax.grad(loss(lambda t, i: jnp.take(t, i, axis=0)))(table)
    assert ours.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))
