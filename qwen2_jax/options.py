"""RunOptions: how a model runs (dtypes, layer layout, kernel orientation, remat, MoE kernels,
sharding) as opposed to what it computes (`Qwen2Config`). One frozen, hashable record, passed by
keyword to the model, the forward pass, the training loss and generation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from qwen2_jax.backend import backend
from qwen2_jax.matmul import MATMULS, check_quantize
from qwen2_jax.sharding import ShardingContext

LAYER_LAYOUTS = ("stacked", "per_layer")
KERNEL_LAYOUTS = ("in_out", "out_in")
REMAT_POLICIES = ("none", "dots", "full")
MOE_IMPLS = ("auto", "ragged_dot", "tiled")
MOE_EXCHANGES = ("auto", "allgather", "ragged_all_to_all")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """
    dtype          compute dtype (activations; weights are cast to it inside each matmul); None
                   computes in param_dtype.
    param_dtype    dtype parameters are created in by `init`; for loaded parameters, their dtype.
    layer_layout   "stacked": decoder layers stacked on a leading axis and run by `nn.scan` (the
                   checkpoint layout; training). "per_layer": one parameter subtree per layer,
                   run by a Python loop (generation on CPU, where slicing a layer out of a stacked
                   weight copies it every step).
    kernel_layout  "in_out": attention and MLP kernels [in, out] (the checkpoint layout).
                   "out_in": [out, in], as torch stores them; XLA:CPU multiplies a few activation
                   rows by these 1.4-1.5x faster (decode).
    scan_unroll    layers per scan iteration (stacked layout).
    remat          "none" | "dots" (keep matmul outputs, recompute the rest) | "full" (keep only
                   each layer's input) for the backward pass.
    moe_impl       MoE grouped matmul: "auto" | "ragged_dot" | "tiled".
    moe_exchange   how tokens reach expert shards: "auto" | "allgather" | "ragged_all_to_all".
    matmul         how attention, MLP and LM-head kernels are multiplied (`qwen2_jax.matmul`):
                   "einsum", "gemm" (one 2-D dot with float32 accumulation, >= 2 rows, on the kernel
                   as stored), "auto" (gemm on CPU for bfloat16 kernels computed in bfloat16).
    quantize       None, or "int8": attention, MLP and LM-head kernels stored as int8 with one
                   float32 scale per output channel (`qwen2_jax.quantize`); embeddings, norms,
                   biases and MoE experts stay in param_dtype. For loaded params, theirs.
    sharding       the mesh and logical rules to constrain activations with (None: one device).
    """

    dtype: Any = None
    param_dtype: Any = jnp.float32
    layer_layout: str = "stacked"
    kernel_layout: str = "in_out"
    scan_unroll: int = 1
    remat: str = "none"
    moe_impl: str = "auto"
    moe_exchange: str = "auto"
    matmul: str = "auto"
    quantize: str | None = None
    sharding: ShardingContext | None = None

    def __post_init__(self):
        if self.dtype is not None:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        for name, allowed in (
            ("layer_layout", LAYER_LAYOUTS),
            ("kernel_layout", KERNEL_LAYOUTS),
            ("remat", REMAT_POLICIES),
            ("moe_impl", MOE_IMPLS),
            ("moe_exchange", MOE_EXCHANGES),
            ("matmul", MATMULS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r} (choose from {', '.join(allowed)})")
        check_quantize(self.quantize)
        if isinstance(self.scan_unroll, bool) or not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ValueError(f"scan_unroll must be a positive integer, got {self.scan_unroll!r}")

    def replace(self, **changes) -> RunOptions:
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self):
        return self.param_dtype if self.dtype is None else self.dtype

    def for_params(self, params, sharding: ShardingContext | None) -> RunOptions:
        """These options for running loaded params: param_dtype, quantization and mesh are theirs."""
        return self.replace(
            param_dtype=jnp.dtype(params["embed_tokens"].dtype), quantize=quantize_of(params), sharding=sharding
        )

    @property
    def transposed_kernels(self) -> bool:
        return self.kernel_layout == "out_in"

    def constrain(self, x, logical_axes):
        return self.sharding.constrain(x, logical_axes) if self.sharding is not None else x


def quantize_of(params) -> str | None:
    """ "int8" for params made by `qwen2_jax.quantize.quantize_params` (they hold an int8 LM head), else None."""
    return "int8" if "lm_head_int8" in params else None


def default_kernel_layout(on_mesh: bool) -> str:
    """[out, in] kernels where they were measured faster (XLA:CPU, one device); the checkpoint's
    orientation elsewhere."""
    return "out_in" if backend() == "cpu" and not on_mesh else "in_out"
