"""Abstract parameter shapes, their logical axes and shardings, and initialisation into shardings.

Abstract first (`jax.eval_shape` of the model's init), then init or restore straight into the
shardings derived from it: no host ever materialises a whole large model.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen2_jax.config import Qwen2Config
from qwen2_jax.model import Qwen2ForCausalLM
from qwen2_jax.sharding import ShardingContext, logical_axes_tree, shardings_for

_DUMMY_T = 2


def _init_fn(config: Qwen2Config, param_dtype):
    model = Qwen2ForCausalLM(config, dtype=param_dtype, param_dtype=param_dtype)
    ids = jnp.zeros((1, _DUMMY_T), jnp.int32)

    def init(rng):
        return model.init(rng, ids, jnp.zeros_like(ids), jnp.ones_like(ids))["params"]

    return init


@functools.lru_cache(maxsize=32)
def _abstract_boxed(config: Qwen2Config, param_dtype):
    return jax.eval_shape(_init_fn(config, param_dtype), jax.random.key(0))


def abstract_params(config: Qwen2Config, param_dtype=jnp.float32):
    """ShapeDtypeStructs of the params tree (unboxed)."""
    return nn.unbox(_abstract_boxed(config, jnp.dtype(param_dtype)))


def param_logical_axes(config: Qwen2Config):
    """Logical axis names of every parameter leaf (a tree of tuples)."""
    return logical_axes_tree(_abstract_boxed(config, jnp.dtype(jnp.float32)))


def param_shardings(config: Qwen2Config, mesh: Mesh | None, param_dtype=jnp.float32):
    abstract = abstract_params(config, param_dtype)
    if mesh is None:
        device = jax.devices()[0]
        return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
    return shardings_for(ShardingContext(mesh), param_logical_axes(config), abstract)


def init_params(config: Qwen2Config, rng, mesh: Mesh | None = None, param_dtype=jnp.float32):
    """Random params (HF's init: normal(initializer_range), biases 0, norms 1), created sharded."""
    shardings = param_shardings(config, mesh, param_dtype)
    init = jax.jit(lambda r: nn.unbox(_init_fn(config, jnp.dtype(param_dtype))(r)), out_shardings=shardings)
    return init(rng)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
