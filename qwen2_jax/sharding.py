"""Meshes, the one table from logical axis names to mesh axes, and shardings derived from it.

Every parameter and key activation carries logical axis names (`embed`, `q_heads`, `batch`, ...);
`LOGICAL_RULES` maps each to mesh axes. A dimension that a mesh axis does not divide is left
replicated along that axis (e.g. 2 KV heads on tensor=4), so any mesh runs any model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# `sequence` (context parallelism, qwen2_jax/sequence_parallel.py) sits next to `tensor`, the two axes
# that exchange activations inside every layer, so both land on the most closely linked devices.
MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")

# Logical axis -> mesh axes, in order. Parameters shard their `embed` dim over fsdp (ZeRO-3 style)
# and their head / MLP / vocab dims over tensor; activations shard the batch over every axis that
# does not split the model's features, and their length over `sequence`. The sequence axis also
# shards the parameters' `embed` dim, as fsdp does: each of its devices holds a different part of
# every sequence, so it needs all of the model, and would otherwise hold a full copy of it.
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # parameters
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp", "sequence")),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("norm", ()),
    ("experts", ("expert",)),
    ("expert_mlp", ("tensor",)),
    ("router", ()),
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", ("sequence",)),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    ("cache_length", ()),
)


class ShardingError(ValueError):
    """An impossible mesh or rules table."""


def validate_rules(rules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, axes in rules:
        if name in table:
            raise ShardingError(f"logical axis {name!r} appears twice in the rules table")
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ShardingError(f"rule for {name!r} names unknown mesh axes {bad} (known: {MESH_AXES})")
        if len(set(axes)) != len(axes):
            raise ShardingError(f"rule for {name!r} repeats a mesh axis: {axes}")
        table[name] = axes
    return table


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    expert: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    *,
    sequence: int = 1,
) -> Mesh:
    """A mesh over (data, fsdp, expert, sequence, tensor); one size may be -1 (= all remaining devices).

    Axis types are set explicitly to Auto: GSPMD propagates shardings from the parameters and
    the logical constraints, whatever JAX's default for `make_mesh` is.
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "sequence": sequence, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ShardingError(f"mesh axis {name} must be a positive integer or -1, got {size!r}")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % fixed:
            raise ShardingError(f"cannot fill mesh axis {free[0]}: {len(devices)} devices are not divisible by {fixed}")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ShardingError(f"mesh {sizes} needs {total} devices but {len(devices)} are available")
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1:
        return _multi_slice_mesh(sizes, devices, len(slices), axis_types)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # An axis that is no product of whole torus axes (8 on a 4x4x4 v5p slice): split a physical axis.
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (NotImplementedError, ValueError) as e:
            raise ShardingError(f"mesh {sizes} does not map onto the devices' torus: {e}") from None
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _multi_slice_mesh(sizes: dict[str, int], devices, num_slices: int, axis_types) -> Mesh:
    """TPU slices joined by the data-center network: the `data` axis spans the slices (only gradients
    cross between them, once per step), every other axis stays inside a slice (ICI)."""
    from jax.experimental import mesh_utils

    if sizes["data"] % num_slices:
        raise ShardingError(
            f"mesh axis data ({sizes['data']}) must be a multiple of the {num_slices} slices: it is the axis that "
            "spans them"
        )
    inner = (sizes["data"] // num_slices,) + tuple(sizes[a] for a in MESH_AXES[1:])
    outer = (num_slices,) + (1,) * (len(MESH_AXES) - 1)
    try:
        grid = mesh_utils.create_hybrid_device_mesh(inner, outer, devices, allow_split_physical_axes=True)
    except ValueError as e:
        raise ShardingError(f"mesh {sizes} over {num_slices} slices: {e}") from None
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    """A mesh plus the logical rules: hashable, so modules can hold it as an attribute."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...] = LOGICAL_RULES

    def __post_init__(self):
        validate_rules(self.rules)

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        return logical_to_spec(logical_axes, self.rules, self.mesh, shape)

    def sharding(self, logical_axes, shape=None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def constrain(self, x, logical_axes):
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))


def logical_to_spec(
    logical_axes: Sequence[str | None], rules, mesh: Mesh | None = None, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """PartitionSpec for one array. Refuses two dims on one mesh axis; drops axes a dim can't divide."""
    table = validate_rules(rules)
    used: dict[str, str] = {}
    out = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ShardingError(f"logical axis {name!r} has no rule in the sharding table")
        kept = []
        size = shape[dim] if shape is not None else None
        for axis in table[name]:
            if axis in used:
                raise ShardingError(
                    f"logical axes {used[axis]!r} and {name!r} both map to mesh axis {axis!r} in one array"
                )
            used[axis] = name
            axis_size = mesh.shape[axis] if mesh is not None else 1
            if axis_size == 1:
                continue
            if size is not None and size % (math.prod(mesh.shape[a] for a in kept) * axis_size):
                continue  # not divisible: stay replicated along this axis
            kept.append(axis)
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*out)


def logical_axes_tree(boxed_tree):
    """Logical axis names of every leaf of a tree of `nn.LogicallyPartitioned` boxes."""
    return jax.tree.map(
        lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else None,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )


def shardings_for(ctx: ShardingContext, logical_tree, abstract_tree):
    """NamedShardings for a tree, given its logical names and its (abstract) shapes."""
    return jax.tree.map(
        lambda names, a: ctx.sharding(names if names is not None else (None,) * a.ndim, a.shape),
        logical_tree,
        abstract_tree,
        is_leaf=lambda x: isinstance(x, tuple) or x is None,
    )


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of a tree live on, when they are NamedSharding-placed."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())


def as_mapping(mesh_cfg: Mapping[str, Any] | None) -> dict[str, int]:
    mesh_cfg = dict(mesh_cfg or {})
    unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"unknown mesh axes {unknown} (known: {MESH_AXES})")
    return {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}


def host_local(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))
