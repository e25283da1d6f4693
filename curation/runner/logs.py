"""Per-shard log records, one object per shard attempt: `OUT/logs/<pass>/<shard>/<run id>-<attempt>.json`.

Never overwritten: object stores cannot append, so each attempt of each run is its own object, and a 0.4 s rerun
leaves the 94 s first run's record in place. Run ids sort by time (UTC, microseconds) and carry the driver's pid,
so two drivers never write one name. `read_logs` gives each shard's latest record, or every attempt; records of the
older layout (`OUT/logs/<pass>/<shard>.json`, one per shard) read as attempts older than any run id. Python
`logging` gets the same record (logger `curation.shards`, level INFO) for whoever configures it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from typing import Any

import fsspec

from curation.layout import Layout
from curation.shards import DoneMarker, write_bytes_atomic

log = logging.getLogger("curation.shards")


def new_run_id() -> str:
    """`20261201T213000123456Z-4242`: sorts by start time; the pid keeps two drivers' names apart."""
    return f"{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{os.getpid()}"


def shard_record(label: str, done: DoneMarker, attempt: int = 1, run: str = "") -> dict[str, Any]:
    seconds = done.seconds or 0.0
    return {
        "stage": label,
        "shard": done.shard,
        "run": run,
        "rows": done.rows,
        "seconds": seconds,
        "samples_per_s": round(done.rows / seconds, 2) if seconds else None,
        "failures": done.counts.get("by_reason", {}),
        "skipped": done.counts.get("by_skipped", {}),
        "attempt": attempt,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_shard_log(layout: Layout, label: str, done: DoneMarker, attempt: int = 1, run: str | None = None) -> None:
    """One new object for this attempt of the shard (`run`: the pass run's `new_run_id()`)."""
    run = run or new_run_id()
    _write(layout, label, shard_record(label, done, attempt, run))


def write_failed_attempt_log(layout: Layout, label: str, shard: str, attempt: int, run: str, error: str) -> None:
    """The record of an attempt that wrote no shard: its worker was lost (the shard runs again), or it raised."""
    _write(layout, label, shard_record(label, DoneMarker(shard), attempt, run) | {"seconds": None, "error": error})


def _write(layout: Layout, label: str, record: dict[str, Any]) -> None:
    log.info("%s", json.dumps(record, sort_keys=True))
    url = f"{layout.logs(label)}/{record['shard']}/{record['run']}-{record['attempt']}.json"
    write_bytes_atomic(url, (json.dumps(record, sort_keys=True) + "\n").encode())


def _order(record: dict[str, Any]) -> tuple:
    return record.get("run", ""), record.get("attempt", 1), record.get("finished_at", "")


def read_logs(layout: Layout, label: str | None = None, every_attempt: bool = False) -> list[dict[str, Any]]:
    """Each shard's latest record (`every_attempt`: all of them, oldest first), ordered by pass and shard; `label`
    keeps one pass (`dedup` is not `dedup/hashes`)."""
    base = layout.logs(label) if label else layout.url("logs")
    fs, root = fsspec.core.url_to_fs(base)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    paths = sorted(p for p in fs.find(root) if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith("."))
    records = [json.loads(data) for data in fs.cat(paths).values()] if paths else []
    records = [r for r in records if label is None or r["stage"] == label]
    records.sort(key=lambda r: (r["stage"], r["shard"], *_order(r)))
    if every_attempt:
        return records
    latest = {(r["stage"], r["shard"]): r for r in records}  # sorted: the last one of each shard wins
    return list(latest.values())


def logged_stages(layout: Layout) -> list[str]:
    """The passes the output has records of."""
    return sorted({r["stage"] for r in read_logs(layout)})
