"""HF safetensors directory -> Orbax checkpoint, one HF tensor in host memory at a time.

Everything is checked before anything is written (config, every shard header, every tensor name
and shape against the one name table, the tensors' dtypes), with the same checks `load_checkpoint`
makes of an HF directory, so a bad source fails without creating a destination.
"""

from __future__ import annotations

import os

import numpy as np

from convert import orbax_stream
from convert.arrays import materialize
from convert.progress import Progress
from qwen2_jax import orbax_checkpoint as oc
from qwen2_jax.checkpoint import check_hf_tensors, require_checkpoint_dir
from qwen2_jax.config import Qwen2Config
from qwen2_jax.dtypes import parse_dtype
from qwen2_jax.hf_keys import Entry, leaf_shapes
from qwen2_jax.safetensors_io import SafetensorsDir


class SourcePlan:
    """A validated HF source: config, tensors, table, target dtype."""

    def __init__(self, src: str, dtype: str | None):
        require_checkpoint_dir(src, "source", config_hint="")
        self.src = src
        self.config = Qwen2Config.from_hf(src)
        self.tensors = SafetensorsDir(src)
        try:
            self.table = check_hf_tensors(self.config, self.tensors)
            self.dtype = self.tensors.param_dtype((e.hf_key for e in self.table), parse_dtype(dtype))
            self.shapes = leaf_shapes(self.config)
        except BaseException:
            self.tensors.close()
            raise
        self.source = f"hf:{os.path.abspath(src)}"
        self.assets_from = src

    def hf_tensor(self, e: Entry) -> np.ndarray:
        return self.tensors.read(e.hf_key)

    @property
    def total_bytes(self) -> int:
        return sum(int(np.prod(e.hf_shape, dtype=np.int64)) for e in self.table) * self.dtype.itemsize

    def close(self):
        self.tensors.close()


def convert(plan, dst: str, progress: Progress) -> None:
    """Write the checkpoint into `dst` (an empty or missing directory). `plan`: a SourcePlan, or any
    plan with its config, table, dtype, shapes, hf_tensor(entry), source and assets_from
    (`convert.merge_lora.MergePlan`)."""
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
        leaf.slices.append((order, e.index, _producer(plan, e, dtype, progress)))
    orbax_stream.write_streamed_params(dst, tree)
    oc.write_checkpoint_files(dst, plan.config, dtype.name, source=plan.source, assets_from=plan.assets_from)


def _producer(plan, e: Entry, dtype: np.dtype, progress: Progress):
    def produce() -> np.ndarray:
        value = materialize(e.to_param(plan.hf_tensor(e)), dtype)  # cast: round to nearest even
        progress.update(value.nbytes)
        return value

    return produce
