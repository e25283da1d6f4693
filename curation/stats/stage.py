"""Stats stage: caption sets and the originals -> per-shard noun partials -> one merge -> `report/`.

Map then reduce: each shard's partial `NounStats` is written beside the shards with a done marker, so a rerun only
counts new shards, and the merge is exact whatever the split. Every caption set is a peer: each set (`captions/`,
`captions-<NAME>/`) has its partials in `stats/` or `stats-<NAME>/` (one pass each) and its own Table 1 row. The
originals (alt-text, prompts) come from the ingest records (`images/`' index) into `stats-original/`, with the
aspect-ratio buckets, whatever sets exist; a sample counts there when ingest read it and no filter removed it.
`compare` adds rows of other outputs or caption corpora to the same table. With `captions` (a corpus file) there
are no passes: the report is the corpus's Table 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import fsspec.implementations.local
import pyarrow as pa

from curation.errors import ConfigError, SetupError
from curation.layout import DEFAULT_SET, ORIGINAL, Layout
from curation.records import OK
from curation.shards import DoneMarker, StageDir, config_hash, lineage, read_parquet
from curation.stage import (
    InputView,
    Needs,
    Pass,
    Resources,
    RowsDone,
    RunContext,
    Stage,
    check_include,
    include_field,
    needs_images,
    no_progress,
    registered_reasons,
)
from curation.stats.nouns import VALID_THRESHOLD, NounExtractor, NounStats, count_captions, decode_caption
from curation.stats.overview import sample_gallery, stage_counts
from curation.stats.quality import QualitySection, quality_section
from curation.stats.report import write_report

if TYPE_CHECKING:
    from curation.runner import RunSummary, StageRun

STAGE = "stats"
FIELDS = ("caption", "original")
FIELD_CHOICES = {"caption": ("caption",), "original": ("original",), "both": FIELDS}
SET_SEMANTICS = {"fields": ["caption"]}  # a caption set's partials: its captions only
LEGACY_DEFAULT_SEMANTICS = {"fields": ["caption", "original"]}  # `captions/`' partials before sets were peers


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    field: str = dataclasses.field(
        default="both",
        metadata={
            "help": "the captions to count: the generated ones, the originals (alt-text), or both",
            "choices": list(FIELD_CHOICES),
        },
    )
    valid_threshold: int = dataclasses.field(
        default=VALID_THRESHOLD, metadata={"help": "valid nouns appear more than this many times"}
    )  # shapes the merged report only, not the per-shard partials: not in semantics
    name: str | None = dataclasses.field(
        default=None,
        metadata={"help": "dataset name in the table (default: the output folder's, or the corpus file's name)"},
    )
    include: tuple[str, ...] = include_field("count")  # not in semantics: in the lineage
    compare: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={"help": "other outputs (their stats run) or caption corpora: more rows in the table", "nargs": "+"},
    )
    captions: str | None = dataclasses.field(
        default=None,
        metadata={"help": "a caption corpus instead of the output's shards: JSONL or parquet, one caption per image"},
    )
    column: str = dataclasses.field(default="caption", metadata={"help": "the corpus's caption field or column"})

    def __post_init__(self) -> None:
        if self.field not in FIELD_CHOICES:
            raise ConfigError(f"--field {self.field!r}: one of {', '.join(FIELD_CHOICES)}")
        object.__setattr__(self, "compare", tuple(self.compare))
        object.__setattr__(self, "include", check_include(self.include))

    @property
    def fields(self) -> tuple[str, ...]:
        """The counted fields: ("caption",), ("original",) or both."""
        return FIELD_CHOICES[self.field]

    def semantics(self) -> dict[str, Any]:
        # The threshold only shapes the merged report, not the per-shard partials; each pass has its own semantics.
        return {"fields": list(self.fields)}


class StatsStage(Stage):
    name = "stats"
    help = "concept density (PixArt-alpha Table 1) of caption shards or a caption corpus"
    config_type = StatsConfig

    def __init__(self, layout: Layout, config: StatsConfig) -> None:
        super().__init__(layout, config)
        self.sets: list[str] = []  # the named caption sets counted (planned by `passes`)
        self.quality: QualitySection | None = None  # the report's quality section (after the passes)
        self.result: str | None = None  # the report's index.html, once `finish` wrote it

    def check(self) -> None:
        """Refuse a missing corpus or --compare path, an output without images, or --field caption without sets."""
        config = self.config
        for what, url in [("the caption corpus", config.captions)] + [("--compare", c) for c in config.compare]:
            if url is None:
                continue
            fs, path = fsspec.core.url_to_fs(url)
            if not fs.exists(path):
                raise SetupError(f"{what} {url} does not exist")
        super().check()  # images/, unless a corpus is counted
        if config.captions is None and config.field == "caption" and not self.layout.caption_sets():
            raise SetupError(f"no caption set in {self.layout.output}: run curation caption --name NAME first")

    def needs(self) -> list[Needs]:
        return [needs_images(self.layout)] if self.config.captions is None else []  # a corpus needs no output

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        """The originals' pass (from `images/`: originals and buckets), then one pass per caption set counted."""
        if self.config.captions is not None:  # a corpus: counted in `finish`, no shards
            return
        layout = self.layout
        self.sets = layout.caption_sets() if "caption" in self.config.fields else []
        yield Pass(
            label=layout.stats_original.url.rstrip("/").rsplit("/", 1)[-1],
            folder=layout.stats_original,
            make_worker=functools.partial(StatsWorker, layout, None, view := self.input_view(layout.images)),
            tasks=[(shard, None) for shard in layout.images.done_shards()],
            semantics={"fields": ["original"]},
            resources=Resources(num_cpus=1),
            upstream=view,
        )
        for caption_set in self.sets:
            folder, captions = layout.stats(caption_set), layout.captions(caption_set)
            yield Pass(
                label=folder.url.rstrip("/").rsplit("/", 1)[-1],
                folder=folder,
                make_worker=functools.partial(StatsWorker, layout, caption_set, view := self.input_view(captions)),
                tasks=[(shard, None) for shard in captions.done_shards()],
                semantics=SET_SEMANTICS,
                # An earlier release counted the originals in the default set's partials too: they hold its captions.
                compatible=(config_hash(LEGACY_DEFAULT_SEMANTICS),) if caption_set == DEFAULT_SET else (),
                resources=Resources(num_cpus=1),
                upstream=view,
            )
        # After the passes: the quality scores reduced per shard in Ray tasks, for the report.
        self.quality = quality_section(ctx, layout, row_fields(layout.output, self.config, self.sets))

    def finish(self, summaries: list[RunSummary]) -> list[str]:
        """Merge the partials (or count the corpus) and write `OUT/report/`."""
        config, layout = self.config, self.layout
        if config.captions is not None:
            name = config.name or config.captions.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
            rows = {name: count_captions(read_corpus(config.captions, config.column))}
            rows |= compare_rows(config.compare, config.valid_threshold)
            self.result = write_local_report(
                layout.report(), lambda local: write_report(local, rows, valid_threshold=config.valid_threshold)
            )
            return self._table()
        buckets = merge_originals(layout.output)[1]
        dup_fs, dup_path = fsspec.core.url_to_fs(layout.report("duplicates.html"))  # dedup's page, linked
        ordered = table_rows(layout.output, config, self.sets) | compare_rows(config.compare, config.valid_threshold)
        self.result = write_local_report(
            layout.report(),
            lambda local: write_report(
                local,
                ordered,
                valid_threshold=config.valid_threshold,
                bucket_counts=buckets,
                gallery=sample_gallery(layout),
                stages=stage_counts(layout),
                output=layout.output,
                duplicates=dup_fs.exists(dup_path),
                quality=self.quality,
            ),
        )
        return self._table()

    def _table(self) -> list[str]:
        """Table 1 as written (markdown), for the terminal."""
        with fsspec.open(self.layout.report("table1.md"), "rt", encoding="utf-8") as fh:
            return fh.read().rstrip("\n").splitlines()

    def outputs(self) -> list[str]:
        return [f"report: {self.result or self.layout.report('index.html')}"]


