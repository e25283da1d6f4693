"""Dedup benchmarks: pHash throughput vs a full decode, banded grouping at 100k and 1M hashes, harder-variant recall.

    python bench/bench_dedup.py            # all three (~1-2 min on 2 cores)

1. Hashing, one process: our pHash (JPEG draft decode at >= 64 px) vs the same hash after a full decode, and
   `imagehash.phash` when it is importable (it is not a dependency; see the README's dependency notes).
2. Grouping without Ray (`find_pairs` + `components`): uniform random 64-bit hashes with 10% of them planted in
   near-duplicate clusters of 2-5 (each member <= 4 bits from its cluster's centre, so every pair is <= 8 apart).
   All planted pairs must be found; the time from 100k to 1M should grow <= 12x. Also printed: how many candidate
   pairs 9 exactly-matched 7-bit bands (the plain pigeonhole split) would have to verify at each size.
3. Recall at the default threshold for copies we do not promise to catch: a 5% crop, a thin border, a watermark.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curation.dedup.grouping import components, find_pairs  # noqa: E402
from curation.dedup.hashing import hamming, phash, phash_pixels  # noqa: E402
from curation.imaging import decode_image  # noqa: E402
from tests.dedup import variants  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
THRESHOLD = 8


def _photos() -> list[bytes]:
    files = sorted((DATA / "coco").glob("*.jpg")) + sorted((DATA / "skimage").glob("*"))
    return [p.read_bytes() for p in files]


def _full_decode_phash(data: bytes) -> int:
    grey = decode_image(data).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    return phash_pixels(np.asarray(grey))


def _rate(fn, items: list[bytes], min_seconds: float = 3.0) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        for item in items:
            fn(item)
        done += len(items)
    return done / (time.perf_counter() - started)


def bench_hashing() -> None:
    photos = _photos()
    jpegs = [d for d in photos if d[:2] == b"\xff\xd8"]
    ours = _rate(phash, jpegs)
    full = _rate(_full_decode_phash, jpegs)
    print(f"hashing, {len(jpegs)} real JPEGs, 1 process: pHash with draft decode {ours:,.0f} images/s; "
          f"full decode + same hash {full:,.0f} images/s ({ours / full:.1f}x)")  # fmt: skip
    try:
        import imagehash
    except ImportError:
        print("imagehash not installed: not compared")
    else:
        lib = _rate(lambda d: imagehash.phash(Image.open(io.BytesIO(d))), jpegs)
        same = sum(int(str(imagehash.phash(decode_image(d))), 16) == _full_decode_phash(d) for d in jpegs)
        print(f"imagehash.phash (full decode, scipy DCT): {lib:,.0f} images/s; "
              f"identical hash to ours after the same decode on {same}/{len(jpegs)}")  # fmt: skip


def planted(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    chosen = rng.permutation(n)[: n // 10]
    clusters, start = [], 0
    while start + 2 <= len(chosen):
        members = chosen[start : start + int(rng.integers(2, 6))]
        start += len(members)
        centre = hashes[members[0]]
        for m in members:
            flips = rng.choice(64, size=int(rng.integers(0, 5)), replace=False)
            hashes[m] = centre ^ np.uint64(sum(1 << int(b) for b in flips))
        clusters.append(np.sort(members))
    return hashes, clusters


def exact_band_candidates(hashes: np.ndarray, bands: int = 9) -> int:
    """Candidate pairs of the plain pigeonhole split: t + 1 = 9 bands (7 or 8 bits) matched exactly."""
    total, shift = 0, 0
    for b in range(bands):
        width = 64 // bands + (1 if b < 64 % bands else 0)
        counts = np.bincount(((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64))
        total += int((counts * (counts - 1) // 2).sum())
        shift += width
    return total


def bench_grouping() -> None:
    rng = np.random.default_rng(0)
    seconds = {}
    for n in (100_000, 1_000_000):
        hashes, clusters = planted(n, rng)
        started = time.perf_counter()
        i, j, _ = find_pairs(hashes, THRESHOLD)
        nodes, labels = components(i, j)
        seconds[n] = time.perf_counter() - started
        found = set((i * n + j).tolist())
        wanted = [int(c[a]) * n + int(c[b]) for c in clusters for a, b in zip(*np.triu_indices(len(c), 1), strict=True)]
        missed = sum(p not in found for p in wanted)
        print(f"grouping {n:,} hashes ({len(clusters):,} planted clusters, {len(wanted):,} planted pairs): "
              f"{seconds[n]:.1f}s, {len(i):,} pairs in {len(np.unique(labels)):,} groups, "
              f"planted pairs missed: {missed}; 9 exact bands would verify {exact_band_candidates(hashes):,} "
              f"candidate pairs")  # fmt: skip
    print(f"grouping time 100k -> 1M: {seconds[1_000_000] / seconds[100_000]:.1f}x (goal <= 12x)")


def bench_recall() -> None:
    photos = _photos()
    kinds = {"5% crop": variants.cropped, "3% border": variants.bordered, "watermark": variants.watermarked}
    for name, make in kinds.items():
        caught = 0
        for data in photos:
            image = decode_image(data)
            caught += hamming(phash(data), phash(make(image))) <= THRESHOLD
        print(f"recall at threshold {THRESHOLD}, {name}: {caught}/{len(photos)} ({caught / len(photos):.0%})")


if __name__ == "__main__":
    bench_hashing()
    bench_grouping()
    bench_recall()
