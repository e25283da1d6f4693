"""Builders shared by the feature, export and loader tests: caption shards made from real COCO photos."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from PIL import Image

from curation.imaging import header_size
from curation.records import Sample, samples_to_table
from curation.shards import DoneMarker, ShardWriter, StageDir

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
COCO = SHARED / "data" / "coco"

CAPTIONS = [
    "A photo of a dog on a bench in the park.",
    "Two people walking down a busy street at night with neon signs and taxis, seen from above.",
    "A plate of food.",
    "<b>A KITCHEN</b> with white tiles, see https://example.com/kitchen for more",
    "a cat",
]


def tall_jpeg(photo: Path) -> bytes:
    """A real photo cut to 500 x 100 (h/w = 5 > 4): PixArt's trainer drops such entries."""
    with Image.open(photo) as im:
        strip = im.convert("RGB").crop((0, 0, 100, min(im.height, 500))).resize((100, 500))
    buf = io.BytesIO()
    strip.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_caption_shards(output: Path, n_ok: int = 6, per_shard: int = 5) -> dict[str, str]:
    """Write OUT/images shards as ingest does (the bytes) and OUT/captions shards as the caption stage does (text and
    records only); returns {key: expected outcome}.

    Outcomes: "ok", "tall" (h/w = 5), "failed_upstream", "no_caption" (has an original caption only),
    "corrupt" (unreadable bytes).
    """
    photos = sorted(COCO.glob("*.jpg"))
    items: list[tuple[Sample, bytes | None, str]] = []
    for i, photo in enumerate(photos[:n_ok]):
        data = photo.read_bytes()
        s = Sample(key=f"coco_{photo.stem}", source="folder", source_id=photo.name, ext="jpg")
        s.set_size(*header_size(data))
        s.original_caption = f"alt text {i}"
        s.caption, s.caption_status = CAPTIONS[i % len(CAPTIONS)], "ok"
        items.append((s, data, "ok"))
    tall = tall_jpeg(photos[n_ok])
    s = Sample(
        key="zz_tall",
        source="folder",
        source_id="tall.jpg",
        ext="jpg",
        caption="a tall strip",
        original_caption="tall",
    )
    s.set_size(*header_size(tall))
    items.append((s, tall, "tall"))
    s = Sample(key="zz_failed", source="folder", source_id="x.jpg", ext="jpg")
    s.fail("truncated_image", "image file is truncated")
    items.append((s, None, "failed_upstream"))
    data = photos[n_ok + 1].read_bytes()
    s = Sample(key="zz_nocaption", source="folder", source_id="n.jpg", ext="jpg", original_caption="alt")
    s.set_size(*header_size(data))
    items.append((s, data, "no_caption"))
    s = Sample(
        key="zz_corrupt",
        source="folder",
        source_id="c.jpg",
        ext="jpg",
        caption="a broken file",
        original_caption="broken",
    )
    s.set_size(640, 480)
    items.append((s, b"\xff\xd8\xff\xe0 not a jpeg at all", "corrupt"))

    images, captions = StageDir(str(output / "images")), StageDir(str(output / "captions"))
    items.sort(key=lambda item: item[0].key)
    for start in range(0, len(items), per_shard):
        chunk, shard = items[start : start + per_shard], f"{start // per_shard:05d}"
        ingested = [dataclasses.replace(s, caption=None, caption_status=None) for s, _, _ in chunk]
        with ShardWriter(images, shard) as writer:
            for sample, (_, data, _) in zip(ingested, chunk, strict=True):
                if data is not None:
                    writer.add(sample.key, {sample.ext: data, "json": sample.to_json()})
            writer.commit(samples_to_table(ingested), DoneMarker(shard, stage="images", lineage=f"images-{shard}"))
        with ShardWriter(captions, shard) as writer:
            for sample, data, _ in chunk:
                if data is not None and sample.caption is not None:
                    writer.add(sample.key, {"txt": sample.caption.encode(), "json": sample.to_json()})
            done = DoneMarker(shard, stage="captions", config_hash="x", lineage=f"captions-{shard}")
            writer.commit(samples_to_table([s for s, _, _ in chunk]), done)
    return {s.key: outcome for s, _, outcome in items}


def make_named_set(output: Path, name: str, no_original: frozenset[str] = frozenset()) -> dict[str, str]:
    """Write OUT/captions-<name> beside `make_caption_shards`' shards, as `curation caption --name` does (text and
    records only); keys in `no_original` are failed rows (reason no_original). Returns {key: caption} of the rest."""
    captions, named = StageDir(str(output / "captions")), StageDir(str(output / f"captions-{name}"))
    texts: dict[str, str] = {}
    for shard in captions.done_shards():
        rows = [Sample.from_dict(r) for r in captions.read_index(shard).to_pylist()]
        with ShardWriter(named, shard) as writer:
            for s in rows:
                if s.status != "ok":
                    continue
                if s.key in no_original:
                    s.fail("no_original", "prompt template needs {original}")
                    continue
                s.caption = f"{name} caption of {s.key}: a detailed scene with a red boat and two trees"
                texts[s.key] = s.caption
                writer.add(s.key, {"txt": s.caption.encode(), "json": s.to_json()})
            done = DoneMarker(shard, stage=f"captions-{name}", lineage=f"{shard}-{sorted(no_original)}")
            writer.commit(samples_to_table(rows), done)
    return texts


def write_features(output: Path, config) -> list[DoneMarker]:
    """Every captions shard's feature sidecars, written in this process by one worker (no Ray)."""
    from curation.features.stage import FeaturesWorker
    from curation.layout import Layout

    layout = Layout(str(output))
    worker = FeaturesWorker(layout, config)
    worker.setup()
    return [worker.process(shard) for shard in layout.images.done_shards()]
