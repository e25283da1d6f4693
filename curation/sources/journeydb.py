"""JourneyDB as released: image archives (`imgs/000.tgz` ... `199.tgz`, or the same extracted into folders) and an
annotation file (`*.jsonl`, or `*.jsonl.tgz` as shipped).

Each annotation line holds `img_path` (`./000/<id>.jpg`: the image archive, then the file), `prompt` (the
Midjourney prompt, kept as the original caption) and `Task2.Caption`. One task streams the annotation file once and
splits it by image archive; each archive is then one source shard. With a partial download, the annotations of
archives that are absent are counted as `not_downloaded` (one line in the summary), not failed rows; an annotation
whose image is missing from a present archive is a failed row.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from curation.records import escape_surrogates, safe_key
from curation.shards import read_parquet, write_bytes_atomic
from curation.sources.base import (
    ANNOTATION_SUFFIXES,
    ARCHIVE_SUFFIXES,
    IMAGE_EXTENSIONS,
    Member,
    ScannedDir,
    SourceError,
    SourceItem,
    Unit,
    apply_damage,
    image_ext,
    list_loose,
    list_tar,
    stem_of,
    suffix_of,
    unit_id,
)

_FLUSH_ROWS = 10_000  # annotation rows buffered per archive before they are written out


_PACKED = tuple(s for s in ANNOTATION_SUFFIXES if s != ".jsonl")  # as shipped: .jsonl.tgz (or gzipped)


def annotation_files(dirs: list[ScannedDir]) -> tuple[list[str], list[tuple[str, str]]]:
    """(the annotation files to read, the (extracted, archive) pairs among them), by name only.

    An annotation archive with its `.jsonl` extracted beside it (`x.jsonl` next to `x.jsonl.tgz`, the state after
    `tar xzf` in place) is one source, read from the extracted file once `split_annotations` found both to hold the
    same lines; the archive is not read as a second annotation file.
    """
    found = [url for d in dirs for url, _ in d.containers if suffix_of(url, ANNOTATION_SUFFIXES)]
    plain = {url for url in found if url.endswith(".jsonl")}
    pairs = []
    for url in found:
        packed = suffix_of(url, _PACKED)
        if packed and url[: -len(packed)] + ".jsonl" in plain:
            pairs.append((url[: -len(packed)] + ".jsonl", url))
    archives = {archive for _, archive in pairs}
    return [url for url in found if url not in archives], pairs


def extracted_note(pair: tuple[str, str]) -> str:
    """The summary's line for an annotation archive extracted beside itself."""
    extracted, archive = (url.rsplit("/", 1)[-1] for url in pair)
    return f"annotations: read {extracted}, extracted beside {archive} with the same lines (the archive is not read)"


def plan(dirs: list[ScannedDir], input_url: str, annotations_url: str) -> tuple[list[Unit], Counter]:
    if not annotation_files(dirs)[0]:
        raise SourceError(
            f"no JourneyDB annotation file (*.jsonl or *.jsonl.tgz) under {input_url}: JourneyDB needs it beside the "
            "images; for a plain image folder use --source folder"
        )
    units, skipped = [], Counter()
    for d in dirs:
        for url, _ in d.containers:
            if suffix_of(url, ANNOTATION_SUFFIXES):
                continue
            if not suffix_of(url, ARCHIVE_SUFFIXES):
                skipped["not_an_image"] += 1
                continue
            rel = d.rel_of(url)
            units.append(Unit(unit_id(rel), "tar", url, rel=rel, annotations=_part(annotations_url, stem_of(url))))
        if any(ext in IMAGE_EXTENSIONS for ext, _ in d.loose_exts):
            archive = d.rel.rsplit("/", 1)[-1]
            units.append(
                Unit(
                    unit_id(d.rel), "dir", d.url, d.rel, listing=d.listing, annotations=_part(annotations_url, archive)
                )
            )
    return units, skipped


def _part(annotations_url: str, archive: str) -> str:
    return f"{annotations_url.rstrip('/')}/{safe_key(archive) if archive else 'root'}.parquet"


def split_annotations(
    files: list[str], annotations_url: str, pairs: list[tuple[str, str]] | tuple = ()
) -> dict[str, int]:
    """Stream the annotation file(s) once, writing each archive's lines to its own part; returns lines per part.

    `pairs` (extracted, archive) from `annotation_files`: each is checked to hold the same lines first (a SourceError
    naming both when they differ: which one is current is the user's call)."""
    for extracted, archive in pairs:
        _check_same_lines(extracted, archive)
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory(prefix="curation-jdb-") as scratch:
        writers: dict[str, pq.ParquetWriter] = {}
        buffers: dict[str, list[dict]] = {}

        def flush(part: str) -> None:
            if part not in writers:
                writers[part] = pq.ParquetWriter(os.path.join(scratch, part.rsplit("/", 1)[-1]), _ANNOTATION_SCHEMA)
            writers[part].write_table(pa.Table.from_pylist(buffers.pop(part), _ANNOTATION_SCHEMA))

        for row in _annotation_rows(files):
            part = _part(annotations_url, PurePosixPath(row["img_path"]).parent.name)
            buffers.setdefault(part, []).append(row)
            counts[part] += 1
            if len(buffers[part]) >= _FLUSH_ROWS:
                flush(part)
        for part in list(buffers):
            flush(part)
        for part, writer in writers.items():
            writer.close()
            with open(os.path.join(scratch, part.rsplit("/", 1)[-1]), "rb") as f:
                write_bytes_atomic(part, f.read())
    return dict(counts)


