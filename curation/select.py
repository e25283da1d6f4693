"""Select stage: `quality/` scores -> `select/` keep flags, PixArt's stage-3 style subset of the best-looking images.

    curation select --output OUT --top-aesthetic 10 [--per bucket|all]

keeps the top 10% by aesthetic score within each aspect-ratio bucket (`--per all`: across the output), so every
bucket keeps its share instead of the most photogenic aspect ratio taking the subset. The others become keep flags
(reason `not_selected`) that every export honours through the filter contract.

The cut is exact and the driver holds nothing per sample. Scores are float32, ranked by their bits read as an
order-preserving uint32. Round 1: a Ray task per shard returns, per bucket, a histogram of the high 16 bits of its
ranked samples' keys; the driver finds the bin holding each bucket's k-th best score (k = ceil(PCT% of the bucket's
ranked samples)). Round 2: per shard, a histogram of the low 16 bits inside that bin; the driver reads the k-th
best score off it. Each histogram has 65,536 bins, a fixed size per bucket whatever the number of samples. Ties at
the cut are all kept (score >= cut), so a bucket may keep a little more than k.

A sample is ranked when its quality row has an aesthetic score and no earlier filter (dedup, the size filter, the
quality thresholds) removes it; everything else is flagged too (an export given `--include duplicate` must not
bring back samples that were never ranked), but the earlier filter's reason is the one later stages report.
A new PCT or `--per` rewrites the flags without `--force` (the cuts are in each shard's lineage), and later stages
redo only the shards whose removals changed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa

from curation.errors import ConfigError, SetupError
from curation.layout import Layout
from curation.records import OK
from curation.shards import DoneMarker, StageDir, config_hash, lineage, write_json_atomic
from curation.stage import (
    InputView,
    KeepFlags,
    Needs,
    Pass,
    Resources,
    RowsDone,
    RunContext,
    Stage,
    check_include,
    include_field,
    keep_flags_extra,
    needs_images,
    no_progress,
)

NAME = "select"
NOT_SELECTED = "not_selected"
SCORE = "aesthetic"
ALL = "all"  # the one group of --per all
BINS = 1 << 16

INDEX = pa.schema(
    [
        ("key", pa.string()),
        ("keep", pa.bool_()),  # false: the exports leave the sample out
        ("reason", pa.string()),  # not_selected, null when kept
        ("detail", pa.string()),  # one line: the score and the cut, or why the sample was not ranked
    ]
)


@dataclass(frozen=True)
class SelectConfig:
    top_aesthetic: float = field(metadata={"help": "keep the top PCT percent by aesthetic score (0 < PCT <= 100)"})
    per: str = field(
        default="bucket",
        metadata={
            "help": "rank within each aspect-ratio bucket, or across the whole output",
            "choices": ["bucket", ALL],
        },
    )
    include: tuple[str, ...] = include_field("rank")  # not in semantics: in the lineage

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", check_include(self.include))
        if not 0 < self.top_aesthetic <= 100:
            raise ConfigError(f"--top-aesthetic {self.top_aesthetic:g}: a percentage above 0 and at most 100")
        if self.per not in ("bucket", ALL):
            raise ConfigError(f"--per {self.per!r}: bucket or {ALL}")

    def wanted(self, n: int) -> int:
        """How many of `n` ranked samples the top PCT% are: ceil, computed in decimal (10% of 30 is 3, not 4)."""
        return math.ceil(Decimal(repr(self.top_aesthetic)) * n / 100)


def order_keys(scores: np.ndarray) -> np.ndarray:
    """float32 scores as uint32 keys in the same order (negative floats' bits reversed, positive ones' sign set)."""
    bits = (np.asarray(scores, np.float32) + np.float32(0)).view(np.uint32)  # + 0: -0.0 ranks as 0.0
    return np.where(bits & 0x80000000, ~bits, bits | 0x80000000).astype(np.uint32)


def score_of(key: int) -> float:
    """The float32 score whose order key is `key`."""
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def ranked(layout: Layout, view: InputView, shard: str, per: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The shard's quality rows, and the aesthetic scores of its ranked samples by group (bucket, or `all`)."""
    rows = layout.quality.read_index(shard).select(["key", "status", "bucket", SCORE]).to_pylist()
    removed = view.removed(shard)
    groups: dict[str, list[float]] = {}
    for r in rows:
        score = r[SCORE]
        r["ranked"] = r["status"] == OK and r["key"] not in removed and score is not None and not math.isnan(score)
        r["group"] = ALL if per == ALL else str(r["bucket"])
        if r["ranked"]:
            groups.setdefault(r["group"], []).append(score)
    return rows, {g: np.asarray(s, np.float32) for g, s in groups.items()}


