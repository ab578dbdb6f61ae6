"""The serving engine: fixed decode slots over one static KV cache, and the few programs that run them.

Continuous batching in JetStream's shape (prefill / insert / generate), on the library's one forward
pass (`Qwen2ForCausalLM`) and one sampler (`qwen2_jax.sampling`):
- The cache holds `max_batch_size` rows of `num_slots` positions. Row r holds one request's tokens
  at cache index == position 0, 1, 2, ... (no padding inside a row), so each row is written at its
  own index (`write_index` as a [b] vector).
- `prefill` writes one chunk of a prompt into one row (the row is sliced out, run at batch 1 and
  written back; the other rows are untouched, so the other requests keep decoding between chunks).
  The prompt's last token is not prefilled: it is the row's first decode input, so the first new
  token comes out of the same decode step, with the same sampling code, as every later one.
- `decode` advances every slot by one token in one compiled step: each row with its own position,
  sampling values (temperature, top-k, top-p, min-p, repetition penalty as [b] arrays) and random
  key (fold_in(key(seed), token index): a request's draws depend on its seed and its own progress,
  never on its neighbours). Free rows run too (fixed shapes) with their writes marked invalid.

Every program is a fixed shape: prefill per chunk bucket (powers of two from 16 to
`max_prefill_chunk`; with prompt log-probabilities up to 64), for a prompt's first chunk and for
later ones; decode per cache prefix (powers of two from 256 slots to the whole cache: a step attends
to the prefix that holds its longest row), per slot count (one slot, or all: a lone request in slot 0
runs a one-row step); the sampling filters, the repetition penalty and log-probabilities run inside
it only when a row asks for them (`lax.cond`). `warmup()` compiles them all; `trace_counts` counts
compilations, so a server can prove that no request compiles anything.

Sampling draws from the `sampling_candidates` (default 256) most likely tokens of each row: a draw
over the whole 151,936-token vocabulary costs 20 ms per step at batch 8 on a 2-core CPU (random bits
for every entry) and a full sort for top-p 223 ms, against 2.2 ms for the 256 candidates
(`jax.lax.top_k`). Greedy rows are exact whatever the candidate count.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax import cpu_kernels
from qwen2_jax.backend import backend
from qwen2_jax.config import Qwen2Config
from qwen2_jax.generate import Generator
from qwen2_jax.kv_cache import KVCache, init_cache
from qwen2_jax.layers import update_block, update_slice
from qwen2_jax.model import Qwen2ForCausalLM
from qwen2_jax.options import RunOptions
from qwen2_jax.sampling import SamplingMode, SamplingValues, apply_repetition_penalty, first_argmax, select_tokens
from serve.requests import MAX_TOP_LOGPROBS

PREFILL_BUCKET_MIN = 16
PROMPT_LOGPROBS_CHUNK = 64  # prompt log-probabilities need [chunk, vocab] float32 logits: 39 MB at 64
SAMPLING_CANDIDATES = 256


def doubling(minimum: int, maximum: int) -> tuple[int, ...]:
    """minimum, 2 * minimum, 4 * minimum, ... below maximum, then maximum: one compiled program each."""
    sizes, n = [], minimum
    while n < maximum:
        sizes.append(n)
        n *= 2
    sizes.append(maximum)
    return tuple(sizes)


def chunk_buckets(max_chunk: int) -> tuple[int, ...]:
    """Prefill chunk lengths: powers of two from 16 up to max_chunk."""
    return doubling(PREFILL_BUCKET_MIN, max_chunk)


KV_MEMORY_SHARE = 0.3  # of the device memory the params leave free, for the KV cache by default


def kv_bytes_per_token(config: Qwen2Config, batch: int, dtype) -> int:
    """Bytes of keys and values one position takes over every layer and slot."""
    per_layer = 2 * config.num_key_value_heads * config.head_size * jnp.dtype(dtype).itemsize
    return config.num_hidden_layers * per_layer * batch


def free_device_memory() -> int:
    """Free memory of the first device: its allocator's limit minus use on a GPU/TPU, the host's
    available memory on CPU (fake CPU devices share it)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    import psutil

    return int(psutil.virtual_memory().available)


