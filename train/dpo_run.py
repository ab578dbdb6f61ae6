"""What `task: dpo` adds to the training run (train/loop.py): its objective and batch fields, and the
reference model at start-up, loaded for the step or run once over the rows (`dpo.precompute_reference`)."""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp

from train.config import DpoConfig, TrainConfig
from train.dpo_data import TOKEN_FIELDS, PreferenceCorpus
from train.dpo_objective import DpoObjective
from train.dpo_reference import (
    REFERENCE_FIELD,
    FrozenModel,
    load_reference_params,
    precompute_token_logps,
    reference_checkpoint,
)


def dpo_batch_fields(dpo: DpoConfig) -> dict[str, Any]:
    fields = dict.fromkeys(TOKEN_FIELDS, jnp.int32)
    if dpo.precompute_reference:
        fields[REFERENCE_FIELD] = jnp.float32
    return fields


def dpo_objective(setup, config: TrainConfig, lora=None) -> tuple[DpoObjective, Any]:
    """(the objective, the shardings of the step's reference argument: the reference's own params; None
    when the rows carry precomputed reference log-probabilities, or when a LoRA run's reference is its
    frozen base, which the step reads from the state: the policy with its adapters off, no second copy)."""
    reference = FrozenModel(setup, config.loss.chunk_length)
    objective = DpoObjective(setup, config.loss, config.dpo, reference)
    own_weights = not config.dpo.precompute_reference and not uses_lora_base(config, lora)
    return objective, setup.param_shardings() if own_weights else None


def uses_lora_base(config: TrainConfig, lora) -> bool:
    """A LoRA run without its own dpo.reference: the reference is the frozen base (adapters off)."""
    return lora is not None and config.dpo.reference is None


def start_reference(run, data: PreferenceCorpus, log) -> tuple:
    """The step's frozen arguments: (the reference's params,), or () once its log-probabilities of every
    row are attached to the data (the same batches in the same order on every start, so a resumed run
    reads what the first start computed)."""
    config = run.config
    checkpoint = reference_checkpoint(config.dpo.reference, run.source.checkpoint)
    what = checkpoint or f"the fresh init of seed {config.seed}"
    if uses_lora_base(config, run.lora):
        what = f"the LoRA base, adapters off ({what})"
        if not config.dpo.precompute_reference:
            log(f"dpo reference: {what} (log-probabilities computed in each step from the frozen base)")
            return ()
        params = run.lora.load_base(run.source, config.seed)  # freed once the rows carry its values
    else:
        params = load_reference_params(run.setup, checkpoint, config.seed)
    if not config.dpo.precompute_reference:
        log(f"dpo reference: {what} (log-probabilities computed in each step)")
        return (params,)
    start = time.perf_counter()
    reference = FrozenModel(run.setup, config.loss.chunk_length)
    values = {}
    for split, rows in (("train", data.train_rows), ("eval", data.eval_rows)):
        values[split] = precompute_token_logps(
            reference,
            params,
            rows,
            batch_size=config.batch_size,
            batch_sharding=run.batch_sharding,
            fields=TOKEN_FIELDS,
        )
    data.attach(REFERENCE_FIELD, values["train"], values["eval"])
    rows = len(values["train"]) + len(values["eval"])
    log(f"dpo reference: {what} (log-probabilities of {rows} rows precomputed in {time.perf_counter() - start:.1f} s)")
    return ()
