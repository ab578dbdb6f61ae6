"""The one table of dtypes: parameter dtypes by name, their numpy dtypes, and safetensors' codes.

Parameter dtypes are named as config.json's `torch_dtype` / `dtype` and torch spell them
("float32", "bfloat16", "float16"); these names are also what `load_checkpoint(dtype=...)`,
`--dtype` and the Orbax metadata file take. numpy has no bfloat16 of its own: `ml_dtypes.bfloat16`
is the one jax uses (`np.dtype(jnp.bfloat16) == np.dtype(ml_dtypes.bfloat16)`).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

# Parameters can be stored and computed in these, in this order of preference for messages.
PARAM_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
PARAM_DTYPE_NAMES: tuple[str, ...] = tuple(PARAM_DTYPES)

# safetensors' dtype codes (the header's "dtype" field) for the tensors a checkpoint may hold;
# only PARAM_DTYPES can become parameters.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
SAFETENSORS_CODES: dict[np.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def parse_dtype(dtype: Any) -> np.dtype | None:
    """A parameter dtype as numpy's: None stays None; a name from PARAM_DTYPE_NAMES, or a numpy /
    jax dtype of one of them. ValueError for anything else."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in PARAM_DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r} (choose from {', '.join(PARAM_DTYPE_NAMES)})")
        return PARAM_DTYPES[dtype]
    try:
        parsed = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"unsupported dtype {dtype!r} (choose from {', '.join(PARAM_DTYPE_NAMES)})") from None
    if parsed not in PARAM_DTYPES.values():
        raise ValueError(f"unsupported dtype {parsed.name!r} (choose from {', '.join(PARAM_DTYPE_NAMES)})")
    return parsed


def dtype_name(dtype: Any) -> str:
    """The name config.json and the Orbax metadata use for a parameter dtype ("bfloat16", ...)."""
    return parse_dtype(dtype).name


def is_param_dtype(dtype: Any) -> bool:
    try:
        return parse_dtype(dtype) is not None
    except ValueError:
        return False


def safetensors_dtype(code: str) -> np.dtype:
    """numpy dtype of a safetensors dtype code; KeyError for a code not in SAFETENSORS_DTYPES."""
    return SAFETENSORS_DTYPES[code]


def safetensors_code(dtype: Any) -> str:
    """safetensors dtype code of a numpy dtype; KeyError for a dtype safetensors files here cannot hold."""
    return SAFETENSORS_CODES[np.dtype(dtype)]
