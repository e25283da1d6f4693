"""`OUT/report/duplicates.html`: duplicate groups as thumbnails side by side, with each member's distance to the
kept one, closest calls first, so a person can judge the threshold. Reads only the images of the groups shown."""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING

from curation.imaging import ImageDecodeError, decode_image
from curation.shards import StageDir, write_bytes_atomic

if TYPE_CHECKING:
    from curation.dedup.stage import DedupResult
    from curation.layout import Layout

MAX_GROUPS = 60
THUMB = 160


def _thumbnails(images: StageDir, wanted: dict[str, str]) -> dict[str, str]:
    """key -> PNG data URI for `wanted` ({key: images shard}), reading each needed shard once."""
    from PIL import Image

    by_shard: dict[str, set[str]] = {}
    for key, shard in wanted.items():
        by_shard.setdefault(shard, set()).add(key)
    out = {}
    for shard, keys in by_shard.items():
        exts = {r["key"]: r["ext"] for r in images.read_index(shard).select(["key", "ext"]).to_pylist()}
        for key, members in images.iter_samples(shard):
            if key not in keys:
                continue
            try:
                image = decode_image(members[exts[key]], target_size=(THUMB, THUMB))
            except ImageDecodeError:
                continue
            image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
            png = io.BytesIO()
            image.save(png, "PNG")
            out[key] = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    return out


def write_duplicates_report(layout: Layout, result: DedupResult) -> str:
    """Write the page (`layout.report("duplicates.html")`); returns its URL."""
    from curation.dedup.stage import group_members

    members, groups = group_members(result.edges)
    shards = layout.images.done_shards()
    info: dict[int, tuple[str, int]] = {}  # sample id -> key, area
    edges = result.edges
    for end in "ab":
        for node, key, area in zip(
            edges.column(end).to_pylist(),
            edges.column(f"key_{end}").to_pylist(),
            edges.column(f"area_{end}").to_pylist(),
            strict=True,
        ):
            info[node] = (key, area)
    # Closest calls first: the group whose farthest member is nearest the threshold tells most about it.
    shown = sorted(groups, key=lambda ids: (-max(members[n].distance for n in ids), -len(ids)))[:MAX_GROUPS]
    thumbs = _thumbnails(layout.images, {info[n][0]: shards[n >> 32] for ids in shown for n in ids})
    rows = []
    for ids in shown:
        cells = []
        for n in ids:
            key, area = info[n]
            m = members[n]
            label = "kept" if m.keep else f"distance {m.distance}" + (" (identical bytes)" if m.exact else "")
            img = f'<img src="{thumbs[key]}" alt="{html.escape(key)}">' if key in thumbs else "<i>unreadable</i>"
            cells.append(
                f"<figure class={'kept' if m.keep else 'dup'}>{img}<figcaption>{html.escape(key)}<br>"
                f"{label}<br>{area:,} px</figcaption></figure>"
            )
        rows.append(f"<div class=group>{''.join(cells)}</div>")
    by_distance: dict[int, int] = {}
    for d in edges.column("distance").to_pylist():
        by_distance[d] = by_distance.get(d, 0) + 1
    histogram = ", ".join(f"{d}: {n}" for d, n in sorted(by_distance.items())) or "none"
    page = f"""<!doctype html><meta charset=utf-8><title>Duplicate groups</title>
<style>body{{font-family:sans-serif;margin:2em}} .group{{display:flex;gap:8px;margin:12px 0;padding:8px;
border-bottom:1px solid #ccc}} figure{{margin:0;width:{THUMB}px;font-size:12px}} .kept img{{outline:3px solid #2a2}}
.dup img{{outline:3px solid #c33}}</style>
<h1>Duplicate groups</h1>
<p>Threshold: pHash Hamming distance &le; {result.threshold} bits. {len(groups)} group(s); {result.removed} of
{result.samples} samples removed ({result.exact} byte-identical). Green: the kept member (largest image, ties to
the smallest key); red: removed, with its distance to the kept member. Showing {len(shown)} group(s), those whose
farthest member is closest to the threshold first. If removed images here are not the same picture, lower the
threshold (<code>curation dedup --threshold N --force</code>).</p>
<p>Pairs found by distance: {histogram}</p>
{"".join(rows)}
"""
    url = layout.report("duplicates.html")
    write_bytes_atomic(url, page.encode())
    return url
