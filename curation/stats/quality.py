"""The report's quality section, from `quality/` (written by `curation quality`): what the scores look like.

Map then merge, as Table 1: a Ray task per quality shard reduces it to a `QualityPartial` of fixed size (a
histogram per score with fixed bins, a count and a sum per score and per aspect-ratio bucket, the shard's `TOP_K`
highest and lowest aesthetic scores), and the driver adds the partials up, so it holds nothing per sample. The
counts removed by each quality threshold and by `curation select` come from their flags' done markers.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curation.layout import Layout
from curation.records import OK
from curation.shards import StageDir

AESTHETIC, NSFW, CLIP = "aesthetic", "nsfw", "clip_score_"
QUALITY_STAGES = ("quality", "select")  # the stages whose keep flags are score thresholds
TOP_K = 12  # images in each of the highest / lowest aesthetic galleries
# Fixed histogram ranges, so the same score reads the same in every report: the LAION aesthetic predictor's 1-10
# scale (its MLP is not bounded: values beyond either end are counted in the end bins), the NSFW detector's
# probability, and CLIPScore's 0-100. Bins: (low, high, count).
RANGES = {AESTHETIC: (1.0, 10.0, 36), NSFW: (0.0, 1.0, 20), CLIP: (0.0, 100.0, 50)}


def score_range(column: str) -> tuple[float, float, int]:
    return RANGES[CLIP] if column.startswith(CLIP) else RANGES[column]


def histogram(column: str, values: np.ndarray) -> list[int]:
    """A score's counts in its fixed bins, values beyond the range counted in the end bins."""
    low, high, bins = score_range(column)
    return np.histogram(np.clip(values, low, high), bins=bins, range=(low, high))[0].astype(int).tolist()


@dataclass
class Score:
    """One score column over the scored samples: count, sum and fixed-bin histogram."""

    count: int = 0
    total: float = 0.0
    hist: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def add(self, other: Score) -> None:
        self.count += other.count
        self.total += other.total
        self.hist = [a + b for a, b in zip(self.hist, other.hist, strict=True)] if self.hist else list(other.hist)


@dataclass
class QualityPartial:
    """What the report needs of some quality shards; `merge` adds another's."""

    scores: dict[str, Score] = field(default_factory=dict)  # aesthetic, nsfw, clip_score_<set>
    truncated: dict[str, int] = field(default_factory=dict)  # {caption field: texts longer than CLIP's 77 tokens}
    buckets: dict[str, Score] = field(default_factory=dict)  # aesthetic per aspect-ratio bucket (no histogram)
    top: list[tuple[float, str, str]] = field(default_factory=list)  # (aesthetic, key, shard), best first
    bottom: list[tuple[float, str, str]] = field(default_factory=list)  # lowest first

    def merge(self, other: QualityPartial) -> None:
        for mine, theirs in ((self.scores, other.scores), (self.buckets, other.buckets)):
            for name, score in theirs.items():
                mine.setdefault(name, Score()).add(score)
        for name, n in other.truncated.items():
            self.truncated[name] = self.truncated.get(name, 0) + n
        self.top = highest(self.top + other.top)
        self.bottom = lowest(self.bottom + other.bottom)


def highest(picks: list[tuple[float, str, str]]) -> list[tuple[float, str, str]]:
    """The TOP_K highest scores, ties by key (so the gallery does not depend on the shards' order)."""
    return heapq.nsmallest(TOP_K, picks, key=lambda p: (-p[0], p[1]))


def lowest(picks: list[tuple[float, str, str]]) -> list[tuple[float, str, str]]:
    return heapq.nsmallest(TOP_K, picks, key=lambda p: (p[0], p[1]))


