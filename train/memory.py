"""Per-device memory of a compiled step, from XLA's memory analysis (nothing is allocated), and of the
training state from its shapes and shardings."""

from __future__ import annotations

import math

import jax
import numpy as np


def memory_report(compiled) -> dict[str, int]:
    """Bytes per device: arguments, outputs, temporaries (activations, gradients, workspace), code,
    and their total less the outputs that reuse donated argument buffers (aliases)."""
    m = compiled.memory_analysis()
    report = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
        "host_temp_bytes": int(getattr(m, "host_temp_size_in_bytes", 0) or 0),
    }
    report["total_bytes"] = (
        report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] + report["temp_bytes"]
    )
    return report


def bytes_per_device(tree) -> int:
    """The largest per-device share of a tree of arrays or ShapeDtypeStructs with shardings: what one
    device holds of it (its shards; replicated leaves whole)."""
    per_device: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        sharding = leaf.sharding
        shard = sharding.shard_shape(leaf.shape)
        size = math.prod(shard) * np.dtype(leaf.dtype).itemsize
        for device in sharding.device_set:
            per_device[device.id] = per_device.get(device.id, 0) + size
    return max(per_device.values(), default=0)
