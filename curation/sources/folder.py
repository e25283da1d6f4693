"""A folder of images (any Pillow format) with optional same-name `.txt` captions.

Key: the relative path stem, made safe (`a/b.jpg` -> `a__b`). Files that share a stem (`x.jpg`, `x.png`) keep
both, keyed `x_jpg` and `x_png`, rather than refusing a whole dataset for a common habit. A file is an image by its
extension, or, when the extension is unknown or absent, by its content (Pillow's own format detection). Every other
file is counted as skipped with a reason; nothing under the input is dropped silently.

Each folder is one source shard (its loose files were listed by the task that scanned it).
"""

from __future__ import annotations

from collections import Counter

import fsspec
from PIL import Image, UnidentifiedImageError

from curation.records import safe_key
from curation.sources.base import (
    ANNOTATION_SUFFIXES,
    ARCHIVE_SUFFIXES,
    IMAGE_EXTENSIONS,
    ScannedDir,
    SourceError,
    SourceItem,
    Unit,
    apply_damage,
    file_ext,
    image_ext,
    list_loose,
    suffix_of,
    unit_id,
)

# Pillow format -> the extension its files are written with here.
_FORMAT_EXT = {fmt: ext.lstrip(".") for ext, fmt in Image.registered_extensions().items()} | {"JPEG": "jpg"}


def plan(dirs: list[ScannedDir], input_url: str) -> tuple[list[Unit], Counter]:
    _refuse_journeydb(dirs, input_url)
    units = [Unit(unit_id(d.rel), "dir", d.url, listing=d.listing, rel=d.rel) for d in dirs if d.loose]
    skipped: Counter = Counter()
    archives = 0
    for d in dirs:
        for url, _ in d.containers:
            kind = "archive" if suffix_of(url, ARCHIVE_SUFFIXES) and not suffix_of(url, ANNOTATION_SUFFIXES) else None
            archives += kind == "archive"
            skipped[kind or "not_an_image"] += 1
    if archives and not any(ext in IMAGE_EXTENSIONS or ext not in ("txt", "json") for d in dirs for ext, _ in
                            d.loose_exts):  # fmt: skip
        raise SourceError(
            f"{input_url} holds {archives} tar archive(s) and no loose images: for webdataset tars as img2dataset "
            "writes them use --source img2dataset; for SA-1B tars use --source sa1b"
        )
    return units, skipped


def _refuse_journeydb(dirs: list[ScannedDir], input_url: str) -> None:
    """JourneyDB read as a folder would lose every prompt and key its images by path: refused. Its layout, by name:
    an annotation file (`*.jsonl`, `*.jsonl.tgz`) beside image archives (`000.tgz`) or their extracted folders
    (`000/`, digits only), so a folder that merely holds a `metadata.jsonl` is still a folder."""
    annotations = [url for d in dirs for url, _ in d.containers if suffix_of(url, ANNOTATION_SUFFIXES)]
    archives = [url for d in dirs for url, _ in d.containers
                if suffix_of(url, ARCHIVE_SUFFIXES) and not suffix_of(url, ANNOTATION_SUFFIXES)]  # fmt: skip
    extracted = [d.url for d in dirs if d.rel.rsplit("/", 1)[-1].isdigit() and d.loose]
    if annotations and (archives or extracted):
        found = (archives or extracted)[0].rsplit("/", 1)[-1]
        raise SourceError(
            f"{input_url} is laid out as JourneyDB (annotations {annotations[0].rsplit('/', 1)[-1]}, images in "
            f"{found}{'/' if not archives else ''} ...): use --source journeydb"
        )


def list_unit(unit: Unit) -> tuple[list[SourceItem], Counter, list[str]]:
    listing = list_loose(unit.listing)
    files = dict(listing.members)
    skipped: Counter = Counter()
    texts = {url[: -len(".txt")]: m for url, m in files.items() if url.endswith(".txt")}
    images: list[tuple[str, str]] = []  # (url, ext)
    for url in files:
        if url.endswith(".txt"):
            continue
        ext = image_ext(url) or _sniff(url)
        if ext is None:
            skipped["not_an_image"] += 1
        else:
            images.append((url, ext))
    stems = Counter(_stem(url) for url, _ in images)
    paired = {_stem(url) for url, _ in images} & texts.keys()
    skipped["caption_without_image"] += len(texts.keys() - paired)
    prefix = f"{unit.rel}/" if unit.rel else ""
    items = []
    for url, ext in images:
        name = url.rsplit("/", 1)[-1]
        rel_stem = prefix + _stem(name)
        items.append(
            SourceItem(
                key=safe_key(rel_stem if stems[_stem(url)] == 1 else f"{rel_stem}_{file_ext(name) or ext}"),
                source="folder",
                source_id=prefix + name,
                ext=ext,
                image=files[url],
                caption=texts.get(_stem(url)),
            )
        )
    return apply_damage(items, listing.damaged), +skipped, []


def _stem(url: str) -> str:
    base = url.rsplit("/", 1)[-1]
    return url[: -len(base)] + (base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base)


def _sniff(url: str) -> str | None:
    """The image extension of a file whose name does not tell (`IMG_0001`, `photo.jpeg_large`), from its header."""
    try:
        with fsspec.open(url, "rb") as f, Image.open(f) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    ext = _FORMAT_EXT.get(fmt)
    return ext if ext in IMAGE_EXTENSIONS else None
