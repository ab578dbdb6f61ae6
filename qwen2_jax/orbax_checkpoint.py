"""Orbax checkpoints of qwen2-jax (written by qwen2-convert and by training).

Layout ("stacked-layers-v1"), a directory CKPT holding:

    CKPT/qwen2_jax_metadata.json   {"format_version", "layout", "dtype", "source", "config", "params_item"}
    CKPT/config.json               HF-style config (Qwen2Config.to_hf), so HF tools and qwen2-generate read it
    CKPT/params/                   a standard Orbax PyTree checkpoint (OCDBT + zarr3) of the params tree:
                                   {"embed_tokens", "layers": {...}, "norm", "lm_head"?}, decoder layers
                                   stacked on a leading axis exactly as `model.py` holds them
    CKPT/tokenizer.json, tokenizer_config.json, generation_config.json, ...   (copied when present)

Stacked leaves written by qwen2-convert (`convert/orbax_stream.py`) are stored one chunk per layer
(per layer and expert for MoE expert weights), the on-disk form Orbax gives an array sharded over
its layers axis, so they are written and read a layer slice at a time and restored with a plain
Orbax restore into any target sharding. `save` (training, export) writes the same layout with
Orbax's own handlers; chunks then follow the arrays' shardings, which every reader here accepts.

A training checkpoint is the same thing with more items beside `params` (`CKPT/opt_state/`, ...),
which `restore` ignores. Also accepted: `CKPT/params/` holding a tree `{"params": ..., other}`
(only the params subtree is read), the metadata file one or two levels above CKPT (a run's root
beside its step directories), and a directory of numbered step directories (the highest complete
step is used).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers as th

from qwen2_jax import atomic
from qwen2_jax.config import Qwen2Config
from qwen2_jax.dtypes import PARAM_DTYPE_NAMES, dtype_name, parse_dtype
from qwen2_jax.hf_keys import leaf_shapes
from qwen2_jax.params import abstract_params, param_shardings
from qwen2_jax.safetensors_io import CheckpointError

METADATA_FILE = "qwen2_jax_metadata.json"
FORMAT_VERSION = 1
LAYOUT = "stacked-layers-v1"
PARAMS_ITEM = "params"
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


# ------------------------------------------------------------------------------------ writing
def write_checkpoint_files(
    directory: str, config: Qwen2Config, dtype: str, source: str, assets_from: str | None = None
) -> None:
    """config.json, the metadata file and the tokenizer / generation assets of a checkpoint, each
    written atomically. `dtype` is the params' dtype name ("bfloat16", ...)."""
    dtype = dtype_name(dtype)
    config.with_checkpoint_info(torch_dtype=dtype).save_hf(directory)
    if assets_from:
        copy_assets(assets_from, directory)
    metadata = {
        "format_version": FORMAT_VERSION,
        "layout": LAYOUT,
        "dtype": dtype,
        "source": source,
        "params_item": PARAMS_ITEM,
        "config": config.with_checkpoint_info(torch_dtype=dtype).to_hf(),
    }
    atomic.write_json(os.path.join(directory, METADATA_FILE), metadata)


def copy_assets(src: str, dst: str) -> list[str]:
    """Copy the ASSET_FILES that `src` has into `dst` (each atomically); returns their names."""
    copied = []
    for name in ASSET_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            atomic.copy_file(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def params_handler(**kwargs):
    """The Orbax handler for the params item (OCDBT + zarr3). Uncompressed: weights barely
    compress, and zstd would cost more time than it saves on disk."""
    return ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=False, **kwargs)


SAVE_CHUNK_BYTES = 256 * 2**20


def params_save_args(params):
    """Orbax SaveArgs that split stacked leaves along the layers axis first (chunks of at most
    SAVE_CHUNK_BYTES), so readers such as orbax-to-hf fetch a layer without its neighbours."""

    def args(path, _):
        stacked = str(getattr(path[0], "key", "")).startswith("layers")
        return th.SaveArgs(chunk_byte_size=SAVE_CHUNK_BYTES, shard_axes=(0,) if stacked else ())

    return jax.tree_util.tree_map_with_path(args, params)


def save(path: str, config: Qwen2Config, params, *, source: str = "qwen2_jax", assets_from: str | None = None):
    """Save a (sharded) params tree as a checkpoint in this layout; each host writes its shards."""
    path = os.path.abspath(path)
    dtypes = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
    if len(dtypes) != 1:
        raise ValueError(f"params have mixed dtypes {sorted(dtypes)}")
    os.makedirs(path, exist_ok=True)
    ocp.Checkpointer(params_handler()).save(
        os.path.join(path, PARAMS_ITEM), args=ocp.args.PyTreeSave(params, save_args=params_save_args(params))
    )
    if jax.process_index() == 0:
        write_checkpoint_files(path, config, dtypes.pop(), source, assets_from)


# ------------------------------------------------------------------------------------ reading
@dataclasses.dataclass
class OrbaxCheckpoint:
    directory: str
    params_dir: str
    metadata_dir: str  # where the metadata file (and the assets) live: `directory` or a run root above it
    metadata: dict[str, Any]
    config: Qwen2Config
    prefix: tuple[str, ...]  # ("params",) when params sit inside a bigger tree in params_dir
    stored: dict  # Orbax's metadata tree of params_dir (shapes and dtypes, no data)

    @property
    def dtype(self) -> str:
        return self.metadata["dtype"]


def _is_pytree_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "_METADATA"))


