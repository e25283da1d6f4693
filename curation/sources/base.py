"""What every source layout yields: cheap listings on the driver, byte reads in the shard workers."""

from __future__ import annotations

import gzip
import json
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import fsspec
import fsspec.implementations.local

IMAGE_EXTENSIONS = {
    "jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ico", "jp2", "j2k", "avif", "qoi", "ppm", "pgm",
    "pbm", "tga", "dds", "pcx", "psd", "sgi", "jfif",
}  # fmt: skip


_SAFE_KEY = re.compile(r"[A-Za-z0-9_\-]+")  # webdataset splits a member name at its first dot


class SourceError(Exception):
    """The input cannot be read as the layout it claims (unsafe or duplicate members, missing annotations)."""


@dataclass(frozen=True, slots=True)
class Member:
    """Where the bytes of one file are: a plain file (`member` None) or a member of a tar archive."""

    container: str  # fsspec URL of the file or archive
    member: str | None = None
    offset: int | None = None  # data offset in an uncompressed tar: read by seeking, not scanning
    size: int | None = None


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One upstream sample: its key, its image, and the sidecars that carry captions and metadata."""

    key: str
    source: str
    source_id: str
    ext: str
    image: Member | None  # None: the upstream download failed (see unavailable)
    caption: Member | None = None  # a UTF-8 text file
    meta: Member | None = None  # a JSON file
    original_caption: str | None = None  # when the listing already knows it (JourneyDB annotations)
    source_meta: dict[str, Any] | None = None
    unavailable: str | None = None  # img2dataset rows whose download failed: kept as failed samples


def open_input(input_url: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(filesystem, root path, URL prefix): fsspec listings drop the `s3://`; items need it back to be read anywhere."""
    fs, root = fsspec.core.url_to_fs(input_url)
    prefix = input_url.split("://", 1)[0] + "://" if "://" in input_url else ""
    return fs, root, prefix


def image_ext(name: str) -> str | None:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext if ext in IMAGE_EXTENSIONS else None


def check_member_name(archive: str, name: str) -> None:
    """Refuse names that would escape an extraction folder; a tool that trusts them writes anywhere."""
    path = PurePosixPath(name)
    first = path.parts[0] if path.parts else ""  # `tar -C dir -cf x.tar .` stores a member named "."
    if path.is_absolute() or ".." in path.parts or name.startswith("\\") or ":" in first:
        raise SourceError(f"unsafe member name {name!r} in {archive}: refusing this archive")


def list_tar(url: str) -> list[tuple[str, Member]]:
    """(member name, Member) for each regular file of a tar, checked for unsafe names."""
    fs, path = fsspec.core.url_to_fs(url)
    compressed = path.endswith((".tgz", ".tar.gz"))
    # A local plain tar is walked header to header, seeking over the data: listing a 10 GB SA-1B tar reads its
    # ~22k headers, not 10 GB. Compressed or remote archives are streamed: one sequential pass is their cheapest read.
    seekable = not compressed and isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    mode = "r:" if seekable else ("r|gz" if compressed else "r|")
    out = []
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode=mode) as tar:
            end = fs.size(path) if seekable else None
            for info in tar:
                check_member_name(url, info.name)
                if not info.isfile():
                    continue
                if end is not None and info.offset_data + info.size > end:  # seeking, a cut tail goes unnoticed
                    raise tarfile.ReadError(f"unexpected end of data in {info.name!r}")
                offset = None if compressed else info.offset_data
                out.append((info.name, Member(url, info.name, offset, info.size)))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # A truncated download or a file that only bears the name: the listing is unusable, so stop, naming it.
        raise SourceError(f"cannot read {url} as a tar archive: {exc or type(exc).__name__}") from exc
    return out


def check_unique(items: list[SourceItem]) -> None:
    """Keys must be unique and webdataset-safe: refused at listing, before any shard is written."""
    seen: dict[str, SourceItem] = {}
    for item in items:
        if not _SAFE_KEY.fullmatch(item.key):
            raise SourceError(f"unsafe key {item.key!r} from {_where(item.image)}: keys may hold only A-Z a-z 0-9 _ -")
        if item.key in seen:
            first = seen[item.key]
            raise SourceError(
                f"duplicate key {item.key!r}: {_where(first.image)} and {_where(item.image)}; keys must be unique"
            )
        seen[item.key] = item


def _where(m: Member | None) -> str:
    if m is None:
        return "(no image)"
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
        if group[0].member is None:
            for m in group:
                data = fs.cat_file(path)
                yield pending.pop(id(m)), data
        elif all(m.offset is not None for m in group):
            with fs.open(path, "rb") as f:
                for m in sorted(group, key=lambda m: m.offset):
                    f.seek(m.offset)
                    data = f.read(m.size)
                    yield pending.pop(id(m)), data
        else:  # compressed archive: one streaming pass
            wanted = {m.member: m for m in group}
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for info in tar:
                    if info.name in wanted:
                        m = wanted.pop(info.name)
                        yield pending.pop(id(m)), tar.extractfile(info).read()
    except (OSError, tarfile.TarError) as exc:
        for m in pending.values():
            yield m, exc
        return
    for m in pending.values():
        yield m, FileNotFoundError(f"{m.member} not found in {container}")


def load_json(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value
