"""Abstract parameter shapes, their logical axes and shardings, and initialisation into shardings.

Abstract first (`jax.eval_shape` of the model's init), then init or restore straight into the
shardings derived from it: no host ever materialises a whole large model. `options` chooses the
layout (stacked or per-layer layers, [in, out] or [out, in] kernels); the default is the checkpoint
layout.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen2_jax.config import Qwen2Config
from qwen2_jax.model import Qwen2ForCausalLM
from qwen2_jax.options import RunOptions
from qwen2_jax.sharding import ShardingContext, logical_axes_tree, shardings_for

_DUMMY_T = 2
CHECKPOINT_LAYOUT = RunOptions()


def _layout_options(options: RunOptions | None, param_dtype) -> RunOptions:
    """Only the fields that shape the params matter here: layouts, quantization and param dtype."""
    options = options or CHECKPOINT_LAYOUT
    return RunOptions(
        dtype=param_dtype,
        param_dtype=param_dtype,
        layer_layout=options.layer_layout,
        kernel_layout=options.kernel_layout,
        quantize=options.quantize,
    )


def _init_fn(config: Qwen2Config, options: RunOptions):
    model = Qwen2ForCausalLM(config, options)
    ids = jnp.zeros((1, _DUMMY_T), jnp.int32)

    def init(rng):
        return model.init(rng, ids, jnp.zeros_like(ids), jnp.ones_like(ids))["params"]

    return init


@functools.lru_cache(maxsize=32)
def _abstract_boxed(config: Qwen2Config, options: RunOptions):
    return jax.eval_shape(_init_fn(config, options), jax.random.key(0))


def abstract_params(config: Qwen2Config, param_dtype=jnp.float32, options: RunOptions | None = None):
    """ShapeDtypeStructs of the params tree (unboxed)."""
    return nn.unbox(_abstract_boxed(config, _layout_options(options, param_dtype)))


def param_logical_axes(config: Qwen2Config, options: RunOptions | None = None):
    """Logical axis names of every parameter leaf (a tree of tuples)."""
    return logical_axes_tree(_abstract_boxed(config, _layout_options(options, jnp.float32)))


def param_shardings(config: Qwen2Config, mesh: Mesh | None, param_dtype=jnp.float32, options: RunOptions | None = None):
    abstract = abstract_params(config, param_dtype, options)
    if mesh is None:
        device = jax.devices()[0]
        return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
    return shardings_for(ShardingContext(mesh), param_logical_axes(config, options), abstract)


def init_params(
    config: Qwen2Config, rng, mesh: Mesh | None = None, param_dtype=jnp.float32, options: RunOptions | None = None
):
    """Random params (HF's init: normal(initializer_range), biases 0, norms 1), created sharded."""
    layout = _layout_options(options, jnp.dtype(param_dtype))
    shardings = param_shardings(config, mesh, param_dtype, options)
    init = jax.jit(lambda r: nn.unbox(_init_fn(config, layout)(r)), out_shardings=shardings)
    return init(rng)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def tree_get(tree, path):
    """The leaf (or subtree) of a nested dict at a tuple of keys."""
    for key in path:
        tree = tree[key]
    return tree


def tree_set(tree: dict, path, value) -> None:
    """Put `value` at a tuple of keys, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
