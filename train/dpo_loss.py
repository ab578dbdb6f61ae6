"""The DPO loss of preference pairs, from per-token log-probabilities of packed rows.

A row holds whole pairs (train/dpo_data.py): pair k of a row is segment 2k-1 (prompt + chosen) and
segment 2k (prompt + rejected), 0 is padding. A sequence's log-probability is the SUM of the
log-probabilities of its completion tokens, as TRL's DPOTrainer sums them. Per pair, with
x = (log πθ(c) - log πref(c)) - (log πθ(r) - log πref(r)) and ε = label_smoothing,

    loss = -(1 - ε) log σ(βx) - ε log σ(-βx)

(TRL's "sigmoid" loss for ε = 0; with ε > 0 the conservative DPO of TRL before 1.0). Everything is
returned as sums over the pairs present, so that gradient accumulation and data parallelism divide
by the pair count of the whole batch: the loss of a step is the mean over its pairs, as TRL's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# what metrics.jsonl calls the per-pair means, as TRL logs them
METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def max_pairs(seq_len: int) -> int:
    """The most pairs a row of seq_len can hold: a sequence with a target has at least two tokens."""
    return max(1, seq_len // 4)


def count_pairs(segment_ids_bt):
    """The pairs of the batch: chosen (odd) segments, counted at their first token."""
    seg_bt = jnp.asarray(segment_ids_bt, jnp.int32)
    before_bt = jnp.pad(seg_bt[:, :-1], ((0, 0), (1, 0)))
    return jnp.sum((seg_bt % 2 == 1) & (seg_bt != before_bt)).astype(jnp.float32)


def pair_logps(token_logps_bt, segment_ids_bt, pairs_per_row: int):
    """(chosen [b, p], rejected [b, p], present [b, p]): the summed token log-probabilities of each
    pair's two sequences. token_logps_bt[t] is the log-probability of token t + 1 (0 where it is not a
    completion token); a counted position never predicts across a segment boundary (each segment's
    first label is not a target), so it sums into its own segment."""
    segments = 2 * pairs_per_row + 1

    def per_row(values_t, seg_t):
        sums = jax.ops.segment_sum(values_t, seg_t, num_segments=segments)
        sizes = jax.ops.segment_sum(jnp.ones_like(values_t), seg_t, num_segments=segments)
        return sums, sizes

    seg_bt = jnp.asarray(segment_ids_bt, jnp.int32)
    sums_bs, sizes_bs = jax.vmap(per_row)(token_logps_bt.astype(jnp.float32), seg_bt)
    return sums_bs[:, 1::2], sums_bs[:, 2::2], sizes_bs[:, 1::2] > 0


def pair_losses(chosen_logratio, rejected_logratio, beta: float, label_smoothing: float = 0.0):
    """The per-pair loss (module docstring) of log-ratios log πθ - log πref."""
    x = beta * (chosen_logratio - rejected_logratio)
    loss = -jax.nn.log_sigmoid(x)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-x)
    return loss


def dpo_terms(policy_bt, reference_bt, segment_ids_bt, *, beta: float, label_smoothing: float, pairs_per_row: int):
    """Sums over the pairs present of the loss and of what TRL logs (rewards = β (log πθ - log πref),
    no gradient through them). policy_bt / reference_bt: per-token log-probabilities [b, t]."""
    chosen, rejected, present = pair_logps(policy_bt, segment_ids_bt, pairs_per_row)
    ref_chosen, ref_rejected, _ = pair_logps(reference_bt, segment_ids_bt, pairs_per_row)
    chosen_logratio, rejected_logratio = chosen - ref_chosen, rejected - ref_rejected
    losses = pair_losses(chosen_logratio, rejected_logratio, beta, label_smoothing)

    def total(x):
        return jnp.sum(jnp.where(present, x, 0.0))

    chosen_rewards = beta * jax.lax.stop_gradient(chosen_logratio)
    rejected_rewards = beta * jax.lax.stop_gradient(rejected_logratio)
    return {
        "loss_sum": total(losses),
        "pairs": jnp.sum(present).astype(jnp.float32),
        "rewards/chosen": total(chosen_rewards),
        "rewards/rejected": total(rejected_rewards),
        "rewards/accuracies": total((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": total(chosen_rewards - rejected_rewards),
        "logps/chosen": total(jax.lax.stop_gradient(chosen)),
        "logps/rejected": total(jax.lax.stop_gradient(rejected)),
    }
