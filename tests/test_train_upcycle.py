"""MoE upcycling (train/upcycle.py): a dense checkpoint into a Qwen2-MoE model's first parameters.

The exact relation: with no reinit, no shuffle, E experts of width I/E, the router kernel zero (softmax
1/E for every expert) and k = E, every expert is selected with weight 1/E (the top-k ties all fall
inside k = E, so their order does not matter; HF's combination sums them in ascending id), the experts
partition the dense channels, so routed(x) = (1/E) FFN(x); the shared expert (down rows doubled, gate
kernel zero: sigmoid 1/2) adds FFN(x). The upcycled model's logits then equal a dense forward of the
original checkpoint with every down kernel scaled by 1 + 1/E (1/E without a shared expert), to 1e-5.
Also: the upcycled state's shapes and shardings on an expert mesh, the reinit share, the seeded
shuffle, and the one-line errors (exit 2) of a mismatched checkpoint or an unknown init key."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax import forward
from qwen2_jax.config import Qwen2Config
from qwen2_jax.orbax_checkpoint import save
from qwen2_jax.params import init_params
from train import upcycle
from train.config import ConfigKeyError, InitSection, load_config
from train_utils import TINY_MODEL, SyntheticData

DENSE = Qwen2Config(**TINY_MODEL)  # intermediate 64


def _moe(experts=4, top_k=4, width=16, shared=64, **changes):
    fields = dict(
        TINY_MODEL,
        model_type="qwen2_moe",
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=shared,
    )
    return Qwen2Config(**{**fields, **changes})


def _randomized_dense(seed=0):
    """Every leaf random, norms around 1 and biases non-zero, so nothing copies by accident."""
    params = init_params(DENSE, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    new = []
    for path, leaf, key in zip(paths, leaves, keys):
        noise = 0.2 * jax.random.normal(key, leaf.shape, leaf.dtype)
        new.append(1.0 + noise if "scale" in path else noise)
    return jax.tree.unflatten(tree, new)


def _upcycle(moe, dense_params, *, shuffle=False, fraction=0.0, seed=0, zero_router=False):
    fresh = init_params(moe, jax.random.key(seed))
    if zero_router:
        fresh["layers"]["mlp"]["router_kernel"] = jnp.zeros_like(fresh["layers"]["mlp"]["router_kernel"])
    plan = upcycle.make_plan(DENSE, moe, InitSection("x", shuffle, fraction), seed)
    return upcycle.upcycle_params(DENSE, dense_params, moe, fresh, plan), fresh, plan


@pytest.mark.parametrize(
    "shared,factor",
    [(64, 1 + 1 / 4), (128, 1 + 1 / 4), (0, 1 / 4)],
    ids=["shared-equal-width", "shared-tiled-2x", "no-shared"],
)
def test_uniform_router_logits_equal_the_scaled_dense_model(shared, factor):
    dense = _randomized_dense()
    moe = _moe(shared=shared)
    params, _, _ = _upcycle(moe, dense, zero_router=True)
    ids = jax.random.randint(jax.random.key(3), (2, 12), 0, DENSE.vocab_size)
    got = forward(moe, params, ids)
    scaled = jax.tree.map(lambda a: a, dense)
    scaled["layers"]["mlp"]["down_kernel"] = dense["layers"]["mlp"]["down_kernel"] * factor
    want = forward(DENSE, scaled, ids)
    assert float(jnp.max(jnp.abs(want))) > 0.5  # logits far from zero: the comparison means something
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_attention_norms_embeddings_copied_router_fresh_shared_gate_zero():
    dense = _randomized_dense()
    moe = _moe(experts=8, top_k=2, width=16)
    params, fresh, _ = _upcycle(moe, dense, shuffle=True, fraction=0.5)
    for key in ("embed_tokens", "lm_head", "norm"):
        jax.tree.map(np.testing.assert_array_equal, params[key], dense[key])
    for key in ("self_attn", "input_layernorm", "post_attention_layernorm"):
        jax.tree.map(np.testing.assert_array_equal, params["layers"][key], dense["layers"][key])
    mlp = params["layers"]["mlp"]
    np.testing.assert_array_equal(mlp["router_kernel"], fresh["layers"]["mlp"]["router_kernel"])
    assert not np.any(mlp["shared_expert_gate_kernel"])
    np.testing.assert_array_equal(mlp["shared_expert"]["down_kernel"], 2 * dense["layers"]["mlp"]["down_kernel"])


@pytest.mark.parametrize("fraction,count", [(0.5, 8), (0.25, 4), (1.0, 16)])
def test_reinit_fraction_reinitialises_that_share_of_each_expert(fraction, count):
    dense = _randomized_dense()
    moe = _moe(experts=8, top_k=2, width=16)
    params, fresh, plan = _upcycle(moe, dense, shuffle=True, fraction=fraction)
    experts, fresh_experts, dense_mlp = (
        params["layers"]["mlp"]["experts"],
        fresh["layers"]["mlp"]["experts"],
        dense["layers"]["mlp"],
    )
    for layer in range(DENSE.num_hidden_layers):
        for e in range(moe.num_experts):
            channels, reinit = plan.channels["layers"][layer, e], plan.reinit["layers"][layer, e]
            assert int(reinit.sum()) == count
            gate = np.asarray(experts["gate_kernel"][layer, e])
            down = np.asarray(experts["down_kernel"][layer, e])
            copied = np.all(gate == np.asarray(dense_mlp["gate_kernel"][layer])[:, channels], axis=0)
            copied &= np.all(down == np.asarray(dense_mlp["down_kernel"][layer])[channels], axis=1)
            kept_fresh = np.all(gate == np.asarray(fresh_experts["gate_kernel"][layer, e]), axis=0)
            np.testing.assert_array_equal(copied, ~reinit)
            np.testing.assert_array_equal(kept_fresh, reinit)


def test_shuffle_differs_across_experts_and_is_seeded():
    # 8 experts of 16 over a dense width of 64: two copies of the FFN, each shuffled on its own
    moe = _moe(experts=8, top_k=2, width=16)
    init = InitSection("x", True, 0.5)
    plan = upcycle.make_plan(DENSE, moe, init, seed=0)
    channels = plan.channels["layers"]  # [layers, E, f]
    for layer in range(DENSE.num_hidden_layers):
        rows = {tuple(c) for c in channels[layer]}
        assert len(rows) == moe.num_experts  # every expert differs
        for copy in range(2):  # each copy's 4 experts together hold every dense channel once
            assert sorted(channels[layer, 4 * copy : 4 * copy + 4].reshape(-1)) == list(range(64))
    assert not np.array_equal(channels[0], channels[1])  # layers shuffled independently
    again = upcycle.make_plan(DENSE, moe, init, seed=0)
    np.testing.assert_array_equal(again.channels["layers"], channels)
    np.testing.assert_array_equal(again.reinit["layers"], plan.reinit["layers"])
    other = upcycle.make_plan(DENSE, moe, init, seed=1)
    assert not np.array_equal(other.channels["layers"], channels)
    plain = upcycle.make_plan(DENSE, moe, InitSection("x", False, 0.5), seed=0).channels["layers"]
    want = (np.arange(8)[:, None] * 16 + np.arange(16)[None, :]) % 64  # consecutive, wrapping slices
    np.testing.assert_array_equal(plain[0], want)


def test_upcycled_state_on_an_expert_mesh_has_the_moe_shapes_and_shardings(tmp_path):
    from train import model_setup as ms

    dense = _randomized_dense()
    save(str(tmp_path / "dense"), DENSE, dense)
    moe = _moe(experts=8, top_k=2, width=16, mlp_only_layers=(1,))  # a sparse and a dense segment
    mesh = ms.build_mesh({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1})
    setup = ms.ModelSetup(moe, mesh)
    init = InitSection(str(tmp_path / "dense"), True, 0.5)
    params = upcycle.upcycled_params(setup, init, seed=0)
    abstract, shardings = setup.abstract_params(), setup.param_shardings()
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for leaf, want, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        assert leaf.shape == want.shape and leaf.dtype == want.dtype
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)
    experts = params["layers_0"]["mlp"]["experts"]["gate_kernel"]
    assert experts.sharding.spec[1] == "expert"  # the experts split over the expert axis
    # the same values as the single-device upcycling
    fresh = init_params(moe, jax.random.key(0))
    single = upcycle.upcycle_params(DENSE, dense, moe, fresh, upcycle.make_plan(DENSE, moe, init, 0))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(single))
    np.testing.assert_array_equal(params["layers_1"]["mlp"]["up_kernel"][0], dense["layers"]["mlp"]["up_kernel"][1])


def _train_sets(tmp_path, dense_dir, *extra):
    sets = [
        f"output_dir={tmp_path / 'run'}",
        "model=qwen2-0.5b",
        f"init.upcycle_from={dense_dir}",
        "total_steps=1",
        "batch_size=8",
        "seq_len=16",
        "progress=false",
    ]
    sets += [f"model_overrides.{k}={v}" for k, v in TINY_MODEL.items()]
    sets += ["model_overrides.model_type=qwen2_moe", "model_overrides.num_experts=8"]
    sets += ["model_overrides.num_experts_per_tok=2", "model_overrides.moe_intermediate_size=16"]
    sets += ["model_overrides.shared_expert_intermediate_size=64"]
    # the preset's other fields as the dense test model has them
    sets += [f"model_overrides.{k}={getattr(DENSE, k):.6e}" for k in ("rope_theta", "rms_norm_eps")]
    sets += ["model_overrides.tie_word_embeddings=false", "model_overrides.qkv_bias=true"]
    return sets + list(extra)


def _cli_args(tmp_path, dense_dir, *extra):
    """qwen2-train's arguments: an empty config file, every key by --set."""
    (tmp_path / "empty.yaml").write_text("")
    args = ["--config", str(tmp_path / "empty.yaml")]
    for s in _train_sets(tmp_path, dense_dir, *extra):
        args += ["--set", s]
    return args


