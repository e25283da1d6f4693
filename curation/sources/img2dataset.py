"""LAION as img2dataset writes it, in each of its output formats; one source shard per img2dataset shard:

    webdataset  NNNNN.tar (<key>.jpg, <key>.txt, <key>.json) beside NNNNN.parquet (every url's row)
    files       NNNNN/ (<key>.jpg, <key>.txt, <key>.json) beside NNNNN.parquet
    parquet     NNNNN.parquet alone, the image bytes in its `jpg` column

Keys are img2dataset's digits (shard + index). The alt-text is the original caption (a null caption stays null);
the url is the source id. Rows whose download or resize failed are kept as failed samples with img2dataset's own
status as the reason (`failed_to_download`, `failed_to_resize`) and its error message, and a key the parquet
lists as a success that the tar or folder does not hold is a failed row `missing_image`, so the index accounts for
every url. A parquet beside a tar that cannot be read is counted (`unreadable_sidecar`) and the tar's own samples
are ingested; a lone parquet that cannot be read is a damaged source shard (`damaged_archive`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from curation.sources.base import (
    ARCHIVE_SUFFIXES,
    IMAGE_EXTENSIONS,
    Member,
    ScannedDir,
    SourceError,
    SourceItem,
    Unit,
    apply_damage,
    file_version,
    image_ext,
    list_loose,
    list_tar,
    stem_of,
    unit_id,
)

_SA1B = re.compile(r"sa_\d+")
_IMAGE_COLUMNS = ("jpg", "png", "webp")  # img2dataset names the column after the encode format


def plan(dirs: list[ScannedDir], input_url: str) -> tuple[list[Unit], Counter]:
    by_url = {d.url: d for d in dirs}
    units, skipped = [], Counter()
    for d in dirs:
        parquets = {stem_of(u): u for u, _ in d.containers if u.endswith(".parquet")}
        subdirs = {s.rstrip("/").rsplit("/", 1)[-1]: s for s in d.subdirs}
        tars = [u for u, _ in d.containers if u.endswith(".tar")]
        if tars and all(_SA1B.fullmatch(stem_of(u)) for u in tars):
            raise SourceError(f"{tars[0]} is named like an SA-1B tar, not an img2dataset shard: use --source sa1b")
        for url in tars:
            units.append(
                Unit(unit_id(d.rel_of(url)), "tar", url, rel=d.rel_of(url), sidecar=parquets.get(stem_of(url)))
            )
        for stem, url in parquets.items():
            if stem in subdirs and by_url[subdirs[stem]].loose:  # the `files` format: a folder beside its parquet
                sub = by_url[subdirs[stem]]
                units.append(Unit(unit_id(sub.rel), "dir", sub.url, listing=sub.listing, rel=sub.rel, sidecar=url))
            elif not any(stem_of(t) == stem for t in tars):  # the `parquet` format: the images are in it
                units.append(Unit(unit_id(d.rel_of(url)), "parquet", url, rel=d.rel_of(url)))
        skipped["not_a_shard"] += sum(
            1 for u, _ in d.containers if u.endswith(ARCHIVE_SUFFIXES) and not u.endswith(".tar")
        )
    if not units and any(ext in IMAGE_EXTENSIONS for d in dirs for ext, _ in d.loose_exts):
        raise SourceError(
            f"{input_url} holds loose images but no img2dataset shards (NNNNN.tar, NNNNN.parquet, NNNNN/): "
            "use --source folder"
        )
    return units, skipped


def list_unit(unit: Unit) -> tuple[list[SourceItem], Counter, list[str]]:
    if unit.kind == "parquet":
        return _list_parquet(unit.url)
    listing = list_tar(unit.url) if unit.kind == "tar" else list_loose(unit.listing)
    by_name = dict(listing.members)
    items, skipped, notes = [], Counter(listing.skipped), list(listing.notes)
    for name, member in listing.members:
        ext = image_ext(name)
        if ext is None:
            skipped["not_an_image"] += not name.endswith((".txt", ".json"))
            continue
        stem = name.rsplit(".", 1)[0]
        key = stem.rsplit("/", 1)[-1]
        if _SA1B.fullmatch(key):
            raise SourceError(f"{unit.url} holds SA-1B files ({key}.{ext} with masks in {key}.json): use --source sa1b")
        items.append(
            SourceItem(
                key=key,
                source="img2dataset",
                source_id=key,  # replaced by the url from the json
                ext=ext,
                image=member,
                caption=by_name.get(stem + ".txt"),
                meta=by_name.get(stem + ".json"),
            )
        )
    items = apply_damage(items, listing.damaged)
    if unit.sidecar:
        rows, problem = _sidecar_rows(unit.sidecar)
        if problem:  # the archive's own samples stand; the downloads it failed are not known
            skipped["unreadable_sidecar"] += 1
            notes.append(f"{unit.sidecar}: {problem}; the samples of {unit.url} are ingested without it")
        present = {i.key for i in items}
        skipped["row_without_key"] += sum(row["key"] is None for row in rows)
        for row in rows:
            if row["key"] is None or str(row["key"]) in present:
                continue
            # A key the downloader reports as a success that the archive does not deliver was lost on the way
            # (a damaged or cut archive, a deleted file): a failed row with what the parquet knows of it.
            lost = f"{row['key']} is a success in {unit.sidecar} but {unit.url} does not hold its image"
            items.append(_failed(row) if _is_failed(row) else _failed(row, "missing_image", lost))
    return items, +skipped, notes


def _list_parquet(url: str) -> tuple[list[SourceItem], Counter, list[str]]:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (pa.ArrowException, OSError) as exc:  # damage, not a layout mistake: counted, the other shards go on
        return [], Counter(damaged_archive=1), [f"{url} is not a readable parquet file ({exc})"]
    column = next((c for c in _IMAGE_COLUMNS if c in schema.names), None)
    if column is None or "key" not in schema.names:
        raise SourceError(
            f"{url} has no image column ({'/'.join(_IMAGE_COLUMNS)}) or no key column, and no NNNNN.tar or NNNNN/ "
            "beside it: not an img2dataset shard"
        )
    # The bytes sit in the file: a cell's identity is the file's (a changed parquet redoes its unit's parts).
    version = file_version(fs.info(path))
    items = []
    try:
        rows = _rows(url, without=column)
    except (pa.ArrowException, OSError) as exc:
        return [], Counter(damaged_archive=1), [f"{url} is not a readable parquet file ({exc})"]
    for i, row in enumerate(rows):
        if row["key"] is None:
            continue
        if _is_failed(row):
            items.append(_failed(row))
            continue
        items.append(
            SourceItem(
                key=str(row["key"]),
                source="img2dataset",
                source_id=str(row.get("url") or row["key"]),
                ext=column,
                image=Member(url, str(row["key"]), i, None, column, version),
                original_caption=row.get("caption"),
                source_meta=row,
            )
        )
    missing = sum(row["key"] is None for row in rows)
    return items, Counter(row_without_key=missing) if missing else Counter(), []


def _sidecar_rows(url: str) -> tuple[list[dict[str, Any]], str | None]:
    """The img2dataset parquet's rows that have a key, or none and what is wrong with the file."""
    try:
        rows = _rows(url)
    except (pa.ArrowException, OSError) as exc:
        return [], f"not a readable parquet file ({exc})"
    if rows and "key" not in rows[0]:
        return [], "no `key` column"
    return rows, None


def _rows(url: str, without: str | None = None) -> list[dict[str, Any]]:
    """The parquet's rows, minus the image column (its bytes are read by the shard that ingests them)."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [n for n in pf.schema_arrow.names if n != without]
        return pf.read(columns=columns, use_threads=False).to_pylist()  # see shards.read_parquet


def _is_failed(row: dict[str, Any]) -> bool:
    return row.get("status") not in (None, "success")


def _failed(row: dict[str, Any], reason: str | None = None, message: str | None = None) -> SourceItem:
    status = reason or str(row.get("status") or "missing_image")
    return SourceItem(
        key=str(row["key"]),
        source="img2dataset",
        source_id=str(row.get("url") or row["key"]),
        ext="",
        image=None,
        original_caption=row.get("caption"),
        source_meta=row,
        unavailable=message or str(row.get("error_message") or status),
        unavailable_reason=status,
    )
