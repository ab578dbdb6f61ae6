"""Generation: prefill + decode loop in one compiled program, prompt buckets, stop tokens, streaming.

Shapes are fixed per compilation: the batch is padded to a power of two, prompts are left-padded to
a bucket length (16, 24, 32, 48, 64, 96, ...) and the output buffer / cache tail to a bucket of
max_new_tokens, so new prompt lengths, token budgets and sampling values rarely recompile (every
trace is counted in `TRACE_COUNTS`). The KV cache is a pytree argument, donated on each call.

`generate` runs prefill and a `lax.while_loop` over decode steps inside one jitted program; the
loop exits early once every row has produced a stop token. `generate_stream` runs the same prefill
and loop body as two programs (prefill, then a few steps at a time) and yields tokens as they are
made; for the same inputs and seed it yields exactly what `generate` returns.

Layer stack: XLA:CPU slicing a layer out of stacked [layers, ...] weights copies the slice each
step (measured ~5 GB/s against ~15-25 GB/s for matvecs over separate buffers), so by default
generation runs the layers "unstacked": `prepare_params` splits the params once into one buffer
per layer (on one device also output-major, [out, in], which XLA:CPU multiplies by a few rows
1.4-1.5x faster), and the cache is per layer too. generate() keeps the split of the last params
it saw; pass `prepare_params(..., consume=True)`'s result to avoid holding two copies.
`layer_mode="scan"` runs the checkpoint layout through `Qwen2ForCausalLM` (nn.scan) instead.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from qwen2_jax.config import Qwen2Config
from qwen2_jax.kv_cache import KVCache, init_cache
from qwen2_jax.layers import RMSNorm, apply_rotary, attention_core, attention_mask, rotary_tables
from qwen2_jax.model import DecoderLayer, Qwen2ForCausalLM, layer_segments, positions_from_mask
from qwen2_jax.sampling import SamplingMode, SamplingParams, SamplingValues, as_int_list, row_keys, select_tokens
from qwen2_jax.sharding import ShardingContext, mesh_of

TRACE_COUNTS: collections.Counter = collections.Counter()  # program name -> times traced (= compiled)
LAYER_MODES = ("unstacked", "scan")
DEFAULT_LAYER_MODE = "unstacked"
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


# ------------------------------------------------------------------------------ unstacked params
@flax.struct.dataclass
class DecodeParams:
    """Params with the layer stack split into one buffer per layer (see the module docstring).

    layout "module": each layer's params as DecoderLayer's. layout "transposed" (the default on a
    single device): dense layers hold their matrices output-major, [out, in] as torch stores them,
    which XLA:CPU multiplies by a few activation rows ~1.4x (batch 1) to ~1.5x (batch 8) faster
    than the [in, out] kernels (measured on this machine); MoE layers keep the module layout.
    """

    top: dict  # embed_tokens, norm, lm_head (untied)
    layers: tuple  # one params dict per layer, in layer order
    layout: str = flax.struct.field(pytree_node=False, default="module")


# Dense-layer leaf -> (name in the "transposed" layout, transform of one layer's slice).
_TRANSPOSED = {
    ("input_layernorm", "scale"): ("in_norm", lambda w: w),
    ("post_attention_layernorm", "scale"): ("post_norm", lambda w: w),
    ("self_attn", "q_kernel"): ("q_w", lambda w: w.reshape(w.shape[0], -1).T),  # [d, n, h] -> [n*h, d]
    ("self_attn", "k_kernel"): ("k_w", lambda w: w.reshape(w.shape[0], -1).T),
    ("self_attn", "v_kernel"): ("v_w", lambda w: w.reshape(w.shape[0], -1).T),
    ("self_attn", "q_bias"): ("q_b", lambda b: b.reshape(-1)),
    ("self_attn", "k_bias"): ("k_b", lambda b: b.reshape(-1)),
    ("self_attn", "v_bias"): ("v_b", lambda b: b.reshape(-1)),
    ("self_attn", "o_kernel"): ("o_w", lambda w: w.reshape(-1, w.shape[-1]).T),  # [n, h, d] -> [d, n*h]
    ("mlp", "gate_kernel"): ("gate_w", lambda w: w.T),  # [d, f] -> [f, d]
    ("mlp", "up_kernel"): ("up_w", lambda w: w.T),
    ("mlp", "down_kernel"): ("down_w", lambda w: w.T),  # [f, d] -> [d, f]
}


def _slice_sharding(leaf):
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return SingleDeviceSharding(next(iter(leaf.devices())))


@functools.lru_cache(maxsize=None)
def _unstack_fn(n: int, out_sharding, key: tuple | None):
    transform = _TRANSPOSED[key][1] if key is not None else (lambda w: w)
    return jax.jit(lambda x: tuple(transform(x[i]) for i in range(n)), out_shardings=(out_sharding,) * n)


def prepare_params(config: Qwen2Config, params, consume: bool = False, layout: str | None = None) -> DecodeParams:
    """Split the stacked layer params into one buffer per layer (a copy of the layer weights).

    layout: "transposed" (default for params on one device) or "module" (default on a mesh: the
    sharded path keeps DecoderLayer's layout and its logical sharding). consume=True deletes each
    stacked leaf as soon as it is split (and empties `params`), so peak memory is the model plus
    one leaf; use it when the stacked params are no longer needed.
    """
    if isinstance(params, DecodeParams):
        return params
    if layout is None:
        layout = "module" if mesh_of(params) is not None else "transposed"
    if layout not in ("module", "transposed"):
        raise ValueError(f"layout must be 'module' or 'transposed', got {layout!r}")
    params = params if consume else dict(params)
    layers: list[dict | None] = [None] * config.num_hidden_layers
    for name, layer_ids in layer_segments(config):
        transpose = layout == "transposed" and not config.is_sparse_layer(layer_ids[0])
        segment = params.pop(name)
        flat, treedef = jax.tree_util.tree_flatten_with_path(segment)
        del segment
        per_leaf, keys = [], []
        for i in range(len(flat)):
            path, leaf = flat[i]
            key = tuple(getattr(k, "key", str(k)) for k in path)
            out_sharding = _slice_sharding(leaf)
            per_leaf.append(_unstack_fn(len(layer_ids), out_sharding, key if transpose else None)(leaf))
            keys.append(key)
            if consume:
                leaf.delete()
            flat[i] = leaf = None
        for j, layer in enumerate(layer_ids):
            if transpose:
                layers[layer] = {_TRANSPOSED[k][0]: slices[j] for k, slices in zip(keys, per_leaf)}
            else:
                layers[layer] = jax.tree_util.tree_unflatten(treedef, [slices[j] for slices in per_leaf])
    top = dict(params)
    if consume:
        params.clear()
    return DecodeParams(top=top, layers=tuple(layers), layout=layout)


_PREPARED: list = []  # [(leaves of the stacked params, config, DecodeParams)]: the last split generate() made


def _prepared(config: Qwen2Config, params) -> DecodeParams:
    if isinstance(params, DecodeParams):
        return params
    leaves = jax.tree.leaves(params)
    if (_PREPARED and _PREPARED[0][1] == config and len(_PREPARED[0][0]) == len(leaves)
            and all(a is b for a, b in zip(_PREPARED[0][0], leaves))):
        return _PREPARED[0][2]
    _PREPARED.clear()
    prepared = prepare_params(config, params)
    _PREPARED.append((leaves, config, prepared))
    return prepared


def clear_prepared_cache() -> None:
    """Drop the per-layer copy generate() keeps of the last params it ran."""
    _PREPARED.clear()


def _embedding_of(params) -> jax.Array:
    return params.top["embed_tokens"] if isinstance(params, DecodeParams) else params["embed_tokens"]


# ------------------------------------------------------------------------------- model application
@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one compiled generation program."""

    config: Qwen2Config
    dtype: Any
    batch: int
    prompt_len: int  # left-padded prompt bucket P
    capacity: int  # output buffer width N (>= max_new_tokens); the cache holds P + N slots
    sampling: SamplingMode
    num_eos: int
    layer_mode: str
    scan_unroll: int
    sharding: ShardingContext | None
    record_logits: bool

    @property
    def num_slots(self) -> int:
        return self.prompt_len + self.capacity


def _apply_model(spec: _Spec, params, ids_bt, positions_bt, mask_bt, cache: KVCache, write_index,
                 logits_index_b=None):
    """(float32 logits [b, t or 1, vocab], updated cache)."""
    if spec.layer_mode == "scan":
        model = Qwen2ForCausalLM(spec.config, dtype=spec.dtype, param_dtype=spec.dtype, sharding=spec.sharding,
                                 scan_unroll=spec.scan_unroll)
        out = model.apply({"params": params}, ids_bt, positions_bt, mask_bt, cache=cache, write_index=write_index,
                          logits_index_b=logits_index_b)
        return out["logits"], out["cache"]
    return _apply_unstacked(spec.config, spec.dtype, spec.sharding, params, ids_bt, positions_bt, mask_bt, cache,
                            write_index, logits_index_b)


def _apply_unstacked(cfg: Qwen2Config, dtype, sharding: ShardingContext | None, params: DecodeParams, ids_bt,
                     positions_bt, mask_bt, cache: KVCache, write_index, logits_index_b):
    """Qwen2ForCausalLM.__call__ with a Python loop over per-layer params and a per-layer cache.

    Same modules (DecoderLayer, RMSNorm), same mask and rotary helpers; tests hold it equal to the
    uncached forward at every step."""

    def constrain(x, names):
        return sharding.constrain(x, names) if sharding is not None else x

    embedding = params.top["embed_tokens"]
    x_btd = constrain(jnp.take(embedding, ids_bt, axis=0).astype(dtype), ("batch", "length", "act_embed"))
    cos_bth, sin_bth = rotary_tables(cfg, positions_bt, dtype)
    t = ids_bt.shape[1]
    new_pos_bt = jnp.where(mask_bt.astype(bool), positions_bt, -1).astype(jnp.int32)
    q_slot_t = write_index + jnp.arange(t)
    k_pos_bs = jax.lax.dynamic_update_slice(cache.pos, new_pos_bt, (0, write_index))
    k_slot_s = jnp.arange(cache.num_slots)
    mask_full = attention_mask(q_slot_t, positions_bt, k_slot_s, k_pos_bs, None)
    mask_sliding = (attention_mask(q_slot_t, positions_bt, k_slot_s, k_pos_bs, cfg.sliding_window)
                    if any(cfg.layer_is_sliding) else None)
    new_k, new_v = [], []
    for i, layer_params in enumerate(params.layers):
        mask = mask_sliding if cfg.layer_is_sliding[i] else mask_full
        with jax.named_scope(f"layer_{i}"):
            if params.layout == "transposed" and not cfg.is_sparse_layer(i):
                x_btd, k_i, v_i = _dense_layer_transposed(cfg, dtype, layer_params, x_btd, cos_bth, sin_bth, mask,
                                                          write_index, cache.k[i], cache.v[i])
            else:
                layer = DecoderLayer(cfg, dtype, dtype, cfg.is_sparse_layer(i), sharding, parent=None)
                x_btd, outs = layer.apply({"params": layer_params}, x_btd, cos_bth, sin_bth, mask, None, write_index,
                                          False, cache.k[i], cache.v[i])
                k_i, v_i = outs["cache_k"], outs["cache_v"]
        new_k.append(k_i)
        new_v.append(v_i)
    x_btd = RMSNorm(cfg.rms_norm_eps, dtype, parent=None).apply({"params": params.top["norm"]}, x_btd)
    if logits_index_b is not None:
        x_btd = jnp.take_along_axis(x_btd, logits_index_b[:, None, None], axis=1)
    if cfg.tie_word_embeddings:
        logits = jnp.einsum("btd,vd->btv", x_btd, embedding.astype(dtype), preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", x_btd, params.top["lm_head"].astype(dtype),
                            preferred_element_type=jnp.float32)
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
    return logits, KVCache(k=tuple(new_k), v=tuple(new_v), pos=k_pos_bs)


def _rms_norm(cfg: Qwen2Config, scale, x):
    return RMSNorm(cfg.rms_norm_eps, scale.dtype, parent=None).apply({"params": {"scale": scale}}, x)


def _dense_layer_transposed(cfg: Qwen2Config, dtype, p: dict, x_btd, cos_bth, sin_bth, mask_b1ts, write_index,
                            cache_k_bskh, cache_v_bskh):
    """DecoderLayer (dense MLP) on the output-major weights of DecodeParams' "transposed" layout:
    the same operations as layers.Attention / layers.MLP, only the weight layout differs."""
    b, t, _ = x_btd.shape
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    residual = x_btd
    x = _rms_norm(cfg, p["in_norm"], x_btd).astype(dtype)
    q = jnp.einsum("btd,od->bto", x, p["q_w"].astype(dtype))
    kk = jnp.einsum("btd,od->bto", x, p["k_w"].astype(dtype))
    v = jnp.einsum("btd,od->bto", x, p["v_w"].astype(dtype))
    if cfg.qkv_bias:
        q, kk, v = q + p["q_b"].astype(dtype), kk + p["k_b"].astype(dtype), v + p["v_b"].astype(dtype)
    q_btnh = apply_rotary(q.reshape(b, t, n, h), cos_bth, sin_bth)
    k_btkh = apply_rotary(kk.reshape(b, t, k, h), cos_bth, sin_bth)
    start = (0, write_index, 0, 0)
    cache_k_bskh = jax.lax.dynamic_update_slice(cache_k_bskh, k_btkh.astype(cache_k_bskh.dtype), start)
    cache_v_bskh = jax.lax.dynamic_update_slice(cache_v_bskh, v.reshape(b, t, k, h).astype(cache_v_bskh.dtype), start)
    out_btnh = attention_core(q_btnh, cache_k_bskh.astype(dtype), cache_v_bskh.astype(dtype), mask_b1ts, h ** -0.5,
                              write_index)
    x_btd = residual + jnp.einsum("bto,do->btd", out_btnh.reshape(b, t, n * h), p["o_w"].astype(dtype))
    residual = x_btd
    x = _rms_norm(cfg, p["post_norm"], x_btd).astype(dtype)
    gate = jnp.einsum("btd,fd->btf", x, p["gate_w"].astype(dtype))
    up = jnp.einsum("btd,fd->btf", x, p["up_w"].astype(dtype))
    x_btd = residual + jnp.einsum("btf,df->btd", jax.nn.silu(gate) * up, p["down_w"].astype(dtype))
    return x_btd, cache_k_bskh, cache_v_bskh


# ------------------------------------------------------------------------------------- the loop
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
class _Request:
    """Per-call dynamic inputs shared by prefill and decode."""

    row_ids: jnp.ndarray  # [b] int32: the row's index in the caller's list (sampling keys)
    key: jax.Array
    values: SamplingValues
    eos: jnp.ndarray  # [num_eos] int32
    max_new: jnp.ndarray  # scalar int32


def _is_stop(tokens_b, eos):
    if eos.shape[0] == 0:
        return jnp.zeros(tokens_b.shape, bool)
    return jnp.any(tokens_b[:, None] == eos[None, :], axis=-1)


def _choose(spec: _Spec, logits_bv, req: _Request, step, seen):
    keys = None if spec.sampling.greedy else row_keys(req.key, step, req.row_ids)
    return select_tokens(logits_bv, spec.sampling, req.values, keys, seen)


def _prefill(spec: _Spec, params, cache: KVCache, ids_bp, mask_bp, active_b, req: _Request) -> DecodeState:
    b, p = ids_bp.shape
    positions = positions_from_mask(mask_bp)
    logits, cache = _apply_model(spec, params, ids_bp, positions, mask_bp, cache, 0,
                                 jnp.full((b,), p - 1, jnp.int32))
    logits_bv = logits[:, 0]
    seen = None
    if spec.sampling.use_repetition_penalty:
        vocab = spec.config.vocab_size
        real_ids = jnp.where(mask_bp.astype(bool), ids_bp, vocab)  # padding -> out of range -> dropped
        seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], real_ids].set(True, mode="drop")
    first = _choose(spec, logits_bv, req, 0, seen)
    first = jnp.where(active_b, first, -1)
    tokens = jnp.full((b, spec.capacity), -1, jnp.int32).at[:, 0].set(first)
    recorded = None
    if spec.record_logits:
        recorded = jnp.zeros((b, spec.capacity, spec.config.vocab_size), jnp.float32).at[:, 0].set(logits_bv)
    return DecodeState(cache=cache, tokens=tokens, last=jnp.maximum(first, 0), done=~active_b | _is_stop(first, req.eos),
                       step=jnp.int32(1), lengths=jnp.sum(mask_bp, axis=1).astype(jnp.int32), seen=seen,
                       logits=recorded)


