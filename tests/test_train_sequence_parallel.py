"""Sequence (context) parallelism, mesh.sequence > 1: rows split over devices in zig-zag order, keys
and values all-gathered in attention. Loss and gradients equal one device's (plain rows, packed rows
with segment ids, DPO's per-token log-probabilities), and a short train() logs one device's losses."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax.cli_support import UsageError
from qwen2_jax.config import Qwen2Config
from qwen2_jax.sequence_parallel import from_zigzag, to_zigzag, zigzag_order
from train.config import LossConfig, load_config
from train.loop import build_run, train
from train.loss import IGNORE_INDEX
from train.model_setup import ModelSetup, build_mesh
from train.objective import Objective
from train.token_logps import batch_token_logps
from train_utils import TINY_LOSS_MODEL, TINY_MODEL, SyntheticData

SEQ = 32
TINY = dict(TINY_LOSS_MODEL, max_position_embeddings=64, tie_word_embeddings=False)
TOL = 1e-5  # float32, max |difference| / max |one-device value|, per leaf


def _setup(mesh_sizes, devices=None):
    return ModelSetup(Qwen2Config(**TINY), build_mesh(mesh_sizes, devices))


@pytest.fixture(scope="module")
def single():
    return _setup({}, jax.devices()[:1])


@pytest.fixture(scope="module")
def params(single):
    """Every parameter random (norm scales, biases and both heads included), on one device."""
    p = single.init_params(seed=0)
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.device_get(jax.tree.unflatten(tree, noisy))


def _plain_batch(vocab, rows=4):
    rng = np.random.RandomState(0)
    ids = rng.randint(0, vocab, (rows, SEQ)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, -5:] = 0  # right padding
    labels = np.where(mask.astype(bool), ids, IGNORE_INDEX)
    labels[2, 9] = IGNORE_INDEX  # an ignored label inside a row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int32)}


def _packed_batch(vocab, rows=4):
    """Rows of several documents (segment ids 1, 2, ..., 0 = padding at the end), as SFT packs them."""
    rng = np.random.RandomState(1)
    ids = rng.randint(0, vocab, (rows, SEQ)).astype(np.int32)
    segments = np.zeros_like(ids)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(2, SEQ - 3), 2 + r % 2, replace=False))
        bounds = [0, *cuts, SEQ - (r % 3)]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            segments[r, a:b] = s + 1
    labels = np.where(segments > 0, ids, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    labels[0, 3:6] = IGNORE_INDEX  # a prompt not trained on
    return {"input_ids": ids, "labels": labels.astype(np.int32), "segment_ids": segments.astype(np.int32)}


def _loss_and_grads(setup, params, batch):
    objective = Objective(setup, LossConfig(chunk_length=8))

    def loss(p, b):
        terms = objective.terms(p, b)
        return objective.combine(terms, terms["tokens"], 1)

    p = jax.device_put(params, setup.param_shardings())
    return jax.jit(jax.value_and_grad(loss))(p, batch)


def _max_rel(got, ref) -> float:
    errs = [
        float(jnp.max(jnp.abs(np.asarray(g) - np.asarray(r)))) / (float(jnp.max(jnp.abs(np.asarray(r)))) + 1e-12)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref))
    ]
    return max(errs)


def test_zigzag_order_gives_each_device_chunks_i_and_2n_minus_1_minus_i():
    order = zigzag_order(16, 4)  # 8 chunks of 2
    assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    x = jnp.arange(32).reshape(2, 16)
    np.testing.assert_array_equal(from_zigzag(to_zigzag(x, 4), 4), x)
    with pytest.raises(ValueError, match="divisible by 2 x the sequence axis"):
        zigzag_order(12, 4)


@pytest.mark.parametrize(
    "mesh_sizes",
    [
        {"sequence": 4, "data": 2},
        {"sequence": 2, "tensor": 2, "fsdp": 2},
        {"sequence": 2, "tensor": 4},  # 4 query heads split, 2 kv heads not: each device picks its kv heads
        pytest.param({"sequence": 8}, marks=pytest.mark.slow),
    ],
    ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()),
)
@pytest.mark.parametrize("kind", ["plain", "packed"])
def test_loss_and_gradients_equal_one_device(single, params, mesh_sizes, kind):
    make = _plain_batch if kind == "plain" else _packed_batch
    batch = make(TINY["vocab_size"])
    setup = _setup(mesh_sizes)
    assert setup.sequence_shards == mesh_sizes["sequence"]
    ref_loss, ref_grads = _loss_and_grads(single, params, batch)
    loss, grads = _loss_and_grads(setup, params, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=TOL)
    assert _max_rel(grads, ref_grads) < TOL


def test_sequence_axis_alone_over_four_devices(single, params):
    """mesh.sequence=4 with nothing else split (the other 4 devices idle: a 4-device mesh)."""
    batch = _packed_batch(TINY["vocab_size"])
    setup = _setup({"sequence": 4}, jax.devices()[:4])
    ref_loss, ref_grads = _loss_and_grads(single, params, batch)
    loss, grads = _loss_and_grads(setup, params, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=TOL)
    assert _max_rel(grads, ref_grads) < TOL
    # activations really are split on their length: the attention's inputs are never whole rows
    text = jax.jit(lambda p, b: Objective(setup, LossConfig(chunk_length=8)).terms(p, b)["loss_sum"]).lower(
        jax.device_put(params, setup.param_shardings()), batch
    )
    assert "all-gather" in text.compile().as_text()


def test_dpo_token_logps_come_back_in_row_order(single, params):
    batch = _packed_batch(TINY["vocab_size"])
    setup = _setup({"sequence": 4, "data": 2})

    def logps(s):
        p = jax.device_put(params, s.param_shardings())
        return jax.jit(lambda p, b: batch_token_logps(s, 8, p, b)[0])(p, batch)

    ref, got = logps(single), logps(setup)
    assert _max_rel(got, ref) < TOL


def _config(tmp_path, name, *overrides):
    sets = [
        f"output_dir={tmp_path / name}",
        "model=qwen2-0.5b",
        "total_steps=3",
        "log_every=1",
        "checkpoint_every=100",
        "batch_size=8",
        f"seq_len={SEQ}",
        "optimizer.learning_rate=1e-2",
        "loss.chunk_length=8",
        "progress=false",
    ]
    sets += [f"model_overrides.{k}={v}" for k, v in TINY_MODEL.items()]
    return load_config(None, sets + list(overrides))


def _logged(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_logs_the_losses_of_one_device(tmp_path):
    """train() with mesh.sequence=4 (x data 2; full remat, 2 micro-batches) logs the losses and gradient
    norms of plain data parallelism (mesh.data=8 over 8 rows: what one device computes, up to
    summation order)."""
    data = SyntheticData(TINY_MODEL["vocab_size"], SEQ)
    base = _config(tmp_path, "base", "mesh.data=8")
    parallel = _config(tmp_path, "seq", "mesh.data=2", "mesh.sequence=4", "remat=full", "grad_accum_steps=2")
    train(base, data=data, log=lambda *a: None)
    train(parallel, data=data, log=lambda *a: None)
    ref, got = _logged(base.output_dir), _logged(parallel.output_dir)
    assert [r["step"] for r in got] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["mesh.sequence=3", "mesh.data=1", "seq_len=30"], "needs 3 devices but 8"),
        (["mesh.sequence=8", "mesh.data=1", "seq_len=24"], r"seq_len 24 is not divisible by 2 x mesh.sequence \(16\)"),
        (["mesh.sequence=4", "mesh.data=2", "loss.chunk_length=2"], r"loss.chunk_length 2 is not divisible"),
        (
            [
                "mesh.sequence=4",
                "mesh.data=2",
                "model_overrides.model_type=qwen2_moe",
                "model_overrides.num_experts=4",
                "model_overrides.moe_intermediate_size=16",
            ],
            "dense models only",
        ),
    ],
)
def test_impossible_sequence_meshes_are_refused(tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message):
        build_run(_config(tmp_path, "bad", *overrides))
