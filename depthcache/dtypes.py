"""The zarr-extensions ``bfloat16`` data type, registered with zarr-python so stores hold real bf16.

On disk a bfloat16 element is 2 little-endian bytes: the upper half of the IEEE-754 float32 with
the same value. A reader without this registration can decode a chunk by viewing it as uint16 and
shifting left by 16 into a uint32 viewed as float32 (see docs/store-format.md).

``ml_dtypes`` (which provides numpy's bfloat16) takes a second or more to import, so it is imported only when a
bfloat16 value is actually made or read: registering the zarr data type, opening a float32 store and matching
other dtypes do not need it. ``BFLOAT16`` and ``STORED_DTYPES`` are resolved on first use.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.npy.float import BaseFloat


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


def register_bfloat16() -> None:
    """Make zarr (and so xarray/dask) read and write ``bfloat16`` arrays; idempotent."""
    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode raw bfloat16 bit patterns (uint16) to float32 without ml_dtypes: what a plain reader does."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def __getattr__(name: str) -> Any:
    """``BFLOAT16`` and ``STORED_DTYPES``, made on first use (they need ml_dtypes)."""
    if name == "BFLOAT16":
        return bfloat16()
    if name == "STORED_DTYPES":
        return {"bfloat16": bfloat16(), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
    raise AttributeError(f"module 'depthcache.dtypes' has no attribute {name!r}")