def kv_buckets(num_slots: int, minimum: int = 256) -> tuple[int, ...]:
    """Cache prefixes a decode step attends to: powers of two from `minimum`, then the whole cache.
    Reading the whole cache every step would cost a step of a short request as much as one of the
    longest the cache allows."""
    return doubling(minimum, num_slots)


def moving_average(average: float | None, seconds: float) -> float:
    """A program's wall time, smoothed over its recent runs (the scheduler sizes prefill chunks by
    them while requests decode)."""
    return seconds if average is None else 0.8 * average + 0.2 * seconds


def key_data(seed: int) -> np.ndarray:
    """The raw threefry key of a seed, [2] uint32, as `jax.random.key(seed)` makes it for seeds below
    2**32; larger and negative seeds are taken modulo 2**64 (high word first)."""
    seed %= 1 << 64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What is static about every program of one engine (hashable for jit)."""

    config: Qwen2Config
    options: RunOptions
    batch: int
    num_slots: int
    candidates: int


@flax.struct.dataclass
class DecodeRows:
    """The host's per-slot inputs to one decode step, [b] each (key_data [b, 2])."""

    feed: Any  # int32: the token fed to the row (the prompt's last token, then each new token)
    length: Any  # int32: tokens already in the row's cache = the fed token's position and cache index
    active: Any  # bool: rows holding a request that decodes now
    greedy: Any  # bool
    logprobs: Any  # bool: the row's request wants log-probabilities
    values: SamplingValues  # temperature (1 for greedy rows), top_k, top_p, min_p, repetition_penalty
    key_data: Any  # uint32 [b, 2]
    step: Any  # int32: tokens the row's request has produced so far


def _model(spec: EngineSpec) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(spec.config, spec.options)


def _top_logprobs(logprobs_tv, chosen_t):
    """(the chosen tokens' log-probabilities [t], top ids [t, K], top log-probabilities [t, K])."""
    top_lp, top_ids = jax.lax.top_k(logprobs_tv, MAX_TOP_LOGPROBS)
    chosen_lp = jnp.take_along_axis(logprobs_tv, chosen_t[:, None], axis=1)[:, 0]
    return chosen_lp, top_ids.astype(jnp.int32), top_lp


def cache_block(cache: KVCache, num_rows: int, num_slots: int) -> KVCache:
    """The first num_rows rows' first num_slots slots (a static slice). Arrays are [..., rows,
    slots, kv_heads, head_dim] (per-layer or stacked) and pos [rows, slots]."""

    def block(a, rows_axis):
        rows = jax.lax.slice_in_dim(a, 0, num_rows, axis=rows_axis)
        return jax.lax.slice_in_dim(rows, 0, num_slots, axis=rows_axis + 1)

    return KVCache(
        k=tuple(block(a, a.ndim - 4) for a in cache.k),
        v=tuple(block(a, a.ndim - 4) for a in cache.v),
        pos=block(cache.pos, 0),
    )


def _put_front(full, front):
    """full with front written over its leading corner, in place."""
    return front if front.shape == full.shape else update_block(full, front, (0,) * full.ndim)


def put_cache_block(cache: KVCache, block: KVCache) -> KVCache:
    return KVCache(
        k=tuple(map(_put_front, cache.k, block.k)),
        v=tuple(map(_put_front, cache.v, block.v)),
        pos=_put_front(cache.pos, block.pos),
    )


