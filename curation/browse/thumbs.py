"""Thumbnails made on demand from `images/` tar members, cached in memory with a bound on their bytes.

Ingest records where each image member's data lies in its tar (`member_offset`, `member_size`), so one thumbnail
reads one byte range. An output ingested before those columns existed has none: its tar's headers are walked to
the one member (`StageDir.read_member`).
"""

from __future__ import annotations

import io

from PIL import Image

from curation.browse.index import LRU, Location
from curation.imaging import decode_image
from curation.shards import StageDir

SIZES = {"small": 256, "large": 1024}  # the only sizes served: a request cannot make the server resize at will
CACHE_BYTES = 64 * 1024 * 1024


class Thumbnails:
    """JPEG thumbnails of one output's images, by (key, size)."""

    def __init__(self, images: StageDir, cache_bytes: int = CACHE_BYTES) -> None:
        self.images = images
        self.cache = LRU(cache_bytes, weigh=len)

    def get(self, key: str, where: Location, size: str) -> bytes:
        """The thumbnail's JPEG bytes; ImageDecodeError when the image cannot be decoded, FileNotFoundError when
        the tar has no such member."""
        cached = self.cache.get((key, size))
        if cached is not None:
            return cached
        side = SIZES[size]
        raw = self.images.read_member(where.shard, f"{key}.{where.ext}", where.offset, where.size)
        image = decode_image(raw, target_size=(side, side))
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        data = out.getvalue()
        self.cache.put((key, size), data)
        return data
