"""`curation browse` at scale: page latency and server memory on synthetic indexes of 10k and 1M samples.

    python bench/bench_browse.py                       # both sizes (minutes: most of it writes the 1M indexes)
    python bench/bench_browse.py 10000 --data DIR      # one size; DIR keeps the indexes for the next run

Each size is an output of shards of 1,000 samples: `images/` (2% failed, buckets, short original captions),
`captions/` (~40-word captions from a 2,000-word vocabulary), `stats/` noun counts and `dedup/` groups, each shard
with its done marker (no tars: thumbnails are not part of this). A real `curation browse --port 0` serves it; each
request is timed over HTTP (median of 5, after one warm-up), then the server's RSS and peak RSS are read from /proc.
Goal: a page of 50 under 1 s at 1M, and memory that does not grow with the samples.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curation.records import images_schema  # noqa: E402
from curation.shards import DoneMarker, StageDir  # noqa: E402

SHARD = 1000
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
REQUESTS = {
    "grid, page 1": "/",
    "grid, page 200": "/?page=200",
    "status=failed": "/?status=failed",
    "search a word (default set)": "/?q=lighthouse",
    "search a regex": "/?q=red%20(car|boat)&mode=regex",
    "sort by nouns, descending": "/?sort=nouns&order=desc",
    "sort by caption length": "/?sort=caption_length",
    "dedup groups (group_size >= 2)": "/?min_group_size=2",
    "bucket + failed at captions": "/?bucket=1.0&stage=default&status=failed",
    "sample page": "/sample/k0000000500",
}


def write_output(out: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(1990)] + ["lighthouse", "red", "car", "boat", "dog"] * 2)
    buckets = np.array(["0.5", "0.75", "1.0", "1.33", "2.0"])
    folders = {name: StageDir(str(out / name)) for name in ("images", "captions", "stats", "dedup")}
    for first in range(0, n, SHARD):
        shard = f"{first // SHARD:05d}"
        m = min(SHARD, n - first)
        keys = [f"k{first + i:010d}" for i in range(m)]
        failed = rng.random(m) < 0.02
        status = np.where(failed, "failed", "ok")
        bucket = buckets[rng.integers(0, len(buckets), m)]
        originals = [" ".join(words[rng.integers(0, len(words), 8)]) for _ in range(m)]
        images = pa.table(
            {
                "key": keys, "source": ["folder"] * m, "source_id": keys, "ext": ["jpg"] * m,
                "width": rng.integers(256, 2048, m), "height": rng.integers(256, 2048, m),
                "bucket_256": bucket, "bucket_512": bucket, "bucket_1024": bucket, "bucket_2048": bucket,
                "original_caption": originals, "source_meta": [None] * m, "status": status,
                "error_reason": np.where(failed, "truncated", None),
                "error": np.where(failed, "image is truncated", None),
                "caption": [None] * m, "caption_status": [None] * m,
                "member_offset": np.where(failed, None, np.arange(m) * 50_000 + 1024),
                "member_size": np.where(failed, None, 49_000),
            }
        ).cast(images_schema())  # fmt: skip
        lengths = rng.integers(20, 60, m)
        captions = [" ".join(words[rng.integers(0, len(words), k)]) for k in lengths]
        cap = images.drop_columns(["member_offset", "member_size"]).set_column(
            images.schema.get_field_index("caption"), "caption", pa.array(np.where(failed, None, captions))
        )
        stats = pa.table({"key": keys, "nouns": (lengths * 0.4).astype(np.int32), "original_nouns": np.full(m, 3)})
        group = np.where(rng.random(m) < 0.01, 2, 1)
        dedup = pa.table(
            {
                "key": keys,
                "group": keys,
                "keep": [True] * m,
                "group_size": group,
                "distance": [0] * m,
                "exact": [False] * m,
            }
        )
        for name, table in (("images", images), ("captions", cap), ("stats", stats), ("dedup", dedup)):
            folders[name].write_index(shard, table)
            folders[name].write_done(DoneMarker(shard, stage=name, rows=m, counts={}))


def _rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def bench(n: int, data: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-browse-") as tmp:
        out = (data or Path(tmp)) / f"out-{n}"
        if not (out / "dedup" / f"{(n - 1) // SHARD:05d}.done.json").exists():
            started = time.perf_counter()
            write_output(out, n)
            print(f"[{n:,} samples] wrote {n // SHARD} shards in {time.perf_counter() - started:.0f} s", flush=True)
        serve(out, n)


def serve(out: Path, n: int) -> None:
    """Start `curation browse` on `out`, time each request, read the server's memory."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "browse", "--output", str(out), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        started = time.perf_counter()
        line = proc.stdout.readline()
        url = line.split()[1].rstrip("/")
        idle, _ = _rss(proc.pid)
        print(f"[{n:,} samples] server up in {time.perf_counter() - started:.1f} s", flush=True)
        for what, path in REQUESTS.items():
            times = []
            for _ in range(6):
                t0 = time.perf_counter()
                with OPENER.open(url + path, timeout=300) as r:
                    assert r.status == 200, (what, r.status)
                    r.read()
                times.append(time.perf_counter() - t0)
            print(f"[{n:,} samples] {what}: {1000 * statistics.median(times[1:]):.0f} ms", flush=True)
        rss, peak = _rss(proc.pid)
        print(f"[{n:,} samples] server RSS: {idle:.0f} MB idle, {rss:.0f} MB after the requests, peak {peak:.0f} MB")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    args = sys.argv[1:]
    data = None
    if "--data" in args:
        at = args.index("--data")
        data, args = Path(args[at + 1]), args[:at] + args[at + 2 :]
    for n in [int(a) for a in args] or [10_000, 1_000_000]:
        bench(n, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
