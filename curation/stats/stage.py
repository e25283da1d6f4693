"""Stats stage: `captions/` shards -> per-shard noun partials (`stats/NNNNN.json`) -> one merge -> `report/`.

Map then reduce: each shard's partial `NounStats` (per caption field) is written beside the shards with a done
marker, so a rerun only counts new shards, and the merge is exact whatever the split. Images are the samples that
were captioned (status ok), so the "original" and "caption" rows describe the same images side by side.

Each named caption set (`captions-<NAME>/`) has its own partials in `stats-<NAME>/`, counted and resumed on its own
(one pass each), and its own Table 1 row; `compare` adds rows of other outputs or caption corpora to the same table.
With `captions` (a corpus file) there are no passes: the report is the corpus's Table 1.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import fsspec.implementations.local

from curation.errors import ConfigError, SetupError
from curation.layout import DEFAULT_SET, Layout
from curation.records import OK
from curation.shards import DoneMarker, config_hash, lineage, read_parquet, write_json_atomic
from curation.stage import InputView, Pass, Resources, RunContext, Stage
from curation.stats.nouns import VALID_THRESHOLD, NounExtractor, NounStats, count_captions, decode_caption
from curation.stats.report import write_report

if TYPE_CHECKING:
    from curation.runner import RunSummary, StageRun

STAGE = "stats"
FIELDS = ("caption", "original")
FIELD_CHOICES = {"caption": ("caption",), "original": ("original",), "both": FIELDS}
GALLERY_SIZE = 12


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
    include_duplicates: bool = dataclasses.field(
        default=False, metadata={"help": "also count the samples dedup removes (default: skip them)"}
    )  # not in semantics: in the lineage
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

    @property
    def fields(self) -> tuple[str, ...]:
        """The counted fields: ("caption",), ("original",) or both."""
        return FIELD_CHOICES[self.field]

    def semantics(self) -> dict[str, Any]:
        # The threshold only shapes the merged report, not the per-shard partials.
        return {"fields": list(self.fields)}


class StatsStage(Stage):
    name = "stats"
    help = "concept density (PixArt-alpha Table 1) of caption shards or a caption corpus"
    config_type = StatsConfig

    def __init__(self, layout: Layout, config: StatsConfig) -> None:
        super().__init__(layout, config)
        self.sets: list[str] = []  # the named caption sets counted (planned by `passes`)
        self.result: str | None = None  # the report's index.html, once `finish` wrote it

    def check(self) -> None:
        config = self.config
        for what, url in [("the caption corpus", config.captions)] + [("--compare", c) for c in config.compare]:
            if url is None:
                continue
            fs, path = fsspec.core.url_to_fs(url)
            if not fs.exists(path):
                raise SetupError(f"{what} {url} does not exist")

    def named_sets(self) -> list[str]:
        """The named caption sets counted besides the default set: all of them when captions are counted."""
        if "caption" not in self.config.fields:
            return []
        return [s for s in self.layout.caption_sets() if s != DEFAULT_SET]

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        """One pass per caption set: the default set's (captions and originals) first, then each named set's."""
        if self.config.captions is not None:  # a corpus: counted in `finish`, no shards
            return
        self.sets = self.named_sets()
        for caption_set in [DEFAULT_SET, *self.sets]:
            # A named set's originals are the default set's: only its captions are counted.
            config = self.config if caption_set == DEFAULT_SET else dataclasses.replace(self.config, field="caption")
            folder, captions = self.layout.stats(caption_set), self.layout.captions(caption_set)
            yield Pass(
                label=folder.url.rstrip("/").rsplit("/", 1)[-1],
                folder=folder,
                make_worker=functools.partial(StatsWorker, self.layout, config, caption_set),
                tasks=[(shard, None) for shard in captions.done_shards()],
                semantics=config.semantics(),
                resources=Resources(num_cpus=1),
                upstream=InputView(self.layout, captions, config),
            )

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
        _, buckets = merge_partials(layout.output, config.fields)
        ordered = table_rows(layout.output, config, self.sets) | compare_rows(config.compare, config.valid_threshold)
        self.result = write_local_report(
            layout.report(),
            lambda local: write_report(
                local,
                ordered,
                valid_threshold=config.valid_threshold,
                bucket_counts=buckets,
                gallery=gallery(layout.output),
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
    """Counts the nouns of one caption shard into its partial, then writes the shard's done marker."""

    def __init__(self, layout: Layout, config: StatsConfig, caption_set: str = DEFAULT_SET) -> None:
        self.captions = layout.captions(caption_set)
        self.input = InputView(layout, self.captions, config)
        self.stage_dir = layout.stats(caption_set)
        self.config = config
        self.reasons = filter_reasons()

    def setup(self) -> None:
        self.extractor = NounExtractor()

    def process(self, shard: str, payload: None = None) -> DoneMarker:
        started = time.time()
        # Removed samples (duplicates) are left out whether the caption stage skipped them or captioned them
        # (--include-duplicates there); those it skipped are tallied as skipped here too.
        removed = self.input.removed(shard)
        index = self.captions.read_index(shard).to_pylist()
        rows = [r for r in index if r["status"] == OK and r["key"] not in removed]
        skipped: dict[str, int] = {}
        for r in index:
            reason = removed[r["key"]][0] if r["key"] in removed else r["error_reason"]
            if reason in self.reasons:
                skipped[reason] = skipped.get(reason, 0) + 1
        partial: dict[str, Any] = {"buckets_1024": {}}
        invalid_utf8 = 0
        if "caption" in self.config.fields:
            # Captions are read from the tar's `.txt` members: they are what trainers read, and may be foreign bytes.
            texts = []
            for key, members in self.captions.iter_samples(shard):
                if key in removed:
                    continue
                text, invalid = decode_caption(members.get("txt", b""))
                invalid_utf8 += invalid
                texts.append(text)
            partial["caption"] = count_captions(texts, extractor=self.extractor).to_json()
        if "original" in self.config.fields:
            originals = [r["original_caption"] for r in rows]
            partial["original"] = count_captions(originals, extractor=self.extractor).to_json()
        for r in rows:
            partial["buckets_1024"][r["bucket_1024"]] = partial["buckets_1024"].get(r["bucket_1024"], 0) + 1
        write_json_atomic(self.stage_dir.url_of(f"{shard}.json"), partial)
        done = DoneMarker(
            shard,
            stage=STAGE,
            rows=len(rows),
            **lineage(config_hash(self.config.semantics()), self.input.read_done(shard).upstream),
            counts={"by_caption_bytes": {"invalid_utf8": invalid_utf8} if invalid_utf8 else {}, "by_skipped": skipped},
            extra={"started": started},
        )
        done.seconds = round(time.time() - started, 3)
        return self.stage_dir.write_done(done)  # last


