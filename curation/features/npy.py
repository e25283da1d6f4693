"""`.npy` bytes for tar members: the standard format, written without compression or temporary files.

A feature member is written once and read every epoch, so it is stored raw: a (120, 4096) float16 T5
feature costs a header plus one buffer copy here, where `np.savez_compressed` spends most of its time in
zlib for a few percent of space (see bench/bench_features_cpu.py). Any `.npy` reader (`np.load`) reads these.
"""

from __future__ import annotations

import io
from functools import cache

import numpy as np


@cache
def _header(shape: tuple[int, ...], descr: str) -> bytes:
    # Features of one shard share a few shapes: the header is built once per (shape, dtype).
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """The `.npy` file content of `array` (C order); object arrays are refused: they would need pickle."""
    if array.dtype.hasobject:
        raise ValueError("object arrays cannot be stored without pickle")
    array = np.ascontiguousarray(array)
    return b"".join((_header(array.shape, np.lib.format.dtype_to_descr(array.dtype)), array.reshape(-1).view(np.uint8)))


def read_npy(data: bytes) -> np.ndarray:
    """Parse `.npy` bytes; pickled (object) content is refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)
