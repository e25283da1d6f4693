"""What the static report shows besides Table 1: every stage's counts, and a gallery sampled across the output.

Both read only what is small: the done markers (one per shard) for the counts, and a few index columns one shard
at a time for the gallery, keeping at most `limit` candidates per stratum (status x aspect-ratio bucket), so the
driver's memory does not grow with the samples. The gallery's images are read by the member offsets ingest
records (one byte range each).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import itertools
from dataclasses import dataclass, field
from typing import Any

from curation.layout import Layout
from curation.records import OK
from curation.runner.summary import RunSummary
from curation.shards import StageDir

GALLERY_LIMIT = 300  # all samples of an output this small; a stratified sample of this many otherwise
THUMB = 160


@dataclass
class StageCounts:
    """One stage folder's totals over its done markers."""

    label: str  # "images", "dedup", "captions-alttext", "features/t5"
    shards: int
    rows: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def stage_counts(layout: Layout) -> list[StageCounts]:
    """Every stage folder of the output that has done shards, in pipeline order."""
    folders: list[tuple[str, StageDir]] = [
        ("images", layout.images),
        ("dedup", layout.dedup),
        ("size-filter", layout.stage_folder("size-filter")),
        ("quality", layout.quality),
        ("quality/flags-images", layout.quality_flags("images")),
        ("quality/flags-texts", layout.quality_flags("texts")),
    ]
    sets = layout.caption_sets()
    folders += [(layout.captions_folder(s), layout.captions(s)) for s in sets]
    folders += [(layout.stats(s).url.rstrip("/").rsplit("/", 1)[-1], layout.stats(s)) for s in sets]
    folders.append(("stats-original", layout.stats_original))
    base = StageDir(layout.features)
    if base.fs.exists(base.root):
        for path in sorted(base.fs.ls(base.root, detail=False)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            folders.append((f"features/{name}", layout.sidecar(name)))
    folders.append(("select", layout.stage_folder("select")))
    out = []
    for label, folder in folders:
        shards = folder.done_shards()
        if not shards:
            continue
        total = RunSummary(label, len(shards), 0)
        for marker in folder.read_dones(shards).values():
            total.add(marker)
        out.append(StageCounts(label, len(shards), total.samples, {k: v for k, v in total.counts.items() if v}))
    return out


def _rank(key: str) -> int:
    """A stable pseudo-random rank: the same output always shows the same gallery."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def sample_gallery(layout: Layout, limit: int = GALLERY_LIMIT) -> list[dict[str, Any]]:
    """Up to `limit` samples, failed and skipped ones included, spread evenly over (status, bucket) strata.

    Items: {"key", "status", "reason", "bucket", "thumbnail" (JPEG bytes or b""), "original", "captions":
    {set: (caption, caption_status)}}. Reads the first caption set's index (the default set when it exists: its rows
    carry the caption stage's statuses and skips), else the images index.
    """
    sets = layout.caption_sets()
    base = layout.captions(sets[0]) if sets else layout.images
    columns = ["key", "status", "error_reason", "bucket_1024", "original_caption"]
    strata: dict[tuple[str, str], list[tuple[int, str, dict]]] = {}  # heaps of (-rank, ...): the `limit` best
    for shard in base.done_shards():
        for row in base.read_index(shard).select(columns).to_pylist():
            stratum = strata.setdefault((row["status"], row["bucket_1024"] or "-"), [])
            item = (-_rank(row["key"]), row["key"], row | {"shard": shard})
            if len(stratum) < limit:
                heapq.heappush(stratum, item)
            elif item > stratum[0]:
                heapq.heapreplace(stratum, item)
    # Round-robin over the strata, each in rank order, until `limit`: small strata (failures) are all shown. The
    # strata are interleaved by status (each status's first bucket, then each one's second...), so every status
    # has a sample even when there are more strata than places.
    by_status: dict[str, list[list]] = {}
    for (status, _), heap in sorted(strata.items()):
        by_status.setdefault(status, []).append(sorted(heap, reverse=True))
    queues = [q for group in itertools.zip_longest(*by_status.values()) for q in group if q is not None]
    chosen: list[dict] = []
    while len(chosen) < limit and any(queues):
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(q.pop(0)[2])
    chosen.sort(key=lambda r: (r["status"] != OK, r["bucket_1024"] or "", r["key"]))
    return gallery_items(layout, sets, chosen)


def gallery_items(layout: Layout, sets: list[str], rows: list[dict]) -> list[dict[str, Any]]:
    """Gallery items for the chosen rows ({"key", "shard", "status", "error_reason"}, and "bucket_1024" and
    "original_caption" unless the images index is to give them): captions of every set and a thumbnail, reading
    only their shards."""
    from PIL import Image

    from curation.imaging import ImageDecodeError, decode_image

    by_shard: dict[str, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    captions: dict[str, dict[str, tuple[str | None, str | None]]] = {}
    where: dict[str, dict] = {}
    for shard, members in by_shard.items():
        keys = {r["key"] for r in members}
        images = layout.images
        if images.has_done(shard):
            for r in images.read_index(shard).to_pylist():
                if r["key"] in keys:
                    where[r["key"]] = r
        for s in sets:
            folder = layout.captions(s)
            if not folder.has_done(shard):
                continue
            table = folder.read_index(shard).select(["key", "caption", "caption_status"]).to_pylist()
            for r in table:
                if r["key"] in keys:
                    captions.setdefault(r["key"], {})[s] = (r["caption"], r["caption_status"])
    items = []
    for r in rows:
        image = where.get(r["key"], {})
        thumbnail = b""
        if image.get("status") == OK:
            try:
                raw = layout.images.read_member(
                    r["shard"], f"{r['key']}.{image['ext']}", image.get("member_offset"), image.get("member_size")
                )
                picture = decode_image(raw, target_size=(THUMB, THUMB))
                picture.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                picture.save(buf, "JPEG", quality=80)
                thumbnail = buf.getvalue()
            except (ImageDecodeError, FileNotFoundError):
                pass
        items.append(
            {
                "key": r["key"],
                "status": r["status"],
                "reason": r["error_reason"],
                "bucket": r.get("bucket_1024", image.get("bucket_1024")),
                "thumbnail": thumbnail,
                "original": r.get("original_caption", image.get("original_caption")),
                "captions": captions.get(r["key"], {}),
            }
        )
    return items