def _decode(spec: _Spec, params, state: DecodeState, req: _Request, stop_step) -> DecodeState:
    """Decode steps until every row stopped, max_new tokens were made, or `stop_step` is reached."""
    b = state.tokens.shape[0]
    limit = jnp.minimum(req.max_new, stop_step)

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        slot = spec.prompt_len + s.step - 1  # where the token fed now goes
        positions = (s.lengths + s.step - 1)[:, None]
        logits, cache = _apply_model(spec, params, s.last[:, None], positions, jnp.ones((b, 1), jnp.int32), s.cache,
                                     slot)
        logits_bv = logits[:, 0]
        seen = s.seen
        if seen is not None:
            seen = seen.at[jnp.arange(b), s.last].set(True)
        new = _choose(spec, logits_bv, req, s.step, seen)
        new = jnp.where(s.done, -1, new)
        tokens = jax.lax.dynamic_update_slice(s.tokens, new[:, None], (0, s.step))
        recorded = s.logits
        if recorded is not None:
            recorded = jax.lax.dynamic_update_slice(recorded, logits_bv[:, None], (0, s.step, 0))
        return DecodeState(cache=cache, tokens=tokens, last=jnp.where(s.done, s.last, new),
                           done=s.done | _is_stop(new, req.eos), step=s.step + 1, lengths=s.lengths, seen=seen,
                           logits=recorded)

    return jax.lax.while_loop(cond, body, state)


