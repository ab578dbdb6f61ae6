"""The reference model of DPO: where its per-token log-probabilities come from.

A reference is anything with `token_logps(params, frozen, batch) -> float32 [b, t]` (the
log-probability of each target token, 0 elsewhere): `params` are the policy's (being trained),
`frozen` the arrays the reference owns (passed into the jitted step beside the state, never
trained). `FrozenModel` is a second set of weights, a checkpoint's; a reference that is the policy's
own params with something switched off (LoRA adapters) would read `params` and own no `frozen`.

`precompute_token_logps` runs a reference once over rows before training (`dpo.precompute_reference`):
the rows then carry the result in a `ref_logps` field and the reference weights are freed. The
batches are the same on every start (the rows in order, `batch_size` at a time, the last filled with
padding rows), so a resumed run computes bit for bit what the first start did on the same hardware.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import numpy as np

from train.batches import global_batch, process_share
from train.token_logps import batch_token_logps

REFERENCE_FIELD = "ref_logps"  # precomputed per-token reference log-probabilities, a float32 row field


class Reference(Protocol):
    def token_logps(self, params, frozen, batch) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A frozen copy of the model: `frozen` is its params, in the policy's shardings."""

    setup: Any  # train.model_setup.ModelSetup: the architecture and mesh, shared with the policy
    chunk_length: int

    def token_logps(self, params, frozen, batch):
        logps_bt, _, _ = batch_token_logps(self.setup, self.chunk_length, frozen, batch)
        return logps_bt


def reference_checkpoint(dpo_reference: str | None, model_checkpoint: str | None) -> str | None:
    """The checkpoint the reference weights come from: dpo.reference, else the starting model's (None:
    the run starts from a fresh init, whose seeded params are the reference)."""
    return dpo_reference if dpo_reference is not None else model_checkpoint


def load_reference_params(setup, checkpoint: str | None, seed: int):
    """The reference weights in the policy's shardings: a checkpoint's (HF or Orbax, refused when its
    architecture differs), or the seeded fresh init the run starts from."""
    return setup.load_params(checkpoint) if checkpoint else setup.init_params(seed)


def precompute_token_logps(
    reference: Reference, frozen, rows: dict[str, np.ndarray], *, batch_size: int, batch_sharding, fields
) -> np.ndarray:
    """float32 [rows, seq_len]: the reference's per-token log-probabilities of every row, computed in
    global batches of batch_size rows (each process feeds its share of each; every process gets all)."""
    from jax.experimental import multihost_utils

    n, seq_len = rows["input_ids"].shape
    share_index, share_count = process_share(batch_sharding, batch_size, seq_len)
    local = batch_size // share_count
    step = jax.jit(
        lambda frozen, batch: reference.token_logps(None, frozen, batch),
        out_shardings=batch_sharding,
    )
    out = np.zeros((n, seq_len), np.float32)
    for first in range(0, n, batch_size):
        take = np.arange(first + share_index * local, first + (share_index + 1) * local)
        batch = {}
        for field in fields:
            block = np.full((local, seq_len), -100 if field == "labels" else 0, rows[field].dtype)
            real = take[take < n]
            block[: len(real)] = rows[field][real]
            batch[field] = block
        logps = step(frozen, global_batch(batch, batch_sharding, batch_size))
        logps = np.asarray(multihost_utils.process_allgather(logps, tiled=True)) if jax.process_count() > 1 else logps
        count = min(batch_size, n - first)
        out[first : first + count] = np.asarray(jax.device_get(logps))[:count]
    return out
