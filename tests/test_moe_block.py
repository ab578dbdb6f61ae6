"""The sparse MoE block on its own: grouped-matmul paths against a plain per-expert loop, expert
parallelism on fake-device meshes against one device, gradients, presets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax.config import Qwen2Config, preset
from qwen2_jax.moe import SparseMoeBlock, grouped_ffn, local_experts, route
from qwen2_jax.options import RunOptions
from qwen2_jax.sharding import ShardingContext, make_mesh
from tolerances import BF16_MOE_MEDIAN_REL, BLOCK_GRAD_REL, EXPERT_PARALLEL_REL, EXPERTS_F64_REL, GROUPED_FFN_TOL

CFG = Qwen2Config(
    model_type="qwen2_moe",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=3,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    initializer_range=0.3,
)


def _silu(a):
    return a / (1.0 + np.exp(-a))


def per_expert_loop(x_nd, weights_nk, idx_nk, w_gate, w_up, w_down):
    """HF Qwen2MoeExperts.forward in numpy float64: visit experts in ascending id, index_add."""
    x_nd, weights_nk = np.asarray(x_nd, np.float64), np.asarray(weights_nk, np.float64)
    idx_nk = np.asarray(idx_nk)
    out = np.zeros_like(x_nd)
    for e in range(w_gate.shape[0]):
        tok, slot = np.nonzero(idx_nk == e)
        if tok.size == 0:
            continue
        h = x_nd[tok]
        y = (_silu(h @ np.asarray(w_gate[e], np.float64)) * (h @ np.asarray(w_up[e], np.float64))) @ np.asarray(
            w_down[e], np.float64
        )
        np.add.at(out, tok, y * weights_nk[tok, slot, None])
    return out


def _weights(num_experts, d=32, f=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        0.3 * jax.random.normal(ks[0], (num_experts, d, f)),
        0.3 * jax.random.normal(ks[1], (num_experts, d, f)),
        0.3 * jax.random.normal(ks[2], (num_experts, f, d)),
    )


FAST_ROUTING = {
    ("ragged_dot", "random"),
    ("ragged_dot", "one-expert"),
    ("tiled", "skewed"),
    ("tiled", "one-expert"),
    ("tiled", "all-experts"),
}


@pytest.mark.parametrize(
    "impl,routing",
    [
        pytest.param(i, r, marks=() if (i, r) in FAST_ROUTING else pytest.mark.slow)
        for i in ("ragged_dot", "tiled")
        for r in ("random", "skewed", "one-expert", "all-experts")
    ],
)
def test_grouped_paths_equal_per_expert_loop(impl, routing):
    n, d, num_experts, k = 37, 32, 8, 3
    x = jax.random.normal(jax.random.key(1), (n, d))
    logits = jax.random.normal(jax.random.key(2), (n, num_experts))
    if routing == "skewed":  # experts 5..7 never chosen: empty groups in the middle and at the end
        logits = logits.at[:, 5:].add(-100.0)
    if routing == "one-expert":  # every token's first choice is expert 3, all k choices among 3 experts
        k = 1
        logits = logits.at[:, 3].add(100.0)
    if routing == "all-experts":
        k = num_experts
    weights, idx = route(logits, k, norm_topk_prob=False)
    wg, wu, wd = _weights(num_experts)
    ours = jax.jit(lambda *a: local_experts(*a, impl=impl))(x, weights, idx, wg, wu, wd)
    ref = per_expert_loop(x, weights, idx, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=EXPERTS_F64_REL * np.abs(ref).max())


def test_grouped_ffn_zeroes_rows_past_the_groups():
    wg, wu, wd = _weights(4)
    x = jax.random.normal(jax.random.key(0), (20, 32))
    sizes = jnp.array([3, 0, 5, 2], jnp.int32)  # 10 of 20 rows used
    for impl in ("ragged_dot", "tiled"):
        y = np.asarray(jax.jit(grouped_ffn, static_argnums=5)(x, sizes, wg, wu, wd, impl))
        assert np.all(y[10:] == 0), impl
        np.testing.assert_allclose(
            y[3:8],
            np.asarray(jax.nn.silu(x[3:8] @ wg[2]) * (x[3:8] @ wu[2]) @ wd[2]),
            rtol=GROUPED_FFN_TOL,
            atol=GROUPED_FFN_TOL,
        )


@jax.jit
def _reference(params, x):
    return SparseMoeBlock(CFG, RunOptions()).apply({"params": params}, x)


def _init_block():
    x = jax.random.normal(jax.random.key(1), (4, 6, CFG.hidden_size))
    params = nn.unbox(SparseMoeBlock(CFG, RunOptions()).init(jax.random.key(0), x)["params"])
    return x, params


def test_param_names_and_shapes_match_the_name_table():
    from qwen2_jax.hf_keys import leaf_shapes
    from qwen2_jax.params import abstract_params

    cfg = CFG.replace(num_hidden_layers=2, layer_types=None)
    shapes = {p: s for p, s in leaf_shapes(cfg).items() if "mlp" in p}
    abstract = abstract_params(cfg)
    for path, shape in shapes.items():
        node = abstract
        for key in path:
            node = node[key]
        assert node.shape == shape, path
    assert ("layers", "mlp", "experts", "gate_kernel") in shapes


MESHES = {
    "expert2": (dict(expert=2), "allgather"),
    "expert4-data2-a2a": (dict(data=2, expert=4), "ragged_all_to_all"),
    "expert8": (dict(expert=8), "allgather"),
    "data2-expert2-tensor2-a2a": (dict(data=2, expert=2, tensor=2), "ragged_all_to_all"),
    "fsdp2-expert4": (dict(fsdp=2, expert=4), "allgather"),
    # slow: the remaining combinations
    "expert2-a2a": (dict(expert=2), "ragged_all_to_all"),
    "expert8-a2a": (dict(expert=8), "ragged_all_to_all"),
    "data2-expert2-tensor2": (dict(data=2, expert=2, tensor=2), "allgather"),
    "fsdp2-expert4-a2a": (dict(fsdp=2, expert=4), "ragged_all_to_all"),
    "expert1-tensor2-data4": (dict(data=4, tensor=2), "auto"),
}
FAST_MESHES = {"expert4-data2-a2a", "expert8", "data2-expert2-tensor2-a2a", "fsdp2-expert4"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST_MESHES else pytest.mark.slow) for n in MESHES])
def test_expert_parallel_equals_one_device(name):
    axes, exchange = MESHES[name]
    x, params = _init_block()
    ref, ref_logits = _reference(params, x)
    mesh = make_mesh(**axes, devices=jax.devices()[: int(np.prod(list(axes.values())))])
    ctx = ShardingContext(mesh)
    block = SparseMoeBlock(CFG, RunOptions(sharding=ctx, moe_exchange=exchange))
    run = jax.jit(lambda p, x: block.apply({"params": p}, x))
    # 24 tokens: split over the expert axis (tokens exchanged); 6 tokens on expert >= 4: replicated (psum)
    for xx, rr in ((x, ref), (x[:1], ref[:1])):
        out, logits = run(params, xx)
        scale = float(jnp.abs(rr).max())
        np.testing.assert_allclose(np.asarray(out), np.asarray(rr), rtol=0, atol=EXPERT_PARALLEL_REL * scale)
    # router logits: measured bit-identical on every ISA; 1e-6 is a few float32 ulps
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits[:1]), rtol=1e-6, atol=1e-6)


def test_gradients_equal_across_paths():
    x, params = _init_block()
    cot = jax.random.normal(jax.random.key(7), x.shape)

    def loss(block):
        def f(p, x):
            out, logits = block.apply({"params": p}, x)
            return jnp.sum(out * cot) + 0.1 * jnp.sum(jax.nn.log_softmax(logits))

        return jax.jit(jax.grad(f, argnums=(0, 1)))

    ref = loss(SparseMoeBlock(CFG, RunOptions(moe_impl="ragged_dot")))(params, x)
    mesh = make_mesh(data=2, expert=4)
    for block in (
        SparseMoeBlock(CFG, RunOptions(moe_impl="tiled")),
        SparseMoeBlock(CFG, RunOptions(sharding=ShardingContext(mesh), moe_exchange="allgather")),
    ):
        got = loss(block)(params, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            assert np.all(np.isfinite(np.asarray(a)))
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=0, atol=BLOCK_GRAD_REL * float(jnp.abs(b).max())
            )


@pytest.mark.parametrize(
    "name,experts,top_k,moe,shared,hidden",
    [
        ("qwen2-57b-a14b", 64, 8, 2560, 20480, 3584),
        ("qwen2-57b-a14b-instruct", 64, 8, 2560, 20480, 3584),
        ("qwen1.5-moe-a2.7b", 60, 4, 1408, 5632, 2048),
    ],
)
def test_moe_presets(name, experts, top_k, moe, shared, hidden):
    cfg = preset(name)
    assert cfg.is_moe and cfg.model_type == "qwen2_moe"
    assert (
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.moe_intermediate_size,
        cfg.shared_expert_intermediate_size,
        cfg.hidden_size,
    ) == (experts, top_k, moe, shared, hidden)
    assert not cfg.norm_topk_prob and cfg.router_aux_loss_coef == 0.001 and cfg.rope_theta == 1e6
    assert all(cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers))
    assert not any(cfg.layer_is_sliding)


def test_bfloat16_paths_run_and_agree():
    x, params = _init_block()
    ref, _ = _reference(params, x)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    scale = float(jnp.abs(ref).max())
    for impl in ("ragged_dot", "tiled"):
        out, logits = jax.jit(
            lambda p, x, impl=impl: SparseMoeBlock(
                CFG, RunOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, moe_impl=impl)
            ).apply({"params": p}, x)
        )(p16, x.astype(jnp.bfloat16))
        assert out.dtype == jnp.bfloat16 and logits.dtype == jnp.bfloat16
        # bf16 rounding can flip a near-tied expert choice for a token or two; the bulk must agree
        err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))
        assert np.median(err) < BF16_MOE_MEDIAN_REL * scale, impl
