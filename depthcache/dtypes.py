"""The zarr-extensions ``bfloat16`` data type, registered with zarr-python so stores hold real bf16.

On disk a bfloat16 element is 2 little-endian bytes: the upper half of the IEEE-754 float32 with
the same value. A reader without this registration can decode a chunk by viewing it as uint16 and
shifting left by 16 into a uint32 viewed as float32 (see docs/store-format.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.npy.float import BaseFloat

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
STORED_DTYPES = {"bfloat16": BFLOAT16, "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat):  # type: ignore[type-arg]
    """zarr-python data type for ``ml_dtypes.bfloat16`` under the zarr-extensions name ``bfloat16``."""

    dtype_cls = type(BFLOAT16)
    _zarr_v3_name = "bfloat16"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @property
    def item_size(self) -> int:
        return 2

    def to_native_dtype(self) -> np.dtype:
        return BFLOAT16


def register_bfloat16() -> None:
    """Make zarr (and so xarray/dask) read and write ``bfloat16`` arrays; idempotent."""
    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode raw bfloat16 bit patterns (uint16) to float32 without ml_dtypes: what a plain reader does."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
