"""Ingest's per-image work: header-only size + bucket assignment, beside a full decode of the same files.

    python bench/bench_ingest.py [--seconds 3]

Single process, single thread: the figures are images/s per core. Goal: >= 20,000 images/s from headers.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

from PIL import Image, ImageOps

from curation.buckets import BASES, assign_bucket
from curation.imaging import header_size

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rate(fn, blobs: list[bytes], seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for blob in blobs:
            fn(blob)
        done += len(blobs)
    return done / (time.perf_counter() - start)


def header_and_buckets(blob: bytes) -> None:
    w, h = header_size(blob)
    for base in BASES:
        assign_bucket(h, w, base)


def full_decode(blob: bytes) -> None:
    with Image.open(io.BytesIO(blob)) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
        w, h = im.size
    for base in BASES:
        assign_bucket(h, w, base)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    blobs = [p.read_bytes() for p in sorted((SHARED / "coco").glob("*.jpg"))]
    blobs += [p.read_bytes() for p in sorted((SHARED / "skimage").glob("*")) if p.suffix.lower() in {".png", ".jpg"}]
    header = _rate(header_and_buckets, blobs, args.seconds)
    decode = _rate(full_decode, blobs, args.seconds)
    print(
        json.dumps(
            {
                "bench": "ingest",
                "images": len(blobs),
                "header_images_per_s_per_core": round(header),
                "full_decode_images_per_s_per_core": round(decode, 1),
                "ratio": round(header / decode, 1),
                "goal_header_images_per_s": 20000,
            }
        )
    )


if __name__ == "__main__":
    main()