class StatsWorker:
    """Counts the nouns of one shard into its partial, then writes the shard's done marker: a caption set's captions
    (from its tar's `.txt` members), or with `caption_set=None` the originals and buckets of an `images/` shard."""

    def __init__(self, layout: Layout, caption_set: str | None, view: InputView) -> None:
        self.source = view.folder
        self.input = view
        self.stage_dir = layout.stats(caption_set) if caption_set is not None else layout.stats_original
        self.originals = caption_set is None
        self.semantics = {"fields": ["original"]} if self.originals else SET_SEMANTICS
        self.reasons = registered_reasons()

    def setup(self) -> None:
        self.extractor = NounExtractor()

    def process(self, shard: str, payload: None = None, rows_done: RowsDone = no_progress) -> DoneMarker:
        started = time.time()
        # Removed samples (duplicates) are left out whether the caption stage skipped them or captioned them
        # (--include duplicate there); those it skipped are tallied as skipped here too.
        removed = self.input.removed(shard)
        index = self.source.read_index(shard).to_pylist()
        rows = [r for r in index if r["status"] == OK and r["key"] not in removed]
        skipped: dict[str, int] = {}
        for r in index:
            reason = removed[r["key"]][0] if r["key"] in removed else r["error_reason"]
            if r["key"] in removed or reason in self.reasons:
                skipped[reason] = skipped.get(reason, 0) + 1
        partial: dict[str, Any] = {}
        invalid_utf8 = 0
        # Per sample, for sorting in `curation browse`: {key: nouns of the caption counted}.
        counted: dict[str, int | None] = {}
        stats = NounStats()
        if self.originals:
            counted = {r["key"]: self._count(stats, r["original_caption"]) for r in rows}
            partial["original"] = stats.to_json()
            buckets: dict[str, int] = {}
            for r in rows:
                buckets[r["bucket_1024"]] = buckets.get(r["bucket_1024"], 0) + 1
            partial["buckets_1024"] = buckets
        else:
            # Captions are read from the tar's `.txt` members: they are what trainers read, and may be foreign bytes.
            ok = {r["key"] for r in rows}
            for key, members in self.source.iter_samples(shard):
                if key not in ok:
                    continue
                text, invalid = decode_caption(members.get("txt", b""))
                invalid_utf8 += invalid
                counted[key] = self._count(stats, text)
            partial["caption"] = stats.to_json()
        name = f"{shard}.json"
        files = {
            name: self.stage_dir.write_file(name, json.dumps(partial, indent=1, sort_keys=True, default=str).encode())
        }
        files[f"{shard}.parquet"] = self.stage_dir.write_index(shard, nouns_table(counted))
        done = DoneMarker(
            shard,
            stage=STAGE,
            rows=len(rows),
            **lineage(config_hash(self.semantics), self.input.read_done(shard).upstream),
            counts={"by_caption_bytes": {"invalid_utf8": invalid_utf8} if invalid_utf8 else {}, "by_skipped": skipped},
            files=files,
            extra={"started": started},
        )
        done.seconds = round(time.time() - started, 3)
        return self.stage_dir.write_done(done)  # last

    def _count(self, stats: NounStats, text: str | None) -> int | None:
        """Count one caption into `stats`; returns its nouns (None when extraction failed)."""
        before, errors = stats.total_nouns, stats.errors
        stats.add_caption(text, extractor=self.extractor)
        return None if stats.errors > errors else stats.total_nouns - before


