"""The training objective equals HF's `loss` (dense and MoE, padding, custom labels) and its gradients
equal torch autograd's; on a mesh it equals one device."""

import numpy as np
import pytest
import torch

import qwen2_jax
from hf_utils import hf_dense_config, make_hf_model, rel_err
from qwen2_jax.hf_keys import hf_table
from test_moe import _batch as moe_batch
from test_moe import hf_moe_config, make_hf_moe
from tolerances import AUX_ATOL, GRAD_REL, LOSS_RTOL, SHARDED_REL
from train.loss import IGNORE_INDEX, causal_lm_loss


def _batch(vocab, seed=0):
    """test_moe's batch (row 1 left-padded, row 2 right-padded) with labels: padding not counted."""
    ids, mask = moe_batch(vocab, seed)
    labels = np.where(mask.astype(bool), ids, IGNORE_INDEX)
    first_real = int(np.argmax(mask[1]))
    labels[1, first_real] = IGNORE_INDEX  # HF would predict it from a padding position; we never count those
    return ids, mask, labels


def _hf_loss(model, ids, mask, labels, moe=False, backward=False):
    ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)
    pos = (mask_t.cumsum(-1) - 1).clamp(min=0) * mask_t
    kwargs = dict(output_router_logits=True) if moe else {}
    model.zero_grad()
    with torch.set_grad_enabled(backward):
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos, labels=torch.as_tensor(labels), **kwargs)
    if backward:
        out.loss.backward()
    return out


def _save(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    return str(tmp_path)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    model = make_hf_model(hf_dense_config(num_hidden_layers=2, tie_word_embeddings=True), seed=3)
    return model, _save(model, tmp_path_factory.mktemp("dense"))


def test_dense_loss_and_gradients_equal_hf(dense):
    model, path = dense
    config, params = qwen2_jax.load_checkpoint(path)
    ids, mask, labels = _batch(config.vocab_size)
    ref = _hf_loss(model, ids, mask, labels, backward=True)
    (loss, metrics), grads = causal_lm_loss(config, params, ids, mask, labels, with_grad=True)
    np.testing.assert_allclose(float(loss), float(ref.loss.detach()), rtol=LOSS_RTOL)
    assert float(metrics["tokens"]) == np.sum(labels[:, 1:] != IGNORE_INDEX)
    assert "aux_loss" not in metrics

    hf_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    checked = 0
    for entry in hf_table(config):
        leaf = grads
        for part in entry.path:
            leaf = leaf[part]
        ours = np.asarray(leaf)[entry.index] if entry.index else np.asarray(leaf)
        theirs = entry.to_param(hf_grads[entry.hf_key])
        assert rel_err(ours, theirs) < GRAD_REL, entry.hf_key
        checked += 1
    assert checked == len(list(model.named_parameters()))


def test_default_labels_ignore_padding(dense):
    _, path = dense
    config, params = qwen2_jax.load_checkpoint(path)
    ids, mask, labels = _batch(config.vocab_size, seed=1)
    explicit, _ = causal_lm_loss(config, params, ids, mask, labels)
    default, _ = causal_lm_loss(config, params, ids, mask)
    assert float(explicit) == float(default)
    # padding does not change the loss of a row: row 1 alone, unpadded, gives its own mean
    row = mask[1].astype(bool)
    alone, m_alone = causal_lm_loss(config, params, ids[1:2, row])
    only_row1 = np.full_like(labels, IGNORE_INDEX)
    only_row1[1] = labels[1]
    padded, m_padded = causal_lm_loss(config, params, ids, mask, only_row1)
    assert float(m_alone["tokens"]) == float(m_padded["tokens"]) == row.sum() - 1
    np.testing.assert_allclose(float(padded), float(alone), rtol=LOSS_RTOL)


def test_all_labels_ignored_gives_zero_not_nan(dense):
    _, path = dense
    config, params = qwen2_jax.load_checkpoint(path)
    ids, mask, _ = _batch(config.vocab_size)
    (loss, metrics), grads = causal_lm_loss(config, params, ids, mask, np.full_like(ids, IGNORE_INDEX), with_grad=True)
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in __import__("jax").tree.leaves(grads))


def test_bad_shapes_are_refused(dense):
    _, path = dense
    config, params = qwen2_jax.load_checkpoint(path)
    with pytest.raises(ValueError, match="labels shape"):
        causal_lm_loss(config, params, np.zeros((2, 5), int), labels=np.zeros((2, 4), int))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\]"):
        causal_lm_loss(config, params, np.zeros((5,), int))


def test_loss_and_gradients_on_a_mesh_equal_one_device(dense):
    import jax

    from qwen2_jax.sharding import make_mesh

    _, path = dense
    config, params = qwen2_jax.load_checkpoint(path)
    _, sharded = qwen2_jax.load_checkpoint(path, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    ids, mask, labels = _batch(config.vocab_size, seed=2)
    ids, mask, labels = (np.concatenate([a, a[:1]]) for a in (ids, mask, labels))  # batch 4: divides data x fsdp
    (ref, _), ref_grads = causal_lm_loss(config, params, ids, mask, labels, with_grad=True)
    (got, _), got_grads = causal_lm_loss(config, sharded, ids, mask, labels, with_grad=True)
    np.testing.assert_allclose(float(got), float(ref), rtol=LOSS_RTOL)
    q = got_grads[next(k for k in got_grads if k.startswith("layers"))]["self_attn"]["q_kernel"]
    assert q.sharding.mesh.shape["tensor"] == 2 and "tensor" in str(q.sharding.spec)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        assert rel_err(a, b) < SHARDED_REL


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_experts_per_tok=2),
        pytest.param(
            dict(num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=4),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_moe_loss_is_hf_loss_with_aux(overrides, tmp_path):
    """HF adds router_aux_loss_coef * aux (padding excluded) to the LM loss; so do we. z-loss is opt-in."""
    hf_cfg = hf_moe_config(router_aux_loss_coef=0.05, **overrides)
    model = make_hf_moe(hf_cfg, seed=7)
    config, params = qwen2_jax.load_checkpoint(_save(model, tmp_path))
    ids, mask, labels = _batch(config.vocab_size, seed=3)
    labels[0, 5:8] = IGNORE_INDEX  # custom labels: some real tokens not trained on
    ref = _hf_loss(model, ids, mask, labels, moe=True)
    loss, metrics = causal_lm_loss(config, params, ids, mask, labels)
    np.testing.assert_allclose(float(loss), float(ref.loss.detach()), rtol=LOSS_RTOL)
    np.testing.assert_allclose(float(metrics["aux_loss"]), float(ref.aux_loss), atol=AUX_ATOL)
    assert float(metrics["aux_loss"]) > 0.5  # a real balance statistic, not a zero that matches by accident

    with_z, m_z = causal_lm_loss(config, params, ids, mask, labels, z_loss_coef=1e-3)
    assert float(m_z["z_loss"]) > 0
    # identities of float32 sums: measured <= 1.7e-8 relative; 1e-6 is a few ulps
    np.testing.assert_allclose(float(with_z), float(loss) + 1e-3 * float(m_z["z_loss"]), rtol=1e-6)
    no_aux, _ = causal_lm_loss(config, params, ids, mask, labels, aux_loss_coef=0.0)
    np.testing.assert_allclose(float(no_aux), float(metrics["lm_loss"]), rtol=1e-6)
