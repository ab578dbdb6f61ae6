"""Next-token cross-entropy computed in chunks of positions, LM head inside the chunk, gradients fused.

With a 152k vocabulary the logits are the largest activation of a step: float32 [tokens, vocab] is
0.6 MB per token, and its gradient is as large again. Here the final hidden states are split along
the sequence into chunks of `chunk_length` positions, and a `lax.scan` handles one chunk at a time:
its logits, log-sum-exp and label logit, and, when differentiated, at once the gradient of the
chunk's loss with respect to its logits (softmax - one-hot) pushed through the LM head into the
hidden states and the head weight. Live logits are [batch, chunk_length, vocab], never
[batch, length, vocab], and unlike rematerialising the chunk in the backward pass, no logits are
computed twice: the backward pass only scales the gradients the forward pass left behind
(a `jax.custom_vjp`; the loss is a sum, so its cotangent is one scalar).

The numbers are those of `train.loss.next_token_cross_entropy` (shift left, ignore -100, do not count
predictions made at padding positions, sum in float32); only the order of the final sum differs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from train.loss import IGNORE_INDEX


def shifted_targets(labels_bt, attention_mask_bt=None):
    """(targets [b, t], valid [b, t]): position t predicts labels[t + 1]; valid marks counted positions."""
    labels_bt = jnp.asarray(labels_bt, jnp.int32)
    shifted_bt = jnp.concatenate(
        [labels_bt[:, 1:], jnp.full((labels_bt.shape[0], 1), IGNORE_INDEX, labels_bt.dtype)], axis=1
    )
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


def chunked_cross_entropy(
    hidden_btd, head, logits_fn: Callable, targets_bt, valid_bt, chunk_length: int, shards: int = 1
):
    """(sum of token losses, number of counted tokens) over all positions.

    logits_fn(hidden [b, c, d], head) -> float32 logits [b, c, vocab]. chunk_length 0 (or >= length)
    takes all positions as one chunk; otherwise it must divide the sequence length. shards: the rows
    are split on their length over this many devices (the mesh's sequence axis), contiguous blocks:
    a chunk then takes chunk_length / shards positions from each block, so that every device works
    on its own positions in every step."""
    chunk_length = loss_chunk_length(hidden_btd.shape[1], chunk_length, shards)
    count = jnp.sum(valid_bt).astype(jnp.float32)
    return _fused_loss(logits_fn, chunk_length, shards, hidden_btd, head, targets_bt, valid_bt), count


def loss_chunk_length(t: int, chunk_length: int, shards: int = 1) -> int:
    """The chunk length to use for rows of t positions (all of them for 0), checked."""
    if chunk_length <= 0 or chunk_length >= t:
        chunk_length = t
    if t % chunk_length:
        raise ValueError(f"loss chunk_length {chunk_length} must divide the sequence length {t}")
    if chunk_length % shards:
        raise ValueError(f"loss chunk_length {chunk_length} must be divisible by the sequence axis ({shards})")
    return chunk_length


def _chunks(x, chunk_length, shards: int = 1):
    """[b, t, ...] -> [n, b, c, ...]: the batch dimension keeps its sharding; a scan step is a chunk.
    With shards > 1, chunk j is the j-th c / shards positions of each of the shards' blocks of t / shards."""
    b, t = x.shape[:2]
    if shards == 1:
        return jnp.moveaxis(x.reshape((b, t // chunk_length, chunk_length) + x.shape[2:]), 1, 0)
    per_shard = chunk_length // shards
    x = x.reshape((b, shards, t // chunk_length, per_shard) + x.shape[2:])
    return jnp.moveaxis(x, 2, 0).reshape((t // chunk_length, b, chunk_length) + x.shape[4:])


def _unchunk(x, shards: int = 1):
    n, b, c = x.shape[:3]
    if shards == 1:
        return jnp.moveaxis(x, 0, 1).reshape((b, n * c) + x.shape[3:])
    x = x.reshape((n, b, shards, c // shards) + x.shape[3:])
    return jnp.moveaxis(x, 0, 2).reshape((b, n * c) + x.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_loss(logits_fn, chunk_length, shards, hidden_btd, head, targets_bt, valid_bt):
    def body(total, chunk):
        hidden_bcd, targets_bc, valid_bc = chunk
        token_loss_bc = token_cross_entropy(logits_fn(hidden_bcd, head), targets_bc)
        return total + jnp.sum(jnp.where(valid_bc, token_loss_bc, 0.0)), None

    xs = tuple(_chunks(a, chunk_length, shards) for a in (hidden_btd, targets_bt, valid_bt))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def _fused_loss_fwd(logits_fn, chunk_length, shards, hidden_btd, head, targets_bt, valid_bt):
    """The loss, and its gradients with respect to hidden states and head (for a cotangent of 1)."""

    def body(carry, chunk):
        total, head_grad = carry
        hidden_bcd, targets_bc, valid_bc = chunk
        logits_bcv, logits_vjp = jax.vjp(logits_fn, hidden_bcd, head)
        logits_bcv = logits_bcv.astype(jnp.float32)
        lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
        vocab_v = jax.lax.broadcasted_iota(jnp.int32, (1, 1, logits_bcv.shape[-1]), 2)
        is_target_bcv = vocab_v == targets_bc[..., None]
        label_logit_bc = jnp.sum(jnp.where(is_target_bcv, logits_bcv, 0.0), axis=-1)
        total = total + jnp.sum(jnp.where(valid_bc, lse_bc - label_logit_bc, 0.0))
        # d(lse - label logit)/d logits = softmax - one-hot, on counted positions only
        dlogits_bcv = jnp.exp(logits_bcv - lse_bc[..., None]) - is_target_bcv.astype(jnp.float32)
        dlogits_bcv = jnp.where(valid_bc[..., None], dlogits_bcv, 0.0)
        hidden_grad_bcd, head_grad_chunk = logits_vjp(dlogits_bcv)
        return (total, head_grad + head_grad_chunk.astype(jnp.float32)), hidden_grad_bcd

    xs = tuple(_chunks(a, chunk_length, shards) for a in (hidden_btd, targets_bt, valid_bt))
    init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (total, head_grad), hidden_grad = jax.lax.scan(body, init, xs)
    return total, (_unchunk(hidden_grad, shards), head_grad.astype(head.dtype), targets_bt, valid_bt)


def _fused_loss_bwd(logits_fn, chunk_length, shards, residuals, g):
    hidden_grad, head_grad, targets_bt, valid_bt = residuals
    return (
        (g * hidden_grad).astype(hidden_grad.dtype),
        (g * head_grad).astype(head_grad.dtype),
        np.zeros(targets_bt.shape, jax.dtypes.float0),
        np.zeros(valid_bt.shape, jax.dtypes.float0),
    )


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
