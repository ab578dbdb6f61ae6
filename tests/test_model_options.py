"""Runtime options that must not change the numbers, and consistency of the name table with the model."""

import jax
import jax.numpy as jnp
import numpy as np

import qwen2_jax
from qwen2_jax.config import Qwen2Config
from qwen2_jax.forward import forward_outputs
from qwen2_jax.hf_keys import hf_table, leaf_shapes
from qwen2_jax.params import abstract_params, init_params, param_logical_axes
from qwen2_jax.sharding import make_mesh
from tolerances import BF16_COMPUTE_REL, FLOAT16_XFAIL, FP16_PARAMS_REL

TINY = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=1)


def test_unrolled_layers_equal_scanned():
    params = init_params(TINY, jax.random.key(0))
    ids = np.random.RandomState(0).randint(0, 96, (2, 9))
    scanned = np.asarray(forward_outputs(TINY, params, ids)["logits"])
    unrolled = np.asarray(forward_outputs(TINY, params, ids, scan_unroll=3)["logits"])
    np.testing.assert_allclose(unrolled, scanned, rtol=1e-6, atol=1e-6)  # measured bit-identical on every ISA


def test_compute_dtype_is_a_runtime_option():
    params = init_params(TINY, jax.random.key(1))
    ids = np.random.RandomState(1).randint(0, 96, (1, 7))
    f32 = np.asarray(forward_outputs(TINY, params, ids)["logits"])
    bf16 = forward_outputs(TINY, params, ids, dtype=jnp.bfloat16)["logits"]
    assert bf16.dtype == jnp.float32  # logits always come back in float32
    assert 0 < np.abs(np.asarray(bf16) - f32).max() < BF16_COMPUTE_REL * np.abs(f32).max()


def test_name_table_covers_every_parameter_with_matching_shapes():
    for cfg in (TINY, TINY.replace(tie_word_embeddings=True)):
        abstract = abstract_params(cfg)
        model_leaves = {tuple(k.key for k in path): leaf.shape
                        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
        assert model_leaves == leaf_shapes(cfg)
        keys = [e.hf_key for e in hf_table(cfg)]
        assert len(keys) == len(set(keys))
        assert ("lm_head.weight" in keys) != cfg.tie_word_embeddings


def test_every_parameter_has_logical_axes():
    axes = param_logical_axes(TINY)
    abstract = abstract_params(TINY)
    for names, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(abstract)):
        assert isinstance(names, tuple) and len(names) == leaf.ndim
    assert axes["layers"]["self_attn"]["q_kernel"] == ("layers", "embed", "q_heads", "head_dim")


def test_init_lands_in_shardings():
    mesh = make_mesh(fsdp=2, tensor=4)
    params = init_params(TINY, jax.random.key(2), mesh=mesh)
    assert params["layers"]["mlp"]["gate_kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert np.all(np.asarray(params["norm"]["scale"]) == 1.0)  # HF init: norms at one, biases at zero
    assert np.all(np.asarray(params["layers"]["self_attn"]["q_bias"]) == 0.0)
    ids = np.random.RandomState(2).randint(0, 96, (8, 5))
    assert np.isfinite(np.asarray(qwen2_jax.forward(TINY, params, ids))).all()


@FLOAT16_XFAIL
def test_float16_parameters_run_on_cpu():
    """XLA:CPU has no F16_F16_F32 dot: attention must still run for fp16 checkpoints."""
    params = init_params(TINY, jax.random.key(3), param_dtype=jnp.float16)
    ids = np.random.RandomState(3).randint(0, 96, (2, 7))
    f16 = np.asarray(qwen2_jax.forward(TINY, params, ids))
    f32 = np.asarray(qwen2_jax.forward(TINY, jax.tree.map(lambda x: x.astype(jnp.float32), params), ids))
    assert np.abs(f16 - f32).max() < FP16_PARAMS_REL * np.abs(f32).max()


@FLOAT16_XFAIL
def test_float16_parameters_generate_on_cpu():
    """The same for generation, in both layer modes (the unstacked one has its own attention call site)."""
    from qwen2_jax.generate import generate

    params = init_params(TINY, jax.random.key(4), param_dtype=jnp.float16)
    prompt = np.random.RandomState(4).randint(0, 96, 70).tolist()  # longer than one causal query block
    tokens = {mode: generate(TINY, params, [prompt], 4, layer_mode=mode)[0] for mode in ("unstacked", "scan")}
    assert tokens["unstacked"] == tokens["scan"] and len(tokens["scan"]) == 4