def _histogram(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, counts = np.unique(keys, return_counts=True)
    return values.astype(np.uint16), counts.astype(np.int64)


def high_histograms(layout: Layout, view: InputView, shard: str, per: str) -> dict[str, tuple]:
    """Round 1 (a Ray task): {group: (high 16 bits present, their counts)} of the shard's ranked scores."""
    return {g: _histogram(order_keys(s) >> 16) for g, s in ranked(layout, view, shard, per)[1].items()}


def low_histograms(layout: Layout, view: InputView, shard: str, per: str, bins: dict[str, int]) -> dict[str, tuple]:
    """Round 2 (a Ray task): {group: (low 16 bits present, their counts)} of the ranked scores in the group's bin."""
    out = {}
    for g, s in ranked(layout, view, shard, per)[1].items():
        keys = order_keys(s)
        inside = keys[(keys >> 16) == bins[g]] if g in bins else keys[:0]
        out[g] = _histogram(inside & 0xFFFF)
    return out


class _Histograms:
    """The shards' sparse histograms summed, as the tasks finish, into one dense histogram per group: a fixed size
    whatever the number of shards or samples."""

    def __init__(self) -> None:
        self.groups: dict[str, np.ndarray] = {}

    def add(self, _shard: str, partial: dict[str, tuple]) -> None:
        for g, (values, counts) in partial.items():
            self.groups.setdefault(g, np.zeros(BINS, np.int64))[values] += counts


def _merged(ctx: RunContext, label: str, fn: Any, tasks: list[tuple[str, tuple]]) -> dict[str, np.ndarray]:
    total = _Histograms()
    ctx.map(label, fn, tasks, on_result=total.add, keep_results=False)
    return total.groups


def _kth_from_top(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(the bin holding the k-th highest value, how many values above that bin)."""
    from_top = np.cumsum(hist[::-1])
    i = int(np.searchsorted(from_top, k))
    return BINS - 1 - i, int(from_top[i] - hist[BINS - 1 - i])


@dataclass(frozen=True)
class Cut:
    """One group's outcome: its ranked samples, how many score at least `cut`, and the cut."""

    count: int
    kept: int
    cut: float


def find_cuts(ctx: RunContext, layout: Layout, view: InputView, config: SelectConfig, shards: list[str]) -> dict:
    """{group: Cut}: the two histogram rounds as Ray tasks, each merged on the driver."""
    per = config.per
    high = _merged(ctx, "select/high-bits", high_histograms, [(s, (layout, view, s, per)) for s in shards])
    wanted = {g: config.wanted(int(h.sum())) for g, h in high.items()}
    bins, above = {}, {}
    for g, h in high.items():
        bins[g], above[g] = _kth_from_top(h, wanted[g])
    low = _merged(ctx, "select/low-bits", low_histograms, [(s, (layout, view, s, per, bins)) for s in shards])
    cuts = {}
    for g, h in high.items():
        low_bin, _ = _kth_from_top(low[g], wanted[g] - above[g])
        kept = above[g] + int(low[g][low_bin:].sum())
        cuts[g] = Cut(int(h.sum()), kept, score_of(bins[g] << 16 | low_bin))
    return cuts


class SelectWorker:
    def __init__(self, layout: Layout, view: InputView, config: SelectConfig, cuts: dict[str, Cut]) -> None:
        self.layout, self.view, self.config, self.cuts = layout, view, config, cuts

    def setup(self) -> None:
        pass

    def process(self, shard: str, upstream: str, rows_done: RowsDone = no_progress) -> DoneMarker:
        """`upstream`: the shard's lineage as `_Ranking` gives it (the planner compares the marker with it)."""
        rows, _ = ranked(self.layout, self.view, shard, self.config.per)
        removed = self.view.removed(shard)
        flags, kept, not_selected = [], 0, 0
        for r in rows:
            cut = self.cuts.get(r["group"])
            keep = r["ranked"] and cut is not None and np.float32(r[SCORE]) >= np.float32(cut.cut)
            if keep:
                kept += 1
                flags.append({"key": r["key"], "keep": True, "reason": None, "detail": None})
                continue
            if r["ranked"]:
                detail = f"{SCORE} {r[SCORE]:.4g} < {cut.cut:.4g}, the top {self.config.top_aesthetic:g}% cut of "
                detail += "the output" if r["group"] == ALL else f"bucket {r['group']}"
            elif r["key"] in removed:
                detail = f"not ranked: {removed[r['key']][0]}"
            elif r["status"] != OK:
                detail = f"not ranked: {r['status']}"
            else:
                detail = f"not ranked: no {SCORE} score"
            # Failed rows and the other filters' removals are theirs to count; these are this filter's own.
            not_selected += r["status"] == OK and r["key"] not in removed
            flags.append({"key": r["key"], "keep": False, "reason": NOT_SELECTED, "detail": detail})
        folder = self.layout.stage_folder(NAME)
        index = folder.write_index(shard, pa.Table.from_pylist(flags, schema=INDEX))  # index first, marker last
        removed_keys = [f["key"] for f in flags if not f["keep"]]
        done = DoneMarker(
            shard,
            stage=NAME,
            rows=len(flags),
            **lineage(config_hash(SEMANTICS), upstream),
            counts={"by_select": {"kept": kept, NOT_SELECTED: not_selected}},
            files={f"{shard}.parquet": index},
            extra=keep_flags_extra(self.layout, shard, ["images", "quality"], removed_keys),
        )
        return folder.write_done(done)


SEMANTICS = {"rule": f"top-{SCORE}", "version": 1}  # PCT, --per and the cuts are in each shard's lineage


class _Ranking:
    """The quality shards, the filters and the cuts as this pass's upstream: a new cut redoes every flag shard."""

    def __init__(self, layout: Layout, view: InputView, decision: dict[str, Any]) -> None:
        self.layout, self.view, self.decision = layout, view, decision

    def lineages(self, shards: list[str]) -> dict[str, str]:
        quality = self.layout.quality.read_dones(shards)
        view = self.view.lineages(shards)
        return {s: config_hash({"quality": quality[s].upstream, "input": view[s], **self.decision}) for s in shards}


class Unselected(KeepFlags):
    reasons = (NOT_SELECTED,)
    applies_after = NAME

    def folder(self) -> StageDir:
        return self.layout.stage_folder(NAME)


class SelectStage(Stage):
    name = NAME
    help = "quality/ -> select/: keep the top PCT% by aesthetic score per aspect-ratio bucket, for the exports"
    config_type = SelectConfig
    sample_filters = (Unselected,)

    def __init__(self, layout: Layout, config: SelectConfig) -> None:
        super().__init__(layout, config)
        self.cuts: dict[str, Cut] = {}

    def needs(self) -> list[Needs]:
        return [needs_images(self.layout), Needs("quality scores", self.layout.quality, "quality")]

    def check(self) -> None:
        """Refuse an output whose quality shards hold no aesthetic score, or miss an images shard."""
        super().check()
        quality = self.layout.quality
        shards = quality.done_shards()
        if SCORE not in quality.read_index(shards[0]).column_names:
            raise SetupError(
                f"{quality.url} has no {SCORE} scores: run `curation quality` with an --aesthetic-head first"
            )
        missing = sorted(set(self.layout.images.done_shards()) - set(shards))
        if missing:
            raise SetupError(
                f"{quality.url} has no scores for images shard {missing[0]} (and {len(missing) - 1} more): "
                "run `curation quality` again"
            )

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        layout, config = self.layout, self.config
        shards = layout.images.done_shards()
        view = self.input_view(layout.images)
        self.cuts = find_cuts(ctx, layout, view, config, shards)
        if not self.cuts:
            raise SetupError(f"no sample of {layout.output} has an {SCORE} score to rank: see `curation logs`")
        decision = {
            "top": config.top_aesthetic,
            "per": config.per,
            "cuts": {g: c.cut for g, c in sorted(self.cuts.items())},
        }
        upstream = _Ranking(layout, view, decision)
        yield Pass(
            label=NAME,
            folder=layout.stage_folder(NAME),
            make_worker=functools.partial(SelectWorker, layout, view, config, self.cuts),
            tasks=list(upstream.lineages(shards).items()),
            semantics=SEMANTICS,
            resources=Resources(stateless=True),
            upstream=upstream,
        )

    def finish(self, summaries: list[Any]) -> list[str]:
        """`select/summary.json`: per group, its ranked samples, those kept and the cut."""
        groups = {g: {"count": c.count, "kept": c.kept, "cut": c.cut} for g, c in sorted(self.cuts.items())}
        kept, count = sum(c.kept for c in self.cuts.values()), sum(c.count for c in self.cuts.values())
        summary = {
            "score": SCORE,
            "top_percent": self.config.top_aesthetic,
            "per": self.config.per,
            "ranked": count,
            "kept": kept,
            "groups": groups,
        }
        write_json_atomic(self.layout.select_summary, summary)
        return [f"[{NAME}] kept {kept:,} of {count:,} ranked samples (top {self.config.top_aesthetic:g}% by {SCORE})"]

    def outputs(self) -> list[str]:
        return [f"{NAME}: {self.layout.stage_folder(NAME).url}/", f"summary: {self.layout.select_summary}"]
