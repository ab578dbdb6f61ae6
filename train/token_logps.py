"""Per-token log-probabilities of the targets, computed in chunks of positions with the LM head inside.

What DPO needs from the model: log p(target) at every counted position, not one summed loss, since a
pair's loss is a non-linear function of its sequences' sums. As in train/chunked_loss.py the final
hidden states go through the LM head one chunk of `chunk_length` positions at a time (a `lax.scan`),
so [batch, chunk, vocab] logits are the most alive at once. Under differentiation each chunk is
rematerialised (`jax.checkpoint`): its logits are recomputed in the backward pass rather than kept,
which costs one more head matmul than the fused cross-entropy but works for any cotangent per token.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from train.chunked_loss import _chunks, _unchunk, loss_chunk_length, token_cross_entropy
from train.config import LossConfig
from train.objective import Objective


def chunked_token_logps(
    hidden_btd, head, logits_fn: Callable, targets_bt, valid_bt, chunk_length: int, shards: int = 1
):
    """float32 [b, t]: log softmax(logits[b, t])[targets[b, t]] where valid, 0 elsewhere.

    logits_fn(hidden [b, c, d], head) -> float32 logits [b, c, vocab]. chunk_length 0 (or >= length)
    takes all positions as one chunk; otherwise it must divide the sequence length. shards: as
    `chunked_cross_entropy`'s."""
    chunk_length = loss_chunk_length(hidden_btd.shape[1], chunk_length, shards)

    @jax.checkpoint
    def chunk_logps(hidden_bcd, head, targets_bc, valid_bc):
        logps_bc = -token_cross_entropy(logits_fn(hidden_bcd, head), targets_bc)
        return jnp.where(valid_bc, logps_bc, 0.0)

    def body(carry, chunk):
        hidden_bcd, targets_bc, valid_bc = chunk
        return carry, chunk_logps(hidden_bcd, head, targets_bc, valid_bc)

    xs = tuple(_chunks(a, chunk_length, shards) for a in (hidden_btd, targets_bt, valid_bt))
    _, logps_nbc = jax.lax.scan(body, None, xs)
    return _unchunk(logps_nbc, shards)


def batch_token_logps(setup, chunk_length: int, params, batch, rng=None):
    """(per-token log-probabilities [b, t] of a batch's targets, router logits, attention mask [b, t])
    under `params`: the trunk (segment ids keep attention inside each packed sequence), then
    `chunked_token_logps` through the model's own LM head. batch: input_ids, labels, segment_ids."""
    input_ids_bt, mask_bt, targets_bt, valid_bt = Objective(setup, LossConfig()).inputs(batch)
    segment_ids_bt = jnp.asarray(batch["segment_ids"], jnp.int32)
    hidden_btd, router_logits = setup.trunk(params, input_ids_bt, mask_bt, rng=rng, segment_ids_bt=segment_ids_bt)
    targets_bt, valid_bt = setup.to_sequence_order(targets_bt), setup.to_sequence_order(valid_bt)

    def logits_fn(hidden_bcd, head):
        return setup.logits(setup.constrain_hidden(hidden_bcd), head)

    logps_bt = chunked_token_logps(
        hidden_btd, setup.lm_head(params), logits_fn, targets_bt, valid_bt, chunk_length, setup.sequence_shards
    )
    return setup.from_sequence_order(logps_bt), router_logits, mask_bt
