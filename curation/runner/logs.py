"""Per-shard log records: `OUT/logs/<pass>/<shard>.json`, one JSON line each, read back merged.

One object per shard rather than one appended file: object stores cannot append, and several drivers' passes
never write the same object. A rerun of a shard replaces its record, so the merged log describes the output as it
is. Python `logging` gets the same record (logger `curation.shards`, level INFO) for whoever configures it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import fsspec

from curation.layout import Layout
from curation.shards import DoneMarker, write_bytes_atomic

log = logging.getLogger("curation.shards")


def shard_record(label: str, done: DoneMarker, attempt: int = 1) -> dict[str, Any]:
    seconds = done.seconds or 0.0
    return {
        "stage": label,
        "shard": done.shard,
        "rows": done.rows,
        "seconds": seconds,
        "samples_per_s": round(done.rows / seconds, 2) if seconds else None,
        "failures": done.counts.get("by_reason", {}),
        "skipped": done.counts.get("by_skipped", {}),
        "attempt": attempt,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_shard_log(layout: Layout, label: str, done: DoneMarker, attempt: int = 1) -> None:
    record = shard_record(label, done, attempt)
    log.info("%s", json.dumps(record, sort_keys=True))
    write_bytes_atomic(f"{layout.logs(label)}/{done.shard}.json", (json.dumps(record, sort_keys=True) + "\n").encode())


def read_logs(layout: Layout, label: str | None = None) -> list[dict[str, Any]]:
    """Every shard record of the output (or of one pass), ordered by pass and shard."""
    base = layout.logs(label) if label else layout.url("logs")
    fs, root = fsspec.core.url_to_fs(base)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    paths = sorted(p for p in fs.find(root) if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith("."))
    records = [json.loads(data) for data in fs.cat(paths).values()] if paths else []
    return sorted(records, key=lambda r: (r["stage"], r["shard"]))
