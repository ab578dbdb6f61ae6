"""Dual Chunk Attention (DCA): attention past the trained context without training (An et al.,
"Training-Free Long-Context Scaling of Large Language Models", arXiv 2402.17463), with the position
indices vLLM uses for Qwen2 / Qwen2.5-1M (`dual_chunk_attention_config`).

The sequence is cut into chunks of L = chunk_size - local_size positions; c(i) = i // L is the chunk
of position i. Keys are rotated with their position inside their chunk; a query is rotated with one of
three indices, chosen by where the key sits:

    key j:                                   P_k(j)       = j mod L
    intra-chunk      (c(j) = c(i)):          P_intra(i)   = i mod L
    successive-chunk (c(j) = c(i) - 1):      P_succ(i)    = min(i mod L + L, chunk_size)
    inter-chunk      (c(j) <= c(i) - 2):     P_inter      = min(2L - 1, chunk_size)   (one constant)

    score(i, j) = scale * lambda(i) * <R(P_q(i, j)) q_i, R(P_k(j)) k_j>,   for j visible from i

R(p) is the model's own rotary embedding at index p (default, linear or YaRN frequencies; YaRN's
attention factor scales both sides, as without DCA), so RoPE never sees a distance above chunk_size:
inside a chunk the distance is i - j, across one chunk boundary at most chunk_size, and to distant
chunks P_inter - (j mod L). All three parts share one softmax over every visible key (what vLLM gets
by merging three flash-attention calls by their log-sum-exps). The paper writes c - 1 where vLLM (and
this module) clamp to chunk_size.

lambda(i) = 1, or with original_max_position_embeddings M > 0, s(i + 1)^2 where
s(n) = max(1, 0.1 ln(n / M) + 1): YaRN's attention scale for the length a query sees. vLLM scales the
keys and the softmax by s(N) of the whole prompt's length N (s(N)^2 for a prompt, equal to ours for its
last token, which picks the first new token) and, while decoding, each new key by the length at the time
it was written; scaling each query by its own length instead gives the same logits whether a sequence is
prefilled whole, in pieces, or decoded token by token.

Where every position is below min(chunk_size, 2L) (and M, when set), these indices give every (i, j)
the distance i - j: DCA is then ordinary attention, and `fits_ordinary_attention` lets the model run the
ordinary program itself (the same operations, so the same numbers).

Memory: attention runs in blocks of queries, each attending to blocks of keys up to its last query with
an online softmax, so no [t, s] score matrix is ever held; a block whose queries and keys all relate
one way (the usual case once chunks are longer than blocks) computes one product, not three.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from qwen2_jax.hf_config import DualChunkSettings

BLOCK_Q = 256
BLOCK_K = 512
# A finite "minus infinity": a query with no visible key yet keeps finite sums, and the first visible
# key's score wipes what masked ones added (exp(_MASKED - score) == 0).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def ordinary_limit(dca: DualChunkSettings) -> int:
    """Below this many positions DCA's indices give every query-key pair its ordinary distance (no
    inter-chunk part, no clamp) and the length scaling is 1."""
    limit = min(dca.chunk_size, 2 * dca.chunk_len)
    if dca.original_max_position_embeddings > 0:
        limit = min(limit, dca.original_max_position_embeddings)
    return limit


def fits_ordinary_attention(dca: DualChunkSettings | None, num_key_slots: int) -> bool:
    """Whether attention over `num_key_slots` keys is ordinary attention under `dca` (or DCA is off).
    Positions never exceed slots (a slot holds its token or padding before it), so the slot count
    bounds every position statically."""
    return dca is None or num_key_slots <= ordinary_limit(dca)


def position_indices(dca: DualChunkSettings, positions_bt):
    """(key and intra-chunk index, successive-chunk index, inter-chunk index) for these positions."""
    chunk_len = dca.chunk_len
    within_bt = positions_bt % chunk_len
    succ_bt = jnp.minimum(within_bt + chunk_len, dca.chunk_size)
    inter_bt = jnp.full_like(positions_bt, min(2 * chunk_len - 1, dca.chunk_size))
    return within_bt, succ_bt, inter_bt


def length_scale(dca: DualChunkSettings, positions_bt):
    """lambda: float32 [b, t], s(position + 1)^2, or ones without original_max_position_embeddings."""
    if dca.original_max_position_embeddings <= 0:
        return jnp.ones(positions_bt.shape, jnp.float32)
    seen = (positions_bt + 1).astype(jnp.float32) / dca.original_max_position_embeddings
    s = jnp.maximum(0.1 * jnp.log(seen) + 1.0, 1.0)
    return s * s


@flax.struct.dataclass
class DualChunkInputs:
    """What DCA attention needs besides q, k, v; it takes the place of the boolean mask. Key slots are
    0..s-1 in order (the uncached keys, or the cache's slots)."""

    q_slot_bt: jnp.ndarray  # int32: each query's cache slot (a key is visible at slots <= it)
    q_chunk_bt: jnp.ndarray  # int32: c(i)
    k_pos_bs: jnp.ndarray  # int32: each key's position, -1 for empty slots and padding
    succ_cos_bth: jnp.ndarray  # rotary tables at P_succ
    succ_sin_bth: jnp.ndarray
    inter_cos_bth: jnp.ndarray  # rotary tables at P_inter
    inter_sin_bth: jnp.ndarray
    logit_scale_bt: jnp.ndarray  # float32: the softmax scale times lambda
    chunk_len: int = flax.struct.field(pytree_node=False)
    block_q: int = flax.struct.field(pytree_node=False, default=BLOCK_Q)
    block_k: int = flax.struct.field(pytree_node=False, default=BLOCK_K)


def make_inputs(
    dca: DualChunkSettings,
    rotary: Callable,
    positions_bt,
    q_slot_bt,
    k_pos_bs,
    softmax_scale: float,
):
    """((cos, sin) at P_k = P_intra, for the keys and intra-chunk queries; DualChunkInputs).
    rotary(positions_bt) -> (cos_bth, sin_bth): the model's rotary tables at those indices."""
    within_bt, succ_bt, inter_bt = position_indices(dca, positions_bt)
    succ_cos, succ_sin = rotary(succ_bt)
    inter_cos, inter_sin = rotary(inter_bt)
    inputs = DualChunkInputs(
        q_slot_bt=jnp.broadcast_to(q_slot_bt, positions_bt.shape).astype(jnp.int32),
        q_chunk_bt=(positions_bt // dca.chunk_len).astype(jnp.int32),
        k_pos_bs=k_pos_bs.astype(jnp.int32),
        succ_cos_bth=succ_cos,
        succ_sin_bth=succ_sin,
        inter_cos_bth=inter_cos,
        inter_sin_bth=inter_sin,
        logit_scale_bt=softmax_scale * length_scale(dca, positions_bt),
        chunk_len=dca.chunk_len,
        block_q=BLOCK_Q,  # read when traced (tests shrink them)
        block_k=BLOCK_K,
    )
    return rotary(within_bt), inputs


# ------------------------------------------------------------------------------------- attention
def _block_scores(q_vbqkgh, k_bskh, q_chunk_bq, k_chunk_bs, visible_bqs, logit_scale_bq):
    """float32 scores [b, kv, g, q, s] of one block: each (query, key) pair takes the query rotation
    (v = 0 intra, 1 successive, 2 inter) its chunks call for. A block whose visible pairs all relate one
    way (per row) multiplies that one rotation; a block straddling a chunk boundary multiplies all three
    and selects (one pass over the keys either way)."""
    relation_bqs = jnp.clip(q_chunk_bq[:, :, None] - k_chunk_bs[:, None, :], 0, 2)
    lowest_b = jnp.min(jnp.where(visible_bqs, relation_bqs, 2), axis=(1, 2))
    highest_b = jnp.max(jnp.where(visible_bqs, relation_bqs, 0), axis=(1, 2))

    def one_rotation(_):
        q_bqkgh = jnp.take_along_axis(q_vbqkgh, highest_b[None, :, None, None, None, None], axis=0)[0]
        return jnp.einsum("bqkgh,bskh->bkgqs", q_bqkgh, k_bskh, preferred_element_type=jnp.float32)

    def three_rotations(_):
        scores_vbkgqs = jnp.einsum("vbqkgh,bskh->vbkgqs", q_vbqkgh, k_bskh, preferred_element_type=jnp.float32)
        pick_vbqs = relation_bqs[None] == jnp.arange(3)[:, None, None, None]
        return jnp.sum(jnp.where(pick_vbqs[:, :, None, None], scores_vbkgqs, 0.0), axis=0)

    scores = jax.lax.cond(jnp.all(lowest_b >= highest_b), one_rotation, three_rotations, None)
    scores = scores * logit_scale_bq[:, None, None, :, None]
    return jnp.where(visible_bqs[:, None, None], scores, _MASKED)


def _visible(q_slot_bq, k_slot_s, k_pos_bs):
    """[b, q, s]: causal by cache slot, valid keys only."""
    return (k_slot_s[None, None, :] <= q_slot_bq[:, :, None]) & (k_pos_bs >= 0)[:, None, :]


def _online_softmax_step(carry, scores_bkgqs, v_bskh):
    """Fold one key block into the running (max, denominator, weighted values)."""
    max_bkgq, denom_bkgq, acc_bkgqh = carry
    new_max = jnp.maximum(max_bkgq, jnp.max(scores_bkgqs, axis=-1))
    correction = jnp.exp(max_bkgq - new_max)
    p_bkgqs = jnp.exp(scores_bkgqs - new_max[..., None])
    denom_bkgq = denom_bkgq * correction + jnp.sum(p_bkgqs, axis=-1)
    pv = jnp.einsum("bkgqs,bskh->bkgqh", p_bkgqs.astype(v_bskh.dtype), v_bskh, preferred_element_type=jnp.float32)
    return new_max, denom_bkgq, acc_bkgqh * correction[..., None] + pv


def _pad_to(x, length: int, axis: int, value):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def attention(q_intra_btnh, q_succ_btnh, q_inter_btnh, k_bskh, v_bskh, inputs: DualChunkInputs):
    """DCA softmax attention: [b, t, n, h] in the queries' dtype. Queries come rotated three ways
    (at P_intra, P_succ, P_inter), keys rotated at P_k."""
    b, t, n, h = q_intra_btnh.shape
    s, kv = k_bskh.shape[1], k_bskh.shape[2]
    g = n // kv
    q_vbtkgh = jnp.stack([q.reshape(b, t, kv, g, h) for q in (q_intra_btnh, q_succ_btnh, q_inter_btnh)])
    k_chunk_bs = jnp.where(inputs.k_pos_bs >= 0, inputs.k_pos_bs // inputs.chunk_len, -1)
    if t == 1 or (t <= inputs.block_q and s <= inputs.block_k):  # decode, small calls: one block
        visible = _visible(inputs.q_slot_bt, jnp.arange(s), inputs.k_pos_bs)
        scores = _block_scores(q_vbtkgh, k_bskh, inputs.q_chunk_bt, k_chunk_bs, visible, inputs.logit_scale_bt)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgqs,bskh->bqkgh", probs.astype(v_bskh.dtype), v_bskh, preferred_element_type=jnp.float32)
        return out.reshape(b, t, n, h).astype(q_intra_btnh.dtype)

    block_q, block_k = min(inputs.block_q, t), min(inputs.block_k, s)
    num_q_blocks, num_k_blocks = -(-t // block_q), -(-s // block_k)
    t_pad, s_pad = num_q_blocks * block_q, num_k_blocks * block_k
    q_vbtkgh = _pad_to(q_vbtkgh, t_pad, 2, 0)
    q_slot_bt = _pad_to(inputs.q_slot_bt, t_pad, 1, -1)  # padding queries see nothing
    q_chunk_bt = _pad_to(inputs.q_chunk_bt, t_pad, 1, 0)
    logit_scale_bt = _pad_to(inputs.logit_scale_bt, t_pad, 1, 1.0)
    k_bskh, v_bskh = _pad_to(k_bskh, s_pad, 1, 0), _pad_to(v_bskh, s_pad, 1, 0)
    k_pos_bs, k_chunk_bs = _pad_to(inputs.k_pos_bs, s_pad, 1, -1), _pad_to(k_chunk_bs, s_pad, 1, -1)

    def query_block(qb):
        start = qb * block_q
        q_blk = jax.lax.dynamic_slice_in_dim(q_vbtkgh, start, block_q, axis=2)
        q_slot_bq = jax.lax.dynamic_slice_in_dim(q_slot_bt, start, block_q, axis=1)
        q_chunk_bq = jax.lax.dynamic_slice_in_dim(q_chunk_bt, start, block_q, axis=1)
        scale_bq = jax.lax.dynamic_slice_in_dim(logit_scale_bt, start, block_q, axis=1)

        def key_block(kb, carry):
            k_start = kb * block_k
            k_blk = jax.lax.dynamic_slice_in_dim(k_bskh, k_start, block_k, axis=1)
            v_blk = jax.lax.dynamic_slice_in_dim(v_bskh, k_start, block_k, axis=1)
            k_pos_blk = jax.lax.dynamic_slice_in_dim(k_pos_bs, k_start, block_k, axis=1)
            k_chunk_blk = jax.lax.dynamic_slice_in_dim(k_chunk_bs, k_start, block_k, axis=1)
            visible = _visible(q_slot_bq, k_start + jnp.arange(block_k), k_pos_blk)
            scores = _block_scores(q_blk, k_blk, q_chunk_bq, k_chunk_blk, visible, scale_bq)
            return _online_softmax_step(carry, scores, v_blk)

        # keys past the block's last query slot are invisible to all of it: skip their blocks
        key_blocks = jnp.clip(jnp.max(q_slot_bq) // block_k + 1, 0, num_k_blocks)
        init = (
            jnp.full((b, kv, g, block_q), _MASKED, jnp.float32),
            jnp.zeros((b, kv, g, block_q), jnp.float32),
            jnp.zeros((b, kv, g, block_q, h), jnp.float32),
        )
        _, denom, acc = jax.lax.fori_loop(0, key_blocks, key_block, init)
        return acc / jnp.where(denom > 0, denom, 1.0)[..., None]

    out_nbkgqh = jax.lax.map(query_block, jnp.arange(num_q_blocks))
    out_btnh = jnp.transpose(out_nbkgqh, (1, 0, 4, 2, 3, 5)).reshape(b, t_pad, n, h)[:, :t]
    return out_btnh.astype(q_intra_btnh.dtype)
