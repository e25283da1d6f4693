"""Ingest at scale: what the driver holds and reads as the input grows, and how ingest scales with workers.

    python bench/bench_ingest_scale.py [--quick]

On synthetic img2dataset output (a 32x24 JPEG, a caption and img2dataset's json per sample; 1,000 samples per tar
beside its parquet, 1% failed downloads), each figure from a fresh driver process (bench/driver_probe.py):
1. driver peak RSS over a whole ingest (listing, key check, shards, summary) at 10k and 100k samples, and over
   planning alone (phases 1-2) at 100k and 1M: growth <= 1.3x in both pairs;
2. bytes the driver read from the input, locally and from a local S3 server (moto, 127.0.0.1): 20 tars x 100;
3. ingest throughput with 2 workers vs 1 on the same input (median of 3), against this machine's own 2-process
   ceiling measured in the same run: goal >= 0.85 of it.
`--quick` shrinks every size tenfold (a smoke run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_stats_ray import machine_ceiling  # noqa: E402


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 80, 40)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_img2dataset(root: Path, tars: int, per_tar: int) -> Path:
    """img2dataset's webdataset output format, as its writer lays it out (see tests/layouts.py)."""
    if root.exists():  # the same input serves several figures
        return root
    root.mkdir(parents=True)
    jpeg = _jpeg()
    for t in range(tars):
        rows = []
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for i in range(per_tar):
                key = f"{t:05d}{i:04d}"
                url = f"https://example.org/{key}.jpg"
                failed = i % 100 == 99
                meta = {"url": url, "caption": f"photo {key}", "key": key,
                        "status": "failed_to_download" if failed else "success",
                        "error_message": "HTTP Error 404" if failed else None, "width": 32, "height": 24}  # fmt: skip
                rows.append(meta)
                if not failed:
                    _member(tar, f"{key}.jpg", jpeg)
                    _member(tar, f"{key}.txt", meta["caption"].encode())
                    _member(tar, f"{key}.json", json.dumps(meta).encode())
        pq.write_table(pa.Table.from_pylist(rows), root / f"{t:05d}.parquet")
    return root


def probe(*args: str, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, str(HERE / "driver_probe.py"), *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"driver_probe failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_growth(tmp: Path, sizes: list[int], plan_only: bool) -> None:
    results = []
    for n in sizes:
        src = make_img2dataset(tmp / f"in{n}", tars=n // 1000 or 1, per_tar=min(n, 1000))
        flags = ["--plan-only"] if plan_only else []
        r = probe(*flags, "--source", "img2dataset", "--input", str(src), "--output", str(tmp / f"out{n}-{plan_only}"))
        results.append(r)
        what = "planning (phases 1-2)" if plan_only else "whole ingest"
        print(f"  {what:22s} {n:>9,} samples: driver peak RSS {r['driver_peak_rss_mb']:7.1f} MB, "
              f"{r['seconds']:6.1f}s, driver read {r['driver_input_bytes']} input bytes", flush=True)  # fmt: skip
    growth = results[-1]["driver_peak_rss_mb"] / results[0]["driver_peak_rss_mb"]
    print(f"  growth {sizes[0]:,} -> {sizes[-1]:,}: {growth:.2f}x (goal <= 1.3x)", flush=True)


def driver_reads(tmp: Path, tars: int, per_tar: int) -> None:
    src = make_img2dataset(tmp / "reads-in", tars, per_tar)
    total = sum(p.stat().st_size for p in src.iterdir())
    r = probe("--source", "img2dataset", "--input", str(src), "--output", str(tmp / "reads-out"))
    print(f"  local: {tars} tars x {per_tar} ({total:,} bytes): driver read {r['driver_input_bytes']} input bytes "
          f"in {r['driver_input_opens']} opens (every byte it read, Ray's own traffic and imports included: "
          f"{r['driver_rchar_bytes']:,})")  # fmt: skip
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("  s3: skipped (pip install '.[dev]' for moto and s3fs)")
        return
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
               "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}  # fmt: skip
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")})
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(str(src) + "/", "bench/laion/", recursive=True)
        r = probe("--source", "img2dataset", "--input", "s3://bench/laion", "--output", str(tmp / "s3-out"), env=env)
        print(f"  s3 (moto on 127.0.0.1): driver read {r['driver_input_bytes']} input bytes "
              f"in {r['driver_input_opens']} opens; {r['samples']} samples ingested")  # fmt: skip
    finally:
        server.stop()


def throughput(tmp: Path, tars: int, per_tar: int, runs: int = 3) -> None:
    """Whole ingests of one input in one warm Ray session, fresh output each time: samples/s at 1 and 2 workers."""
    from curation.ingest import IngestConfig, run_ingest
    from curation.runner import ray_session

    src = make_img2dataset(tmp / "tp-in", tars, per_tar)
    rates: dict[int, list[float]] = {1: [], 2: []}
    with ray_session(None):
        for _ in range(runs):
            for workers in (1, 2):
                out = tempfile.mkdtemp(dir=tmp, prefix=f"tp-out-{workers}-")
                start = time.perf_counter()
                summary = run_ingest(out, IngestConfig("img2dataset", str(src), workers=workers), progress=False)
                rates[workers].append(summary.samples / (time.perf_counter() - start))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    ceiling = machine_ceiling()
    print(f"  {tars * per_tar:,} samples, median of {runs}: 1 worker {one:,.0f}/s, 2 workers {two:,.0f}/s = "
          f"{two / one:.2f}x; this machine runs 2 processes at {ceiling:.2f}x one: "
          f"{two / one / ceiling:.2f} of its ceiling (goal >= 0.85)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    k = 10 if args.quick else 1
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp = Path(tmp)
        print("driver peak RSS, whole ingest:", flush=True)
        rss_growth(tmp, [10_000 // k, 100_000 // k], plan_only=False)
        print("driver peak RSS, planning alone:", flush=True)
        rss_growth(tmp, [100_000 // k, 1_000_000 // k], plan_only=True)
        print("archive bytes read by the driver:", flush=True)
        driver_reads(tmp, 20, 100)
        print("throughput, 2 workers vs 1:", flush=True)
        throughput(tmp, 40 // k, 1000)


if __name__ == "__main__":
    main()
