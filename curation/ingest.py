"""Ingest stage: a source layout -> `images/` shards (original bytes, sizes from headers, buckets, failures as rows).

Three phases, each run by Ray tasks, so the driver plans source shards and never holds a sample:
1. list: tasks scan the input folder by folder and list each source shard (an img2dataset tar, an SA-1B tar, a
   JourneyDB archive, a folder) into `OUT/listings/units/<unit>.parquet` (keys, member offsets, sizes);
2. keys: partitioned passes over the listings refuse a key that appears twice, before any image shard is written;
3. write: one task per output shard `<unit>-<first key>` reads its slice of a listing, the image headers and bytes.

Each write task's lineage is what its slice was made from (`curation.sources.parts`), so a rerun redoes exactly the
parts whose files changed, and the later stages follow through the lineage they already check.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import fsspec
import fsspec.implementations.local

from curation.errors import SourceError
from curation.imaging import ImageDecodeError, header_size
from curation.layout import Layout
from curation.records import Sample, count_statuses, decode_utf8, escape_surrogates, images_table
from curation.shards import DoneMarker, ShardWriter, StageDir, config_hash, lineage
from curation.sources import SOURCES, SourcePlan, plan_source
from curation.sources.base import Member, SourceItem, load_json, read_members
from curation.sources.listing import read_keys, read_listing
from curation.sources.parts import KEY_CHUNKS, POSITIONAL
from curation.sources.sa1b import sa1b_meta
from curation.stage import Pass, Resources, RowsDone, RunContext, Stage, no_progress

if TYPE_CHECKING:
    from curation.runner import StageRun


@dataclass(frozen=True)
class IngestConfig:
    source: str = field(metadata={"help": "the input's layout", "choices": sorted(SOURCES)})
    input: str = field(metadata={"help": "input folder, archive or fsspec URL"})
    shard_size: int = field(default=1000, metadata={"help": "at most this many samples per output shard"})
    workers: int | None = field(
        default=None, metadata={"help": "tasks at once (default: one per CPU of the cluster)"}
    )  # how fast, not what: not in semantics

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise SourceError("--shard-size must be at least 1")

    def semantics(self, plan: str = KEY_CHUNKS) -> dict:
        """What decides the output's content: a rerun with other values is refused (see runner). `plan`: how the
        input is cut into shards (`curation.sources.parts`), so an output planned another way is not mixed."""
        # `data`, `./data` and `/abs/data` are one input; URLs are kept as given.
        where = self.input if "://" in self.input else os.path.abspath(self.input)
        return {"source": self.source, "input": where, "shard_size": self.shard_size, "plan": plan}


class IngestStage(Stage):
    name = "ingest"
    help = "a source layout -> images/ shards with sizes and aspect-ratio buckets"
    config_type = IngestConfig

    def check(self) -> None:
        check_paths(self.config.input, self.layout.output)

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        """List and check the input's source shards (plain Ray tasks), then write one output shard per task."""
        from curation.runner.planning import refuse_changed_config

        config = self.config
        done = self.layout.images.read_dones(self.layout.images.done_shards())  # one marker per shard
        scheme = self._scheme(done, ctx.force)
        if not ctx.force:  # before the runner removes the shards this plan does not make (another --shard-size)
            refuse_changed_config(self.layout.images.url, done, {config_hash(config.semantics(scheme))})
        plan = plan_source(
            config.source,
            config.input,
            self.layout.listings,
            lambda label, fn, tasks: ctx.map(f"images {label}", fn, tasks, max_in_flight=config.workers),
            shard_size=config.shard_size,
            scheme=scheme,
        )
        if scheme == POSITIONAL:
            self._adopt(plan, done, ctx)
        self.plan = plan
        yield Pass(
            label="images",
            folder=self.layout.images,
            make_worker=functools.partial(IngestWriter, self.layout, config, scheme),
            tasks=plan.shards(),
            semantics=config.semantics(scheme),
            resources=Resources(num_cpus=1, workers=config.workers, stateless=True),
            upstream=plan,
        )

    def _scheme(self, done: dict[str, DoneMarker], force: bool) -> str:
        """An output made before parts were cut by their keys keeps its positional plan, so upgrading redoes nothing;
        --force re-plans it by keys."""
        legacy = config_hash(self.config.semantics(POSITIONAL))
        return POSITIONAL if not force and any(m.config_hash == legacy for m in done.values()) else KEY_CHUNKS

    def _adopt(self, plan: SourcePlan, done: dict[str, DoneMarker], ctx: RunContext) -> None:
        """Done shards made before parts had a lineage: trusted while they hold their part's keys, and given its
        lineage (their own `lineage` kept, so the later stages' shards made from them stay done)."""
        images = self.layout.images
        legacy = [p for p in plan.parts if p.name in done and not done[p.name].input_lineage]
        by_listing: dict[str, list] = {}
        for p in legacy:
            by_listing.setdefault(p.listing, []).append((p.name, p.start, p.stop, p.lineage))
        tasks = [(url.rsplit("/", 1)[-1], (images.url, url, parts)) for url, parts in by_listing.items()]
        if tasks:
            ctx.map("images adopt", adopt_shards, tasks)

    def finish(self, summaries: list) -> list[str]:
        # Input files that are no row, by reason, beside the rows' own tallies; each damaged file named once.
        summaries[-1].tally({"by_skipped": dict(self.plan.skipped)})
        lines = [f"[images] {remark}" for remark in self.plan.remarks]
        lines += [f"[images] damaged input: {note}" for note in self.plan.notes]
        changes = self.plan.changes
        if changes is not None:  # None: a new output, where everything is new
            counts = ", ".join(f"{changes.get(k, 0)} {k}" for k in ("added", "changed", "removed"))
            lines.append(f"[images] input since the last run: {counts} (samples)")
        return lines

    def outputs(self) -> list[str]:
        return [f"images: {self.layout.images.url}/"]


