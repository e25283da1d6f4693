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
from curation.imaging import ImageDecodeError, header_size

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


def header_and_buckets_safe(blob: bytes) -> None:
    try:
        header_and_buckets(blob)
    except ImageDecodeError:  # a failed row at ingest: its cost counts too
        pass


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
    sets = {
        "coco_jpeg": [p.read_bytes() for p in sorted((SHARED / "coco").glob("*.jpg"))],
        "skimage_png_jpeg": [
            p.read_bytes() for p in sorted((SHARED / "skimage").glob("*")) if p.suffix.lower() in {".png", ".jpg"}
        ],
        "edge_cases_any_format": [
            p.read_bytes() for p in sorted((SHARED / "edge_cases").rglob("*")) if p.is_file() and p.suffix != ".json"
        ],
    }
    for name, blobs in sets.items():
        header = _rate(header_and_buckets_safe, blobs, args.seconds)
        line = {"bench": "ingest", "files": name, "images": len(blobs), "header_images_per_s_per_core": round(header)}
        if name != "edge_cases_any_format":  # hostile files do not fully decode
            decode = _rate(full_decode, blobs, args.seconds)
            line |= {"full_decode_images_per_s_per_core": round(decode, 1), "ratio": round(header / decode, 1)}
        print(json.dumps(line | {"goal_header_images_per_s": 20000}), flush=True)


if __name__ == "__main__":
    main()
