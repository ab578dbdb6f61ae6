"""Generation: a `Generator` owns a model's runtime params and its compiled programs.

Shapes are fixed per compilation: the batch is padded to a power of two, prompts are left-padded to
a bucket length (16, 24, 32, 48, 64, 96, ...) and the output buffer / cache tail to a bucket of
max_new_tokens, so new prompt lengths, token budgets and sampling values rarely recompile (each
generator counts its traces in `trace_counts`).

`Generator.generate` runs prefill and a `lax.while_loop` over decode steps inside one jitted
program; the loop exits early once every row has produced a stop token. `Generator.stream` runs
the same prefill and loop body as two programs (prefill, then a few steps at a time) and yields
tokens as they are made; for the same inputs and seed it yields exactly what `generate` returns.

Layer layout: XLA:CPU slicing a layer out of stacked [layers, ...] weights copies the slice each
step (measured ~5 GB/s against ~15-25 GB/s for matvecs over separate buffers), so by default a
generator holds the layers "per_layer", a copy of the layer weights made once (on one CPU device
also with [out, in] kernels, which XLA:CPU multiplies by a few rows 1.4-1.5x faster).
`Generator(..., consume=True)` moves the checkpoint params instead of copying them.
`Generator(..., quantize="int8")` also quantizes them (`qwen2_jax.quantize`; params loaded with
`load_checkpoint(..., quantize="int8")` already are).

`generate`, `generate_outputs` and `generate_stream` are the function forms: each call finds the
generator made for the same params (held only while those params are alive) or makes one.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.config import Qwen2Config
from qwen2_jax.decode_loop import LoopInputs, LoopSpec, Programs, build_programs
from qwen2_jax.forward import sharding_of
from qwen2_jax.kv_cache import init_cache
from qwen2_jax.layouts import relayout
from qwen2_jax.lora import LoraConfig
from qwen2_jax.lora import apply as apply_lora
from qwen2_jax.options import LAYER_LAYOUTS, RunOptions, default_kernel_layout
from qwen2_jax.quantize import quantize_params
from qwen2_jax.sampling import SamplingParams, as_int_list

PROMPT_BUCKET_MIN = 16
NEW_TOKENS_BUCKET_MIN = 16


def bucket(n: int, minimum: int = PROMPT_BUCKET_MIN) -> int:
    """Smallest of minimum, 1.5*minimum, 2*minimum, 3*minimum, 4*minimum, ... that is >= n."""
    b = minimum
    while True:
        if n <= b:
            return b
        if n <= b + b // 2:
            return b + b // 2
        b *= 2


def batch_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """One generation request's settings (the positional order is `generate`'s).

    eos_token_ids: None = the checkpoint's eos tokens (config.checkpoint_info); [] = never stop
    early. temperature 0 is greedy; otherwise HF's processors run in HF's order (repetition
    penalty, temperature, top-k, top-p, min-p) and the draw is seeded: the same seed and inputs
    give the same tokens. allow_context_overflow lets prompt + max_new_tokens run past the model's
    max_position_embeddings (refused otherwise; with dual chunk attention there is no such limit)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    eos_token_ids: Any = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    allow_context_overflow: bool = False

    def __post_init__(self):
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {n!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)  # validates

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)

    def stop_tokens(self, config: Qwen2Config) -> list[int]:
        eos = self.eos_token_ids
        if eos is None:
            eos = config.checkpoint_info.eos_token_ids
        elif isinstance(eos, int):
            eos = [eos]
        return sorted(set(as_int_list(eos, "eos_token_ids")))


@dataclasses.dataclass
class _Job:
    spec: LoopSpec
    args: tuple  # (cache, ids, mask, active, inputs)
    num_rows: int
    max_new: int


