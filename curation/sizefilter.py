"""Size filter stage: `images/` -> `size-filter/` keep flags for images too small or too elongated to train on.

    curation size-filter --output OUT --min-side 512 [--max-aspect 4]

LAION-style sources hold many thumbnails: a 200 px image upsampled into a 512 or 1024 bucket teaches blur. An image
whose long side is more than `max_aspect` times its short side lies beyond PixArt's widest bucket (1:4), so its
bucket's centre crop throws most of it away. Sizes come from ingest's header read: nothing is decoded.

This stage is also the worked example of the stage contract (`curation.stage`): it is this module plus one line in
`curation.registry`. Its `SampleFilter` is found through the registry and applies to every stage after this one
(dedup on), so caption, stats, features and the exports skip the removed samples (skipped rows, reason `too_small`,
unless `--include too_small`) with no edit to them, and redo exactly the shards whose removals change when the
thresholds do.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from curation.errors import ConfigError
from curation.layout import Layout
from curation.records import OK
from curation.shards import DoneMarker, StageDir, config_hash, lineage
from curation.stage import (
    KeepFlags,
    Needs,
    Pass,
    Resources,
    RowsDone,
    RunContext,
    Stage,
    keep_flags_extra,
    needs_images,
    no_progress,
)

NAME = "size-filter"
TOO_SMALL = "too_small"

INDEX = pa.schema(
    [
        ("key", pa.string()),
        ("keep", pa.bool_()),  # false: later stages skip the sample
        ("reason", pa.string()),  # too_small when not kept; null when kept
        ("detail", pa.string()),  # why, in one line ("short side 120 px < 512"); null when kept
    ]
)


@dataclass(frozen=True)
class SizeFilterConfig:
    min_side: int = field(default=512, metadata={"help": "keep images whose shorter side has at least this many px"})
    max_aspect: float = field(
        default=4.0, metadata={"help": "keep images whose long side is at most this many times the short side"}
    )

    def __post_init__(self) -> None:
        if self.min_side < 1 or self.max_aspect < 1:
            raise ConfigError("--min-side must be at least 1 and --max-aspect at least 1")

    def semantics(self) -> dict:
        return {"min_side": self.min_side, "max_aspect": self.max_aspect}


def verdict(width: int, height: int, config: SizeFilterConfig) -> str | None:
    """Why an image of `width` x `height` is not kept, or None when it is."""
    short, long = min(width, height), max(width, height)
    if short < config.min_side:
        return f"short side {short} px < {config.min_side}"
    if long > config.max_aspect * short:
        return f"aspect {long / short:.2f} > {config.max_aspect:g}"
    return None


class SizeFilterWorker:
    def __init__(self, layout: Layout, config: SizeFilterConfig) -> None:
        self.layout, self.config = layout, config

    def setup(self) -> None:
        pass

    def process(self, shard: str, _payload: None = None, rows_done: RowsDone = no_progress) -> DoneMarker:
        images = self.layout.images
        rows = []
        for r in images.read_index(shard).select(["key", "status", "width", "height"]).to_pylist():
            # Failed samples are dropped by every stage already: kept here, so the filter only counts its own.
            why = verdict(r["width"], r["height"], self.config) if r["status"] == OK else None
            rows.append({"key": r["key"], "keep": why is None, "reason": TOO_SMALL if why else None, "detail": why})
        removed = sorted(r["key"] for r in rows if not r["keep"])
        extra = keep_flags_extra(self.layout, shard, ["images"], removed)
        folder = self.layout.stage_folder(NAME)
        index = folder.write_index(shard, pa.Table.from_pylist(rows, schema=INDEX))  # index first, done marker last
        done = DoneMarker(
            shard,
            stage=NAME,
            rows=len(rows),
            **lineage(config_hash(self.config.semantics()), extra["reads"]["images"]),
            counts={"by_size_filter": {"kept": len(rows) - len(removed), "removed": len(removed)}},
            files={f"{shard}.parquet": index},
            extra=extra,
        )
        return folder.write_done(done)


class _Images:
    """The images shards as this stage's upstream."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def lineages(self, shards: list[str]) -> dict[str, str]:
        return {s: m.upstream for s, m in self.layout.images.read_dones(shards).items()}


class SizeFilter(KeepFlags):
    reasons = (TOO_SMALL,)
    applies_after = NAME

    def folder(self) -> StageDir:
        return self.layout.stage_folder(NAME)

    def entry(self, row: dict) -> tuple[str, str]:
        return TOO_SMALL, row.get("detail", row["reason"])  # flags made before `detail` kept it in `reason`


class SizeFilterStage(Stage):
    name = NAME
    help = "images/ -> size-filter/: leave out images too small or too elongated to train on"
    config_type = SizeFilterConfig
    sample_filters = (SizeFilter,)

    def needs(self) -> list[Needs]:
        return [needs_images(self.layout)]

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        shards = self.layout.images.done_shards()
        yield Pass(
            label=NAME,
            folder=self.layout.stage_folder(NAME),
            make_worker=functools.partial(SizeFilterWorker, self.layout, self.config),
            tasks=[(s, None) for s in shards],
            semantics=self.config.semantics(),
            resources=Resources(stateless=True),
            upstream=_Images(self.layout),
        )

    def outputs(self) -> list[str]:
        return [f"{NAME}: {self.layout.stage_folder(NAME).url}/"]
