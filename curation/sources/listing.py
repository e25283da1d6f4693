"""Listing files: what the planning tasks write under `OUT/listings/`, so the driver never holds a sample.

    scan/<folder>.parquet      the loose files of one input folder (url, size, version: size and mtime or ETag),
                               written by the task that scanned it
    annotations/<archive>.parquet  JourneyDB: the annotation lines of one image archive
    units/<unit>.parquet       one source shard's samples (key, where its bytes are, captions, metadata), by key

Each is written whole (temporary name, then rename; one PUT on object stores), so a killed task leaves none half
written. A unit's listing records what it was made from; a rerun keeps it while those files are unchanged.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.records import safe_key
from curation.shards import read_parquet, read_parquet_range, write_parquet_atomic
from curation.sources.base import (
    CONTAINER_SUFFIXES,
    Member,
    ScannedDir,
    SourceError,
    SourceItem,
    file_ext,
    file_version,
    suffix_of,
    url_of,
    where,
)

KEY_BUCKETS = 1024  # keys are hashed into this many buckets at listing; the key check groups buckets into passes
MAX_EXTS = 16  # a folder's loose-file extensions reported to the driver: the commonest few, not one per file
ROW_GROUP = 1000  # listing rows per parquet row group: an output shard of --shard-size rows reads about its own
_MEMBERS = ("image", "caption", "meta")
_MEMBER_FIELDS = (("container", pa.string()), ("member", pa.string()), ("offset", pa.int64()),
                  ("size", pa.int64()), ("column", pa.string()), ("version", pa.string()))  # fmt: skip
LISTING_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("bucket", pa.int32()),
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("ext", pa.string()),
        *[(f"{m}_{f}", t) for m in _MEMBERS for f, t in _MEMBER_FIELDS],
        ("original_caption", pa.string()),
        ("source_meta", pa.string()),
        ("unavailable", pa.string()),
        ("unavailable_reason", pa.string()),
        ("identity", pa.string()),  # `SourceItem.identity()`: what the sample is made of, for its part's lineage
    ]
)


def key_bucket(key: str) -> int:
    return zlib.crc32(key.encode()) % KEY_BUCKETS


def scan_dir(url: str, rel: str, scan_folder: str) -> ScannedDir:
    """List one folder (not its sub-folders): sub-folders and containers by name, loose files into a listing file."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)
    subdirs, containers, loose = [], [], []
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        name = entry["name"]
        if name.rstrip("/") == path.rstrip("/"):  # some stores list a folder as its own first entry
            continue
        full = url_of(fs, name, url)
        if entry["type"] == "directory":
            subdirs.append(full)
        elif suffix_of(name, CONTAINER_SUFFIXES):
            containers.append((full, int(entry.get("size") or 0)))
        else:
            loose.append((full, int(entry.get("size") or 0), file_version(entry)))
    listing = None
    if loose:
        listing = f"{scan_folder.rstrip('/')}/{safe_key(rel or 'root')}.parquet"
        columns = dict(zip(("url", "size", "version"), map(list, zip(*loose, strict=True)), strict=True))
        write_parquet_atomic(listing, pa.table(columns))
    exts = Counter(file_ext(u) for u, _, _ in loose).most_common(MAX_EXTS)
    return ScannedDir(url, rel, tuple(subdirs), tuple(containers), len(loose), tuple(exts), listing)


