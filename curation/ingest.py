"""Ingest stage: a source layout -> `images/` shards (original bytes, sizes from headers, buckets, failures as rows)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from curation.imaging import ImageDecodeError, header_size
from curation.records import Sample, count_statuses, samples_to_table
from curation.shards import ShardWriter, StageDir, config_hash, lineage
from curation.sources.base import Member, SourceItem, load_json, read_members
from curation.sources.sa1b import sa1b_meta

STAGE = "images"


@dataclass(frozen=True)
class IngestConfig:
    source: str
    input: str
    shard_size: int = 1000

    def semantics(self) -> dict:
        """What decides the output's content: a rerun with other values is refused (see runner)."""
        # `data`, `./data` and `/abs/data` are one input; URLs are kept as given.
        where = self.input if "://" in self.input else os.path.abspath(self.input)
        return {"source": self.source, "input": where, "shard_size": self.shard_size}


def plan_shards(items: list[SourceItem], shard_size: int) -> list[tuple[str, list[SourceItem]]]:
    """Consecutive groups of `shard_size` items in listing order (sources list deterministically)."""
    if shard_size < 1:
        raise ValueError("shard size must be at least 1")
    return [(f"{i // shard_size:05d}", items[i : i + shard_size]) for i in range(0, len(items), shard_size)]


class IngestStage:
    """Pure CPU work; `setup` has nothing to load."""

    def __init__(self, output: str, config: IngestConfig) -> None:
        self.stage_dir = StageDir(f"{output.rstrip('/')}/{STAGE}")
        self.config = config

    def setup(self) -> None:
        pass

    def process(self, shard: str, items: list[SourceItem]) -> dict:
        wanted: list[Member] = []
        for item in items:
            wanted.extend(m for m in (item.image, item.caption, item.meta) if m is not None)
        data = dict(read_members(wanted))
        samples = []
        with ShardWriter(self.stage_dir, shard) as writer:
            for item in sorted(items, key=lambda i: i.key):
                sample, image = ingest_item(item, data)
                samples.append(sample)
                if image is not None:
                    writer.add(sample.key, {sample.ext: image, "json": sample.to_json()})
            done = {
                "stage": STAGE,
                **lineage(config_hash(self.config.semantics()), None),
                **count_statuses(samples),
            }
            return writer.commit(samples_to_table(samples), done)


def ingest_item(item: SourceItem, data: dict[Member, bytes | Exception]) -> tuple[Sample, bytes | None]:
    """One Sample and the image bytes to keep (None when the sample failed)."""
    sample = Sample(
        key=item.key,
        source=item.source,
        source_id=item.source_id,
        ext=item.ext,
        original_caption=item.original_caption,
        source_meta=json.dumps(item.source_meta) if item.source_meta else None,
    )
    if item.image is None:
        sample.fail("missing_image", item.unavailable or "no image")
        return sample, None
    _apply_sidecars(sample, item, data)
    image = data.get(item.image, FileNotFoundError(f"{item.image} was not read"))
    if isinstance(image, Exception):
        sample.fail("read_error", f"{type(image).__name__}: {image}")
        return sample, None
    try:
        width, height = header_size(image)
    except ImageDecodeError as exc:
        sample.fail(exc.reason, str(exc))
        return sample, None
    if width <= 0 or height <= 0:
        sample.fail("empty_image", f"image size is {width}x{height}")
        return sample, None
    sample.set_size(width, height)
    return sample, image


def _apply_sidecars(sample: Sample, item: SourceItem, data: dict[Member, bytes | Exception]) -> None:
    """Captions and source metadata; a broken sidecar is noted in source_meta, it does not fail the image."""
    if item.caption is not None:
        raw = data.get(item.caption)
        if isinstance(raw, bytes):
            sample.original_caption = raw.decode("utf-8", errors="replace").strip()
    if item.meta is None:
        return
    raw = data.get(item.meta)
    try:
        meta = load_json(raw) if isinstance(raw, bytes) else {}
    except ValueError as exc:
        sample.source_meta = json.dumps({"meta_error": f"unreadable {item.meta.member or item.meta.container}: {exc}"})
        return
    if item.source == "sa1b":
        source_id, kept = sa1b_meta(meta)
        sample.source_id = source_id or sample.source_id
        sample.source_meta = json.dumps(kept)
    else:  # img2dataset: url, alt-text and the downloader's own fields
        sample.source_id = str(meta.get("url") or sample.source_id)
        if sample.original_caption is None and meta.get("caption") is not None:
            sample.original_caption = str(meta["caption"])
        sample.source_meta = json.dumps(meta, ensure_ascii=False, default=str)


def run_ingest(
    output: str,
    config: IngestConfig,
    *,
    ray_address: str | None = None,
    force: bool = False,
    progress: bool = True,
):
    """List the source on the driver (cheap), then ingest its shards on Ray."""
    from curation.runner import Resources, run_stage
    from curation.sources import list_source

    items = list_source(config.source, config.input)
    return run_stage(
        output=output,
        stage_dir=StageDir(f"{output.rstrip('/')}/{STAGE}"),
        make_stage=lambda: IngestStage(output, config),
        tasks=plan_shards(items, config.shard_size),
        semantics=config.semantics(),
        resources=Resources(num_cpus=1),
        ray_address=ray_address,
        force=force,
        progress=progress,
    )