@functools.lru_cache(maxsize=64)
def _programs(spec: _Spec):
    """(generate, prefill, decode_chunk) jitted for one spec; the cache / state are donated."""

    def generate_program(params, cache, ids, mask, active, req):
        TRACE_COUNTS["generate"] += 1
        state = _prefill(spec, params, cache, ids, mask, active, req)
        return _decode(spec, params, state, req, req.max_new)

    def prefill_program(params, cache, ids, mask, active, req):
        TRACE_COUNTS["prefill"] += 1
        return _prefill(spec, params, cache, ids, mask, active, req)

    def decode_program(params, state, req, stop_step):
        TRACE_COUNTS["decode"] += 1
        return _decode(spec, params, state, req, stop_step)

    return (jax.jit(generate_program, donate_argnums=(1,)), jax.jit(prefill_program, donate_argnums=(1,)),
            jax.jit(decode_program, donate_argnums=(1,)))


_STREAM_EXECUTABLES: dict = {}


def _stream_executables(job: "_Prepared"):
    """Prefill and decode programs of a stream, both compiled up front (so the first decode step
    does not pay for a compilation in the middle of the stream)."""
    found = _STREAM_EXECUTABLES.get(job.spec)
    if found is None:
        _, prefill, decode = _programs(job.spec)
        prefill_exe = prefill.lower(job.params, job.cache, job.ids, job.mask, job.active, job.req).compile()
        state = jax.tree.map(lambda info, sh: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sh),
                             prefill_exe.out_info, prefill_exe.output_shardings)
        decode_exe = decode.lower(job.params, state, job.req, jnp.int32(0)).compile()
        if len(_STREAM_EXECUTABLES) >= 64:
            _STREAM_EXECUTABLES.pop(next(iter(_STREAM_EXECUTABLES)))
        found = _STREAM_EXECUTABLES[job.spec] = (prefill_exe, decode_exe)
    return found