def _find_metadata(directory: str) -> str | None:
    d = directory
    for _ in range(3):
        if os.path.isfile(os.path.join(d, METADATA_FILE)):
            return d
        d = os.path.dirname(d)
    return None


def _latest_step(path: str) -> str | None:
    steps = [int(n) for n in os.listdir(path) if n.isdigit() and _is_pytree_dir(os.path.join(path, n, PARAMS_ITEM))]
    return os.path.join(path, str(max(steps))) if steps else None


def _resolve(path: str) -> tuple[str, str, str] | None:
    """(checkpoint dir, params dir, metadata dir) or None if this is not a checkpoint of ours."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return None
    if not _is_pytree_dir(os.path.join(path, PARAMS_ITEM)):
        step = _latest_step(path)
        if step is None:
            return None
        path = step
    meta = _find_metadata(path)
    return (path, os.path.join(path, PARAMS_ITEM), meta) if meta else None


def is_orbax_checkpoint(path: str) -> bool:
    return _resolve(path) is not None


def open_checkpoint(path: str) -> OrbaxCheckpoint:
    """Locate and check a checkpoint; CheckpointError naming the file if it is not one we can read."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    found = _resolve(path)
    if found is None:
        raise CheckpointError(f"{path}: not a qwen2-jax Orbax checkpoint (no {PARAMS_ITEM}/ with {METADATA_FILE})")
    directory, params_dir, meta_dir = found
    meta_path = os.path.join(meta_dir, METADATA_FILE)
    try:
        with open(meta_path) as f:
            metadata = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable metadata ({e})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{meta_path}: unreadable metadata (not a JSON object)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: unsupported format_version {metadata.get('format_version')!r} "
            f"(this qwen2-jax reads {FORMAT_VERSION})"
        )
    if metadata.get("layout") != LAYOUT:
        raise CheckpointError(f"{meta_path}: unsupported layout {metadata.get('layout')!r} (expected {LAYOUT!r})")
    if metadata.get("dtype") not in PARAM_DTYPE_NAMES:
        raise CheckpointError(f"{meta_path}: unsupported dtype {metadata.get('dtype')!r}")
    config_path = next(
        (
            os.path.join(d, "config.json")
            for d in (directory, meta_dir)
            if os.path.isfile(os.path.join(d, "config.json"))
        ),
        None,
    )
    config = Qwen2Config.from_hf(config_path) if config_path else Qwen2Config.from_hf(metadata["config"])
    top = _stored_tree(params_dir)
    prefix = (PARAMS_ITEM,) if PARAMS_ITEM in top and "embed_tokens" not in top else ()
    return OrbaxCheckpoint(directory, params_dir, meta_dir, metadata, config, prefix, top)


class _StepMetadataElsewhere(logging.Filter):
    """Orbax's Checkpointer warns when the directory it reads lacks `_CHECKPOINT_METADATA`. In a training
    checkpoint that file sits one level up, in the step directory (CheckpointManager writes it there),
    and converted checkpoints never had one: the warning reports nothing wrong, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


@contextlib.contextmanager
def _reading_params_dir():
    quiet = _StepMetadataElsewhere()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _stored_tree(params_dir: str) -> dict:
    try:
        with _reading_params_dir():
            item = ocp.PyTreeCheckpointer().metadata(os.path.abspath(params_dir)).item_metadata
    except Exception as e:  # Orbax raises many types for a damaged directory
        raise CheckpointError(f"{params_dir}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from None
    if item is None:  # Orbax logs and swallows the reason
        raise CheckpointError(f"{params_dir}: unreadable Orbax checkpoint metadata")
    return item.tree


def check_stored_shapes(ckpt: OrbaxCheckpoint, expected: dict[tuple[str, ...], tuple[int, ...]]) -> None:
    tree = ckpt.stored
    for key in ckpt.prefix:
        tree = tree[key]
    stored = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        else:
            stored[path] = tuple(node.shape)

    walk(tree, ())
    for path, shape in expected.items():
        if path not in stored:
            raise CheckpointError(f"{ckpt.params_dir}: missing parameter {'.'.join(path)!r}")
        if stored[path] != shape:
            raise CheckpointError(
                f"{ckpt.params_dir}: parameter {'.'.join(path)!r} has shape {list(stored[path])}, "
                f"config.json implies {list(shape)}"
            )
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{ckpt.params_dir}: unexpected parameter {'.'.join(extra[0])!r} for this config")


def restore(path: str, dtype=None, mesh=None):
    """(config, params) with every leaf restored straight into `param_shardings(config, mesh, dtype)`.
    dtype: None keeps the stored dtype; else a parameter dtype (name or numpy/jax dtype) to cast to."""
    ckpt = open_checkpoint(path)
    target = parse_dtype(dtype) if dtype is not None else parse_dtype(ckpt.dtype)
    check_stored_shapes(ckpt, leaf_shapes(ckpt.config))
    shardings = param_shardings(ckpt.config, mesh, target)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s, dtype=target), shardings)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, target, sharding=s), abstract_params(ckpt.config, target), shardings
    )
    for key in reversed(ckpt.prefix):
        restore_args, abstract = {key: restore_args}, {key: abstract}
    with _reading_params_dir():
        params = ocp.PyTreeCheckpointer().restore(
            ckpt.params_dir,
            args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=bool(ckpt.prefix)),
        )
    for key in ckpt.prefix:
        params = params[key]
    return ckpt.config, params