def shard_partial(layout: Layout, shard: str) -> QualityPartial:
    """One quality shard reduced (a Ray task): its rows with `status` ok and the score present."""
    table = layout.quality.read_index(shard)
    ok = np.asarray(table.column("status").to_pylist(), dtype=object) == OK
    columns = [c for c in table.column_names if c in (AESTHETIC, NSFW) or c.startswith(CLIP)]
    part = QualityPartial()
    for column in columns:
        values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls: NaN
        scored = ok & ~np.isnan(values)
        v = values[scored]
        part.scores[column] = Score(int(v.size), float(v.sum()), histogram(column, v))
    for column in table.column_names:
        if column.startswith("text_truncated_"):
            flags = np.asarray(table.column(column).to_pylist(), dtype=object)
            part.truncated[column.removeprefix("text_truncated_")] = int(np.sum(ok & (flags == True)))  # noqa: E712
    if AESTHETIC in columns:
        values = table.column(AESTHETIC).to_numpy(zero_copy_only=False).astype(np.float64)
        keys, buckets = table.column("key").to_pylist(), table.column("bucket").to_pylist()
        picks = []
        for i in np.flatnonzero(ok & ~np.isnan(values)):
            bucket = part.buckets.setdefault(str(buckets[i]), Score())
            bucket.count += 1
            bucket.total += float(values[i])
            picks.append((float(values[i]), keys[i], shard))
        part.top, part.bottom = highest(picks), lowest(picks)
    return part


def merged_partials(ctx: Any, layout: Layout) -> QualityPartial | None:
    """Every done quality shard's partial, merged as the tasks finish; None when the output has no quality scores."""
    shards = layout.quality.done_shards()
    if not shards:
        return None
    total = QualityPartial()
    ctx.map(
        "report/quality",
        shard_partial,
        [(s, (layout, s)) for s in shards],
        on_result=lambda _shard, part: total.merge(part),
        keep_results=False,
    )
    return total


@dataclass
class QualitySection:
    """What `write_report` shows of the quality scores."""

    partial: QualityPartial
    top: list[dict[str, Any]]  # gallery items (`overview.gallery_items`) with their "score", highest first
    bottom: list[dict[str, Any]]  # lowest first
    removed: list[tuple[str, str, int]]  # `removed_by_threshold`
    clip_by_row: dict[str, float | None]  # {Table 1 row name: mean CLIP score of its captions}


def quality_section(ctx: Any, layout: Layout, row_fields: dict[str, str]) -> QualitySection | None:
    """The section of an output with `quality/` (None without): `row_fields` maps each Table 1 row's name to the
    caption field it counts ("original", a set's name)."""
    from curation.stats.overview import gallery_items

    partial = merged_partials(ctx, layout)
    if partial is None:
        return None

    def items(picks: list[tuple[float, str, str]]) -> list[dict[str, Any]]:
        rows = [{"key": key, "shard": shard, "status": OK, "error_reason": None} for _, key, shard in picks]
        found = gallery_items(layout, layout.caption_sets(), rows)
        return [item | {"score": score} for item, (score, _, _) in zip(found, picks, strict=True)]

    means = clip_means(partial)
    return QualitySection(
        partial,
        items(partial.top),
        items(partial.bottom),
        removed_by_threshold(layout),
        {row: means.get(f) for row, f in row_fields.items()},
    )


def score_field(column: str) -> str:
    """The caption field a clip score column scores (`clip_score_dense` -> "dense")."""
    return column.removeprefix(CLIP)


def clip_means(partial: QualityPartial) -> dict[str, float | None]:
    """{caption field ("original", a set's name): mean CLIP score of its captions}."""
    return {score_field(c): s.mean for c, s in partial.scores.items() if c.startswith(CLIP)}


def removed_by_threshold(layout: Layout) -> list[tuple[str, str, int]]:
    """(flags folder, reason, samples removed) of each registered filter that scores quality (its reasons named in
    its done markers' counts): the quality thresholds and `curation select`."""
    from curation.registry import stage_classes

    out = []
    for stage in stage_classes():
        if stage.name not in QUALITY_STAGES:
            continue
        for kind in stage.sample_filters:
            reasons = set(kind.reasons)
            folder: StageDir = kind(layout).folder()
            shards = folder.done_shards()
            if not shards:
                continue
            totals: dict[str, int] = {}
            for marker in folder.read_dones(shards).values():
                for tally in marker.counts.values():
                    for reason, n in tally.items():
                        if reason in reasons:
                            totals[reason] = totals.get(reason, 0) + n
            where = folder.url.rstrip("/").removeprefix(layout.root + "/")
            out += [(where, reason, totals.get(reason, 0)) for reason in sorted(reasons)]
    return out
