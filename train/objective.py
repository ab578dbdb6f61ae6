"""The training objective of one micro-batch: the model's trunk, the chunked cross-entropy, the MoE terms.

Returned as sums and counts, not means, so that gradient accumulation can divide by the token count
of the whole batch: k micro-batches of b sequences then give the same loss and gradients as one
batch of k*b (up to float summation order).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from train.chunked_loss import chunked_cross_entropy, shifted_targets
from train.config import LossConfig
from train.loss import labels_from_inputs
from train.model_setup import ModelSetup


@dataclasses.dataclass(frozen=True)
class Objective:
    setup: ModelSetup
    loss: LossConfig

    @property
    def aux_coef(self) -> float:
        coef = self.loss.aux_loss_coef
        return self.setup.config.router_aux_loss_coef if coef is None else coef

    def inputs(self, batch):
        """(input_ids, attention_mask, targets, valid), all [b, t], from a batch dict with input_ids and
        optional attention_mask / labels / segment_ids (default labels: the inputs, padding ignored;
        with segment_ids, packed rows, the attention mask is segment_ids > 0)."""
        input_ids_bt = jnp.asarray(batch["input_ids"], jnp.int32)
        mask_bt = batch.get("attention_mask")
        if mask_bt is None and "segment_ids" in batch:
            mask_bt = (jnp.asarray(batch["segment_ids"]) > 0).astype(jnp.int32)
        mask_bt = jnp.ones_like(input_ids_bt) if mask_bt is None else jnp.asarray(mask_bt, jnp.int32)
        labels_bt = batch.get("labels")
        labels_bt = labels_from_inputs(input_ids_bt, mask_bt) if labels_bt is None else labels_bt
        targets_bt, valid_bt = shifted_targets(labels_bt, mask_bt)
        return input_ids_bt, mask_bt, targets_bt, valid_bt

    def normalizer(self, batch):
        """What the batch's loss is a mean over: its counted tokens."""
        _, _, _, valid_bt = self.inputs(batch)
        return jnp.sum(valid_bt).astype(jnp.float32)

    def terms(self, params, batch, rng=None, frozen=None):
        """{"loss_sum", "tokens"} and for MoE {"aux_loss", "z_loss"} of one micro-batch. frozen: arrays the
        objective reads but does not train (none here; a DPO reference model's params in train/dpo_objective.py)."""
        setup = self.setup
        input_ids_bt, mask_bt, targets_bt, valid_bt = self.inputs(batch)
        segment_ids_bt = batch.get("segment_ids")
        if segment_ids_bt is not None:
            segment_ids_bt = jnp.asarray(segment_ids_bt, jnp.int32)
        hidden_btd, router_logits = setup.trunk(params, input_ids_bt, mask_bt, rng=rng, segment_ids_bt=segment_ids_bt)
        head = setup.lm_head(params)
        # the trunk's rows come in its sequence order (zig-zag over a sequence axis): the targets follow,
        # and the loss, a sum over tokens, is the same
        targets_bt, valid_bt = setup.to_sequence_order(targets_bt), setup.to_sequence_order(valid_bt)

        def logits_fn(hidden_bcd, head):
            return setup.logits(setup.constrain_hidden(hidden_bcd), head)

        loss_sum, tokens = chunked_cross_entropy(
            hidden_btd, head, logits_fn, targets_bt, valid_bt, self.loss.chunk_length, setup.sequence_shards
        )
        out = {"loss_sum": loss_sum, "tokens": tokens}
        if setup.is_moe:
            out["aux_loss"] = setup.aux_loss(router_logits, mask_bt)
            out["z_loss"] = setup.z_loss(router_logits, mask_bt) if self.loss.z_loss_coef else jnp.zeros(())
        return out

    def metrics(self, terms, total_tokens, num_micro: int):
        """The step's metrics beyond loss and gradient norm, from the terms summed over micro-batches."""
        out = {"lm_loss": terms["loss_sum"] / jnp.maximum(total_tokens, 1.0), "tokens": total_tokens}
        if "aux_loss" in terms:
            out["aux_loss"] = terms["aux_loss"] / num_micro
            if self.loss.z_loss_coef:
                out["z_loss"] = terms["z_loss"] / num_micro
        return out

    def combine(self, terms, total_tokens, num_micro: int):
        """The scalar to differentiate for one micro-batch: its share of the batch's mean token loss,
        plus its share of the (per-micro-batch averaged) MoE terms."""
        value = terms["loss_sum"] / jnp.maximum(total_tokens, 1.0)
        if "aux_loss" in terms:
            value = value + self.aux_coef * terms["aux_loss"] / num_micro
            if self.loss.z_loss_coef:
                value = value + self.loss.z_loss_coef * terms["z_loss"] / num_micro
        return value
