"""Packing without cross-talk: documents packed several to a row with segment ids give the per-token
losses and the gradients of the same documents one per padded row (float32, every parameter
random), through the trainer's own objective (trunk + chunked loss): the dense attention path, the
CPU blocked path (rows longer than its 64-query blocks), sliding-window layers, and a data x fsdp x
tensor mesh of 8 fake CPU devices. Plus the packer itself: best fit, cut / drop, first labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax.config import Qwen2Config
from qwen2_jax.model import positions_from_segments
from train.chunked_loss import shifted_targets, token_cross_entropy
from train.config import LossConfig
from train.model_setup import ModelSetup, build_mesh
from train.objective import Objective
from train.packing import IGNORE_INDEX, Document, assign_rows, pack
from train_utils import TINY_LOSS_MODEL

TINY = dict(TINY_LOSS_MODEL, max_position_embeddings=512, qkv_bias=True, tie_word_embeddings=False)
TOLERANCE = 1e-6
# On a mesh the gradient sums over rows run across devices, in an order that depends on which device
# holds which row: the same unpadded batch on the 2x2x2 mesh and on one device already differs by
# 1.2e-6 of a leaf's largest entry (q_kernel), packed vs unpacked on the mesh by 2.2e-6. The
# per-token losses stay within TOLERANCE there too.
MESH_GRAD_TOLERANCE = 4e-6


def _documents(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        ids = rng.integers(0, vocab, n).astype(np.int32)
        labels = np.where(rng.random(n) < 0.6, ids, IGNORE_INDEX).astype(np.int32)
        labels[-1] = ids[-1]  # something to learn in every document
        docs.append(Document(ids, labels))
    return docs


def _randomized(params, seed=0):
    """Every leaf random (norm scales around 1, biases non-zero), so no masking bug hides behind a
    zero bias or a unit norm."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        noise = jax.random.normal(k, x.shape, jnp.float32)
        is_norm = "norm" in jax.tree_util.keystr(path)
        out.append(jax.device_put((1.0 + 0.3 * noise if is_norm else 0.2 * noise).astype(x.dtype), x.sharding))
    return jax.tree_util.tree_unflatten(treedef, out)


def _setup(mesh_sizes, **overrides):
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh_sizes}
    mesh = build_mesh(sizes, jax.devices()[: sizes["data"] * sizes["fsdp"] * sizes["tensor"]])
    setup = ModelSetup(Qwen2Config(**dict(TINY, **overrides)), mesh)
    return setup, _randomized(setup.init_params(seed=0))


def _per_token_loss_and_grads(setup, params, rows, chunk_length):
    """Per-token losses [rows, t] (0 where not counted) and the gradients of their sum."""
    objective = Objective(setup, LossConfig(chunk_length=chunk_length))
    batch = {"input_ids": rows.input_ids, "labels": rows.labels, "segment_ids": rows.segment_ids}

    @jax.jit
    def token_losses(params):
        ids, mask, targets, valid = objective.inputs(batch)
        hidden, _ = setup.trunk(params, ids, mask, segment_ids_bt=jnp.asarray(rows.segment_ids))
        losses = token_cross_entropy(setup.logits(hidden, setup.lm_head(params)), targets)
        return jnp.where(valid, losses, 0.0)

    grads = jax.jit(jax.grad(lambda p: objective.terms(p, batch)["loss_sum"]))(params)
    return np.asarray(token_losses(params)), grads


def _by_document(rows, losses):
    """Per-document arrays of the losses at the positions that predict a target."""
    _, valid = shifted_targets(rows.labels, rows.segment_ids > 0)
    valid = np.asarray(valid)
    out = []
    for r in range(len(rows)):
        for s in range(1, rows.segment_ids[r].max() + 1):
            where = rows.segment_ids[r] == s
            out.append((tuple(rows.input_ids[r][where]), losses[r][where & valid[r]]))
    return dict(out)