class Generator:
    """A model ready to generate: its params in the runtime layout, its compiled programs, and
    `trace_counts` (program name -> compilations). Drop the generator to free both.

    layer_layout: "per_layer" (default) or "stacked" (runs the checkpoint layout as it is).
    kernel_layout: None = [out, in] on one CPU device, the checkpoint's [in, out] elsewhere.
    consume: move the params into the runtime layout, deleting the originals (peak memory: the
    model plus one leaf) instead of copying them.
    quantize: None, or "int8" to quantize float params (see `qwen2_jax.quantize`).
    matmul: RunOptions.matmul ("auto", "einsum", "gemm").
    lora: (LoraConfig, adapters) to generate with, unmerged (`qwen2_jax.lora.apply` on the runtime
    params; the base stays as it is, quantized or not). Merging them instead costs nothing per step.
    """

    def __init__(
        self,
        config: Qwen2Config,
        params,
        *,
        layer_layout: str = "per_layer",
        kernel_layout: str | None = None,
        scan_unroll: int = 1,
        consume: bool = False,
        quantize: str | None = None,
        matmul: str = "auto",
        lora: tuple[LoraConfig, Any] | None = None,
    ):
        if layer_layout not in LAYER_LAYOUTS:
            raise ValueError(f"layer_layout must be one of {LAYER_LAYOUTS}, got {layer_layout!r}")
        sharding = sharding_of(params)
        if kernel_layout is None:
            kernel_layout = default_kernel_layout(sharding is not None) if layer_layout == "per_layer" else "in_out"
        self.config = config
        layout = RunOptions(
            layer_layout=layer_layout, kernel_layout=kernel_layout, scan_unroll=scan_unroll, matmul=matmul
        ).for_params(params, sharding)
        runtime = relayout(config, params, layout, consume=consume)
        if quantize is not None:
            runtime = quantize_params(config, runtime, layout, quantize, consume=consume)
        if lora is not None:
            runtime = apply_lora(runtime, lora[1], lora[0])
        self.params = runtime
        self.options = layout.for_params(runtime, sharding)
        self.trace_counts: collections.Counter = collections.Counter()
        self._programs: dict[LoopSpec, Programs] = {}
        self._stream_executables: dict[LoopSpec, tuple] = {}

    # ------------------------------------------------------------------------------ public API
    def generate(self, prompts, options: GenerateOptions) -> list[list[int]]:
        """New tokens for each prompt (a list of token-id lists of any lengths), each row ending
        with its stop token when one was produced."""
        return self.generate_outputs(prompts, options)["tokens"]

    def generate_outputs(self, prompts, options: GenerateOptions, output_logits: bool = False) -> dict:
        """{"tokens": lists, "logits": per row float32 [len, vocab] (the raw logits each token was
        chosen from, when output_logits)}."""
        job = self._job(prompts, options, output_logits)
        if job.max_new == 0:
            return {"tokens": [[] for _ in range(job.num_rows)]}
        state = self._programs_for(job.spec).whole(self.params, *job.args)
        tokens = _rows_from(np.asarray(jax.device_get(state.tokens)), job.num_rows, job.max_new)
        out: dict[str, Any] = {"tokens": tokens}
        if output_logits:
            logits = np.asarray(jax.device_get(state.logits))
            out["logits"] = [logits[i, : len(t)] for i, t in enumerate(tokens)]
        return out

    def stream(self, prompts, options: GenerateOptions, chunk_size: int = 1) -> Iterator[list[int | None]]:
        """Yield one list per generated position: each prompt's new token, or None for a row that
        has already stopped. chunk_size: decode steps per device call (1 = every token as soon as
        it is made)."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        job = self._job(prompts, options, False)
        if job.max_new == 0:
            return
        prefill, decode = self._stream_programs(job)
        state = prefill(self.params, *job.args)
        inputs = job.args[-1]
        emitted = 0
        while True:
            tokens = np.asarray(jax.device_get(state.tokens))
            made = int(state.step)
            for j in range(emitted, made):
                column = tokens[: job.num_rows, j]
                if np.all(column < 0):
                    return
                yield [int(t) if t >= 0 else None for t in column]
            emitted = made
            done = np.asarray(jax.device_get(state.done))[: job.num_rows]
            if made >= job.max_new or done.all():
                return
            state = decode(self.params, state, inputs, jnp.int32(made + chunk_size))

    # ---------------------------------------------------------------------------------- inside
    def _programs_for(self, spec: LoopSpec) -> Programs:
        if spec not in self._programs:
            self._programs[spec] = build_programs(spec, self.trace_counts)
        return self._programs[spec]

    def _stream_programs(self, job: _Job):
        """Prefill and decode programs of a stream, both compiled up front (so the first decode
        step does not pay for a compilation in the middle of the stream)."""
        if job.spec not in self._stream_executables:
            programs = self._programs_for(job.spec)
            prefill = programs.prefill.lower(self.params, *job.args).compile()
            state = jax.tree.map(
                lambda info, sh: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sh),
                prefill.out_info,
                prefill.output_shardings,
            )
            decode = programs.decode.lower(self.params, state, job.args[-1], jnp.int32(0)).compile()
            self._stream_executables[job.spec] = (prefill, decode)
        return self._stream_executables[job.spec]

    def _job(self, prompts, options: GenerateOptions, record_logits: bool) -> _Job:
        config = self.config
        prompts = check_prompts(config, prompts)
        longest = max(len(p) for p in prompts)
        context = config.context_length  # None: no limit (dual chunk attention)
        if context is not None and longest + options.max_new_tokens > context and not options.allow_context_overflow:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {options.max_new_tokens} runs past the "
                f"model's context of {context} tokens (max_position_embeddings); shorten the request "
                "or allow_context_overflow=True"
            )
        eos = options.stop_tokens(config)
        sharding = self.options.sharding
        rows = len(prompts)
        b = batch_bucket(rows)
        p = bucket(longest, PROMPT_BUCKET_MIN)
        n = bucket(max(options.max_new_tokens, 1), NEW_TOKENS_BUCKET_MIN)
        ids = np.zeros((b, p), np.int32)
        mask = np.zeros((b, p), np.int32)
        for i, x in enumerate(prompts):
            ids[i, p - len(x) :] = x
            mask[i, p - len(x) :] = 1
        mask[rows:, -1] = 1  # batch padding rows: one dummy token, marked done from the start
        active = np.arange(b) < rows
        spec = LoopSpec(
            config=config,
            options=self.options,
            batch=b,
            prompt_len=p,
            capacity=n,
            sampling=options.sampling.mode(config.vocab_size),
            num_eos=len(eos),
            record_logits=record_logits,
        )

        def put(x, names):
            x = jnp.asarray(x)
            return jax.device_put(x, sharding.sharding(names, x.shape)) if sharding is not None else x

        inputs = LoopInputs(
            row_ids=put(np.arange(b, dtype=np.int32), ("batch",)),
            key=jax.random.key(int(options.seed)),
            values=options.sampling.values(),
            eos=jnp.asarray(np.array(eos, np.int32)),
            max_new=jnp.int32(options.max_new_tokens),
        )
        cache = init_cache(
            config,
            b,
            spec.num_slots,
            self.options.compute_dtype,
            per_layer=self.options.layer_layout == "per_layer",
            sharding=sharding,
        )
        return _Job(
            spec=spec,
            args=(
                cache,
                put(ids, ("batch", "length")),
                put(mask, ("batch", "length")),
                put(active, ("batch",)),
                inputs,
            ),
            num_rows=rows,
            max_new=int(options.max_new_tokens),
        )


def check_prompts(config: Qwen2Config, prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise ValueError("prompts must be a list of token-id lists")
    prompts = list(prompts)
    if any(isinstance(p, (str, bytes)) or not hasattr(p, "__iter__") for p in prompts):
        raise ValueError("prompts must be a list of token-id lists (one list per prompt)")
    prompts = [as_int_list(p, "prompt token ids") for p in prompts]
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
    return prompts


def _rows_from(tokens: np.ndarray, num_rows: int, max_new: int) -> list[list[int]]:
    out = []
    for row in tokens[:num_rows, :max_new]:
        stop = np.flatnonzero(row < 0)
        out.append(row[: stop[0] if stop.size else max_new].tolist())
    return out


# --------------------------------------------------------------------------- function forms
# id(anchor) -> (weakref to the anchor, ids of every leaf, generator settings, generator). The anchor is
# the first stacked layer leaf, which a per-layer generator never holds (it holds per-layer copies),
# so an entry lives exactly as long as the caller's params: a finalizer drops it.
_GENERATORS: dict[int, tuple] = {}
_GENERATOR_SETTINGS = ("layer_layout", "kernel_layout", "scan_unroll", "quantize", "matmul")


def generator_for(config: Qwen2Config, params, **settings) -> Generator:
    """`params` itself when it is a Generator; otherwise the generator made earlier for these very
    params (same arrays, config and settings), or a new one, kept while the params are alive."""
    if isinstance(params, Generator):
        if params.config != config:
            raise ValueError("the Generator was made for another config")
        return params
    leaves = jax.tree.leaves(params)
    anchor = jax.tree.leaves(params[config.layer_segments()[0][0]])[0]
    key = id(anchor)
    found = _GENERATORS.get(key)
    if (
        found is not None
        and found[0]() is anchor
        and found[1] == tuple(map(id, leaves))
        and found[2] == (config, settings)
    ):
        return found[3]
    generator = Generator(config, params, **settings)
    if generator.options.layer_layout == "stacked":
        return generator  # it holds the caller's arrays themselves: keeping it would keep them alive
    _GENERATORS[key] = (weakref.ref(anchor), tuple(map(id, leaves)), (config, settings), generator)
    weakref.finalize(anchor, _GENERATORS.pop, key, None)
    return generator


def _split(config: Qwen2Config, max_new_tokens, args, kwargs: dict) -> tuple[dict, GenerateOptions]:
    """(generator settings, request). The request's default stop tokens are the caller's config's
    (a shared generator may have been made with an equal config from another checkpoint)."""
    settings = {k: kwargs.pop(k) for k in _GENERATOR_SETTINGS if k in kwargs}
    options = GenerateOptions(max_new_tokens, *args, **kwargs)
    if options.eos_token_ids is None:
        options = dataclasses.replace(options, eos_token_ids=config.checkpoint_info.eos_token_ids)
    return settings, options


def generate(config: Qwen2Config, params, prompts, max_new_tokens: int, *args, **kwargs) -> list[list[int]]:
    """New tokens for each prompt: `generate(config, params, prompts, max_new_tokens, temperature=0.0,
    top_k=None, top_p=None, seed=0, eos_token_ids=None, *, min_p=None, repetition_penalty=None,
    allow_context_overflow=False, layer_layout=..., kernel_layout=..., scan_unroll=1)`; the request
    settings are GenerateOptions', the rest the Generator's. `params` may be a Generator."""
    settings, request = _split(config, max_new_tokens, args, kwargs)
    return generator_for(config, params, **settings).generate(prompts, request)


def generate_outputs(
    config: Qwen2Config, params, prompts, max_new_tokens: int, *args, output_logits: bool = False, **kwargs
) -> dict:
    """`generate` with details: {"tokens": ..., "logits": ...} (see Generator.generate_outputs)."""
    settings, request = _split(config, max_new_tokens, args, kwargs)
    return generator_for(config, params, **settings).generate_outputs(prompts, request, output_logits)


def generate_stream(
    config: Qwen2Config, params, prompts, max_new_tokens: int, *args, chunk_size: int = 1, **kwargs
) -> Iterator[list[int | None]]:
    """Yield one list per generated position (see Generator.stream); concatenating a row's tokens
    gives exactly `generate`'s row for the same arguments."""
    settings, request = _split(config, max_new_tokens, args, kwargs)
    return generator_for(config, params, **settings).stream(prompts, request, chunk_size)
