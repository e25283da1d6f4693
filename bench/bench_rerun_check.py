"""The rerun's file check: planning a pass of done shards with and without holding their files to their markers'
sizes, and the shard writer's running CRC-32 against the same writes without it.

    python bench/bench_rerun_check.py [--shards 1000] [--repeat 5]

Planning is what the runner does before it skips a done shard: read every done marker (`done_markers`), decide
what is pending (`pending_shards`), then, with the check, one listing of the folder with sizes (`damaged_shards`).
The CRC-32 the writer sums is measured as a share of a real shard write.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import zlib
from pathlib import Path

from curation.records import Sample, samples_to_table
from curation.runner.planning import damaged_shards, done_markers, pending_shards
from curation.shards import DoneMarker, ShardWriter, StageDir

COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco"


def _shards(folder: StageDir, n: int, image: bytes) -> list[str]:
    names = []
    for i in range(n):
        shard = f"src{i:05d}-000"
        with ShardWriter(folder, shard) as w:
            w.add("k", {"jpg": image})
            w.commit(samples_to_table([Sample(key="k", source="folder", source_id="k.jpg", ext="jpg")]),
                     DoneMarker(shard, stage="images", config_hash="c"))  # fmt: skip
        names.append(shard)
    return names


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    image = next(iter(sorted(COCO.glob("*.jpg")))).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        folder = StageDir(f"{tmp}/images")
        shards = _shards(folder, args.shards, image)

        def plan() -> None:
            pending_shards(folder, shards, "c", False, None, done_markers(folder))

        def plan_checked() -> None:
            markers = done_markers(folder)
            pending_shards(folder, shards, "c", False, None, markers)
            damaged_shards(folder, markers, shards)

        without, checked = _median(plan, args.repeat), _median(plan_checked, args.repeat)
        print(json.dumps({"figure": "rerun planning", "shards": args.shards, "without_check_s": round(without, 3),
                          "with_size_check_s": round(checked, 3), "ratio": round(checked / without, 3)}))  # fmt: skip

        # The tar's checksum as it is written: a real shard of 50 COCO photos (fsynced, renamed), and the CRC-32 of
        # the same bytes alone, as a share of the writer's time.
        photos = [p.read_bytes() for p in sorted(COCO.glob("*.jpg"))]
        rows = samples_to_table([Sample(key="k", source="folder", source_id="k.jpg", ext="jpg")])

        def shard() -> None:
            with ShardWriter(folder, "bench") as w:
                for i, data in enumerate(photos):
                    w.add(f"k{i:04d}", {"jpg": data})
                w.commit(rows, DoneMarker("bench", stage="images", config_hash="c"))

        writer = _median(shard, 20)
        crc = _median(lambda: [zlib.crc32(p) for p in photos], 20)
        megabytes = sum(map(len, photos)) / 1e6
        print(json.dumps({"figure": "shard write, 50 COCO photos", "mb": round(megabytes, 1),
                          "writer_ms": round(writer * 1e3, 2), "crc32_ms": round(crc * 1e3, 2),
                          "crc32_share": round(crc / writer, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
