"""Reading safetensors files as memory-mapped numpy arrays, bfloat16 included.

Hand-written over the (simple, documented) file format because the `safetensors` package cannot
give what we need: its numpy framework rejects bfloat16, and its flax framework copies every tensor
onto the default accelerator. A memory map keeps host memory bounded by what is actually touched,
and lets us check every header against the file size before trusting it. Never unpickles.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Iterator

import numpy as np

from qwen2_jax.dtypes import PARAM_DTYPE_NAMES, is_param_dtype, safetensors_code, safetensors_dtype

MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A malformed or inconsistent checkpoint; the message names the file or tensor."""


class SafetensorsFile:
    """One .safetensors file, memory-mapped. `get(name)` returns a read-only numpy view."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise CheckpointError(f"missing safetensors file: {self.path}")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"{self.path}: corrupt safetensors header (length {header_len})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = safetensors_dtype(info["dtype"])
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent offsets for its shape")
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {self._data_start + end} "
                    f"but the file has {size} bytes"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        if self._mmap is None:
            if os.path.getsize(self.path) == 0:
                raise CheckpointError(f"{self.path}: empty file")
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = memoryview(self._mmap)[self._data_start + begin : self._data_start + end]
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def read(self, name: str) -> np.ndarray:
        """A writable copy of tensor `name`, read with plain file reads (see `_read_into`)."""
        dtype, shape, begin, _ = self._entries[name]
        out = np.empty(shape, dtype)
        if out.size:
            _read_into(self.path, self._data_start + begin, out)
        return out

    def close(self):
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a view is still alive; the map closes when it is collected
            self._mmap = None


class SafetensorsDir:
    """All tensors of an HF checkpoint directory: one model.safetensors, or shards + index.json."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, "model.safetensors.index.json")
        single = os.path.join(self.directory, "model.safetensors")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: malformed index ({e})") from None
            for file_name in sorted(set(weight_map.values())):
                path = os.path.join(self.directory, file_name)
                if not os.path.exists(path):
                    raise CheckpointError(f"shard {file_name} is listed in {index_path} but missing")
                self._files[file_name] = SafetensorsFile(path)
            for name, file_name in weight_map.items():
                if name not in self._files[file_name]:
                    raise CheckpointError(f"tensor {name!r} is listed in the index under {file_name} but is not in it")
            for file_name, f in self._files.items():
                for name in f.keys():
                    if name in self._where and self._where[name] != file_name:
                        raise CheckpointError(f"duplicate tensor {name!r} in {self._where[name]} and {file_name}")
                    self._where[name] = file_name
        elif os.path.exists(single):
            self._files["model.safetensors"] = SafetensorsFile(single)
            self._where = {n: "model.safetensors" for n in self._files["model.safetensors"].keys()}
        else:
            others = sorted(p for p in os.listdir(self.directory) if p.endswith(".safetensors"))
            if len(others) == 1:
                self._files[others[0]] = SafetensorsFile(os.path.join(self.directory, others[0]))
                self._where = {n: others[0] for n in self._files[others[0]].keys()}
            elif others:
                raise CheckpointError(
                    f"{self.directory}: {len(others)} safetensors files but no model.safetensors.index.json"
                )
            else:
                raise CheckpointError(f"{self.directory}: no model.safetensors or model.safetensors.index.json")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return os.path.join(self.directory, self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._files[self._where[name]].dtype(name)

    def nbytes(self, name: str) -> int:
        return self._files[self._where[name]].nbytes(name)

    def get(self, name: str) -> np.ndarray:
        return self._files[self._where[name]].get(name)

    def read(self, name: str) -> np.ndarray:
        return self._files[self._where[name]].read(name)

    def param_dtype(self, names: Iterable[str], target: np.dtype | None = None) -> np.dtype:
        """The dtype parameters read from tensors `names` get: `target` if given (each tensor is cast
        to it), else the one dtype they are stored in. CheckpointError if a tensor is not stored in a
        parameter dtype (float32, bfloat16, float16), or if they mix dtypes and no target is given."""
        stored = {self.dtype(name) for name in names}
        bad = sorted(str(d) for d in stored if not is_param_dtype(d))
        if bad:
            raise CheckpointError(
                f"{self.directory}: unsupported tensor dtype(s) {bad} (supported: {', '.join(PARAM_DTYPE_NAMES)})"
            )
        if target is not None:
            return np.dtype(target)
        if len(stored) != 1:
            raise CheckpointError(
                f"{self.directory}: tensors have mixed dtypes {sorted(map(str, stored))}; choose a target dtype"
            )
        return stored.pop()

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._where:
            yield name, self.get(name)

    def close(self):
        for f in self._files.values():
            f.close()


# ------------------------------------------------------------------------------ copying reads
# `read` (the converter's path) copies each tensor into its own buffer instead of viewing the
# shared memory map: pages touched through a map stay in the process's RSS until the whole file is
# unmapped, so streaming a multi-GB shard through `get` makes peak RSS grow with the checkpoint.
# A fresh buffer is freed as soon as its tensor has been written.

_READ_BLOCK = 1 << 30  # one read() call moves at most ~2 GiB on Linux


def _read_into(path: str, offset: int, out: np.ndarray) -> None:
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done : done + _READ_BLOCK])
            if not n:
                raise CheckpointError(f"{path}: truncated file: short read at byte {offset + done}")
            done += n


# ------------------------------------------------------------------------------------ writing
def safetensors_header(specs, metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header for tensors laid out back to back in `specs` order.

    specs: [(name, numpy dtype, shape)]. The JSON is padded with spaces to a multiple of 8 bytes
    (as the reference implementation does) so every tensor starts 8-byte aligned.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {
            "dtype": safetensors_code(dtype),
            "shape": [int(s) for s in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor: the header is planned from `specs` up front,
    so memory holds one tensor at a time. Tensors must be written in `specs` order."""

    def __init__(self, path: str | os.PathLike, specs, metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        self._specs = [(n, np.dtype(d), tuple(int(s) for s in sh)) for n, d, sh in specs]
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(safetensors_header(self._specs, metadata))

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: unexpected extra tensor {name!r}")
        want_name, want_dtype, want_shape = self._specs[self._next]
        if (name, np.dtype(array.dtype), tuple(array.shape)) != (want_name, want_dtype, want_shape):
            raise ValueError(
                f"{self.path}: expected tensor {want_name!r} {want_dtype} {list(want_shape)}, got "
                f"{name!r} {array.dtype} {list(array.shape)}"
            )
        data = np.ascontiguousarray(array)
        if data.size:
            self._f.write(data.reshape(-1).view(np.uint8))
        self._next += 1

    def close(self) -> None:
        if self._f.closed:
            return
        missing = [n for n, _, _ in self._specs[self._next :]]
        self._f.close()
        if missing:
            raise ValueError(f"{self.path}: closed before tensor {missing[0]!r} was written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()
