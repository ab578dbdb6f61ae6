"""The objective of `task: dpo`: the DPO loss of the pairs in a micro-batch, as sums (train/dpo_loss.py).

The same `terms / combine` shape as the language-model objective (train/objective.py), so the one
train step runs both: `normalizer` is the batch's pair count (the loss is a mean over pairs),
`terms` runs the policy over the packed rows and takes the reference's per-token log-probabilities
from the batch (`ref_logps`, precomputed) or from the reference (`frozen`: its weights, the step's
third argument), never differentiated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from train.config import DpoConfig, LossConfig
from train.dpo_loss import METRIC_NAMES, count_pairs, dpo_terms, max_pairs
from train.dpo_reference import REFERENCE_FIELD, Reference
from train.model_setup import ModelSetup
from train.token_logps import batch_token_logps


@dataclasses.dataclass(frozen=True)
class DpoObjective:
    setup: ModelSetup
    loss: LossConfig
    dpo: DpoConfig
    reference: Reference

    @property
    def aux_coef(self) -> float:
        coef = self.loss.aux_loss_coef
        return self.setup.config.router_aux_loss_coef if coef is None else coef

    def normalizer(self, batch):
        return count_pairs(batch["segment_ids"])

    def terms(self, params, batch, rng=None, frozen=None):
        setup = self.setup
        policy_bt, router_logits, mask_bt = batch_token_logps(setup, self.loss.chunk_length, params, batch, rng)
        if REFERENCE_FIELD in batch:
            reference_bt = jnp.asarray(batch[REFERENCE_FIELD], jnp.float32)
        else:
            reference_bt = self.reference.token_logps(params, frozen, batch)
        out = dpo_terms(
            policy_bt,
            jax.lax.stop_gradient(reference_bt),
            batch["segment_ids"],
            beta=self.dpo.beta,
            label_smoothing=self.dpo.label_smoothing,
            pairs_per_row=max_pairs(policy_bt.shape[1]),
        )
        if setup.is_moe:  # as TRL adds the policy's load-balancing loss
            out["aux_loss"] = setup.aux_loss(router_logits, mask_bt)
        return out

    def combine(self, terms, total_pairs, num_micro: int):
        """One micro-batch's share of the batch's mean pair loss (plus its share of the MoE term)."""
        value = terms["loss_sum"] / jnp.maximum(total_pairs, 1.0)
        if "aux_loss" in terms:
            value = value + self.aux_coef * terms["aux_loss"] / num_micro
        return value

    def metrics(self, terms, total_pairs, num_micro: int):
        """Means over the batch's pairs, named as TRL's DPOTrainer logs them."""
        out = {name: terms[name] / jnp.maximum(total_pairs, 1.0) for name in METRIC_NAMES}
        out["pairs"] = total_pairs
        if "aux_loss" in terms:
            out["aux_loss"] = terms["aux_loss"] / num_micro
        return out
