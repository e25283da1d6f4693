"""Per-image fingerprints for dedup: SHA-256 of the original bytes and a 64-bit DCT perceptual hash (pHash).

The pHash is imagehash's `phash` computed with numpy: the image as displayed (EXIF orientation applied), grey,
resized to 32x32 with Lanczos, the 8x8 lowest frequencies of its 2-D DCT-II, one bit per coefficient: above the
median of the 64 or not. Bit 63 is the top-left coefficient, row by row, as imagehash's hex string reads.
JPEGs are decoded by libjpeg at the smallest DCT scale (1/2 .. 1/8) that keeps both sides >= 64 px (draft mode):
the hash only looks at 32x32 pixels, and a 2x Lanczos margin makes a resized copy hash like its original.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from curation.imaging import decode_image

HASH_SIZE = 8  # 8x8 DCT coefficients -> 64 bits
_RESIZED = HASH_SIZE * 4  # imagehash's highfreq_factor=4
_DRAFT = 64  # decode at least this size: at 32 px, textures (skimage's brick) lose 10 bits to a 2x smaller copy


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first k rows of the unnormalised n-point DCT-II matrix (scipy.fftpack.dct's, up to its factor 2)."""
    i = np.arange(n)
    return np.cos(np.pi * np.arange(k)[:, None] * (2 * i[None, :] + 1) / (2 * n))


_DCT = _dct_rows(_RESIZED, HASH_SIZE)
_WEIGHTS = (1 << np.arange(HASH_SIZE * HASH_SIZE - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def phash_pixels(grey: np.ndarray) -> int:
    """pHash of 32x32 grey pixels: the sign pattern of the low-frequency DCT around its median."""
    low = _DCT @ grey.astype(np.float64) @ _DCT.T
    bits = (low > np.median(low)).ravel()
    return int(np.sum(_WEIGHTS[bits], dtype=np.uint64))


def phash(data: bytes) -> int:
    """64-bit pHash of an encoded image as displayed; raises ImageDecodeError like the other stages."""
    image = decode_image(data, target_size=(_DRAFT, _DRAFT))
    grey = image.convert("L").resize((_RESIZED, _RESIZED), Image.Resampling.LANCZOS)
    return phash_pixels(np.asarray(grey))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
