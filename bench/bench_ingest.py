"""Ingest's per-image work: header-only size + bucket assignment, beside a full decode of the same files; and the
damaged-input checks (the end check of each image, the tar walk that accounts for every byte), on and off.

    python bench/bench_ingest.py [--seconds 3]

Single process, single thread: the figures are images/s per core. Goals: >= 20,000 images/s from headers; with the
checks on, >= 0.9x the rate with them off.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

from curation.buckets import BASES, assign_bucket
from curation.imaging import ImageDecodeError, header_size
from curation.sources.base import list_tar

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _paired(off, on, items: list, seconds: float) -> tuple[float, float]:
    """Rates of two ways over the same items, one pass of each in turn, each rate from its fastest pass: on a
    shared machine a neighbour's load lands on either alike, and the fastest passes are the ones it missed."""
    best = [float("inf"), float("inf")]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for i, fn in enumerate((off, on)):
            start = time.perf_counter()
            for item in items:
                fn(item)
            best[i] = min(best[i], time.perf_counter() - start)
    return len(items) / best[0], len(items) / best[1]


def header_and_buckets(blob: bytes, complete: bool = False) -> None:
    w, h = header_size(blob, complete=complete)
    for base in BASES:
        assign_bucket(h, w, base)


def header_and_buckets_safe(blob: bytes) -> None:
    try:
        header_and_buckets(blob)
    except ImageDecodeError:  # a failed row at ingest: its cost counts too
        pass


def checked_header_and_buckets(blob: bytes) -> None:
    """What ingest does per image: the header with the end check (`complete=True`), and the buckets."""
    try:
        header_and_buckets(blob, complete=True)
    except ImageDecodeError:
        pass


def full_decode(blob: bytes) -> None:
    with Image.open(io.BytesIO(blob)) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
        w, h = im.size
    for base in BASES:
        assign_bucket(h, w, base)


def tarfile_listing(path: str) -> None:
    """The listing before the damaged-input checks: tarfile's walk, which stops at the first bad or zero block."""
    with tarfile.open(path) as tar:
        [(i.name, i.offset_data, i.size) for i in tar if i.isfile()]


def _img2dataset_tar(folder: str, images: list[bytes], samples: int) -> str:
    path = f"{folder}/00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            key = f"{i:09d}"
            meta = json.dumps({"url": f"https://example.org/{i}.jpg", "caption": "a photo", "key": key}).encode()
            for ext, data in (("jpg", images[i % len(images)]), ("txt", b"a photo"), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


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
        header, checked = _paired(header_and_buckets_safe, checked_header_and_buckets, blobs, args.seconds)
        line = {"bench": "ingest", "files": name, "images": len(blobs), "header_images_per_s_per_core": round(header),
                "checks_on_images_per_s_per_core": round(checked), "on_vs_off": round(checked / header, 3),
                "goal_on_vs_off": 0.9}  # fmt: skip
        if name != "edge_cases_any_format":  # hostile files do not fully decode
            _, decode = _paired(checked_header_and_buckets, full_decode, blobs, args.seconds)
            line |= {"full_decode_images_per_s_per_core": round(decode, 1), "ratio": round(checked / decode, 1)}
        print(json.dumps(line | {"goal_header_images_per_s": 20000}), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        path = _img2dataset_tar(tmp, sets["coco_jpeg"], samples=1000)
        members = 3000
        naive, ours = (rate * members for rate in _paired(tarfile_listing, list_tar, [path], args.seconds))
        print(json.dumps({"bench": "ingest_listing", "members": members, "walk_every_byte_us_per_member":
                          round(1e6 / ours, 2), "tarfile_us_per_member": round(1e6 / naive, 2),
                          "on_vs_off": round(ours / naive, 3), "goal_on_vs_off": 0.9}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