def decode_step(spec: EngineSpec, kv_len: int, params, cache: KVCache, seen_bv, rows: DecodeRows):
    """One token for each of the first b slots (b = the rows' length), attending to (and writing in)
    the first kv_len cache slots only: (cache, seen, {"tokens" [b], "logprob" [b], "top_ids" [b, K],
    "top_logprobs" [b, K]}). Every active row is among them with its write index below kv_len; a
    free row's write past it is dropped.

    The repetition penalty, the sampling filters and draw, and the log-probabilities run under
    `lax.cond`s on whether any active row needs them: one program serves every mix of requests, and
    a batch of greedy requests without penalty or log-probabilities pays for none of them."""
    b, vocab = rows.feed.shape[0], spec.config.vocab_size
    mask_b1 = rows.active.astype(jnp.int32)[:, None]  # inactive rows write keys marked invalid (pos -1)
    out = _model(spec).apply(
        {"params": params},
        rows.feed[:, None],
        rows.length[:, None],
        mask_b1,
        cache=cache_block(cache, b, kv_len),
        write_index=rows.length,
    )
    cache = put_cache_block(cache, out["cache"])
    logits_bv = out["logits"][:, 0].astype(jnp.float32)
    # the fed token joins the tokens the repetition penalty sees (the prompt's were set by prefill)
    seen_block_bv = seen_bv[:b].at[jnp.arange(b), jnp.where(rows.active, rows.feed, vocab)].set(True, mode="drop")
    seen_bv = _put_front(seen_bv, seen_block_bv)
    penalty_b = rows.values.repetition_penalty
    penalized_bv = jax.lax.cond(
        jnp.any(rows.active & (penalty_b != 1.0)),
        lambda x: apply_repetition_penalty(x, seen_block_bv, penalty_b[:, None]),
        lambda x: x,
        logits_bv,
    )
    sampling = SamplingMode(greedy=False, top_k_cap=min(spec.candidates, vocab), use_top_p=True, use_min_p=True)
    keys = jax.vmap(lambda kd, t: jax.random.fold_in(jax.random.wrap_key_data(kd), t))(rows.key_data, rows.step)
    tokens_b = jax.lax.cond(
        jnp.any(rows.active & ~rows.greedy),
        lambda x: select_tokens(x, sampling, rows.values, keys, greedy_b=rows.greedy),
        first_argmax,
        penalized_bv,
    ).astype(jnp.int32)
    k = MAX_TOP_LOGPROBS
    lp, ids, top = jax.lax.cond(
        jnp.any(rows.active & rows.logprobs),
        lambda x: _top_logprobs(jax.nn.log_softmax(x, axis=-1), tokens_b),
        lambda x: (jnp.zeros((b,), jnp.float32), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32)),
        logits_bv,
    )
    return cache, seen_bv, {"tokens": tokens_b, "logprob": lp, "top_ids": ids, "top_logprobs": top}


def prefill_chunk(
    spec: EngineSpec,
    logprobs: bool,
    first: bool,
    params,
    cache: KVCache,
    seen_bv,
    row,
    ids_c,
    n_real,
    start,
    targets_c,
):
    """Write ids_c[:n_real] (a chunk of row `row`'s prompt, at positions start...) into the cache.
    first: the prompt's first chunk (start is 0, statically): it clears the row and attends to its
    own keys only (on CPU in causal blocks), not to the whole row: a 127-token prompt in a row of
    2688 slots took 1.15 s against 0.44 s in a row of 256. With logprobs: each chunk token's
    prediction of targets_c (the token after it), as (logprob [c], top ids [c, K], top logprobs
    [c, K])."""
    vocab, c = spec.config.vocab_size, ids_c.shape[0]
    if first:
        start = 0

    def take_row(a):
        return jax.lax.dynamic_slice_in_dim(a, row, 1, axis=0)

    def put_row(a, new):
        return update_slice(a, new, row, axis=0)

    row_cache = KVCache(
        k=tuple(map(take_row, cache.k)),
        v=tuple(map(take_row, cache.v)),
        pos=jnp.full_like(take_row(cache.pos), -1) if first else take_row(cache.pos),
    )
    real_c = jnp.arange(c) < n_real
    out = _model(spec).apply(
        {"params": params},
        ids_c[None],
        (start + jnp.arange(c))[None],
        real_c.astype(jnp.int32)[None],
        cache=row_cache,
        write_index=start,
        return_logits=logprobs,
    )
    new = out["cache"]
    cache = KVCache(
        k=tuple(map(put_row, cache.k, new.k)), v=tuple(map(put_row, cache.v, new.v)), pos=put_row(cache.pos, new.pos)
    )
    seen_v = jnp.zeros_like(seen_bv[0]) if first else take_row(seen_bv)[0]
    seen_v = seen_v.at[jnp.where(real_c, ids_c, vocab)].set(True, mode="drop")
    seen_bv = put_row(seen_bv, seen_v[None])
    result = None
    if logprobs:
        result = _top_logprobs(jax.nn.log_softmax(out["logits"][0], axis=-1), targets_c)
    return cache, seen_bv, result


