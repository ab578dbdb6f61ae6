"""The training objective: next-token cross-entropy as HF transformers computes it, plus the MoE terms.

HF's `ForCausalLMLoss` shifts labels left by one, ignores -100, and averages over the remaining
tokens in float32; `Qwen2MoeForCausalLM` then adds `router_aux_loss_coef * aux`. We do the same, so
a loss curve here and one from an HF trainer are the same numbers. The optional router z-loss
(ST-MoE) is off by default, as in HF.

`make_loss_fn` returns a pure `loss_fn(params, batch) -> (loss, metrics)` for
`jax.value_and_grad(..., has_aux=True)` inside a jitted train step; `causal_lm_loss` is the
one-call form for evaluation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from qwen2_jax.config import Qwen2Config
from qwen2_jax.forward import sharding_of, validated_batch
from qwen2_jax.model import Qwen2ForCausalLM, positions_from_mask
from qwen2_jax.moe import load_balancing_loss, router_z_loss
from qwen2_jax.options import RunOptions

IGNORE_INDEX = -100  # HF's ignore_index: label positions that do not count


def labels_from_inputs(input_ids_bt, attention_mask_bt=None):
    """Labels for plain language modelling: the inputs themselves, padding set to IGNORE_INDEX."""
    labels = jnp.asarray(input_ids_bt, jnp.int32)
    if attention_mask_bt is None:
        return labels
    return jnp.where(jnp.asarray(attention_mask_bt).astype(bool), labels, IGNORE_INDEX)


def next_token_cross_entropy(logits_btv, labels_bt, attention_mask_bt=None):
    """(sum of token losses, number of counted tokens): position t predicts labels[t + 1].

    A prediction made at a padding position is not counted even when the next label is real (the
    first real token after left padding): that query saw no real context, and HF's loss, which
    counts it, depends on how padding rows happen to be masked. Returned as a sum and a count so
    gradient accumulation and data parallelism can average over all tokens of the global batch."""
    shifted_bt = jnp.concatenate(
        [labels_bt[:, 1:], jnp.full((labels_bt.shape[0], 1), IGNORE_INDEX, labels_bt.dtype)], axis=1
    )
    valid_bt = shifted_bt != IGNORE_INDEX
    if attention_mask_bt is not None:
        valid_bt = valid_bt & attention_mask_bt.astype(bool)
    token_loss_bt = optax.softmax_cross_entropy_with_integer_labels(
        logits_btv.astype(jnp.float32), jnp.where(valid_bt, shifted_bt, 0)
    )
    return jnp.sum(jnp.where(valid_bt, token_loss_bt, 0.0)), jnp.sum(valid_bt).astype(jnp.float32)


def make_loss_fn(
    config: Qwen2Config,
    options: RunOptions | None = None,
    *,
    z_loss_coef: float = 0.0,
    aux_loss_coef: float | None = None,
):
    """A pure `loss_fn(params, batch) -> (loss, metrics)`; `options` says how the model runs (compute
    and param dtype, remat, MoE kernels, sharding; default: float32 on one device).

    batch: dict with `input_ids` [b, t], optional `attention_mask` [b, t] (1 real, 0 padding; positions
    count real tokens only) and optional `labels` [b, t] (default: inputs with padding ignored).
    MoE models add `aux_loss_coef * aux` (default config.router_aux_loss_coef, HF's weighting) with
    padding excluded from the aux statistics, and `z_loss_coef * z` when z_loss_coef > 0."""
    if z_loss_coef < 0:
        raise ValueError(f"z_loss_coef must be >= 0, got {z_loss_coef}")
    model = Qwen2ForCausalLM(config, options or RunOptions())
    is_moe = config.num_experts > 0 and any(config.is_sparse_layer(i) for i in range(config.num_hidden_layers))
    coef = config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef

    def loss_fn(params, batch):
        input_ids_bt = jnp.asarray(batch["input_ids"], jnp.int32)
        mask_bt = batch.get("attention_mask")
        mask_bt = jnp.ones_like(input_ids_bt) if mask_bt is None else jnp.asarray(mask_bt, jnp.int32)
        labels_bt = batch.get("labels")
        labels_bt = (
            labels_from_inputs(input_ids_bt, mask_bt) if labels_bt is None else jnp.asarray(labels_bt, jnp.int32)
        )
        out = model.apply(
            {"params": params}, input_ids_bt, positions_from_mask(mask_bt), mask_bt, output_router_logits=is_moe
        )
        loss_sum, tokens = next_token_cross_entropy(out["logits"], labels_bt, mask_bt)
        lm_loss = loss_sum / jnp.maximum(tokens, 1.0)
        metrics = {"lm_loss": lm_loss, "tokens": tokens}
        loss = lm_loss
        if is_moe:
            aux = load_balancing_loss(out["router_logits"], config.num_experts, config.num_experts_per_tok, mask_bt)
            metrics["aux_loss"] = aux
            loss = loss + coef * aux
            if z_loss_coef:
                z = router_z_loss(out["router_logits"], mask_bt)
                metrics["z_loss"] = z
                loss = loss + z_loss_coef * z
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn


@functools.partial(jax.jit, static_argnames=("config", "options", "z_loss_coef", "aux_loss_coef", "with_grad"))
def _loss(params, batch, *, config, options, z_loss_coef, aux_loss_coef, with_grad: bool):
    fn = make_loss_fn(config, options, z_loss_coef=z_loss_coef, aux_loss_coef=aux_loss_coef)
    return jax.value_and_grad(fn, has_aux=True)(params, batch) if with_grad else fn(params, batch)


def causal_lm_loss(
    config: Qwen2Config,
    params,
    input_ids,
    attention_mask=None,
    labels=None,
    *,
    z_loss_coef: float = 0.0,
    aux_loss_coef: float | None = None,
    with_grad: bool = False,
):
    """Loss and metrics of one batch (and gradients with `with_grad=True`: ((loss, metrics), grads)).

    Equals transformers' `model(input_ids, attention_mask=..., position_ids=cumsum(mask) - 1, labels=labels,
    output_router_logits=True).loss` (positions count real tokens only, as HF generate does; without
    left padding these are HF's default positions), except that predictions made at padding positions
    never count (HF counts the one before the first real token of a left-padded row)."""
    batch = validated_batch(config, input_ids, attention_mask=attention_mask, labels=labels)
    options = RunOptions().for_params(params, sharding_of(params))
    return _loss(
        params,
        batch,
        config=config,
        options=options,
        z_loss_coef=float(z_loss_coef),
        aux_loss_coef=aux_loss_coef,
        with_grad=with_grad,
    )