def test_mismatched_dense_checkpoint_exits_2_naming_the_field(tmp_path, capsys):
    from train.cli import main

    wider = Qwen2Config(**dict(TINY_MODEL, hidden_size=48, num_attention_heads=4))
    save(str(tmp_path / "dense"), wider, init_params(wider, jax.random.key(0)))
    assert main(_cli_args(tmp_path, tmp_path / "dense")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "hidden_size is 48, the MoE model's 32" in lines[0], lines
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_upcycle_needs_a_moe_model_and_known_init_keys(tmp_path, capsys):
    from train.cli import main

    save(str(tmp_path / "dense"), DENSE, init_params(DENSE, jax.random.key(0)))
    assert main(_cli_args(tmp_path, tmp_path / "dense", "model_overrides.model_type=qwen2")) == 2
    assert "upcycling needs a qwen2_moe model" in capsys.readouterr().err
    with pytest.raises(ConfigKeyError, match="'init.upcycle_frm'"):
        load_config(None, ["init.upcycle_frm=/x"])
    with pytest.raises(ConfigKeyError, match="'init.upcycle_reinit_fraction'"):
        load_config(None, ["init.upcycle_reinit_fraction=1.5"])


def test_qwen2_train_starts_from_the_upcycled_dense_model(tmp_path):
    """In the trainer: the first loss of the upcycled run is the upcycled params' loss on the first batch,
    within 5% of the dense model's loss on it, and the checkpoint is the MoE model."""
    import qwen2_jax
    from train.loop import train

    dense = _randomized_dense()
    save(str(tmp_path / "dense"), DENSE, dense)
    config = load_config(
        None, _train_sets(tmp_path, tmp_path / "dense", "mesh.data=2", "mesh.expert=4", "loss.aux_loss_coef=0.01")
    )
    data = SyntheticData(DENSE.vocab_size, 16)
    train(config, data=data, log=lambda *a: None)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    batch = next(data.train_iterator(global_batch_size=8, seed=0, process_index=0, process_count=1))["input_ids"]
    logits = forward(DENSE, dense, batch)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    dense_loss = -float(jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)))
    lm_loss = first["loss"] - 0.01 * first["aux_loss"]  # the logged loss adds the load-balancing term
    print(f"upcycled step-0 loss {lm_loss:.4f}, dense {dense_loss:.4f}, ratio {lm_loss / dense_loss:.4f}")
    assert lm_loss / dense_loss <= 1.05, (lm_loss, dense_loss)
    config_out, _ = qwen2_jax.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert config_out.is_moe and config_out.num_experts == 8
