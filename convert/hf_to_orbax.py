"""HF safetensors directory -> Orbax checkpoint, one HF tensor in host memory at a time.

Everything is checked before anything is written (config, every shard header, every tensor name
and shape against the one name table), so a bad source fails without creating a destination.
"""

from __future__ import annotations

import os

import numpy as np

from convert import orbax_stream
from convert.arrays import materialize
from convert.progress import Progress
from qwen2_jax import orbax_checkpoint as oc
from qwen2_jax.checkpoint import check_hf_tensors, parse_dtype, require_checkpoint_dir
from qwen2_jax.config import Qwen2Config
from qwen2_jax.hf_keys import Entry, leaf_shapes
from qwen2_jax.safetensors_io import CheckpointError, SafetensorsDir


class SourcePlan:
    """A validated HF source: config, tensors, table, target dtype."""

    def __init__(self, src: str, dtype: str | None):
        require_checkpoint_dir(src, "source", config_hint="")
        self.src = src
        self.config = Qwen2Config.from_hf(src)
        self.tensors = SafetensorsDir(src)
        try:
            self.table = check_hf_tensors(self.config, self.tensors)
            stored = {np.dtype(self.tensors.dtype(e.hf_key)) for e in self.table}
            bad = sorted(str(d) for d in stored if d.name not in oc.DTYPES)
            if bad:
                raise CheckpointError(f"{src}: unsupported tensor dtype(s) {bad}")
            if dtype is None and len(stored) != 1:
                raise CheckpointError(f"{src}: tensors have mixed dtypes {sorted(map(str, stored))}; pass --dtype")
            self.dtype = parse_dtype(dtype) if dtype is not None else stored.pop()
            self.shapes = leaf_shapes(self.config)
            _check_against_model(self.config, self.shapes)
        except BaseException:
            self.tensors.close()
            raise

    @property
    def total_bytes(self) -> int:
        return sum(int(np.prod(e.hf_shape, dtype=np.int64)) for e in self.table) * self.dtype.itemsize

    def close(self):
        self.tensors.close()


def _check_against_model(config: Qwen2Config, shapes: dict) -> None:
    """The table must describe exactly the Flax model's params (abstract: no memory)."""
    import jax

    from qwen2_jax.params import abstract_params

    model = {tuple(k.key for k in p): tuple(v.shape)
             for p, v in jax.tree_util.tree_leaves_with_path(abstract_params(config))}
    if model != shapes:
        diff = sorted(set(model.items()) ^ set(shapes.items()))
        raise RuntimeError(f"name table and model disagree on parameters: {diff[:3]}")


def convert(plan: SourcePlan, dst: str, progress: Progress) -> None:
    """Write the checkpoint into `dst` (an empty or missing directory)."""
    os.makedirs(dst, exist_ok=True)
    dtype = plan.dtype
    tree: dict = {}
    leaves: dict[tuple[str, ...], orbax_stream.StreamedLeaf] = {}
    for order, e in enumerate(plan.table):
        leaf = leaves.get(e.path)
        if leaf is None:
            leaf = leaves[e.path] = orbax_stream.StreamedLeaf(plan.shapes[e.path], dtype, len(e.index), [])
            node = tree
            for key in e.path[:-1]:
                node = node.setdefault(key, {})
            node[e.path[-1]] = leaf
        leaf.slices.append((order, e.index, _producer(plan.tensors, e, dtype, progress)))
    orbax_stream.write_streamed_params(dst, tree)
    oc.write_checkpoint_files(dst, plan.config, dtype.name, source=f"hf:{os.path.abspath(plan.src)}",
                              assets_from=plan.src)


def _producer(tensors: SafetensorsDir, e: Entry, dtype: np.dtype, progress: Progress):
    def produce() -> np.ndarray:
        value = materialize(e.to_param(tensors.read(e.hf_key)), dtype)  # cast: round to nearest even
        progress.update(value.nbytes)
        return value

    return produce
