"""Helpers for the qwen2-convert tests: tiny sharded HF checkpoints, running the CLI, comparing."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch

from hf_utils import hf_dense_config, make_hf_model
from qwen2_jax.dtypes import PARAM_DTYPE_NAMES
from qwen2_jax.safetensors_io import SafetensorsDir, SafetensorsFile, SafetensorsWriter

TORCH_DTYPES = {name: getattr(torch, name) for name in PARAM_DTYPE_NAMES}  # torch spells them the same
ASSETS = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": '{"eos_token": "<|endoftext|>"}',
    "vocab.json": "{}",
    "merges.txt": "#version: 0.2\n",
}


def save_hf(path, dtype: str = "float32", tied: bool = False, seed: int = 0, layers: int = 3, **overrides):
    """A tiny random Qwen2 saved by transformers in several shards, with assets; returns the model."""
    model = make_hf_model(hf_dense_config(tie_word_embeddings=tied, num_hidden_layers=layers, **overrides), seed=seed)
    model = model.to(TORCH_DTYPES[dtype])
    model.save_pretrained(path, max_shard_size="20KB")
    model.generation_config.save_pretrained(path)
    for name, text in ASSETS.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return model


def run_cli(capfd, *argv) -> tuple[int, str, str]:
    from convert.cli import main

    capfd.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def tensors_of(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    d = SafetensorsDir(path)
    try:
        return {k: (str(d.dtype(k)), d.shape(k), d.read(k).tobytes()) for k in d.keys()}
    finally:
        d.close()


def torch_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def copy_dir(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def shard_files(path) -> list[str]:
    return sorted(os.path.join(path, p) for p in os.listdir(path) if p.endswith(".safetensors"))


def shard_of(path, tensor: str) -> str:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return os.path.join(path, json.load(f)["weight_map"][tensor])


def rewrite_shard(path, shard: str, drop: str | None = None, add: tuple[str, np.ndarray] | None = None) -> None:
    """Rewrite one shard without tensor `drop` / with an extra tensor, and update the index to match."""
    f = SafetensorsFile(shard)
    tensors = {k: f.read(k) for k in f.keys() if k != drop}
    f.close()
    if add:
        tensors[add[0]] = add[1]
    with SafetensorsWriter(shard, [(k, v.dtype, v.shape) for k, v in tensors.items()], {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as fh:
        index = json.load(fh)
    if drop:
        del index["weight_map"][drop]
    if add:
        index["weight_map"][add[0]] = os.path.basename(shard)
    with open(index_path, "w") as fh:
        json.dump(index, fh)


def edit_config(path, **changes) -> None:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def leftovers(dst) -> list[str]:
    """Anything the converter may have left beside DST (its temporary names)."""
    parent, base = os.path.split(os.path.abspath(dst))
    if not os.path.isdir(parent):
        return []
    return [p for p in os.listdir(parent) if p.startswith(f".{base}.qwen2-convert")]