def adopt_shards(images_url: str, listing: str, parts: list[tuple[str, int, int, str]]) -> int:
    """One task per listing: each done shard whose keys are its part's gets the part's lineage; returns how many."""
    stage = StageDir(images_url)
    keys, _ = read_keys(listing)
    adopted = 0
    for shard, start, stop, part_lineage in parts:
        marker = stage.read_done(shard)
        if marker.input_lineage or stage.read_index(shard).column("key").to_pylist() != keys[start:stop]:
            continue  # another part's keys: redone by the runner
        marker.input_lineage = part_lineage
        stage.write_done(marker)
        adopted += 1
    return adopted


class IngestWriter:
    """Writes one output shard; pure CPU work, nothing to set up."""

    def __init__(self, layout: Layout, config: IngestConfig, scheme: str = KEY_CHUNKS) -> None:
        self.stage_dir = layout.images
        self.chash = config_hash(config.semantics(scheme))

    def setup(self) -> None:
        pass

    def process(self, shard: str, part: tuple[str, int, int, str], rows_done: RowsDone = no_progress) -> DoneMarker:
        """One output shard from rows [start, stop) of a unit's listing; `part`: (listing, start, stop, lineage)."""
        listing, start, stop, part_lineage = part
        return self.write(shard, read_listing(listing, start, stop), part_lineage, rows_done)

    def write(
        self, shard: str, items: list[SourceItem], part_lineage: str, rows_done: RowsDone = no_progress
    ) -> DoneMarker:
        wanted: list[Member] = []
        for item in items:
            wanted.extend(m for m in (item.image, item.caption, item.meta) if m is not None)
        rows_done(0, len(items))
        data = dict(read_members(wanted))  # the bulk of the time: the bytes read
        samples, repaired = [], Counter()
        members: dict[str, tuple[int, int]] = {}  # key -> where its image's bytes lie in the tar
        with ShardWriter(self.stage_dir, shard) as writer:
            for item in sorted(items, key=lambda i: i.key):
                sample, image = ingest_item(item, data, repaired)
                samples.append(sample)
                rows_done(len(samples), len(items))
                if image is not None:
                    where = writer.add(sample.key, {sample.ext: image, "json": sample.to_json()})
                    members[sample.key] = where[sample.ext]
            counts = count_statuses(samples) | ({"by_repaired": dict(repaired)} if repaired else {})
            done = DoneMarker(shard, stage="images", **lineage(self.chash, part_lineage), counts=counts)
            return writer.commit(images_table(samples, members), done)


def ingest_item(
    item: SourceItem, data: dict[Member, bytes | Exception], repaired: Counter | None = None
) -> tuple[Sample, bytes | None]:
    """One Sample and the image bytes to keep (None when the sample failed); text that had to be repaired to be
    stored (invalid UTF-8, lone surrogates) is counted in `repaired` by kind."""
    mine: Counter = Counter()
    sample = Sample(
        key=item.key,
        source=item.source,
        source_id=item.source_id,
        ext=item.ext,
        original_caption=item.original_caption,
        source_meta=_meta_text(item.source_meta, mine) if item.source_meta else None,
    )
    image = _image(sample, item, data, mine)
    for name in ("source_id", "original_caption", "error"):
        text, escaped = escape_surrogates(getattr(sample, name))
        if escaped:
            setattr(sample, name, text)
            mine["escaped_text"] += 1
    if repaired is not None:  # counted per sample
        repaired.update({kind: 1 for kind, n in mine.items() if n})
    return sample, image


