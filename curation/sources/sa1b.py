"""SA-1B: tars (`sa_000000.tar` ...) or folders of `sa_<id>.jpg` + `sa_<id>.json`; one source shard per tar or folder.

The json's `image` object (`image_id`, `width`, `height`, `file_name`) is kept as source metadata; its
`annotations` (segmentation masks, most of the json's bytes) are never loaded into the index.
"""

from __future__ import annotations

import re
from collections import Counter

from curation.sources.base import (
    ANNOTATION_SUFFIXES,
    ARCHIVE_SUFFIXES,
    IMAGE_EXTENSIONS,
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

_IMG2DATASET_SHARD = re.compile(r"\d+")


def plan(dirs: list[ScannedDir], input_url: str) -> tuple[list[Unit], Counter]:
    units, skipped = [], Counter()
    for d in dirs:
        parquets = {stem_of(url) for url, _ in d.containers if url.endswith(".parquet")}
        for url, _ in d.containers:
            if not suffix_of(url, ARCHIVE_SUFFIXES) or suffix_of(url, ANNOTATION_SUFFIXES):
                skipped["not_an_image"] += 1
                continue
            stem = stem_of(url)
            if _IMG2DATASET_SHARD.fullmatch(stem) and stem in parquets:
                raise SourceError(
                    f"{url} with {stem}.parquet beside it is img2dataset output, not SA-1B: use --source img2dataset"
                )
            units.append(Unit(unit_id(d.rel_of(url)), "tar", url, rel=d.rel_of(url)))
        if any(ext in IMAGE_EXTENSIONS for ext, _ in d.loose_exts):
            units.append(Unit(unit_id(d.rel), "dir", d.url, listing=d.listing, rel=d.rel))
    return units, skipped


def list_unit(unit: Unit) -> tuple[list[SourceItem], Counter, list[str]]:
    listing = list_tar(unit.url) if unit.kind == "tar" else list_loose(unit.listing)
    entries = listing.members
    skipped = Counter(listing.skipped)
    jsons = {name.rsplit("/", 1)[-1][: -len(".json")]: m for name, m in entries if name.endswith(".json")}
    items, others = [], []
    for name, member in entries:
        ext = image_ext(name)
        stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if ext is None:
            skipped["not_an_image"] += not name.endswith(".json")
            continue
        if not stem.startswith("sa_"):
            others.append(name)
            continue
        items.append(
            SourceItem(
                key=stem,
                source="sa1b",
                source_id=stem.removeprefix("sa_"),  # replaced by the json's image_id when present
                ext=ext,
                image=member,
                meta=jsons.get(stem),
            )
        )
    if others and not items:
        raise SourceError(
            f"{unit.url} holds images not named sa_<id> (e.g. {others[0]}): not SA-1B; for img2dataset output use "
            "--source img2dataset, for other images --source folder"
        )
    skipped["not_named_sa_id"] += len(others)
    return apply_damage(items, listing.damaged), +skipped, listing.notes


def sa1b_meta(meta: dict) -> tuple[str | None, dict]:
    """(source id, kept metadata) from an SA-1B json: the `image` object only."""
    image = meta.get("image")
    if not isinstance(image, dict):  # a malformed sidecar: keep the sample, drop the metadata
        return None, {"meta_error": "the json has no `image` object"}
    source_id = str(image["image_id"]) if "image_id" in image else None
    return source_id, {k: image[k] for k in ("image_id", "width", "height", "file_name") if k in image}