def nouns_table(counted: dict[str, int | None]) -> pa.Table:
    """`<stats folder>/NNNNN.parquet`: key and the nouns of its caption (null where extraction failed), by key."""
    keys = sorted(counted)
    return pa.table({"key": pa.array(keys, pa.string()), "nouns": pa.array([counted[k] for k in keys], pa.int32())})


def read_partial(stage: StageDir, shard: str) -> dict[str, Any]:
    """One shard's partial; a damaged one is a `ShardReadError` naming it and the command that rewrites it."""
    try:
        with stage.fs.open(stage.path(f"{shard}.json"), "rb") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise stage.damage(shard, f"{shard}.json: {type(exc).__name__}: {exc}") from exc


def merge_partials(stage: StageDir, field: str) -> NounStats:
    """Sum one field of every done shard's partial in a stats folder."""
    total = NounStats()
    for shard in stage.done_shards():
        partial = read_partial(stage, shard)
        if field in partial:
            total += NounStats.from_json(partial[field])
    return total


def merge_originals(output: str) -> tuple[NounStats, dict[str, int]]:
    """The originals' NounStats and image counts per aspect-ratio bucket, from `stats-original/` (an output whose
    last stats run predates it: from the default set's partials, which counted the originals then)."""
    layout = Layout(output)
    stage = layout.stats_original if layout.stats_original.done_shards() else layout.stats()
    totals = NounStats()
    buckets: dict[str, int] = {}
    for shard in stage.done_shards():
        partial = read_partial(stage, shard)
        if "original" in partial:
            totals += NounStats.from_json(partial["original"])
        for key, n in partial.get("buckets_1024", {}).items():
            buckets[key] = buckets.get(key, 0) + n
    return totals, buckets