def filter_reasons() -> frozenset[str]:
    """The skipped rows' reasons of every registered `SampleFilter` (dedup's `duplicate`)."""
    from curation.registry import stage_classes

    return frozenset(s.sample_filter.reason for s in stage_classes() if s.sample_filter is not None)


def merge_partials(
    output: str, fields: tuple[str, ...], caption_set: str = DEFAULT_SET
) -> tuple[dict[str, NounStats], dict[str, int]]:
    """Sum every done shard's partial: {field: NounStats}, and image counts per aspect-ratio bucket."""
    stage = Layout(output).stats(caption_set)
    totals = {f: NounStats() for f in fields}
    buckets: dict[str, int] = {}
    for shard in stage.done_shards():
        with stage.fs.open(stage.path(f"{shard}.json"), "rb") as fh:
            partial = json.load(fh)
        for f in fields:
            if f in partial:
                totals[f] += NounStats.from_json(partial[f])
        for key, n in partial.get("buckets_1024", {}).items():
            buckets[key] = buckets.get(key, 0) + n
    return totals, buckets


def gallery(output: str, limit: int = GALLERY_SIZE) -> list[dict[str, Any]]:
    """A few captioned samples with thumbnails, for a person to eyeball the captions next to their images."""
    from PIL import Image

    from curation.imaging import ImageDecodeError, decode_image

    captions = Layout(output).captions()
    items: list[dict[str, Any]] = []
    for shard in captions.done_shards():
        for key, members in captions.iter_samples(shard):
            record = json.loads(members["json"])
            try:
                image = decode_image(members[record["ext"]], target_size=(160, 160))
            except ImageDecodeError:
                continue
            image.thumbnail((160, 160), Image.Resampling.LANCZOS)
            png = io.BytesIO()
            image.save(png, "PNG")
            items.append(
                {
                    "key": key,
                    "thumbnail_png": png.getvalue(),
                    "caption": decode_caption(members.get("txt", b""))[0],
                    "caption_status": record.get("caption_status"),
                    "original": record.get("original_caption"),
                }
            )
            if len(items) >= limit:
                return items
    return items


def table_rows(output: str, config: StatsConfig, sets: list[str]) -> dict[str, NounStats]:
    """{row name: NounStats} of an output's merged partials: originals, the default set, then each named set.

    A field whose captions are empty everywhere (a source without alt-text) has no row, rather than a row of 0/0.
    """
    name = config.name or Layout(output).name
    totals, _ = merge_partials(output, config.fields)
    names = {"caption": f"{name} (generated captions)", "original": f"{name} (original captions)"}
    # Originals first: the paper's layout reads "LAION" then "LAION-LLaVA".
    rows = {names[f]: totals[f] for f in ("original", "caption") if f in config.fields}
    for s in sets:
        rows[f"{name} ({s} captions)"] = merge_partials(output, ("caption",), s)[0]["caption"]
    return {row: stats for row, stats in rows.items() if stats.images > stats.empty}


def compare_rows(others: tuple[str, ...], valid_threshold: int = VALID_THRESHOLD) -> dict[str, NounStats]:
    """Rows of other datasets: an output folder (from its `curation stats` partials), or a caption corpus file."""
    rows: dict[str, NounStats] = {}
    for other in others:
        fs, path = fsspec.core.url_to_fs(other)
        if fs.isdir(path):
            sets = [s for s in Layout(other).caption_sets() if s != DEFAULT_SET]
            found = table_rows(other, StatsConfig(valid_threshold=valid_threshold), sets)
            if not found:
                raise SetupError(f"{other} has no caption statistics: run `curation stats --output {other}`")
            rows |= found
        else:
            rows[os.path.basename(path.rstrip("/")).split(".")[0]] = count_captions(read_corpus(other, "caption"))
    return rows


def run_stats(output: str, config: StatsConfig, **kw) -> tuple[RunSummary | None, str]:
    """`curation stats` from Python: see `curation.runner.run` for the keywords (`force` redoes the partials of
    another field choice).

    Returns the summary of the default set's (and originals') pass (None for a corpus), and the report's index.html.
    """
    from curation.runner import run

    done: StageRun = run(StatsStage(Layout(output), config), **kw)
    return (done.summaries[0] if done.summaries else None), done.result


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
