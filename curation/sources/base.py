"""What every source layout is made of: scanned folders, source shards ("units"), listed items, byte reads.

The driver sees only folder names and the names and sizes of archives (`ScannedDir`); it groups them into units,
one per source shard (an img2dataset `NNNNN.tar`, an SA-1B tar, a JourneyDB image archive, a folder of loose
files). Workers list a unit's members into `SourceItem`s and, later, read the bytes.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec
import fsspec.implementations.local
import numpy as np
import pyarrow.parquet as pq

from curation.errors import SourceError
from curation.records import safe_key
from curation.shards import read_parquet
from curation.sources.tar import walk_tar

IMAGE_EXTENSIONS = {
    "jpg", "jpeg", "jpe", "jfif", "png", "apng", "mpo", "webp", "gif", "bmp", "tif", "tiff", "ico", "jp2", "j2k",
    "avif", "avifs", "qoi", "ppm", "pgm", "pbm", "pnm", "tga", "dds", "pcx", "psd", "sgi",
}  # fmt: skip
ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz")
ANNOTATION_SUFFIXES = (".jsonl", ".jsonl.tgz", ".jsonl.tar.gz", ".jsonl.gz")
# Files the driver is told about by name: the archives, indexes and annotation files that define source shards.
CONTAINER_SUFFIXES = (*ANNOTATION_SUFFIXES, *ARCHIVE_SUFFIXES, ".parquet")

_SAFE_KEY = re.compile(r"[A-Za-z0-9_\-]+")  # webdataset splits a member name at its first dot


@dataclass(frozen=True, slots=True)
class Member:
    """Where the bytes of one file are: a plain file, a member of a tar, or a binary cell of a parquet file."""

    container: str  # fsspec URL of the file, archive or parquet file
    member: str | None = None
    offset: int | None = None  # data offset in an uncompressed tar (read by seeking), or the parquet row
    size: int | None = None
    column: str | None = None  # set for a parquet cell: the binary column holding the image
    version: str | None = None  # what identifies these bytes: size and mtime or ETag (`file_version`), tar header


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One upstream sample: its key, its image, and the sidecars that carry captions and metadata."""

    key: str
    source: str
    source_id: str
    ext: str
    image: Member | None  # None: the upstream download failed, or the image is missing (see unavailable)
    caption: Member | None = None  # a UTF-8 text file
    meta: Member | None = None  # a JSON file
    original_caption: str | None = None  # when the listing already knows it (annotations, parquet columns)
    source_meta: dict[str, Any] | None = None
    unavailable: str | None = None  # why there is no image: kept as a failed sample with this message
    unavailable_reason: str = "missing_image"  # its short category (img2dataset's own status where it has one)

    def identity(self) -> str:
        """What this sample is made of: its listed fields and the identity of every file it reads, but not where
        the bytes sit (a tar member's offset), so rewriting a tar with one changed member changes one identity."""
        files = [None if m is None else [m.member or m.container, m.version] for m in (self.image, self.caption,
                                                                                        self.meta)]  # fmt: skip
        state = [self.key, self.source, self.source_id, self.ext, self.original_caption, self.source_meta,
                 self.unavailable, self.unavailable_reason, files]  # fmt: skip
        return hashlib.blake2b(json.dumps(state, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class ScannedDir:
    """One folder of the input as the driver sees it: sub-folders and archives by name, loose files by count.

    The loose files themselves (names, sizes) are in the parquet file `listing`, written by the scanning task, so a
    flat folder of millions of images costs the driver one path, not millions.
    """

    url: str
    rel: str  # relative to the input root; "" for the root
    subdirs: tuple[str, ...]  # URLs
    containers: tuple[tuple[str, int], ...]  # (URL, size) of archives, parquet and annotation files
    loose: int  # files that are not containers
    loose_exts: tuple[tuple[str, int], ...]  # the commonest extensions of those files, with counts (bounded)
    listing: str | None  # parquet of (url, size) for the loose files, when there are any

    def rel_of(self, url: str) -> str:
        """The input-relative path of one of this folder's entries."""
        name = url.rstrip("/").rsplit("/", 1)[-1]
        return f"{self.rel}/{name}" if self.rel else name


@dataclass(frozen=True, slots=True)
class Unit:
    """One source shard: listed by one task, ingested into the output shards `<id>-000`, `<id>-001`, ..."""

    id: str
    kind: str  # "tar" | "parquet" | "dir"
    url: str  # the archive, parquet file or folder
    rel: str = ""  # its path relative to the input ("" for the input folder itself)
    listing: str | None = None  # dir: the scanned loose files
    sidecar: str | None = None  # img2dataset: the NNNNN.parquet beside a tar or a folder (failed downloads)
    annotations: str | None = None  # JourneyDB: this archive's share of the annotation file(s)


def unit_id(rel: str, suffixes: tuple[str, ...] = CONTAINER_SUFFIXES) -> str:
    """A unit's id, and so its shards' names: its relative path made safe (`sub/00042.tar` -> `sub__00042`)."""
    suffix = suffix_of(rel, suffixes)
    rel = rel[: -len(suffix)] if suffix else rel
    return safe_key(rel) if rel else "root"


def file_version(info: dict[str, Any]) -> str:
    """A file's identity as a listing records it: its size and modification time (ETag on object stores)."""
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{stamp}"


def url_of(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """fsspec listings drop the `s3://`; items need it back to be read in any process."""
    return fs.unstrip_protocol(path) if "://" in like else path


def suffix_of(name: str, suffixes: tuple[str, ...]) -> str | None:
    low = name.lower()
    return next((s for s in sorted(suffixes, key=len, reverse=True) if low.endswith(s)), None)


def stem_of(url: str, suffixes: tuple[str, ...] = CONTAINER_SUFFIXES) -> str:
    base = url.rstrip("/").rsplit("/", 1)[-1]
    suffix = suffix_of(base, suffixes)
    return base[: -len(suffix)] if suffix else base


def image_ext(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    ext = base.rsplit(".", 1)[-1].lower() if "." in base else ""
    return ext if ext in IMAGE_EXTENSIONS else None


def file_ext(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base.lstrip(".") else ""


def check_member_name(archive: str, name: str) -> None:
    """Refuse names that would escape an extraction folder; a tool that trusts them writes anywhere."""
    path = PurePosixPath(name)
    first = path.parts[0] if path.parts else ""  # `tar -C dir -cf x.tar .` stores a member named "."
    if path.is_absolute() or ".." in path.parts or name.startswith("\\") or ":" in first:
        raise SourceError(f"unsafe member name {name!r} in {archive}: refusing this archive")


MAX_MEMBER_BYTES = 256 * 2**20  # a file larger than this is a failed row (`too_large`), never read into memory


@dataclass
class Listing:
    """A source shard's files as a listing task finds them: the readable ones and what is wrong with the rest."""

    members: list[tuple[str, Member]]  # (name, Member) of every file, damaged ones included
    damaged: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (reason, message): not readable
    skipped: Counter = field(default_factory=Counter)  # entries that are no sample (links, empty archives...)
    notes: list[str] = field(default_factory=list)  # one line per problem, naming the file


def list_tar(url: str) -> Listing:
    """Every file of a tar (see `curation.sources.tar`), checked for unsafe names."""
    fs, path = fsspec.core.url_to_fs(url)
    compressed = path.endswith((".tgz", ".tar.gz"))
    # A local plain tar is walked header to header, seeking over the data: listing a 10 GB SA-1B tar reads its
    # ~22k headers, not 10 GB. Compressed or remote archives are streamed: one sequential pass is their cheapest read.
    seekable = not compressed and isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    with fs.open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        walk = walk_tar(f, url, end=fs.size(path) if seekable else None, compressed=compressed,
                        max_size=MAX_MEMBER_BYTES)  # fmt: skip
    members = []
    for name, offset, size in walk.files:
        check_member_name(url, name)
        # Identified by size and header mtime, not offset: one changed member moves every later one.
        version = f"{size}:{walk.mtimes[name]}"
        members.append((name, Member(url, name, None if compressed else offset, size, version=version)))
    return Listing(members, walk.damaged, walk.skipped, walk.notes)


def list_loose(listing: str) -> Listing:
    """The loose files a scanning task found in one folder, as a Listing (files over the size cap are damaged)."""
    members, damaged = [], {}
    for url, size, version in read_loose_listing(listing):
        members.append((url, Member(url, version=version)))
        if size > MAX_MEMBER_BYTES:
            damaged[url] = ("too_large", f"{url} is {size:,} bytes, over the {MAX_MEMBER_BYTES:,} cap")
    return Listing(members, damaged)


def apply_damage(items: list[SourceItem], damaged: dict[str, tuple[str, str]]) -> list[SourceItem]:
    """Items any of whose files (image or sidecar) cannot be read become failed rows with that file's reason."""
    if not damaged:
        return items
    out = []
    for item in items:
        names = [m.member or m.container for m in (item.image, item.caption, item.meta) if m is not None]
        hit = next((damaged[n] for n in names if n in damaged), None)
        if hit is not None:
            item = dataclasses.replace(
                item, image=None, caption=None, meta=None, unavailable=hit[1], unavailable_reason=hit[0]
            )
        out.append(item)
    return out


def read_loose_listing(url: str) -> list[tuple[str, int, str]]:
    """(URL, size, `file_version`) of the loose files a scanning task found in one folder."""
    table = read_parquet(*fsspec.core.url_to_fs(url))
    columns = [table.column(c).to_pylist() for c in ("url", "size", "version")]
    return list(zip(*columns, strict=True))


def check_key(item: SourceItem) -> None:
    if not _SAFE_KEY.fullmatch(item.key):
        raise SourceError(f"unsafe key {item.key!r} from {where(item)}: keys may hold only A-Z a-z 0-9 _ -")


def check_unique(items: list[SourceItem]) -> None:
    """Keys within one unit: unique and webdataset-safe (across units, the ingest's partitioned key check)."""
    seen: dict[str, SourceItem] = {}
    for item in items:
        check_key(item)
        if item.key in seen:
            raise SourceError(
                f"duplicate key {item.key!r}: {where(seen[item.key])} and {where(item)}; keys must be unique"
            )
        seen[item.key] = item


def where(item: SourceItem) -> str:
    """Where a sample comes from, for error messages."""
    m = item.image
    if m is None:
        return item.source_id
    if m.column:
        return f"{m.container} row {m.offset}"
    return f"{m.container}:{m.member}" if m.member else m.container


def read_members(members: Iterable[Member]) -> Iterator[tuple[Member, bytes | Exception]]:
    """Read many members, grouped by container so each archive is opened once; errors are returned, not raised."""
    by_container: dict[str, list[Member]] = {}
    for m in members:
        by_container.setdefault(m.container, []).append(m)
    for container, group in by_container.items():
        yield from _read_container(container, group)


def _read_container(container: str, group: list[Member]) -> Iterator[tuple[Member, bytes | Exception]]:
    fs, path = fsspec.core.url_to_fs(container)
    pending = {id(m): m for m in group}
    try:
        if group[0].column is not None:  # img2dataset's parquet output: the image is a binary cell
            for m, data in _parquet_cells(fs, path, group[0].column, group):
                yield pending.pop(id(m)), data if data is not None else ValueError(f"row {m.offset} has no image")
        elif group[0].member is None:
            for m in group:
                data = fs.cat_file(path)
                yield pending.pop(id(m)), data
        elif all(m.offset is not None for m in group):
            with fs.open(path, "rb") as f:
                for m in sorted(group, key=lambda m: m.offset):
                    f.seek(m.offset)
                    data = f.read(m.size)
                    yield pending.pop(id(m)), data
        else:  # compressed archive: one streaming pass, to the end (its CRC is checked there)
            with fs.open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
                walk = walk_tar(f, container, end=None, compressed=True, max_size=MAX_MEMBER_BYTES,
                                wanted={m.member for m in group})  # fmt: skip
            for m in group:
                if m.member in walk.data:
                    yield pending.pop(id(m)), walk.data[m.member]
                elif m.member in walk.damaged:
                    yield pending.pop(id(m)), ValueError(walk.damaged[m.member][1])
    except (OSError, EOFError, ValueError) as exc:
        for m in pending.values():
            yield m, exc
        return
    for m in pending.values():
        yield m, FileNotFoundError(f"{m.member} not found in {container}")


def _parquet_cells(fs, path: str, column: str, group: list[Member]) -> Iterator[tuple[Member, bytes | None]]:
    """The cells of `column` at the members' rows, reading only the row groups that hold them: an output shard is
    a slice of its source shard, and the column holds every image of it (img2dataset writes 100 rows a group)."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        rows = np.array([m.offset for m in group])
        row_group = np.searchsorted(starts, rows, side="right") - 1
        needed = np.unique(row_group).tolist()
        # use_threads=False: see shards.read_parquet
        cells = pf.read_row_groups(needed, columns=[column], use_threads=False).column(0)
    sizes = [int(starts[g + 1] - starts[g]) for g in needed]
    begins = dict(zip(needed, np.cumsum([0] + sizes[:-1]).tolist(), strict=True))  # a group's first cell in `cells`
    for m, row, g in zip(group, rows.tolist(), row_group.tolist(), strict=True):
        yield m, cells[begins[g] + row - int(starts[g])].as_py()


def load_json(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value
