"""int8 weight quantization of loaded params: another runtime layout, like `layouts.relayout`.

`quantize_params` turns every attention and MLP kernel (shared-expert MLPs included) into int8
values plus one float32 scale per output channel (symmetric absmax, `matmul.quantize_int8`), and the
LM-head matrix into `lm_head_int8` [vocab, d] + `lm_head_int8_scale` [vocab] (for tied models a
quantized copy of the embedding, which itself stays as it is for the token lookup). Embeddings,
norms, biases, the router and the MoE experts keep their dtype. Which leaves change, and over which
dims the scales run, is read from the model's own declaration of the quantized layout (its logical
axis names), so the modules stay the one place that says how each parameter is laid out; each
result is created straight into its sharding, so scales shard with their channel on a mesh.

Own module rather than a library: Google's qwix 0.1.8 and aqtp 0.9.0 both install next to jax
0.10.2 / flax 0.12.8 (pip --dry-run: no conflicts), but they quantize by intercepting the dots of a
wrapped module, and qwix's weight-only path (`core/dot_general.py`: float activations) dequantizes
the weights and runs a float matmul, relying on XLA fusing the dequantize into the matmul. XLA:CPU
does not: the dequantized kernel is materialised (and hoisted out of the decode loop), which is the
slow path `qwen2_jax.matmul` measured (109 ms against 44 ms per decode step). The int8 product used
here and this per-layer relayout-style step are small, and keep the one forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen2_jax.config import Qwen2Config
from qwen2_jax.matmul import Int8Kernel, check_quantize, quantize_int8
from qwen2_jax.options import RunOptions, quantize_of
from qwen2_jax.params import abstract_params, param_logical_axes, param_shardings, tree_get, tree_set
from qwen2_jax.sharding import mesh_of

SCALE_SUFFIX = "_scale"


def quantize_params(
    config: Qwen2Config,
    params: dict,
    layout: RunOptions | None = None,
    quantize: str = "int8",
    consume: bool = False,
    head: bool = True,
) -> dict:
    """The params (float, in `layout`'s layer/kernel layout; default the checkpoint layout) with int8
    kernels. consume=True deletes each float kernel once quantized (peak memory: the model plus one
    kernel's float32 copy). Params that are already quantized come back unchanged. head=False leaves
    the LM head float (`lm_head`, or the tied embedding) with no int8 copy: a frozen LoRA training
    base, whose loss applies the head itself (the model's trunk then never reads `lm_head_int8`)."""
    check_quantize(quantize)
    if quantize is None or quantize_of(params) == quantize:
        return params
    layout = (layout or RunOptions()).replace(quantize=None)
    qlayout = layout.replace(quantize=quantize)
    dtype = jnp.dtype(params["embed_tokens"].dtype)
    q_abstract = abstract_params(config, dtype, qlayout)
    q_axes = param_logical_axes(config, qlayout)
    q_shardings = param_shardings(config, mesh_of(params), dtype, qlayout)
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(q_abstract)[0]:
        path = tuple(k.key for k in path)
        if leaf.dtype != jnp.int8:
            if not path[-1].endswith(SCALE_SUFFIX):
                tree_set(out, path, tree_get(params, path))
            continue
        scale_path = path[:-1] + (path[-1] + SCALE_SUFFIX,)
        if path == ("lm_head_int8",) and not head:
            if not config.tie_word_embeddings:
                out["lm_head"] = params["lm_head"]
            continue
        shardings = (tree_get(q_shardings, path), tree_get(q_shardings, scale_path))
        if path == ("lm_head_int8",):
            tied = config.tie_word_embeddings
            source = params["embed_tokens"] if tied else params["lm_head"]
            quantized = _quantize_fn((1,), not tied, shardings)(source)
            if consume and not tied:
                source.delete()
        else:
            kernel_axes, scale_axes = tree_get(q_axes, path), tree_get(q_axes, scale_path)
            in_axes = tuple(i for i, name in enumerate(kernel_axes) if name not in scale_axes)
            source = tree_get(params, path)
            quantized = _quantize_fn(in_axes, False, shardings)(source)
            if consume:
                source.delete()
        tree_set(out, path, quantized.values)
        tree_set(out, scale_path, quantized.scale)
        del source
    if consume:
        params.clear()
    return out


def _quantize_fn(in_axes: tuple[int, ...], transpose: bool, shardings):
    def quantize(w):
        return tuple(quantize_int8(w.T if transpose else w, in_axes))

    fn = jax.jit(quantize, out_shardings=shardings)
    return lambda w: Int8Kernel(*fn(w))
