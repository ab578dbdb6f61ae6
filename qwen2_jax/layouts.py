"""Moving params from the checkpoint layout (stacked layers, [in, out] kernels) to the layout a
`RunOptions` asks for (per-layer subtrees and/or [out, in] kernels), on the same devices.

Which axes move is read from the logical axis names of both layouts, so the model's modules stay
the one place that says how each parameter is laid out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen2_jax.config import Qwen2Config
from qwen2_jax.model import per_layer_name
from qwen2_jax.options import RunOptions
from qwen2_jax.params import param_logical_axes, param_shardings, tree_get, tree_set
from qwen2_jax.sharding import mesh_of


def is_checkpoint_layout(options: RunOptions) -> bool:
    return options.layer_layout == "stacked" and options.kernel_layout == "in_out"


def _permutation(src_axes: tuple, dst_axes: tuple) -> tuple[int, ...] | None:
    if src_axes == dst_axes:
        return None
    return tuple(src_axes.index(name) for name in dst_axes)


def relayout(config: Qwen2Config, params: dict, options: RunOptions, consume: bool = False) -> dict:
    """The params (checkpoint layout) in `options`' layout: a copy of the layer weights.

    consume=True deletes each stacked leaf as soon as it is moved (and empties `params`), so peak
    memory is the model plus one leaf."""
    if is_checkpoint_layout(options):
        return params
    dtype = jnp.dtype(params["embed_tokens"].dtype)
    src_axes = param_logical_axes(config, RunOptions(quantize=options.quantize))
    dst_axes = param_logical_axes(config, options)
    dst_shardings = param_shardings(config, mesh_of(params), dtype, options)
    per_layer = options.layer_layout == "per_layer"
    source = params if consume else dict(params)
    out: dict = {}
    for segment, layer_ids in config.layer_segments():
        leaves = jax.tree_util.tree_flatten_with_path(source.pop(segment))[0]
        for i in range(len(leaves)):
            path, leaf = leaves[i]
            rest = tuple(k.key for k in path)
            leaves[i] = None
            src = src_axes[segment]
            for key in rest:
                src = src[key]
            if per_layer:
                targets = [(per_layer_name(layer),) + rest for layer in layer_ids]
                perm = _permutation(src[1:], tree_get(dst_axes, targets[0]))
            else:
                targets = [(segment,) + rest]
                perm = _permutation(src, tree_get(dst_axes, targets[0]))
            moved = _move_fn(
                len(layer_ids) if per_layer else None, perm, tuple(tree_get(dst_shardings, t) for t in targets)
            )(leaf)
            for target, value in zip(targets, moved):
                tree_set(out, target, value)
            if consume:
                leaf.delete()
            del leaf
    out.update(source)  # embedding, final norm, LM head: the same in every layout
    if consume:
        params.clear()
    return out


def _move_fn(num_layers: int | None, perm, shardings):
    """Split a stacked leaf into layers (num_layers) or keep it whole, permuting each piece."""

    def move(x):
        pieces = [x[j] for j in range(num_layers)] if num_layers is not None else [x]
        if perm is not None:
            pieces = [jnp.transpose(p, perm) for p in pieces]
        return tuple(pieces)

    return jax.jit(move, out_shardings=shardings)
