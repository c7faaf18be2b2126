"""The zarr-extensions ``bfloat16`` data type, registered with zarr-python so stores hold real bf16.

On disk a bfloat16 element is 2 little-endian bytes: the upper half of the IEEE-754 float32 with
the same value. A reader without this registration can decode a chunk by viewing it as uint16 and
shifting left by 16 into a uint32 viewed as float32 (see docs/store-format.md).

``ml_dtypes`` (which provides numpy's bfloat16) takes a second or more to import, so it is imported only when a
bfloat16 value is actually made or read: registering the zarr data type, opening a float32 store and matching
other dtypes do not need it. ``BFLOAT16`` and ``STORED_DTYPES`` are resolved on first use.

Extraction never imports it: the writer hands zarr bf16 arrays as ``BFloat16Bits``, the same data type on disk
(name, metadata JSON, chunk bytes) whose values in memory are the uint16 bit patterns, which torch's bf16 tensors
already are; creating a store and writing its bf16 chunks go through zarr exactly as before, byte for byte.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import numpy as np
from zarr.core.common import ZarrFormat
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.npy.common import float_to_json_v2, float_to_json_v3
from zarr.core.dtype.npy.float import BaseFloat

ITEMSIZES = {"bfloat16": 2, "float16": 2, "float32": 4}  # bytes per element of each stored activation dtype


@cache
def bfloat16() -> np.dtype:
    """numpy's bfloat16 dtype (imports ml_dtypes on first use)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16, without importing ml_dtypes (a bfloat16 value implies it is loaded)."""
    ml = sys.modules.get("ml_dtypes")
    return ml is not None and np.dtype(dtype) == bfloat16()


def stored_dtype(name: str) -> np.dtype:
    """The numpy dtype of a stored dtype name (bfloat16, float16, float32); other names as numpy reads them."""
    return bfloat16() if name == "bfloat16" else np.dtype(name)


class _NotLoaded:
    """Placeholder for bfloat16's numpy dtype class until ml_dtypes is imported (nothing is an instance of it)."""


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat):  # type: ignore[type-arg]
    """zarr-python data type for ``ml_dtypes.bfloat16`` under the zarr-extensions name ``bfloat16``."""

    dtype_cls = _NotLoaded  # only read by zarr's default native-dtype check and messages; both are overridden
    _zarr_v3_name = "bfloat16"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _check_native_dtype(cls, dtype: Any) -> bool:
        ml = sys.modules.get("ml_dtypes")  # a bfloat16 dtype cannot exist before ml_dtypes is imported
        return ml is not None and type(dtype) is type(bfloat16())

    @property
    def item_size(self) -> int:
        return 2

    def to_native_dtype(self) -> np.dtype:
        return bfloat16()


@dataclass(frozen=True, kw_only=True)
class BFloat16Bits(BFloat16):
    """The ``bfloat16`` data type with its values held as their uint16 bit patterns: how depthcache creates and writes
    bf16 arrays without ml_dtypes. On disk nothing differs (same name, fill value JSON and little-endian chunk
    bytes); only the numpy arrays zarr takes and gives are ``uint16``. Not registered, so a store read back through
    zarr still gives ``BFloat16`` (ml_dtypes) values; a ``np.uint16`` scalar is a bit pattern, any other number a
    value rounded to bf16."""

    @classmethod
    def _check_native_dtype(cls, dtype: Any) -> bool:
        return False  # never inferred from a numpy dtype: only used where depthcache asks for it by name

    def to_native_dtype(self) -> np.dtype:
        return np.dtype("<u2")

    def _cast_scalar_unchecked(self, data: Any) -> np.uint16:
        if isinstance(data, np.uint16):
            return data  # already a bit pattern (zarr casts a parsed fill value a second time)
        return float_to_bf16_bits(float(data))

    def to_json_scalar(self, data: object, *, zarr_format: ZarrFormat) -> float | str:
        value = bf16_bits_to_float32(np.asarray(self.cast_scalar(data)))[()]
        return float_to_json_v2(value) if zarr_format == 2 else float_to_json_v3(value)


def float_to_bf16_bits(value: float) -> np.uint16:
    """The bfloat16 bit pattern of a number, rounded to nearest, ties to even, as ml_dtypes rounds it (NaN stays a
    quiet NaN): rounded to odd into float32 first (so there is no double rounding), then to nearest even."""
    if np.isnan(value):
        return np.uint16((int(np.array(value, dtype=np.float32).view(np.uint32)) >> 16) | 0x0040)
    with np.errstate(over="ignore"):
        single = np.array(value, dtype=np.float32)
    bits = int(single.view(np.uint32))
    if float(single) != value:  # inexact: truncate towards zero, then set the sticky bit
        bits = (bits - (abs(float(single)) > abs(value))) | 1
    return np.uint16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)


def register_bfloat16() -> None:
    """Make zarr (and so xarray/dask) read and write ``bfloat16`` arrays; idempotent."""
    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode raw bfloat16 bit patterns (uint16) to float32 without ml_dtypes (exact, one pass): what a plain
    reader does."""
    out = np.empty(np.shape(bits), np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


def __getattr__(name: str) -> Any:
    """``BFLOAT16`` and ``STORED_DTYPES``, made on first use (they need ml_dtypes)."""
    if name == "BFLOAT16":
        return bfloat16()
    if name == "STORED_DTYPES":
        return {name: stored_dtype(name) for name in ITEMSIZES}
    raise AttributeError(f"module 'depthcache.dtypes' has no attribute {name!r}")
