"""Next-token cross-entropy computed in chunks of positions, LM head inside the chunk.

With a 152k vocabulary the logits are the largest activation of a step: float32 [tokens, vocab] is
0.6 MB per token, and its gradient is as large again. Here the final hidden states are split along
the sequence into chunks of `chunk_length` positions; a `lax.scan` computes each chunk's logits,
its log-sum-exp and the label logit, and keeps only two scalars. The scan body is rematerialised
(`jax.checkpoint`), so the backward pass recomputes one chunk's logits at a time instead of saving
them: live logits are [batch, chunk_length, vocab], never [batch, length, vocab].

The numbers are those of `train.loss.next_token_cross_entropy` (shift left, ignore -100, do not count
predictions made at padding positions, sum in float32); only the order of the final sum differs.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from train.loss import IGNORE_INDEX


def shifted_targets(labels_bt, attention_mask_bt=None):
    """(targets [b, t], valid [b, t]): position t predicts labels[t + 1]; valid marks counted positions."""
    labels_bt = jnp.asarray(labels_bt, jnp.int32)
    shifted_bt = jnp.concatenate(
        [labels_bt[:, 1:], jnp.full((labels_bt.shape[0], 1), IGNORE_INDEX, labels_bt.dtype)], axis=1)
    valid_bt = shifted_bt != IGNORE_INDEX
    if attention_mask_bt is not None:
        valid_bt = valid_bt & jnp.asarray(attention_mask_bt).astype(bool)
    return jnp.where(valid_bt, shifted_bt, 0), valid_bt


def token_cross_entropy(logits_btv, targets_bt):
    """-log softmax(logits)[target] per position, float32. The label logit is picked by a masked sum
    over the vocabulary (exact: one non-zero term) rather than a gather, so a vocabulary sharded over
    the tensor axis is reduced in place instead of gathered."""
    logits_btv = logits_btv.astype(jnp.float32)
    vocab_v = jax.lax.broadcasted_iota(jnp.int32, (1, 1, logits_btv.shape[-1]), 2)
    label_logit_bt = jnp.sum(jnp.where(vocab_v == targets_bt[..., None], logits_btv, 0.0), axis=-1)
    return jax.nn.logsumexp(logits_btv, axis=-1) - label_logit_bt


def chunked_cross_entropy(hidden_btd, head, logits_fn: Callable, targets_bt, valid_bt, chunk_length: int):
    """(sum of token losses, number of counted tokens) over all positions.

    logits_fn(hidden [b, c, d], head) -> float32 logits [b, c, vocab]. chunk_length 0 (or >= length)
    computes all positions at once; otherwise it must divide the sequence length."""
    b, t, d = hidden_btd.shape
    count = jnp.sum(valid_bt).astype(jnp.float32)
    if chunk_length <= 0 or chunk_length >= t:
        token_loss_bt = token_cross_entropy(logits_fn(hidden_btd, head), targets_bt)
        return jnp.sum(jnp.where(valid_bt, token_loss_bt, 0.0)), count
    if t % chunk_length:
        raise ValueError(f"loss chunk_length {chunk_length} must divide the sequence length {t}")
    n = t // chunk_length
    # [b, t, ...] -> [n, b, c, ...]: the batch dimension keeps its sharding; each scan step is one chunk.
    hidden_nbcd = jnp.moveaxis(hidden_btd.reshape(b, n, chunk_length, d), 1, 0)
    targets_nbc = jnp.moveaxis(targets_bt.reshape(b, n, chunk_length), 1, 0)
    valid_nbc = jnp.moveaxis(valid_bt.reshape(b, n, chunk_length), 1, 0)

    @jax.checkpoint
    def chunk_loss(head, hidden_bcd, targets_bc, valid_bc):
        token_loss_bc = token_cross_entropy(logits_fn(hidden_bcd, head), targets_bc)
        return jnp.sum(jnp.where(valid_bc, token_loss_bc, 0.0))

    def body(total, chunk):
        return total + chunk_loss(head, *chunk), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden_nbcd, targets_nbc, valid_nbc))
    return total, count