def row_fields(output: str, config: StatsConfig, sets: list[str]) -> dict[str, str]:
    """{Table 1 row name: the caption field it counts ("original", a set's name)}, in table order: the originals
    first, as the paper's layout reads "LAION" then "LAION-LLaVA"."""
    name = config.name or Layout(output).name
    rows = {f"{name} (original captions)": ORIGINAL} if "original" in config.fields else {}
    return rows | {f"{name} ({'generated' if s == DEFAULT_SET else s} captions)": s for s in sets}


def table_rows(output: str, config: StatsConfig, sets: list[str]) -> dict[str, NounStats]:
    """{row name: NounStats} of an output's merged partials: the originals, then each caption set counted.

    A field whose captions are empty everywhere (a source without alt-text) has no row, rather than a row of 0/0.
    """
    layout = Layout(output)
    rows = {
        row: merge_originals(output)[0] if field == ORIGINAL else merge_partials(layout.stats(field), "caption")
        for row, field in row_fields(output, config, sets).items()
    }
    return {row: stats for row, stats in rows.items() if stats.images > stats.empty}


def compare_rows(others: tuple[str, ...], valid_threshold: int = VALID_THRESHOLD) -> dict[str, NounStats]:
    """Rows of other datasets: an output folder (from its `curation stats` partials), or a caption corpus file."""
    rows: dict[str, NounStats] = {}
    for other in others:
        fs, path = fsspec.core.url_to_fs(other)
        if fs.isdir(path):
            found = table_rows(other, StatsConfig(valid_threshold=valid_threshold), Layout(other).caption_sets())
            if not found:
                raise SetupError(f"{other} has no caption statistics: run `curation stats --output {other}`")
            rows |= found
        else:
            rows[os.path.basename(path.rstrip("/")).split(".")[0]] = count_captions(read_corpus(other, "caption"))
    return rows


def run_stats(output: str, config: StatsConfig, **kw) -> tuple[RunSummary | None, str]:
    """`curation stats` from Python: see `curation.runner.run` for the keywords (`force` redoes the partials of
    another field choice).

    Returns the summary of the default set's pass, or else of the originals' (None for a corpus), and the report's
    index.html.
    """
    from curation.runner import run

    done: StageRun = run(StatsStage(Layout(output), config), **kw)
    first = next((s for s in done.summaries if s.stage == STAGE), done.summaries[0] if done.summaries else None)
    return first, done.result


def run_corpus_stats(
    captions_file: str,
    name: str,
    output: str,
    *,
    column: str = "caption",
    valid_threshold: int = VALID_THRESHOLD,
    compare: tuple[str, ...] = (),
) -> str:
    """Table 1 of any caption corpus: JSONL with a `column` field per line, or parquet with that column."""
    config = StatsConfig(
        captions=captions_file, name=name, column=column, valid_threshold=valid_threshold, compare=tuple(compare)
    )
    return run_stats(output, config, progress=False)[1]


def read_corpus(path: str, column: str):
    """Captions of a corpus file, one per image; a missing or null field counts as an empty caption."""
    fs, p = fsspec.core.url_to_fs(path)
    if p.endswith(".parquet"):
        table = read_parquet(fs, p, columns=[column])
        for value in table.column(column).to_pylist():
            yield value if value is None or isinstance(value, str) else str(value)
        return
    with fs.open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            text, _ = decode_caption(raw)
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
            value = record.get(column) if isinstance(record, dict) else None
            yield value if value is None or isinstance(value, str) else str(value)


def write_local_report(url: str, write) -> str:
    """Render into a local folder (matplotlib writes files), then copy to `url` when it is remote."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return str(write(Path(path)))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        html = write(Path(tmp))
        fs.put(tmp.rstrip("/") + "/", path, recursive=True)
        return f"{url.rstrip('/')}/{Path(html).name}"