class Engine:
    """A model's runtime params (`Generator`'s layout and quantization), the decode slots' device
    state (KV cache, the repetition penalty's seen-token table) and the compiled programs.

    max_model_len: the longest prompt + output of one request (default: the model's context,
    max_position_embeddings, or none with dual chunk attention, capped so that the KV cache takes at
    most 30% of the memory the params leave free; `max_model_len_capped` says whether it was).
    max_prefill_chunk: the longest prompt piece prefilled between two decode steps. kv_bucket_min: the
    smallest cache prefix a decode step attends to. Not thread-safe: one thread (the scheduler's loop) drives it."""

    def __init__(
        self,
        config: Qwen2Config,
        params,
        *,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        max_prefill_chunk: int = 512,
        sampling_candidates: int = SAMPLING_CANDIDATES,
        kv_bucket_min: int = 256,
        quantize: str | None = None,
        consume: bool = False,
    ):
        for name, value, low in (
            ("max_batch_size", max_batch_size, 1),
            ("max_prefill_chunk", max_prefill_chunk, PREFILL_BUCKET_MIN),
            ("sampling_candidates", sampling_candidates, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        context = config.context_length  # None: no position limit (dual chunk attention), memory only
        if max_model_len is not None and (
            isinstance(max_model_len, bool)
            or not isinstance(max_model_len, int)
            or not 2 <= max_model_len <= (context or max_model_len)
        ):
            raise ValueError(
                f"max_model_len must be an integer in [2, {context}] (the model's context), got {max_model_len!r}"
            )
        generator = Generator(config, params, consume=consume, quantize=quantize)
        self.config = config
        self.params = generator.params
        self.options = generator.options
        self.max_model_len_capped = False
        if max_model_len is None:
            # after the params are placed: the cache gets a share of what they left free
            per_token = kv_bytes_per_token(config, max_batch_size, self.options.compute_dtype)
            fits = int(KV_MEMORY_SHARE * free_device_memory() // per_token) - max_prefill_chunk
            max_model_len = fits // 16 * 16 if context is None else min(context, fits // 16 * 16)
            self.max_model_len_capped = context is None or max_model_len < context
            if max_model_len < 2:
                raise ValueError(
                    f"no memory left for a KV cache: {max_batch_size} slots need {per_token / 2**20:.1f} MiB per "
                    "token; lower max_batch_size or set max_model_len"
                )
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.max_prefill_chunk = max_prefill_chunk
        self.chunk_sizes = chunk_buckets(max_prefill_chunk)
        self.logprob_chunk_sizes = tuple(c for c in self.chunk_sizes if c <= PROMPT_LOGPROBS_CHUNK)
        # a chunk is written whole (its padding too), so the last one may reach past max_model_len
        num_slots = max_model_len + self.chunk_sizes[-1]
        self.spec = EngineSpec(config, self.options, max_batch_size, num_slots, sampling_candidates)
        sharding = self.options.sharding
        self.cache = init_cache(
            config,
            max_batch_size,
            num_slots,
            self.options.compute_dtype,
            per_layer=self.options.layer_layout == "per_layer",
            sharding=sharding,
        )
        seen_sharding = sharding.sharding(("batch", None), (max_batch_size, config.vocab_size)) if sharding else None
        self.seen = jnp.zeros((max_batch_size, config.vocab_size), bool, device=seen_sharding)
        if sharding is None:
            # committed to the device, as every program's outputs are: an uncommitted first cache made
            # jit compile the first program once more for the committed caches of the later calls
            device = jax.devices()[0]
            self.cache, self.seen = jax.device_put((self.cache, self.seen), device)
        self.trace_counts: collections.Counter = collections.Counter()
        # (logprobs, first chunk, chunk size) -> moving average of the program's seconds
        self.prefill_seconds: dict[tuple[bool, bool, int], float] = {}
        self.decode_seconds: float | None = None
        self.kv_lengths = kv_buckets(num_slots, kv_bucket_min)
        self.batch_sizes = (max_batch_size,)
        if (
            max_batch_size <= cpu_kernels.MAX_ROWS
            and sharding is None
            and backend() == "cpu"
            and cpu_kernels.available()
        ):
            # Steps of fewer slots only where a row's numbers provably do not depend on the slot count:
            # the CPU decode kernels compute each row alike for 1 to 8 rows. XLA's dots may change
            # algorithm with the row count (on a mesh, a one-row step changed a float32 greedy token).
            self.batch_sizes = doubling(1, max_batch_size)
        self._decode = {}
        self._prefill = {}
        for kv_len in self.kv_lengths:
            self._decode[kv_len] = jax.jit(
                functools.partial(self._traced, "decode", decode_step, self.spec, kv_len), donate_argnums=(1, 2)
            )
        for logprobs in (False, True):
            for first in (True, False):
                self._prefill[logprobs, first] = jax.jit(
                    functools.partial(self._traced, "prefill", prefill_chunk, self.spec, logprobs, first),
                    donate_argnums=(1, 2),
                )

    def _traced(self, name, fn, *args):
        self.trace_counts[name] += 1
        return fn(*args)

    # ------------------------------------------------------------------------------- programs
    def chunk_size_for(self, remaining: int, logprobs: bool, first: bool = True, budget_s: float | None = None) -> int:
        """The bucket a prefill of `remaining` more prompt tokens uses next (it takes min(remaining,
        that bucket) tokens): the smallest that holds them all, or, with budget_s, no larger than the
        largest whose measured prefill time fits in budget_s (at least the smallest bucket). first:
        the prompt's first chunk (cheaper: it attends to its own keys only)."""
        sizes = self.logprob_chunk_sizes if logprobs else self.chunk_sizes
        if budget_s is not None:
            timed = self.prefill_seconds
            sizes = [c for i, c in enumerate(sizes) if i == 0 or timed.get((logprobs, first, c), 0.0) <= budget_s]
        return next((c for c in sizes if c >= remaining), sizes[-1])

    def prefill(self, row: int, ids, start: int, targets=None):
        """Prefill prompt tokens `ids` (at most one bucket) into `row` at positions start... (start 0
        starts a new request in the row). targets: the token after each of ids, to return prompt
        log-probabilities for (then at most 64 tokens): (logprob [n], top ids [n, 20], top logprobs
        [n, 20]) as numpy; else None."""
        n = len(ids)
        logprobs = targets is not None
        c = self.chunk_size_for(n, logprobs)
        if not 0 <= n <= c:
            raise ValueError(f"a prefill chunk holds at most {c} tokens, got {n}")
        if start + c > self.spec.num_slots:
            raise ValueError(f"prefill at {start} + {c} runs past the cache's {self.spec.num_slots} slots")
        ids_c = np.zeros(c, np.int32)
        ids_c[:n] = ids
        targets_c = np.zeros(c, np.int32)
        if logprobs:
            targets_c[:n] = targets
        began = time.perf_counter()
        self.cache, self.seen, result = self._prefill[logprobs, start == 0](
            self.params, self.cache, self.seen, np.int32(row), ids_c, np.int32(n), np.int32(start), targets_c
        )
        result = None if result is None else tuple(np.asarray(x)[:n] for x in jax.device_get(result))
        jax.block_until_ready(self.seen)
        key = (logprobs, start == 0, c)
        self.prefill_seconds[key] = moving_average(self.prefill_seconds.get(key), time.perf_counter() - began)
        return result

    def kv_length_for(self, rows: DecodeRows) -> int:
        """The cache prefix a decode step of these rows attends to: it holds every active row's
        tokens and the one fed now."""
        longest = int(np.max(rows.length, where=rows.active, initial=0)) + 1
        return next(n for n in self.kv_lengths if n >= longest)

    def rows_for(self, rows: DecodeRows) -> int:
        """How many leading slots a decode step of these rows runs: the fewest of `batch_sizes` that
        hold every active row. On one CPU device with up to 8 slots these are the powers of two, so
        a lone request in slot 0 runs a one-row step (the 8-row step cost a Qwen2-0.5B request 51 ms a
        token against ~20 ms at one row); elsewhere every step runs every slot."""
        last = int(np.flatnonzero(rows.active)[-1]) + 1 if rows.active.any() else 1
        return next(b for b in self.batch_sizes if b >= last)

    def decode(self, rows: DecodeRows) -> dict[str, np.ndarray]:
        """One decode step over the leading slots that hold every active row (`rows_for`); numpy
        results for those slots ("tokens" [b], "logprob" [b], "top_ids" and "top_logprobs" [b, 20])."""
        b = self.rows_for(rows)
        program = self._decode[self.kv_length_for(rows)]
        began = time.perf_counter()
        # copies: the scheduler edits its arrays in place after the call, and XLA:CPU may read a
        # numpy argument in place (zero copy) after the call returns
        rows = jax.tree.map(lambda x: np.array(x[:b]), rows)
        self.cache, self.seen, result = program(self.params, self.cache, self.seen, rows)
        result = {k: np.asarray(v) for k, v in jax.device_get(result).items()}
        self.decode_seconds = moving_average(self.decode_seconds, time.perf_counter() - began)
        return result

    def empty_rows(self) -> DecodeRows:
        """Host arrays for a decode step with no active slot (the scheduler fills them in)."""
        b = self.max_batch_size
        return DecodeRows(
            feed=np.zeros(b, np.int32),
            length=np.zeros(b, np.int32),
            active=np.zeros(b, bool),
            greedy=np.ones(b, bool),
            logprobs=np.zeros(b, bool),
            values=SamplingValues(
                temperature=np.ones(b, np.float32),
                top_k=np.zeros(b, np.int32),
                top_p=np.ones(b, np.float32),
                min_p=np.zeros(b, np.float32),
                repetition_penalty=np.ones(b, np.float32),
            ),
            key_data=np.zeros((b, 2), np.uint32),
            step=np.zeros(b, np.int32),
        )

    def warmup(self, progress=None) -> None:
        """Compile every program (each run once on a free row / with no active slot). progress:
        called with a line per program."""
        jobs = [(False, c) for c in self.chunk_sizes] + [(True, c) for c in self.logprob_chunk_sizes]
        for logprobs, c in jobs:
            if progress:
                progress(f"prefill chunk {c}{' with logprobs' if logprobs else ''}")
            ids = [0] * c
            for start in (1, 0):  # a later chunk's program (any start but 0 fits the cache), then a first one's
                for _ in range(2):  # the first run compiles; the second one's time is the chunk's cost
                    self.prefill_seconds.pop((logprobs, start == 0, c), None)
                    self.prefill(0, ids, start, targets=ids if logprobs else None)
        rows = self.empty_rows()
        for b in self.batch_sizes:
            for kv_len in self.kv_lengths:
                if progress:
                    progress(f"decode step ({b} slot{'s' * (b > 1)}, {kv_len} cache positions)")
                # row b-1 active at kv_len - 1 picks this program; a request taking the row resets it
                rows.active[:] = False
                rows.active[b - 1] = True
                rows.length[b - 1] = kv_len - 1
                self.decode(rows)
        rows.active[:] = False
        rows.active[-1] = True
        rows.length[:] = 0
        self.decode_seconds = None
        self.decode(rows)  # every slot, the smallest prefix: a first measure of a step
