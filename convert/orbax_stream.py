"""Streaming I/O on the params of an Orbax checkpoint (qwen2_jax.orbax_checkpoint's layout).

Writing: `StreamedLeaf` values in a params tree are saved by a type handler that writes them into
the zarr3 arrays of a standard Orbax PyTree checkpoint one slice (layer, or layer x expert) at a
time, with a few slices in flight so tensorstore batches them into one OCDBT commit. Each slice is
one zarr chunk, the form Orbax itself gives an array sharded over its layers axis, so a plain Orbax
restore with any target sharding reads the result. Reading: `LeafReader` reads one slice of a
stored leaf through tensorstore. Host memory in both directions: a few slices, whatever the depth.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import type_handlers as th
from orbax.checkpoint._src.futures import future  # CommitFutureAwaitingContractedSignals: no public alias in 0.12.8

from qwen2_jax import orbax_checkpoint as oc

IN_FLIGHT_BYTES = 256 * 2**20  # slice writes in flight: constant memory, whatever the depth
IN_FLIGHT_SLICES = 8


@dataclasses.dataclass
class StreamedLeaf:
    """A parameter leaf written slice by slice: slices = [(order, index, produce)].

    `index` selects leaf[index] (leading stacked dims); `produce()` returns that slice. Slices of
    all leaves are written in global `order`, so the caller decides the read order of its source.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    stacked: int
    slices: list[tuple[int, tuple[int, ...], Callable[[], np.ndarray]]]


class StreamedLeafHandler(th.NumpyHandler):
    """Saves `StreamedLeaf`s: each slice is produced and written into its zarr chunk in turn."""

    # Recorded as np.ndarray: a plain restore reads it with Orbax's own handlers.
    def typestr(self) -> str:
        return "np.ndarray"

    async def serialize(self, values, infos, args=None):
        args = args or [th.SaveArgs()] * len(values)
        return [future.CommitFutureAwaitingContractedSignals(self._write(values, infos, args), name="streamed_leaves")]

    async def _write(self, values, infos, args):
        context = None
        work = []
        for leaf, info, arg in zip(values, infos, args, strict=True):
            await info.await_path_creation()
            if context is None:
                context = _unsynced_context(info.ts_context)
            write_shape = (1,) * leaf.stacked + tuple(leaf.shape[leaf.stacked :])
            spec = th.get_json_tspec_write(
                info,
                use_ocdbt=info.is_ocdbt_checkpoint,
                global_shape=leaf.shape,
                local_shape=write_shape,
                dtype=leaf.dtype,
                process_index=jax.process_index(),
                arg=arg,
            )
            store = await ts.open(ts.Spec(spec), create=True, open=True, context=context)
            work += [(order, store, index, produce) for order, index, produce in leaf.slices]
        # A few slices in flight (bounded in bytes, not in depth) let tensorstore batch them
        # into one OCDBT commit instead of one commit per slice.
        pending: collections.deque = collections.deque()
        in_flight = 0
        for _, store, index, produce in sorted(work, key=lambda w: w[0]):
            value = produce()
            # produce() hands over a fresh array: tensorstore may keep it instead of copying.
            write = store[index].write(value, can_reference_source_data_indefinitely=True)
            pending.append((write, value.nbytes))
            in_flight += value.nbytes
            del value
            while pending and (in_flight > IN_FLIGHT_BYTES or len(pending) > IN_FLIGHT_SLICES):
                future_, nbytes = pending.popleft()
                await future_
                in_flight -= nbytes
        while pending:
            await pending.popleft()[0]


def _unsynced_context(orbax_context):
    """Orbax's tensorstore context for streamed writes. No fsync per write (5-10x slower when
    writing a slice at a time): callers fsync the finished checkpoint once
    (`qwen2_jax.atomic.directory` does)."""
    spec = orbax_context.spec.to_json() if orbax_context is not None else {}
    spec["file_io_sync"] = False
    # Each batch of slices is one OCDBT commit that rewrites B-tree nodes; a cache of them only
    # fills up (one commit's worth per layer, to Orbax's 100 MB cap) and is never read again.
    spec["cache_pool#ocdbt"] = {"total_bytes_limit": 0}
    return ts.Context(spec)


def write_streamed_params(directory: str, tree) -> None:
    """Writes a params tree of `StreamedLeaf`s as CKPT/params (a standard Orbax PyTree checkpoint).
    Not fsynced: call `qwen2_jax.atomic.fsync_tree` before relying on it surviving a crash."""
    registry = th.create_type_handler_registry((StreamedLeaf, StreamedLeafHandler()))
    checkpointer = ocp.Checkpointer(oc.params_handler(type_handler_registry=registry))
    checkpointer.save(os.path.join(os.path.abspath(directory), oc.PARAMS_ITEM), args=ocp.args.PyTreeSave(tree))


class LeafReader:
    """Reads slices of stored leaves through tensorstore: a layer's slice, never the stacked leaf."""

    def __init__(self, ckpt: oc.OrbaxCheckpoint):
        self._ckpt = ckpt
        self._ocdbt = th.is_ocdbt_checkpoint(epath.Path(ckpt.params_dir))
        with open(os.path.join(ckpt.params_dir, "_METADATA")) as f:
            self._zarr3 = bool(json.load(f).get("use_zarr3", False))
        self._context = th.get_ts_context(use_ocdbt=self._ocdbt)
        self._open: dict[tuple[str, ...], Any] = {}

    def _store(self, path: tuple[str, ...]):
        if path not in self._open:
            info = th.ParamInfo(
                name=".".join(self._ckpt.prefix + path),
                parent_dir=epath.Path(self._ckpt.params_dir),
                is_ocdbt_checkpoint=self._ocdbt,
                use_zarr3=self._zarr3,
            )
            spec = th.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            self._open[path] = ts.open(ts.Spec(spec), open=True, context=self._context).result()
        return self._open[path]

    def read(self, path: tuple[str, ...], index: tuple[int, ...]) -> np.ndarray:
        store = self._store(path)
        return np.asarray(store[index].read().result() if index else store.read().result())