def _image(sample: Sample, item: SourceItem, data: dict[Member, bytes | Exception], repaired: Counter) -> bytes | None:
    if item.image is None:
        sample.fail(item.unavailable_reason, item.unavailable or "no image")
        return None
    if not _apply_sidecars(sample, item, data, repaired):
        return None
    image = data.get(item.image, FileNotFoundError(f"{item.image} was not read"))
    if isinstance(image, Exception):
        sample.fail("read_error", f"{type(image).__name__}: {image}")
        return None
    try:
        width, height = header_size(image, complete=True)
    except ImageDecodeError as exc:
        sample.fail(exc.reason, str(exc))
        return None
    if width <= 0 or height <= 0:
        sample.fail("empty_image", f"image size is {width}x{height}")
        return None
    sample.set_size(width, height)
    return image


def _apply_sidecars(sample: Sample, item: SourceItem, data: dict[Member, bytes | Exception], repaired: Counter) -> bool:
    """Captions and source metadata. A metadata file that does not parse fails its sample (`bad_sidecar`): it is
    the sample's provenance (url, alt-text, SA-1B's image record). False when the sample failed."""
    if item.caption is not None:
        raw = data.get(item.caption)
        if isinstance(raw, bytes):
            text, invalid = decode_utf8(raw)
            repaired["invalid_utf8"] += invalid
            sample.original_caption = text.strip()
    if item.meta is None:
        return True
    raw = data.get(item.meta)
    name = item.meta.member or item.meta.container
    try:
        meta = load_json(raw) if isinstance(raw, bytes) else {}
    except RecursionError:
        sample.fail("bad_sidecar", f"{name}: JSON nested too deep to read")
        return False
    except ValueError as exc:  # JSONDecodeError, invalid UTF-8, not an object
        sample.fail("bad_sidecar", f"{name}: not a JSON object ({exc})")
        return False
    if item.source == "sa1b":
        source_id, kept = sa1b_meta(meta)
        sample.source_id = source_id or sample.source_id
        sample.source_meta = _meta_text(kept, repaired)
    else:  # img2dataset: url, alt-text and the downloader's own fields
        sample.source_id = str(meta.get("url") or sample.source_id)
        if "caption" in meta:  # the json keeps a null caption null; its .txt holds "" for it
            sample.original_caption = None if meta["caption"] is None else str(meta["caption"])
        sample.source_meta = _meta_text(meta, repaired)
    return True


def _meta_text(meta: dict, repaired: Counter) -> str:
    """Metadata as JSON text; strings that UTF-8 cannot encode (lone surrogates from `\\ud800` escapes) stay
    escaped in the JSON, and are counted."""
    text = json.dumps(meta, ensure_ascii=False, default=str)
    if escape_surrogates(text)[1]:
        repaired["escaped_text"] += 1
        return json.dumps(meta, default=str)  # ASCII: every such character as a \\uXXXX escape
    return text


def run_ingest(output: str, config: IngestConfig, **kw) -> StageRun:
    """`curation ingest` from Python: see `curation.runner.run` for the keywords."""
    from curation.runner import run

    return run(IngestStage(Layout(output), config), **kw)


def check_paths(input_url: str, output: str) -> None:
    """An input that is not there, or an output inside the input (a rerun would ingest its own shards): one line."""
    in_fs, in_path = fsspec.core.url_to_fs(input_url)
    if not in_fs.exists(in_path):
        raise SourceError(f"the input {input_url} does not exist")
    out_fs, out_path = fsspec.core.url_to_fs(output)
    if type(in_fs) is not type(out_fs):
        return
    if isinstance(in_fs, fsspec.implementations.local.LocalFileSystem):
        in_path, out_path = os.path.realpath(in_path), os.path.realpath(out_path)
    if (out_path.rstrip("/") + "/").startswith(in_path.rstrip("/") + "/"):
        raise SourceError(
            f"the output {output} is inside the input {input_url}: a rerun would list the output as input; "
            "choose an output folder outside it"
        )
