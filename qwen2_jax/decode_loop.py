"""The compiled generation programs: prefill, then a `lax.while_loop` of decode steps.

Everything static about one program is a `LoopSpec` (shapes, sampling mode, how the model runs);
the KV cache and decode state are pytrees, donated on each call. The model is the one
`Qwen2ForCausalLM` forward pass, in whichever layer layout the spec's options say.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from qwen2_jax.config import Qwen2Config
from qwen2_jax.kv_cache import KVCache
from qwen2_jax.model import Qwen2ForCausalLM, positions_from_mask
from qwen2_jax.options import RunOptions
from qwen2_jax.sampling import SamplingMode, SamplingValues, row_keys, select_tokens


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    config: Qwen2Config
    options: RunOptions
    batch: int
    prompt_len: int  # left-padded prompt bucket P
    capacity: int  # output buffer width N (>= max_new_tokens); the cache holds P + N slots
    sampling: SamplingMode
    num_eos: int
    record_logits: bool

    @property
    def num_slots(self) -> int:
        return self.prompt_len + self.capacity


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    tokens: jnp.ndarray  # [b, capacity] int32; -1 after a row stopped (and for padding rows)
    last: jnp.ndarray  # [b] the token to feed next
    done: jnp.ndarray  # [b] bool
    step: jnp.ndarray  # scalar int32: tokens produced so far
    lengths: jnp.ndarray  # [b] real prompt lengths
    seen: Any  # [b, vocab] bool (repetition penalty) or None
    logits: Any  # [b, capacity, vocab] float32 (record_logits) or None


@flax.struct.dataclass
class LoopInputs:
    """Per-call dynamic inputs shared by prefill and decode."""

    row_ids: jnp.ndarray  # [b] int32: the row's index in the caller's list (sampling keys)
    key: jax.Array
    values: SamplingValues
    eos: jnp.ndarray  # [num_eos] int32
    max_new: jnp.ndarray  # scalar int32


def _apply_model(
    spec: LoopSpec, params, ids_bt, positions_bt, mask_bt, cache: KVCache, write_index, logits_index_b=None
):
    out = Qwen2ForCausalLM(spec.config, spec.options).apply(
        {"params": params},
        ids_bt,
        positions_bt,
        mask_bt,
        cache=cache,
        write_index=write_index,
        logits_index_b=logits_index_b,
    )
    return out["logits"], out["cache"]


def _is_stop(tokens_b, eos):
    if eos.shape[0] == 0:
        return jnp.zeros(tokens_b.shape, bool)
    return jnp.any(tokens_b[:, None] == eos[None, :], axis=-1)


def _choose(spec: LoopSpec, logits_bv, inputs: LoopInputs, step, seen):
    keys = None if spec.sampling.greedy else row_keys(inputs.key, step, inputs.row_ids)
    return select_tokens(logits_bv, spec.sampling, inputs.values, keys, seen)


def prefill(spec: LoopSpec, params, cache: KVCache, ids_bp, mask_bp, active_b, inputs: LoopInputs) -> DecodeState:
    b, p = ids_bp.shape
    logits, cache = _apply_model(
        spec, params, ids_bp, positions_from_mask(mask_bp), mask_bp, cache, 0, jnp.full((b,), p - 1, jnp.int32)
    )
    logits_bv = logits[:, 0]
    seen = None
    if spec.sampling.use_repetition_penalty:
        vocab = spec.config.vocab_size
        real_ids = jnp.where(mask_bp.astype(bool), ids_bp, vocab)  # padding -> out of range -> dropped
        seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], real_ids].set(True, mode="drop")
    first = jnp.where(active_b, _choose(spec, logits_bv, inputs, 0, seen), -1)
    tokens = jnp.full((b, spec.capacity), -1, jnp.int32).at[:, 0].set(first)
    recorded = None
    if spec.record_logits:
        recorded = jnp.zeros((b, spec.capacity, spec.config.vocab_size), jnp.float32).at[:, 0].set(logits_bv)
    return DecodeState(
        cache=cache,
        tokens=tokens,
        last=jnp.maximum(first, 0),
        done=~active_b | _is_stop(first, inputs.eos),
        step=jnp.int32(1),
        lengths=jnp.sum(mask_bp, axis=1).astype(jnp.int32),
        seen=seen,
        logits=recorded,
    )


def decode(spec: LoopSpec, params, state: DecodeState, inputs: LoopInputs, stop_step) -> DecodeState:
    """Decode steps until every row stopped, max_new tokens were made, or `stop_step` is reached."""
    b = state.tokens.shape[0]
    limit = jnp.minimum(inputs.max_new, stop_step)

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        slot = spec.prompt_len + s.step - 1  # where the token fed now goes
        positions = (s.lengths + s.step - 1)[:, None]
        logits, cache = _apply_model(
            spec, params, s.last[:, None], positions, jnp.ones((b, 1), jnp.int32), s.cache, slot
        )
        logits_bv = logits[:, 0]
        seen = s.seen
        if seen is not None:
            seen = seen.at[jnp.arange(b), s.last].set(True)
        new = jnp.where(s.done, -1, _choose(spec, logits_bv, inputs, s.step, seen))
        tokens = jax.lax.dynamic_update_slice(s.tokens, new[:, None], (0, s.step))
        recorded = s.logits
        if recorded is not None:
            recorded = jax.lax.dynamic_update_slice(recorded, logits_bv[:, None], (0, s.step, 0))
        return DecodeState(
            cache=cache,
            tokens=tokens,
            last=jnp.where(s.done, s.last, new),
            done=s.done | _is_stop(new, inputs.eos),
            step=s.step + 1,
            lengths=s.lengths,
            seen=seen,
            logits=recorded,
        )

    return jax.lax.while_loop(cond, body, state)


@dataclasses.dataclass(frozen=True)
class Programs:
    """The jitted programs of one spec; cache / state arguments are donated."""

    whole: Any  # prefill + decode to the end: (params, cache, ids, mask, active, inputs) -> state
    prefill: Any  # (params, cache, ids, mask, active, inputs) -> state
    decode: Any  # (params, state, inputs, stop_step) -> state


def build_programs(spec: LoopSpec, trace_counts: collections.Counter) -> Programs:
    """Programs for `spec`; each trace (= compilation) is counted in `trace_counts` by name."""

    def whole(params, cache, ids, mask, active, inputs):
        trace_counts["generate"] += 1
        state = prefill(spec, params, cache, ids, mask, active, inputs)
        return decode(spec, params, state, inputs, inputs.max_new)

    def prefill_only(params, cache, ids, mask, active, inputs):
        trace_counts["prefill"] += 1
        return prefill(spec, params, cache, ids, mask, active, inputs)

    def decode_chunk(params, state, inputs, stop_step):
        trace_counts["decode"] += 1
        return decode(spec, params, state, inputs, stop_step)

    return Programs(
        whole=jax.jit(whole, donate_argnums=(1,)),
        prefill=jax.jit(prefill_only, donate_argnums=(1,)),
        decode=jax.jit(decode_chunk, donate_argnums=(1,)),
    )
