"""int8 kernels: per-channel absmax round trip, the int8 product, which params change, generation on
one device and on meshes, load_checkpoint / qwen2-generate --quantize and their errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen2_jax
from hf_utils import hf_dense_config, make_hf_model
from qwen2_jax import cli
from qwen2_jax.config import Qwen2Config
from qwen2_jax.forward import forward_outputs
from qwen2_jax.generate import GenerateOptions, Generator
from qwen2_jax.matmul import (
    INT8_DIGITS_MAX_ROWS,
    INT8_DIGITS_MAX_ROWS_LARGE,
    LARGE_KERNEL_ELEMENTS,
    dequantize,
    int8_digits,
    int8_dot,
    int8_form,
    quantize_int8,
)
from qwen2_jax.quantize import quantize_params
from qwen2_jax.sharding import make_mesh


def test_round_trip_and_per_channel_scales():
    rng = np.random.RandomState(0)
    w = rng.randn(6, 4, 5).astype(np.float32) * np.array([0.01, 1.0, 30.0, 0.5])[None, :, None]  # [in, out...]
    w[:, 2, 3] = 0.0  # an all-zero output channel
    q = quantize_int8(jnp.asarray(w), (0,))
    assert q.values.dtype == jnp.int8 and q.values.shape == w.shape
    assert q.scale.dtype == jnp.float32 and q.scale.shape == (4, 5)
    amax = np.abs(w).max(axis=0)
    np.testing.assert_allclose(np.asarray(q.scale), np.where(amax > 0, amax / 127, 1.0), rtol=1e-6)
    assert np.abs(np.asarray(q.values)).max() == 127 and np.all(np.asarray(q.values)[:, 2, 3] == 0)
    back = np.asarray(dequantize(q, (0,)))
    assert np.all(np.abs(back - w) <= np.asarray(q.scale)[None] / 2 * (1 + 1e-6))  # half a step per channel


def test_int8_dot_equals_the_dequantized_product():
    rng = np.random.RandomState(1)
    x = rng.randn(3, 64).astype(np.float32)
    x[1, 7] = 80.0  # an outlier activation: the row's digits still resolve the small values
    x[2] = 0.0
    w = rng.randn(48, 64).astype(np.float32)  # [out, in]
    q = quantize_int8(jnp.asarray(w), (1,))
    ref = x.astype(np.float64) @ np.asarray(dequantize(q, (1,)), np.float64).T
    got = np.asarray(int8_dot(jnp.asarray(x), q.values, q.scale, in_first=False))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    digits, s_hi, s_lo = int8_digits(jnp.asarray(x))
    rebuilt = np.asarray(digits[:3], np.float32) * np.asarray(s_hi) + np.asarray(digits[3:], np.float32) * np.asarray(
        s_lo
    )
    assert np.abs(rebuilt - x).max() <= np.abs(x).max() / 127 / 254  # 16-bit fixed point per row


@pytest.mark.parametrize("in_first", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_each_int8_form_equals_the_dequantized_product(rows, in_first):
    """Both forms, forced, against the float64 product of the activations as given (bf16 or float32)
    with the dequantized kernel: "digits" within its 16-bit activation split, "dequantize" within
    float32 accumulation (int8 values are exact in bf16 and float32)."""
    rng = np.random.RandomState(2)
    x = rng.randn(rows, 64).astype(np.float32)
    x[0, 5] = 50.0  # an outlier activation
    w = rng.randn(48, 64).astype(np.float32)  # [out, in]
    q = quantize_int8(jnp.asarray(w.T if in_first else w), (0,) if in_first else (1,))
    w_deq = np.asarray(dequantize(q, (0,) if in_first else (1,)), np.float64)
    w_deq = w_deq if in_first else w_deq.T  # [in, out]
    for dtype in (jnp.float32, jnp.bfloat16):
        x_in = jnp.asarray(x).astype(dtype)
        ref = np.asarray(x_in.astype(jnp.float32), np.float64) @ w_deq
        for form, tol in (("digits", 2e-4), ("dequantize", 1e-6)):
            got = np.asarray(int8_dot(x_in, q.values, q.scale, in_first, form))
            assert got.shape == ref.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, ref, rtol=0, atol=tol * np.abs(ref).max(), err_msg=f"{form} {dtype}")


def test_int8_form_by_row_count():
    small, large = 896 * 4864, LARGE_KERNEL_ELEMENTS + 1
    assert int8_form(1, small) == int8_form(INT8_DIGITS_MAX_ROWS, small) == "digits"
    assert int8_form(INT8_DIGITS_MAX_ROWS + 1, small) == "dequantize"
    assert int8_form(INT8_DIGITS_MAX_ROWS_LARGE, large) == "digits"
    assert int8_form(INT8_DIGITS_MAX_ROWS_LARGE + 1, large) == "dequantize"
    # and int8_dot follows it: an int32 dot for digits, none when dequantizing
    v, s = jnp.zeros((48, 64), jnp.int8), jnp.ones((48,), jnp.float32)
    for rows, int_dot in ((INT8_DIGITS_MAX_ROWS, True), (INT8_DIGITS_MAX_ROWS + 1, False)):
        jaxpr = str(jax.make_jaxpr(lambda x: int8_dot(x, v, s, False))(jnp.ones((rows, 64), jnp.bfloat16)))
        assert ("preferred_element_type=int32" in jaxpr) == int_dot, rows
    with pytest.raises(ValueError, match="unknown int8 form"):
        int8_dot(jnp.ones((2, 64)), v, s, False, "int4")


def test_dequantize_form_is_not_hoisted_out_of_a_loop():
    """The kernel's float copy stays inside the loop that uses it: XLA hoists an untied convert out of
    it (a float copy of every kernel per generate call)."""
    v = jnp.asarray(np.random.RandomState(3).randint(-127, 128, (48, 40)).astype(np.int8))  # [out, in]
    s = jnp.ones((48,), jnp.float32)

    def loop(x, v, s, steps):
        def body(i, x):
            return x + int8_dot(x, v, s, False, "dequantize")[:, :40].astype(x.dtype) * 1e-3

        return jax.lax.fori_loop(0, steps, body, x)

    hlo = jax.jit(loop).lower(jnp.ones((8, 40), jnp.bfloat16), v, s, 3).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    assert " while(" in entry
    outside = entry.split(" while(")[0]
    assert not any(f"{t}[48,40]" in outside for t in ("bf16", "f32")), outside


TINY = Qwen2Config(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_hf_model(hf_dense_config(num_hidden_layers=2, tie_word_embeddings=True), seed=9)
    path = tmp_path_factory.mktemp("int8")
    model.save_pretrained(path)
    return str(path)


def test_only_decoder_and_head_matrices_are_quantized(checkpoint):
    config, params = qwen2_jax.load_checkpoint(checkpoint, dtype="bfloat16")
    _, q = qwen2_jax.load_checkpoint(checkpoint, dtype="bfloat16", quantize="int8")
    assert q["embed_tokens"].dtype == jnp.bfloat16 and q["norm"]["scale"].dtype == jnp.bfloat16
    layers = q["layers"]
    assert layers["self_attn"]["q_kernel"].dtype == jnp.int8 and layers["self_attn"]["q_bias"].dtype == jnp.bfloat16
    assert layers["self_attn"]["o_kernel_scale"].shape == (2, config.hidden_size)  # [layers, out]
    assert layers["mlp"]["down_kernel"].dtype == jnp.int8 and layers["input_layernorm"]["scale"].dtype == jnp.bfloat16
    assert q["lm_head_int8"].shape == (config.vocab_size, config.hidden_size)  # tied: an int8 copy of the head
    ids = np.random.RandomState(3).randint(0, config.vocab_size, (2, 9))
    a = np.asarray(qwen2_jax.forward(config, params, ids))
    b = np.asarray(qwen2_jax.forward(config, q, ids))
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()  # every weight randomised at 0.2: coarse steps


def test_moe_experts_stay_float():
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=16,
    )
    params = qwen2_jax.params.init_params(cfg, jax.random.key(0))
    q = quantize_params(cfg, params)
    mlp = q["layers"]["mlp"]
    assert mlp["experts"]["gate_kernel"].dtype == jnp.float32
    assert mlp["shared_expert"]["gate_kernel"].dtype == jnp.int8
    ids = np.random.RandomState(0).randint(0, 64, (1, 6))
    ref = np.asarray(forward_outputs(cfg, params, ids)["logits"])
    got = np.asarray(forward_outputs(cfg, q, ids)["logits"])
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize(
    "axes",
    [
        dict(data=2, tensor=4),
        # slow: the same sharded int8 path (scales split with their channels over tensor) as data x tensor
        pytest.param(dict(fsdp=2, tensor=2), marks=pytest.mark.slow),
    ],
    ids=["data2-tensor4", "fsdp2-tensor2"],
)
def test_int8_generation_one_device_equals_meshes(checkpoint, axes):
    request = GenerateOptions(10, eos_token_ids=[])
    prompts = [[5, 6, 7, 8, 9], [11, 3]]
    config, q = qwen2_jax.load_checkpoint(checkpoint, dtype="bfloat16", quantize="int8")
    one = Generator(config, q).generate(prompts, request)
    # quantizing after the per-layer relayout (Generator(quantize=)) gives the same params
    _, params = qwen2_jax.load_checkpoint(checkpoint, dtype="bfloat16")
    assert Generator(config, params, quantize="int8").generate(prompts, request) == one
    mesh = make_mesh(**axes, devices=jax.devices()[: 2 * max(axes.values())])
    _, sharded = qwen2_jax.load_checkpoint(checkpoint, dtype="bfloat16", mesh=mesh, quantize="int8")
    scale = sharded["layers"]["mlp"]["gate_kernel_scale"]  # [layers, mlp]: sharded with its channel
    assert scale.sharding.spec[1] == "tensor", scale.sharding.spec
    assert sharded["layers"]["mlp"]["gate_kernel"].sharding.spec[2] == "tensor"
    assert Generator(config, sharded).generate(prompts, request) == one, axes


def test_bad_quantize_values_are_one_line_errors(checkpoint, capsys):
    with pytest.raises(ValueError, match="unknown quantize 'int4'"):
        qwen2_jax.load_checkpoint(checkpoint, quantize="int4")
    with pytest.raises(ValueError, match="unknown quantize"):
        qwen2_jax.RunOptions(quantize="fp8")
    rc = cli.main(["--checkpoint", checkpoint, "--prompt-ids", "1,2", "--quantize", "int4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--quantize" in err


def test_cli_quantize_int8(checkpoint, capsys):
    rc = cli.main(
        [
            "--checkpoint",
            checkpoint,
            "--prompt-ids",
            "1,2,3",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--json",
            "--dtype",
            "bfloat16",
            "--quantize",
            "int8",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    config, q = qwen2_jax.load_checkpoint(checkpoint, dtype="bfloat16", quantize="int8")
    assert json.loads(out)["tokens"] == qwen2_jax.generate(config, q, [[1, 2, 3]], 5, eos_token_ids=[])[0]
