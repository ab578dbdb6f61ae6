"""qwen2-convert merge-lora: a base checkpoint (HF directory or Orbax) + a PEFT LoRA adapter -> an HF
directory (or, with --to orbax, an Orbax checkpoint) whose targeted projections are W + scale * B @ A
(peft's `merge_and_unload`).

The merge runs tensor by tensor in HF's [out, in] orientation as the name table streams the base
(one base tensor in host memory, plus the adapter, which is small): the sum in float32, rounded
once to the output dtype. Everything (base, adapter against the base's shapes, dtype) is checked
before DST is created.
"""

from __future__ import annotations

import os
import re

import numpy as np

from convert import orbax_to_hf
from qwen2_jax import orbax_checkpoint as oc
from qwen2_jax.checkpoint import check_hf_tensors, require_checkpoint_dir
from qwen2_jax.config import Qwen2Config
from qwen2_jax.dtypes import parse_dtype
from qwen2_jax.hf_keys import Entry, hf_table, leaf_shapes
from qwen2_jax.lora import TARGETS
from qwen2_jax.peft_adapter import load_peft_adapter
from qwen2_jax.safetensors_io import SafetensorsDir

_TARGET_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight$")


class MergePlan:
    """A validated base + adapter and the HF tensors the merged checkpoint holds (the interface
    `orbax_to_hf.convert` and `hf_to_orbax.convert` write from)."""

    def __init__(self, base: str, adapter: str, dtype: str | None):
        require_checkpoint_dir(base, "base checkpoint")
        self.tensors = None
        if oc.is_orbax_checkpoint(base):
            self._orbax = orbax_to_hf.CheckpointPlan(base, dtype)
            self.config: Qwen2Config = self._orbax.config
            self.dtype = self._orbax.dtype
            self.asset_dirs = self._orbax.asset_dirs
        else:
            require_checkpoint_dir(
                base, "base checkpoint", config_hint=" (not an HF checkpoint) and no Orbax checkpoint"
            )
            self._orbax = None
            self.config = Qwen2Config.from_hf(base)
            self.tensors = SafetensorsDir(base)
            self.asset_dirs = (base,)
        try:
            self.table = hf_table(self.config) if self._orbax is None else self._orbax.table
            if self.tensors is not None:
                check_hf_tensors(self.config, self.tensors)
                self.dtype = self.tensors.param_dtype((e.hf_key for e in self.table), parse_dtype(dtype))
            self.lora_config, adapters = load_peft_adapter(adapter, self.config, dtype=np.float32)
        except BaseException:
            self.close()
            raise
        self._adapters = adapters["layers"]
        self.shapes = leaf_shapes(self.config)
        self.source = f"merge-lora:{os.path.abspath(base)}+{os.path.abspath(adapter)}"
        # the first directory holding tokenizer / generation files (an Orbax base may keep them in
        # its metadata directory), as orbax_to_hf copies them
        with_assets = [d for d in self.asset_dirs if any(os.path.isfile(os.path.join(d, f)) for f in oc.ASSET_FILES)]
        self.assets_from = with_assets[0] if with_assets else None
        self.total_bytes = sum(int(np.prod(e.hf_shape, dtype=np.int64)) for e in self.table) * self.dtype.itemsize

    def _delta(self, e: Entry) -> np.ndarray | None:
        """scale * B @ A for this HF tensor in [out, in] (None if the adapter does not target it)."""
        match = _TARGET_KEY.match(e.hf_key)
        if match is None or match.group(3) not in self.lora_config.target_modules:
            return None
        layer, module = int(match.group(1)), match.group(3)
        sub, name = TARGETS[module]
        a = self._adapters[sub][name]["a"][layer]  # [*in, r]
        b = self._adapters[sub][name]["b"][layer]  # [r, *out]
        r = self.lora_config.rank
        return (b.reshape(r, -1).T @ a.reshape(-1, r).T) * np.float32(self.lora_config.scale)

    def hf_tensor(self, e: Entry) -> np.ndarray:
        base = self._orbax.hf_tensor(e) if self._orbax is not None else self.tensors.read(e.hf_key)
        delta = self._delta(e)
        if delta is None:
            return base
        return base.astype(np.float32) + delta

    def close(self):
        if self._orbax is not None:
            self._orbax.close()
        if self.tensors is not None:
            self.tensors.close()