# ----------------------------------------------------------------------------------- host side
@dataclasses.dataclass
class _Prepared:
    spec: _Spec
    params: Any
    cache: KVCache
    ids: jax.Array
    mask: jax.Array
    active: jax.Array
    req: _Request
    num_rows: int
    max_new: int


def _check_prompts(config: Qwen2Config, prompts) -> list[list[int]]:
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
        if len(p) > config.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the model's context of "
                             f"{config.max_position_embeddings} (max_position_embeddings)")
    return prompts


def _prepare(config: Qwen2Config, params, prompts, max_new_tokens, sampling: SamplingParams, seed, eos_token_ids,
             layer_mode, scan_unroll, record_logits) -> _Prepared:
    prompts = _check_prompts(config, prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    layer_mode = layer_mode or DEFAULT_LAYER_MODE
    if layer_mode not in LAYER_MODES:
        raise ValueError(f"layer_mode must be one of {LAYER_MODES}, got {layer_mode!r}")
    eos = sorted(set(as_int_list(config.eos_token_ids if eos_token_ids is None else
                                 ([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids),
                                 "eos_token_ids")))
    if layer_mode == "unstacked":
        params = _prepared(config, params)
    elif isinstance(params, DecodeParams):
        raise ValueError("layer_mode='scan' needs the stacked params, not DecodeParams")
    mesh = mesh_of(params)
    sharding = ShardingContext(mesh) if mesh is not None else None
    dtype = jnp.dtype(_embedding_of(params).dtype)

    rows = len(prompts)
    b = batch_bucket(rows)
    p = bucket(max(len(x) for x in prompts), PROMPT_BUCKET_MIN)
    n = bucket(max(max_new_tokens, 1), NEW_TOKENS_BUCKET_MIN)
    ids = np.zeros((b, p), np.int32)
    mask = np.zeros((b, p), np.int32)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = x
        mask[i, p - len(x):] = 1
    mask[rows:, -1] = 1  # batch padding rows: one dummy token, marked done from the start
    active = np.arange(b) < rows
    # Token ids do not shape the program: configs differing only in them share compilations.
    model_config = config.replace(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    spec = _Spec(config=model_config, dtype=dtype, batch=b, prompt_len=p, capacity=n, sampling=sampling.mode(config.vocab_size),
                 num_eos=len(eos), layer_mode=layer_mode, scan_unroll=scan_unroll, sharding=sharding,
                 record_logits=record_logits)

    def put(x, names):
        x = jnp.asarray(x)
        return jax.device_put(x, sharding.sharding(names, x.shape)) if sharding is not None else x

    req = _Request(row_ids=put(np.arange(b, dtype=np.int32), ("batch",)), key=jax.random.key(int(seed)),
                   values=sampling.values(), eos=jnp.asarray(np.array(eos, np.int32)),
                   max_new=jnp.int32(max_new_tokens))
    cache = init_cache(config, b, spec.num_slots, dtype, per_layer=layer_mode == "unstacked", sharding=sharding)
    return _Prepared(spec=spec, params=params, cache=cache, ids=put(ids, ("batch", "length")),
                     mask=put(mask, ("batch", "length")), active=put(active, ("batch",)), req=req, num_rows=rows,
                     max_new=int(max_new_tokens))


def _rows_from(tokens: np.ndarray, num_rows: int, max_new: int) -> list[list[int]]:
    out = []
    for row in tokens[:num_rows, :max_new]:
        stop = np.flatnonzero(row < 0)
        out.append(row[:stop[0] if stop.size else max_new].tolist())
    return out


def generate_outputs(config: Qwen2Config, params, prompts, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_token_ids=None, *,
                     min_p: float | None = None, repetition_penalty: float | None = None,
                     layer_mode: str | None = None, scan_unroll: int = 1, output_logits: bool = False) -> dict:
    """`generate` with details: {"tokens": lists, "logits": per row float32 [len, vocab] (the raw
    logits each token was chosen from, when output_logits)}."""
    sampling = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    job = _prepare(config, params, prompts, max_new_tokens, sampling, seed, eos_token_ids, layer_mode, scan_unroll,
                   output_logits)
    if job.max_new == 0:
        return {"tokens": [[] for _ in range(job.num_rows)]}
    run = _programs(job.spec)[0]
    state = run(job.params, job.cache, job.ids, job.mask, job.active, job.req)
    tokens = _rows_from(np.asarray(jax.device_get(state.tokens)), job.num_rows, job.max_new)
    out: dict[str, Any] = {"tokens": tokens}
    if output_logits:
        logits = np.asarray(jax.device_get(state.logits))
        out["logits"] = [logits[i, :len(t)] for i, t in enumerate(tokens)]
    return out


def generate(config: Qwen2Config, params, prompts, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_token_ids=None, *,
             min_p: float | None = None, repetition_penalty: float | None = None, layer_mode: str | None = None,
             scan_unroll: int = 1) -> list[list[int]]:
    """New tokens for each prompt (a list of token-id lists of any lengths).

    Each row ends with its stop token when one was produced (eos_token_ids: None = the config's
    eos_token_id; [] = never stop early). temperature 0 is greedy; otherwise HF's processors run in
    HF's order (repetition penalty, temperature, top-k, top-p, min-p) and the draw is seeded: the
    same seed and inputs give the same tokens. `params` may be the stacked checkpoint params or
    `prepare_params(...)`'s per-layer split (generate makes and keeps one split otherwise).
    """
    return generate_outputs(config, params, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_token_ids,
                            min_p=min_p, repetition_penalty=repetition_penalty, layer_mode=layer_mode,
                            scan_unroll=scan_unroll)["tokens"]


def generate_stream(config: Qwen2Config, params, prompts, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_token_ids=None, *,
                    min_p: float | None = None, repetition_penalty: float | None = None,
                    layer_mode: str | None = None, scan_unroll: int = 1,
                    chunk_size: int = 1) -> Iterator[list[int | None]]:
    """Yield one list per generated position: each prompt's new token, or None for a row that has
    already stopped. Concatenating a row's tokens gives exactly `generate`'s row (same arguments).
    chunk_size: decode steps per device call (1 = every token as soon as it is made)."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    sampling = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    job = _prepare(config, params, prompts, max_new_tokens, sampling, seed, eos_token_ids, layer_mode, scan_unroll,
                   False)
    if job.max_new == 0:
        return
    prefill, decode = _stream_executables(job)
    state = prefill(job.params, job.cache, job.ids, job.mask, job.active, job.req)
    emitted = 0
    while True:
        tokens = np.asarray(jax.device_get(state.tokens))
        made = int(state.step)
        for j in range(emitted, made):
            column = tokens[:job.num_rows, j]
            if np.all(column < 0):
                return
            yield [int(t) if t >= 0 else None for t in column]
        emitted = made
        done = np.asarray(jax.device_get(state.done))[:job.num_rows]
        if made >= job.max_new or done.all():
            return
        state = decode(job.params, state, job.req, jnp.int32(made + chunk_size))
