"""The chunked cross-entropy (LM head inside each chunk, recomputed in the backward) gives the numbers
of train/loss.py: loss and gradients, dense (tied and untied head) and MoE, with padding and labels,
on one device and on an fsdp x tensor mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax.config import Qwen2Config
from train.config import LossConfig
from train.loss import IGNORE_INDEX, make_loss_fn
from train.model_setup import ModelSetup, build_mesh
from train.objective import Objective
from train_utils import TINY_LOSS_MODEL

SEQ = 16
DENSE = dict(TINY_LOSS_MODEL, max_position_embeddings=64)
MOE = dict(
    DENSE,
    model_type="qwen2_moe",
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    router_aux_loss_coef=0.01,
)


def _batch(vocab, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (4, SEQ)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    labels = np.where(mask.astype(bool), ids, IGNORE_INDEX)
    labels[3, 7] = IGNORE_INDEX  # an ignored label inside a row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int32)}


def _setup(fields, mesh_sizes):
    config = Qwen2Config(**fields)
    mesh = build_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh_sizes})
    return ModelSetup(config, mesh)


def _chunked(setup, chunk_length, z_loss_coef=0.0):
    objective = Objective(setup, LossConfig(chunk_length=chunk_length, z_loss_coef=z_loss_coef))

    def loss(params, batch):
        terms = objective.terms(params, batch)
        return objective.combine(terms, terms["tokens"], 1), terms

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _reference(setup, z_loss_coef=0.0):
    fn = make_loss_fn(setup.config, setup.options, z_loss_coef=z_loss_coef)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))


@pytest.mark.parametrize(
    "case,mesh_sizes,chunk",
    [
        ("tied", {"fsdp": 2, "tensor": 2, "data": -1}, 4),
        ("moe", {"data": -1}, 4),
        pytest.param("tied", {"data": -1}, 4, marks=pytest.mark.slow),
        pytest.param("untied", {"data": -1}, 8, marks=pytest.mark.slow),
        pytest.param("untied", {"data": -1}, 0, marks=pytest.mark.slow),
    ],
)
def test_chunked_loss_and_grads_equal_train_loss(case, mesh_sizes, chunk):
    fields = dict(MOE if case == "moe" else DENSE, tie_word_embeddings=(case == "tied"))
    setup = _setup(fields, mesh_sizes)
    params = setup.init_params(seed=1)
    # 8 rows: data=-1 takes all remaining (up to 8 fake) devices, and the batch splits over them
    batch = {k: np.concatenate([v, v[::-1]]) for k, v in _batch(setup.config.vocab_size).items()}
    z = 1e-3 if case == "moe" else 0.0
    (loss, terms), grads = _chunked(setup, chunk, z)(params, batch)
    (ref_loss, ref_metrics), ref_grads = _reference(setup, z)(params, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-6)
    assert float(terms["tokens"]) == float(ref_metrics["tokens"])
    if case == "moe":
        np.testing.assert_allclose(float(terms["aux_loss"]), float(ref_metrics["aux_loss"]), rtol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        scale = float(jnp.max(jnp.abs(r))) + 1e-12
        err = float(jnp.max(jnp.abs(g - r))) / scale
        assert err < 2e-5, (jax.tree_util.keystr(path), err)


def test_chunk_length_must_divide_length():
    setup = _setup(DENSE, {"data": -1})
    params = setup.init_params(seed=0)
    batch = {"input_ids": np.zeros((8, SEQ), np.int32)}
    with pytest.raises(ValueError, match="must divide"):
        _chunked(setup, 5)(params, batch)


@pytest.mark.slow
def test_chunked_step_keeps_less_memory_live():
    """The compiled gradient's temporaries shrink with chunking (the full logits are never live)."""
    fields = dict(DENSE, vocab_size=4096, tie_word_embeddings=True)
    setup = _setup(fields, {"data": -1})
    abstract = setup.abstract_params()
    batch = {"input_ids": jax.ShapeDtypeStruct((8, 128), jnp.int32)}

    def temp(chunk):
        return _chunked(setup, chunk).lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes

    rows_per_device = 8 // setup.mesh.shape["data"]
    full_logits_bytes = rows_per_device * 128 * 4096 * 4
    assert temp(0) > full_logits_bytes
    assert temp(16) < temp(0) - full_logits_bytes
