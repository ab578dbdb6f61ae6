"""The 2-D GEMM form of the kernel products (RunOptions.matmul="gemm", CPU's default for float32 and
bfloat16) against the einsum form and HF: float32 within the float32 parity bound, bfloat16 within the
bfloat16 one, in the forward pass and in generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen2_jax
from hf_utils import hf_dense_config, hf_logits, make_hf_model, rel_err
from qwen2_jax.forward import forward_outputs
from qwen2_jax.generate import GenerateOptions, Generator
from qwen2_jax.matmul import apply_kernel, uses_gemm
from qwen2_jax.options import RunOptions


def _kl(p_logits, q_logits):  # KL(p || q) averaged over rows
    p_logits, q_logits = p_logits.astype(np.float64), q_logits.astype(np.float64)
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    hf_cfg = hf_dense_config(
        num_hidden_layers=3,
        hidden_size=128,
        intermediate_size=256,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = make_hf_model(hf_cfg, seed=5)
    path = tmp_path_factory.mktemp("gemm")
    model.save_pretrained(path)
    return model, str(path)


def test_auto_is_gemm_on_cpu_for_float32_and_bfloat16_only():
    assert uses_gemm("auto", jnp.float32, jnp.float32) and uses_gemm("auto", jnp.bfloat16, jnp.bfloat16)
    assert not uses_gemm("auto", jnp.float16, jnp.float16)
    assert not uses_gemm("auto", jnp.bfloat16, jnp.float32)  # mixed: the kernel is cast, as before
    assert uses_gemm("gemm", jnp.float16, jnp.float16) and not uses_gemm("einsum", jnp.float32, jnp.float32)


@pytest.mark.parametrize(
    "spec,x_shape,w_shape",
    [
        ("btd,dnh->btnh", (2, 3, 8), (8, 4, 5)),  # [in, out] kernel
        ("btd,nhd->btnh", (1, 1, 8), (4, 5, 8)),  # [out, in] kernel, one row (padded to two for bf16)
        ("btnh,nhd->btd", (2, 3, 4, 5), (4, 5, 8)),
        ("btnh,dnh->btd", (1, 1, 4, 5), (8, 4, 5)),
    ],
)
def test_gemm_equals_einsum_for_every_kernel_orientation(spec, x_shape, w_shape):
    rng = np.random.RandomState(0)
    x, w = (jnp.asarray(rng.randn(*s).astype(np.float32)) for s in (x_shape, w_shape))
    ref = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64))
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        got = apply_kernel(spec, x, w.astype(dtype), matmul="gemm", compute_dtype=dtype, out_dtype=jnp.float32)
        assert got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=tol * np.abs(ref).max())


def test_float32_gemm_equals_einsum_and_hf(model_dir):
    model, path = model_dir
    config, params = qwen2_jax.load_checkpoint(path)
    ids = np.random.RandomState(1).randint(0, config.vocab_size, (2, 11))
    ref = hf_logits(model, ids)
    for matmul in ("gemm", "einsum"):
        out = np.asarray(forward_outputs(config, params, ids, options=RunOptions(matmul=matmul))["logits"])
        assert rel_err(out, ref) < 1e-5, matmul


def test_bfloat16_gemm_within_the_bfloat16_bound(model_dir):
    """Both forms in bf16 are as close to HF fp32 as HF's own bf16 run is (the parity tests' bound)."""
    from transformers import Qwen2ForCausalLM

    model, path = model_dir
    config, params = qwen2_jax.load_checkpoint(path, dtype="bfloat16")
    ids = np.random.RandomState(2).randint(0, config.vocab_size, (3, 13))
    ref32 = hf_logits(model, ids).reshape(-1, config.vocab_size)
    hf16 = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    kl_hf = _kl(hf_logits(hf16, ids).reshape(-1, config.vocab_size), ref32)
    outs = {}
    for matmul in ("gemm", "einsum"):
        outs[matmul] = np.asarray(forward_outputs(config, params, ids, options=RunOptions(matmul=matmul))["logits"])
        assert _kl(outs[matmul].reshape(-1, config.vocab_size), ref32) < 2 * kl_hf + 1e-6, matmul
    assert _kl(outs["gemm"].reshape(-1, config.vocab_size), outs["einsum"].reshape(-1, config.vocab_size)) < kl_hf


def test_bfloat16_generation_gemm_logits_within_the_bound(model_dir):
    """Cached decode (one row per step: the padded 2-row GEMM) against the einsum form, bf16."""
    _, path = model_dir
    config, params = qwen2_jax.load_checkpoint(path, dtype="bfloat16")
    request = GenerateOptions(8, eos_token_ids=[])
    gemm = Generator(config, params, matmul="gemm").generate_outputs([[5, 6, 7, 8]], request, output_logits=True)
    einsum = Generator(config, params, matmul="einsum").generate_outputs([[5, 6, 7, 8]], request, output_logits=True)
    f32_config, f32_params = qwen2_jax.load_checkpoint(path)
    f32 = Generator(f32_config, f32_params).generate_outputs([[5, 6, 7, 8]], request, output_logits=True)
    # teacher-forced comparison would need equal tokens; the first step's logits always compare
    a, b, ref = gemm["logits"][0][0], einsum["logits"][0][0], f32["logits"][0][0]
    scale = np.abs(ref).max()
    assert np.abs(a - ref).max() < 0.05 * scale and np.abs(b - ref).max() < 0.05 * scale
    assert jax.tree.leaves(Generator(config, params).params)[0].dtype == jnp.bfloat16  # no float32 copy held