_ANNOTATION_SCHEMA = pa.schema(
    [("img_path", pa.string()), ("prompt", pa.string()), ("task2_caption", pa.string()), ("line", pa.string())]
)


def _annotation_rows(files: list[str]) -> Iterator[dict]:
    for url in files:
        for where, line in _lines(url):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                img_path = record["img_path"]
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
                raise SourceError(f"{where}: not a JourneyDB annotation line ({type(exc).__name__}: {exc})") from exc
            if not isinstance(img_path, str):
                raise SourceError(f"{where}: img_path must be a string, got {img_path!r}")
            prompt, task2 = record.get("prompt"), record.get("Task2")
            caption = task2.get("Caption") if isinstance(task2, dict) else None
            # Lone surrogates (a `\\ud800` escape) cannot be written as UTF-8: kept as visible escape text.
            yield {
                "img_path": escape_surrogates(img_path)[0],
                "prompt": None if prompt is None else escape_surrogates(str(prompt))[0],
                "task2_caption": None if caption is None else escape_surrogates(str(caption))[0],
                "line": where,
            }


def _check_same_lines(extracted: str, archive: str) -> None:
    """Both files, streamed side by side: the first line that differs (or a file that ends early) is refused."""
    missing = object()
    for n, (a, b) in enumerate(itertools.zip_longest(_lines(extracted), _lines(archive), fillvalue=missing), 1):
        if a is missing or b is missing or a[1].rstrip("\r\n") != b[1].rstrip("\r\n"):
            shorter = f" ({extracted if a is missing else archive} ends first)" if missing in (a, b) else ""
            raise SourceError(
                f"the annotation files {extracted} and {archive} differ at line {n}{shorter}: JourneyDB reads one; "
                "remove the one that is out of date"
            )


def _lines(url: str) -> Iterator[tuple[str, str]]:
    """(`file:line`, text) of an annotation file: plain, gzipped, or a tgz holding the .jsonl (as released)."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as raw:
        if suffix_of(url, (".jsonl.tgz", ".jsonl.tar.gz")):
            try:
                with tarfile.open(fileobj=raw, mode="r|gz") as tar:
                    for info in tar:
                        if info.isfile() and info.name.endswith(".jsonl"):
                            # Line by line in bytes: a text wrapper would ask the tar stream to seek.
                            for n, line in enumerate(tar.extractfile(info), 1):
                                yield f"{url}:{info.name}:{n}", line.decode("utf-8", errors="replace")
            except (tarfile.TarError, EOFError, gzip.BadGzipFile) as exc:
                raise SourceError(f"cannot read {url} as a tgz of JSONL annotations: {exc}") from exc
            return
        stream = gzip.open(raw, "rt", encoding="utf-8") if url.endswith(".gz") else io.TextIOWrapper(raw, "utf-8")
        for n, line in enumerate(stream, 1):
            yield f"{url}:{n}", line


def list_unit(unit: Unit) -> tuple[list[SourceItem], Counter, list[str]]:
    listing = list_tar(unit.url) if unit.kind == "tar" else list_loose(unit.listing)
    entries = listing.members
    annotations = _read_part(unit.annotations)
    skipped = Counter(listing.skipped)
    images: dict[str, Member] = {}
    for name, member in entries:
        if image_ext(name) is None:
            skipped["not_an_image"] += 1
            continue
        base = name.rsplit("/", 1)[-1]
        if base not in annotations:
            skipped["no_annotation"] += 1
            continue
        images[base] = member
    items = []
    for base, row in annotations.items():
        member = images.get(base)
        items.append(
            SourceItem(
                key=safe_key(base.rsplit(".", 1)[0]),
                source="journeydb",
                source_id=row["img_path"],
                ext=image_ext(base) or "",
                image=member,
                original_caption=row["prompt"],
                source_meta={"task2_caption": row["task2_caption"]},
                unavailable=None if member else f"image {row['img_path']} not found in {unit.url}",
            )
        )
    return apply_damage(items, listing.damaged), +skipped, listing.notes


def _read_part(url: str) -> dict[str, dict]:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return {}
    rows = read_parquet(fs, path).to_pylist()
    by_name: dict[str, dict] = {}
    for row in rows:
        base = row["img_path"].rsplit("/", 1)[-1]
        if base in by_name:
            raise SourceError(f"image {base!r} is annotated twice: {by_name[base]['line']} and {row['line']}")
        by_name[base] = row
    return by_name