def _assert_grads_close(grads, ref, tolerance):
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref)):
        scale = float(jnp.max(jnp.abs(r))) + 1e-12
        err = float(jnp.max(jnp.abs(g - r))) / scale
        assert err <= tolerance, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize(
    "seq_len,lengths,mesh_sizes,overrides",
    [
        (48, [5, 17, 9, 30, 12, 3, 22, 8], {}, {}),  # the dense path
        (160, [70, 41, 96, 33, 150, 12, 60], {}, {}),  # CPU blocked attention (64-query blocks)
        (48, [5, 17, 9, 30, 12, 3, 22, 8], {}, dict(use_sliding_window=True, sliding_window=6, max_window_layers=0)),
        (48, [5, 17, 9, 30, 12, 3, 22, 8, 40, 7, 11, 2], {"data": 2, "fsdp": 2, "tensor": 2}, {}),
    ],
    ids=["dense", "cpu-blocks", "sliding-window", "mesh-2x2x2"],
)
def test_packed_rows_equal_the_documents_unpacked(seq_len, lengths, mesh_sizes, overrides):
    setup, params = _setup(mesh_sizes, **overrides)
    docs = _documents(setup.config.vocab_size, lengths)
    packed, packed_stats = pack(docs, seq_len, packing=True, truncation="cut", pad_id=0)
    unpacked, unpacked_stats = pack(docs, seq_len, packing=False, truncation="cut", pad_id=0)
    assert len(packed) < len(unpacked) == len(docs)
    assert packed_stats.targets == unpacked_stats.targets
    ways = 2 if mesh_sizes else 1  # the batch must split over data x fsdp
    packed, unpacked = (_pad_rows(rows, ways) for rows in (packed, unpacked))
    packed_loss, packed_grads = _per_token_loss_and_grads(setup, params, packed, chunk_length=16)
    unpacked_loss, unpacked_grads = _per_token_loss_and_grads(setup, params, unpacked, chunk_length=16)
    by_doc, ref_by_doc = _by_document(packed, packed_loss), _by_document(unpacked, unpacked_loss)
    assert by_doc.keys() == ref_by_doc.keys() and len(by_doc) == len(docs)
    for key, ref in ref_by_doc.items():
        assert len(ref) > 0
        np.testing.assert_allclose(by_doc[key], ref, rtol=TOLERANCE, atol=TOLERANCE)
    _assert_grads_close(packed_grads, unpacked_grads, MESH_GRAD_TOLERANCE if mesh_sizes else TOLERANCE)


def _pad_rows(rows, multiple):
    """Rows of padding (segment 0) up to a multiple of the data-parallel ways."""
    extra = -len(rows) % multiple
    if not extra:
        return rows
    t = rows.input_ids.shape[1]
    pad = lambda a, v: np.concatenate([a, np.full((extra, t), v, a.dtype)])  # noqa: E731
    return type(rows)(pad(rows.input_ids, 0), pad(rows.labels, IGNORE_INDEX), pad(rows.segment_ids, 0))


def test_packing_leaks_nothing_across_documents():
    """Changing one document's tokens changes no other document's losses in the same row (the test
    above would pass for a model that ignores segments if packed and unpacked rows happened to match
    in some other way; this one fails on any cross-document attention)."""
    setup, params = _setup({})
    docs = _documents(setup.config.vocab_size, [10, 12, 9])
    rows, _ = pack(docs, 48, packing=True, truncation="cut", pad_id=0)
    assert len(rows) == 1 and rows.segment_ids.max() == 3
    changed = rows.input_ids.copy()
    first = rows.segment_ids[0] == 1
    changed[0, first] = (changed[0, first] + 1) % setup.config.vocab_size
    rows2 = type(rows)(changed, rows.labels, rows.segment_ids)
    loss1, _ = _per_token_loss_and_grads(setup, params, rows, chunk_length=0)
    loss2, _ = _per_token_loss_and_grads(setup, params, rows2, chunk_length=0)
    later = rows.segment_ids[0] > 1
    np.testing.assert_array_equal(loss1[0, later], loss2[0, later])
    assert not np.array_equal(loss1[0, first], loss2[0, first])


def test_positions_restart_at_each_document():
    segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    expected = [[0, 1, 2, 0, 1, 0, 0, 0], list(range(8))]
    assert np.asarray(positions_from_segments(segments)).tolist() == expected


def test_best_fit_decreasing_rows():
    # 8 and 2 fill one row; 6 and 4 another; 5 a third (the first row to open holds the longest)
    assert assign_rows([2, 8, 6, 5, 4], 10, packing=True) == [[0, 1], [2, 4], [3]]
    assert assign_rows([2, 8, 6], 10, packing=False) == [[0], [1], [2]]


def test_cut_drop_and_first_labels():
    ids = np.arange(1, 13, dtype=np.int32)
    all_targets = Document(ids, ids.copy())
    late_targets = Document(ids, np.where(ids > 9, ids, IGNORE_INDEX).astype(np.int32))
    short = Document(ids[:4], ids[:4].copy())
    rows, stats = pack([all_targets, late_targets, short], 8, packing=True, truncation="cut", pad_id=0)
    # all_targets is cut to 8 tokens; late_targets has no target left in its first 8: dropped
    assert (stats.cut, stats.dropped, stats.rows) == (1, 1, 2)
    assert rows.labels[:, 0].tolist() == [IGNORE_INDEX, IGNORE_INDEX]  # never a target at a start
    assert stats.targets == 7 + 3
    rows, stats = pack([all_targets, late_targets, short], 8, packing=True, truncation="drop", pad_id=0)
    assert (stats.cut, stats.dropped, stats.rows) == (0, 2, 1)
    assert rows.segment_ids.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
