"""Qwen2-MoE sparse block: HF-exact routing, dropless grouped experts, expert parallelism, aux losses.

Math (transformers `Qwen2MoeSparseMoeBlock`):
    logits = x @ router                      [n, E] in the compute dtype
    p = softmax(float32(logits)); w, idx = top_k(p, k); w /= sum(w) only if norm_topk_prob
    routed = sum_j w_j * expert_{idx_j}(x)   experts summed in ascending expert id, in the compute dtype
    out = routed + sigmoid(x @ shared_gate) * shared_expert(x)

Dispatch is dropless: the n*k (token, expert) pairs are sorted by expert and run through grouped
matmuls (`jax.lax.ragged_dot`, or a tiled grouped matmul that XLA:CPU runs fast, see
`grouped_ffn`), then unsorted and combined. Under a mesh the expert part runs inside `jax.shard_map`:
tokens are split over the batch mesh axes, experts over the `expert` axis, the expert MLP width over
`tensor`; tokens reach their experts' shard by an all-gather + reduce-scatter over `expert`
(default, any backend) or by `jax.lax.ragged_all_to_all` (GPU/TPU; emulated on CPU for tests).

Shapes in names: n tokens, d hidden, E experts, k experts per token, f expert MLP width, m rows of
the sorted (token, expert) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen2_jax.backend import backend
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import MLP, normal_init, param
from qwen2_jax.options import MOE_EXCHANGES, MOE_IMPLS, RunOptions
from qwen2_jax.sharding import ShardingContext

Dtype = Any

IMPLS = MOE_IMPLS
EXCHANGES = MOE_EXCHANGES


# ------------------------------------------------------------------------------------------ routing
def route(logits_nE, top_k: int, norm_topk_prob: bool):
    """HF Qwen2MoeTopKRouter: softmax in float32 over all experts, top-k, optional renorm.

    Returns (weights [n, k] in the logits dtype, expert ids [n, k] int32)."""
    probs = jax.nn.softmax(logits_nE.astype(jnp.float32), axis=-1)
    weights, idx = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(logits_nE.dtype), idx.astype(jnp.int32)


# ------------------------------------------------------------------------------ grouped matmuls
def _resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE impl {impl!r} (choose from {IMPLS})")
    if impl == "auto":
        # XLA:CPU expands ragged_dot into a dense dot over every group (measured ~2x slower than a
        # one-hot einsum over all experts); the tiled grouped matmul is its CPU replacement.
        return "tiled" if backend() == "cpu" else "ragged_dot"
    return impl


def _tile_rows(m: int, num_groups: int, max_tile: int = 128) -> int:
    """Rows per tile: about the mean group size, a power of two in [8, max_tile]."""
    mean = max(1, m // max(1, num_groups))
    return int(min(max_tile, max(8, 2 ** math.ceil(math.log2(mean)))))


def _ffn(x, w_gate, w_up, w_down):
    gate = jnp.dot(x, w_gate)
    up = jnp.dot(x, w_up)
    return jnp.dot(jax.nn.silu(gate) * up, w_down)


def grouped_ffn(x_md, group_sizes_e, w_gate_edf, w_up_edf, w_down_efd, impl: str = "auto"):
    """SwiGLU of each row with its group's expert: rows sorted by group, `group_sizes` rows each.

    Rows past sum(group_sizes) are padding and come out as zeros. impl:
      ragged_dot  three `jax.lax.ragged_dot` grouped matmuls (native on TPU).
      tiled       groups padded to tiles of `_tile_rows` rows, one expert per tile, a loop over the
                  tiles that skips unused ones: dense per-tile matmuls, so no work over all experts.
    """
    impl = _resolve_impl(impl)
    m = x_md.shape[0]
    num_groups = w_gate_edf.shape[0]
    group_sizes_e = group_sizes_e.astype(jnp.int32)
    if impl == "ragged_dot":
        dt = x_md.dtype
        gate = jax.lax.ragged_dot(x_md, w_gate_edf, group_sizes_e, preferred_element_type=dt)
        up = jax.lax.ragged_dot(x_md, w_up_edf, group_sizes_e, preferred_element_type=dt)
        out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down_efd, group_sizes_e, preferred_element_type=dt)
        valid = jnp.arange(m) < jnp.sum(group_sizes_e)
        return jnp.where(valid[:, None], out, jnp.zeros((), out.dtype))

    tile = _tile_rows(m, num_groups)
    num_tiles = -(-m // tile) + num_groups  # sum_e ceil(g_e / tile) <= m / tile + E
    starts = jnp.cumsum(group_sizes_e) - group_sizes_e
    tiles_e = (group_sizes_e + tile - 1) // tile
    tile_ends = jnp.cumsum(tiles_e)
    tile_starts = tile_ends - tiles_e
    used_tiles = tile_ends[-1]
    # Which group each tile serves, and which sorted row each padded row holds (m = a zero row).
    tile_ids = jnp.arange(num_tiles)
    tile_group = jnp.minimum(jnp.searchsorted(tile_ends, tile_ids, side="right"), num_groups - 1)
    pad_rows = jnp.arange(num_tiles * tile)
    row_group = tile_group[pad_rows // tile]
    offset = pad_rows - tile_starts[row_group] * tile
    src = jnp.where(
        (offset < group_sizes_e[row_group]) & (pad_rows // tile < used_tiles), starts[row_group] + offset, m
    )
    x_pad = jnp.concatenate([x_md, jnp.zeros((1, x_md.shape[1]), x_md.dtype)])[src]
    x_tiles = x_pad.reshape(num_tiles, tile, x_md.shape[1])

    d_out = w_down_efd.shape[-1]

    def one_tile(args):
        x_t, g, j = args
        return jax.lax.cond(
            j < used_tiles,
            lambda: _ffn(x_t, w_gate_edf[g], w_up_edf[g], w_down_efd[g]).astype(x_md.dtype),
            lambda: jnp.zeros((tile, d_out), x_md.dtype),
        )

    y_tiles = jax.lax.map(one_tile, (x_tiles, tile_group, tile_ids))
    # Back to sorted-row order: sorted row r of group e sits at padded row tile_starts[e]*tile + r - starts[e].
    rows = jnp.arange(m)
    r_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes_e), rows, side="right"), num_groups - 1)
    dest = tile_starts[r_group] * tile + rows - starts[r_group]
    valid = rows < jnp.sum(group_sizes_e)
    y = y_tiles.reshape(num_tiles * tile, d_out)[jnp.where(valid, dest, 0)]
    return jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))


# ------------------------------------------------------------------------- local expert compute
def _sort_pairs(key_m, num_groups: int):
    """Stable sort of pair keys; group sizes of keys < num_groups (keys >= num_groups sort last)."""
    order = jnp.argsort(key_m, stable=True)
    sizes = jnp.zeros((num_groups + 1,), jnp.int32).at[jnp.minimum(key_m, num_groups)].add(1)[:num_groups]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return order, sizes, inverse


def combine(y_nkd, weights_nk, idx_nk, valid_nk=None):
    """sum_j w_j * y_j in ascending expert id, accumulated in the compute dtype (HF's index_add_ order)."""
    dtype = y_nkd.dtype
    contrib = y_nkd * weights_nk.astype(dtype)[..., None]
    if valid_nk is not None:
        contrib = jnp.where(valid_nk[..., None], contrib, jnp.zeros((), dtype))
    perm = jnp.argsort(idx_nk, axis=-1)
    contrib = jnp.take_along_axis(contrib, perm[..., None], axis=1)
    out = jnp.zeros(contrib.shape[:1] + contrib.shape[2:], dtype)
    for j in range(contrib.shape[1]):
        out = out + contrib[:, j]
    return out


def local_experts(x_nd, weights_nk, idx_nk, w_gate, w_up, w_down, first_expert=0, impl="auto"):
    """The routed output of the experts held here ([first_expert, first_expert + E_local)) for
    these tokens; other experts' pairs contribute zero. Dropless: every pair is computed."""
    n, k = idx_nk.shape
    num_local = w_gate.shape[0]
    local_nk = idx_nk - first_expert
    valid_nk = (local_nk >= 0) & (local_nk < num_local)
    key = jnp.where(valid_nk, local_nk, num_local).reshape(-1)
    order, sizes, inverse = _sort_pairs(key, num_local)
    xs_md = x_nd[order // k]
    ys_md = grouped_ffn(xs_md, sizes, w_gate, w_up, w_down, impl)
    y_nkd = ys_md[inverse].reshape(n, k, -1)
    return combine(y_nkd, weights_nk, idx_nk, valid_nk)


# ------------------------------------------------------------------------- expert parallelism
def _axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _axis_size(mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` semantics from all-gathers, for backends without it (XLA:CPU).

    One slice per peer. Costs an all-gather of the whole operand: for tests, not for speed."""
    del recv_sizes
    me = jax.lax.axis_index(axis_name)
    all_operand = jax.lax.all_gather(operand, axis_name)  # [peers, rows, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)  # [src, dst]
    sizes = jax.lax.all_gather(send_sizes, axis_name)
    out_off = jax.lax.all_gather(output_offsets, axis_name)
    rows = jnp.arange(output.shape[0])
    result = output
    for src in range(all_operand.shape[0]):
        start, size, at = out_off[src, me], sizes[src, me], in_off[src, me]
        hit = (rows >= start) & (rows < start + size)
        taken = all_operand[src][jnp.clip(at + rows - start, 0, operand.shape[0] - 1)]
        result = jnp.where(hit.reshape((-1,) + (1,) * (output.ndim - 1)), taken, result)
    return result


def _ragged_a2a(*args, axis_name, emulate: bool):
    if emulate:
        return emulated_ragged_all_to_all(*args, axis_name=axis_name)
    return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)


def _a2a_experts(x_nd, weights_nk, idx_nk, w_gate, w_up, w_down, axis: str, impl: str, emulate: bool):
    """Expert parallelism with ragged all-to-all: send each (token, expert) pair to its expert's
    shard, run the local experts, send the results back. Buffers are sized for the worst case
    (every pair of every shard to one shard), so nothing is dropped."""
    n, k = idx_nk.shape
    ep = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    num_local = w_gate.shape[0]
    num_experts = num_local * ep
    m = n * k
    # 1. Sort my pairs by expert: contiguous per destination shard.
    order, counts_E, inverse = _sort_pairs(idx_nk.reshape(-1), num_experts)
    xs_md = x_nd[order // k]
    counts_all = jax.lax.all_gather(counts_E, axis)  # [src, E]
    sent = counts_all.reshape(ep, ep, num_local)  # [src, dst, local expert]
    c_sd = jnp.sum(sent, axis=-1)  # rows src sends to dst
    send_sizes = c_sd[me]
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    output_offsets = (jnp.cumsum(c_sd, axis=0) - c_sd)[me]  # where my rows land on each dst
    recv_sizes = c_sd[:, me]
    buf = ep * m
    received = _ragged_a2a(
        xs_md,
        jnp.zeros((buf, x_nd.shape[1]), x_nd.dtype),
        input_offsets,
        send_sizes,
        output_offsets,
        recv_sizes,
        axis_name=axis,
        emulate=emulate,
    )
    # 2. Received rows come as (src, local expert) blocks: regroup by local expert and run them.
    block_sizes = sent[:, me, :].reshape(-1)  # [(src, e)]
    block_of_row = jnp.repeat(jnp.arange(ep * num_local), block_sizes, total_repeat_length=buf)
    row_valid = jnp.arange(buf) < jnp.sum(block_sizes)
    local_key = jnp.where(row_valid, block_of_row % num_local, num_local)
    order2, sizes2, inverse2 = _sort_pairs(local_key, num_local)
    y_sorted = grouped_ffn(received[order2], sizes2, w_gate, w_up, w_down, impl)
    y_received = y_sorted[inverse2]
    # 3. Back to the senders: each gets its rows at the offsets it sent them from.
    back_out_offsets = (jnp.cumsum(c_sd, axis=1) - c_sd)[:, me]
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    returned = _ragged_a2a(
        y_received,
        jnp.zeros((m, y_received.shape[1]), y_received.dtype),
        recv_offsets,
        recv_sizes,
        back_out_offsets,
        send_sizes,
        axis_name=axis,
        emulate=emulate,
    )
    y_nkd = returned[inverse].reshape(n, k, -1)
    return combine(y_nkd, weights_nk, idx_nk)


def sharded_experts(ctx: ShardingContext, x_nd, weights_nk, idx_nk, w_gate, w_up, w_down, impl="auto", exchange="auto"):
    """The routed expert output under a mesh, with `jax.shard_map`.

    Tokens are split over the mesh axes `batch` maps to (when they divide n), experts over the axes
    `experts` maps to, the expert MLP width over those of `expert_mlp`; the hidden dim is gathered.
    Equal to the single-device result up to float summation order."""
    if exchange not in EXCHANGES:
        raise ValueError(f"unknown MoE exchange {exchange!r} (choose from {EXCHANGES})")
    mesh = ctx.mesh
    n, d = x_nd.shape
    tok_axes = _axes_of(ctx.spec(("batch", None), (n, d))[0])
    w_spec = ctx.spec(("experts", None, "expert_mlp"), w_gate.shape)
    e_axes, f_axes = _axes_of(w_spec[0]), _axes_of(w_spec[2])
    ep = _axis_size(mesh, e_axes)
    exchange_tokens = ep > 1 and set(e_axes) <= set(tok_axes)
    if ep > 1 and not exchange_tokens:
        tok_axes = tuple(a for a in tok_axes if a not in e_axes)  # replicate tokens over the expert axes
    if exchange == "auto":
        exchange = "allgather"
    use_a2a = exchange_tokens and exchange == "ragged_all_to_all"
    if use_a2a and len(e_axes) != 1:
        raise ValueError(f"ragged_all_to_all exchange needs experts on one mesh axis, got {e_axes}")
    emulate = backend() == "cpu"
    num_local = w_gate.shape[0] // ep

    tok_spec = P(tok_axes or None, None)
    route_spec = P(tok_axes or None, None)
    gate_spec = P(e_axes or None, None, f_axes or None)
    down_spec = P(e_axes or None, f_axes or None, None)

    def body(x, w, idx, wg, wu, wd):
        if use_a2a:
            y = _a2a_experts(x, w, idx, wg, wu, wd, e_axes[0], impl, emulate)
        elif exchange_tokens:
            x_all = jax.lax.all_gather(x, e_axes, tiled=True)
            w_all = jax.lax.all_gather(w, e_axes, tiled=True)
            idx_all = jax.lax.all_gather(idx, e_axes, tiled=True)
            first = jax.lax.axis_index(e_axes) * num_local
            y_all = local_experts(x_all, w_all, idx_all, wg, wu, wd, first, impl)
            if f_axes:
                y_all = jax.lax.psum(y_all, f_axes)
            return jax.lax.psum_scatter(y_all, e_axes, scatter_dimension=0, tiled=True)
        else:
            first = jax.lax.axis_index(e_axes) * num_local if ep > 1 else 0
            y = local_experts(x, w, idx, wg, wu, wd, first, impl)
            if ep > 1:
                y = jax.lax.psum(y, e_axes)
        if f_axes:
            y = jax.lax.psum(y, f_axes)
        return y

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tok_spec, route_spec, route_spec, gate_spec, gate_spec, down_spec),
        out_specs=tok_spec,
        check_vma=False,
    )
    return fn(x_nd, weights_nk, idx_nk, w_gate, w_up, w_down)


# ------------------------------------------------------------------------------------ the module
class _ExpertWeights(nn.Module):
    """Stacked expert kernels: gate/up [E, d, f], down [E, f, d] (HF mlp.experts.{e}.*, transposed)."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    config: Qwen2Config
    param_dtype: Dtype

    @nn.compact
    def __call__(self):
        init = normal_init(self.config)
        e, d, f = self.num_experts, self.hidden_size, self.intermediate_size
        gate = param(self, "gate_kernel", init, (e, d, f), self.param_dtype, ("experts", "embed", "expert_mlp"))
        up = param(self, "up_kernel", init, (e, d, f), self.param_dtype, ("experts", "embed", "expert_mlp"))
        down = param(self, "down_kernel", init, (e, f, d), self.param_dtype, ("experts", "expert_mlp", "embed"))
        return gate, up, down


class SparseMoeBlock(nn.Module):
    """Router + dropless routed experts + sigmoid-gated shared expert. Returns (out [b, t, d],
    router logits [b, t, E] in the compute dtype).

    options.moe_impl: grouped matmul, "auto" | "ragged_dot" | "tiled" (see `grouped_ffn`).
    options.moe_exchange: how tokens reach expert shards under a mesh with expert > 1: "auto"
    (= "allgather") | "allgather" | "ragged_all_to_all" (emulated with all-gathers on CPU).
    """

    config: Qwen2Config
    options: RunOptions

    @nn.compact
    def __call__(self, x_btd):
        cfg, opt = self.config, self.options
        b, t, d = x_btd.shape
        num_experts, k = cfg.num_experts, cfg.num_experts_per_tok
        x = x_btd.astype(opt.compute_dtype)
        with jax.named_scope("router"):
            router = param(
                self, "router_kernel", normal_init(cfg), (d, num_experts), opt.param_dtype, ("embed", "router")
            )
            logits_btE = jnp.einsum("btd,dE->btE", x, router.astype(opt.compute_dtype))
            weights_nk, idx_nk = route(logits_btE.reshape(b * t, num_experts), k, cfg.norm_topk_prob)
        w_gate, w_up, w_down = _ExpertWeights(
            num_experts, d, cfg.moe_intermediate_size, cfg, opt.param_dtype, name="experts"
        )()
        w_gate, w_up, w_down = (w.astype(opt.compute_dtype) for w in (w_gate, w_up, w_down))
        x_nd = x.reshape(b * t, d)
        with jax.named_scope("routed_experts"):
            if opt.sharding is None:
                routed_nd = local_experts(x_nd, weights_nk, idx_nk, w_gate, w_up, w_down, 0, opt.moe_impl)
            else:
                routed_nd = sharded_experts(
                    opt.sharding, x_nd, weights_nk, idx_nk, w_gate, w_up, w_down, opt.moe_impl, opt.moe_exchange
                )
        out_btd = routed_nd.reshape(b, t, d)
        if cfg.shared_expert_intermediate_size > 0:
            with jax.named_scope("shared_expert"):
                shared = MLP(cfg, opt, cfg.shared_expert_intermediate_size, name="shared_expert")(x)
                gate_kernel = param(
                    self, "shared_expert_gate_kernel", normal_init(cfg), (d, 1), opt.param_dtype, ("embed", None)
                )
                gate = jax.nn.sigmoid(jnp.einsum("btd,dz->btz", x, gate_kernel.astype(opt.compute_dtype)))
                out_btd = out_btd + gate * shared
        return opt.constrain(out_btd, ("batch", "length", "act_embed")), logits_btE


# -------------------------------------------------------------------------------------- losses
def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None):
    """HF `load_balancing_loss_func` (transformers 5): one average over every sparse layer and token.

    router_logits: sequence over sparse layers of [b, t, E] (or [b*t, E]) logits; attention_mask
    [b, t] 1/0 excludes padding. L = E * sum_e f_e * P_e, f_e = top-k assignments to e per row,
    P_e = mean router probability of e. Softmax rounded to the logits dtype as torch does, sums in
    float32."""
    if router_logits is None or len(router_logits) == 0:
        return jnp.zeros((), jnp.float32)
    counts = jnp.zeros((num_experts,), jnp.float32)
    prob_sum = jnp.zeros((num_experts,), jnp.float32)
    rows = jnp.zeros((), jnp.float32)
    mask_r = None if attention_mask is None else jnp.asarray(attention_mask).reshape(-1).astype(jnp.float32)
    for logits in router_logits:
        logits = jnp.asarray(logits).reshape(-1, num_experts)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
        _, selected = jax.lax.top_k(probs, top_k)
        probs = probs.astype(jnp.float32)
        row_w = jnp.ones((logits.shape[0],), jnp.float32) if mask_r is None else mask_r
        counts = counts + jnp.zeros((num_experts,), jnp.float32).at[selected.reshape(-1)].add(jnp.repeat(row_w, top_k))
        prob_sum = prob_sum + jnp.sum(probs * row_w[:, None], axis=0)
        rows = rows + jnp.sum(row_w)
    return jnp.sum((counts / rows) * (prob_sum / rows)) * num_experts


def router_z_loss(router_logits, attention_mask=None):
    """ST-MoE router z-loss: mean over (layer, real token) of logsumexp(logits)^2, float32."""
    if router_logits is None or len(router_logits) == 0:
        return jnp.zeros((), jnp.float32)
    total = jnp.zeros((), jnp.float32)
    rows = jnp.zeros((), jnp.float32)
    mask_r = None if attention_mask is None else jnp.asarray(attention_mask).reshape(-1).astype(jnp.float32)
    for logits in router_logits:
        logits = jnp.asarray(logits)
        z = jax.nn.logsumexp(logits.reshape(-1, logits.shape[-1]).astype(jnp.float32), axis=-1)
        row_w = jnp.ones_like(z) if mask_r is None else mask_r
        total = total + jnp.sum(z * z * row_w)
        rows = rows + jnp.sum(row_w)
    return total / rows


def aux_loss(config: Qwen2Config, outputs, attention_mask=None):
    """HF's `aux_loss` from `forward_outputs(..., output_router_logits=True)` (or its router logits)."""
    logits = outputs["router_logits"] if isinstance(outputs, dict) else outputs
    return load_balancing_loss(logits, config.num_experts, config.num_experts_per_tok, attention_mask)


def moe_loss(config: Qwen2Config, router_logits, attention_mask=None, z_loss_coef: float = 0.0):
    """What training adds to the LM loss: router_aux_loss_coef * aux (+ z_loss_coef * z-loss, off by default)."""
    loss = config.router_aux_loss_coef * load_balancing_loss(
        router_logits, config.num_experts, config.num_experts_per_tok, attention_mask
    )
    if z_loss_coef:
        loss = loss + z_loss_coef * router_z_loss(router_logits, attention_mask)
    return loss