def write_listing(url: str, items: list[SourceItem], about: dict[str, Any] | None = None) -> None:
    """One unit's items in key order; `about` (what the listing was made from) goes into the file's metadata."""
    items = sorted(items, key=lambda i: i.key)
    columns: dict[str, list[Any]] = {name: [] for name in LISTING_SCHEMA.names}
    for item in items:
        columns["key"].append(item.key)
        columns["bucket"].append(key_bucket(item.key))
        for name in ("source", "source_id", "ext", "original_caption", "unavailable", "unavailable_reason"):
            columns[name].append(getattr(item, name))
        columns["identity"].append(item.identity())
        columns["source_meta"].append(
            json.dumps(item.source_meta, ensure_ascii=False, default=str) if item.source_meta is not None else None
        )
        for m in _MEMBERS:
            member = getattr(item, m)
            for f, _ in _MEMBER_FIELDS:
                columns[f"{m}_{f}"].append(getattr(member, f) if member is not None else None)
    table = pa.table(columns, schema=LISTING_SCHEMA)
    about = {"about": json.dumps(about or {}, sort_keys=True)}
    # Row groups of ROW_GROUP rows: each output shard of the unit decodes the groups of its own rows, not the unit.
    write_parquet_atomic(url, table.replace_schema_metadata(about), row_group_size=ROW_GROUP)


def listing_about(url: str) -> dict[str, Any] | None:
    """What an existing listing file was made from (its footer only), or None when there is none."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        metadata = pq.read_schema(f).metadata or {}
    return json.loads(metadata.get(b"about", b"{}"))


def read_keys(url: str) -> tuple[list[str], list[str] | None]:
    """A listing's keys and their identities (None for a listing made before identities were recorded)."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [c for c in ("key", "identity") if c in pf.schema_arrow.names]
        table = pf.read(columns=columns, use_threads=False)  # see shards.read_parquet
    identities = table.column("identity").to_pylist() if "identity" in columns else None
    return table.column("key").to_pylist(), identities


def read_listing(url: str, start: int = 0, stop: int | None = None) -> list[SourceItem]:
    """The items of one unit's listing, rows [start, stop) in key order (only the row groups they lie in)."""
    return [_item(row) for row in read_parquet_range(*fsspec.core.url_to_fs(url), start, stop).to_pylist()]


def _item(row: dict[str, Any]) -> SourceItem:
    members = {}
    for m in _MEMBERS:
        container = row[f"{m}_container"]
        members[m] = None if container is None else Member(*(row[f"{m}_{f}"] for f, _ in _MEMBER_FIELDS))
    return SourceItem(
        key=row["key"],
        source=row["source"],
        source_id=row["source_id"],
        ext=row["ext"],
        original_caption=row["original_caption"],
        source_meta=json.loads(row["source_meta"]) if row["source_meta"] is not None else None,
        unavailable=row["unavailable"],
        unavailable_reason=row["unavailable_reason"],
        **members,
    )


def check_keys(listings: list[str], part: int, parts: int) -> int:
    """One pass of the key check: the keys whose bucket falls in this part, from every listing; returns how many.

    Memory is this part's keys (as Arrow strings), never the whole dataset's: the driver picks `parts` so each
    pass holds a bounded number. A clash is refused naming both places, before any image shard is written.
    """
    keys, origin = [], []
    for i, url in enumerate(listings):
        table = read_parquet(*fsspec.core.url_to_fs(url), columns=["key", "bucket"])
        mine = pa.array(table.column("bucket").to_numpy() % parts == part)
        chosen = table.column("key").filter(mine)
        keys.append(chosen)
        origin.append(pa.array(np.full(len(chosen), i, dtype=np.int32)))
    if not keys:
        return 0
    table = pa.table({"key": pa.chunked_array(keys, pa.string()), "origin": pa.chunked_array(origin, pa.int32())})
    counts = table.group_by("key").aggregate([("origin", "count")])
    dupes = counts.filter(pc.greater(counts.column("origin_count"), 1))
    if dupes.num_rows:
        key = dupes.column("key")[0].as_py()
        found = table.filter(pc.equal(table.column("key"), key)).column("origin").to_pylist()
        places = [where(i) for u in dict.fromkeys(listings[j] for j in found) for i in read_listing(u) if i.key == key]
        raise SourceError(f"duplicate key {key!r}: {places[0]} and {places[1]}; keys must be unique")
    return table.num_rows
