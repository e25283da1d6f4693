"""Run an ingest, or its planning phases alone, as a driver, and report what the driver itself cost.

    python bench/driver_probe.py [--plan-only] --source img2dataset --input IN --output OUT [--workers N]

Prints one JSON line: driver peak RSS, the bytes the driver read from the input, how many input files it opened,
seconds, samples and shards. Input bytes are counted at fsspec's door in this process (every `open`/`cat_file` of a
path under the input, local or s3://, and Python's own `open`): Ray's workers are other processes, so what they read
is not counted, which is the point. `rchar` from /proc (every byte this process read from any file or socket,
Ray's own traffic included) is reported beside it as an upper bound.
"""

from __future__ import annotations

import argparse
import builtins
import json
import resource
import sys
import time
from pathlib import Path

import fsspec
import fsspec.asyn
import fsspec.spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class InputReads:
    """Counts opens and bytes read of paths under one input root, through fsspec and builtins.open."""

    def __init__(self, input_url: str) -> None:
        self.root = fsspec.core.url_to_fs(input_url)[1].rstrip("/")
        self.bytes = 0
        self.opens = 0

    def mine(self, path) -> bool:
        path = str(path)
        return path == self.root or path.startswith(self.root + "/")

    def wrap(self, f):
        probe = self
        read, readinto = getattr(f, "read", None), getattr(f, "readinto", None)

        def counted_read(*args, **kwargs):
            data = read(*args, **kwargs)
            probe.bytes += len(data or b"")
            return data

        def counted_readinto(buf):
            n = readinto(buf)
            probe.bytes += n or 0
            return n

        f.read = counted_read
        if readinto is not None:
            f.readinto = counted_readinto
        return f

    def install(self) -> None:
        probe = self
        fs_open, fs_cat = fsspec.spec.AbstractFileSystem.open, fsspec.spec.AbstractFileSystem.cat_file
        async_cat = fsspec.asyn.AsyncFileSystem._cat_file
        py_open = builtins.open

        def open_(fs, path, *args, **kwargs):
            f = fs_open(fs, path, *args, **kwargs)
            if probe.mine(fs._strip_protocol(path)):
                probe.opens += 1
                return probe.wrap(f)
            return f

        def cat_(fs, path, *args, **kwargs):
            data = fs_cat(fs, path, *args, **kwargs)
            if probe.mine(fs._strip_protocol(path)):
                probe.opens += 1
                probe.bytes += len(data)
            return data

        async def async_cat_(fs, path, *args, **kwargs):
            data = await async_cat(fs, path, *args, **kwargs)
            if probe.mine(fs._strip_protocol(path)):
                probe.opens += 1
                probe.bytes += len(data)
            return data

        def builtin_open(file, mode="r", *args, **kwargs):
            f = py_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, Path)) and "r" in mode and probe.mine(Path(file).resolve()):
                probe.opens += 1
            return f

        fsspec.spec.AbstractFileSystem.open = open_
        fsspec.spec.AbstractFileSystem.cat_file = cat_
        fsspec.asyn.AsyncFileSystem._cat_file = async_cat_
        builtins.open = builtin_open


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--plan-only", action="store_true", help="phases 1-2 (listing, key check) without the shards")
    args = p.parse_args(argv)

    from curation.ingest import IngestConfig, run_ingest
    from curation.layout import Layout
    from curation.runner import ray_session, run_tasks
    from curation.sources import plan_source

    probe = InputReads(args.input)
    probe.install()
    start, rchar0 = time.time(), rchar()
    if args.plan_only:
        with ray_session(None):
            plan = plan_source(
                args.source,
                args.input,
                Layout(args.output).listings,
                lambda label, fn, tasks: run_tasks(label, fn, tasks, max_in_flight=args.workers, progress=False),
                shard_size=args.shard_size,
            )
        samples, shards = plan.samples, len(plan.parts)
    else:
        config = IngestConfig(args.source, args.input, shard_size=args.shard_size, workers=args.workers)
        summary = run_ingest(args.output, config, progress=False)
        samples, shards = summary.samples, summary.shards_total
    result = {
        "plan_only": args.plan_only,
        "samples": samples,
        "shards": shards,
        "seconds": round(time.time() - start, 2),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "driver_input_bytes": probe.bytes,
        "driver_input_opens": probe.opens,
        "driver_rchar_bytes": rchar() - rchar0,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
