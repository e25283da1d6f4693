"""Stats stage: `captions/` shards -> per-shard noun partials (`stats/NNNNN.json`) -> one merge -> `report/`.

Map then reduce: each shard's partial `NounStats` (per caption field) is written beside the shards with a done
marker, so a rerun only counts new shards, and the merge is exact whatever the split. Images are the samples that
were captioned (status ok), so the "original" and "caption" rows describe the same images side by side.

Each named caption set (`captions-<NAME>/`) has its own partials in `stats-<NAME>/`, counted and resumed on its own,
and its own Table 1 row; `compare` adds rows of other outputs or caption corpora to the same table.
"""

from __future__ import annotations

import io
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import fsspec
import fsspec.implementations.local

from curation.caption.sets import DEFAULT_SET, named_sets, set_dir
from curation.dedup.filter import DUPLICATE, DuplicateFilter
from curation.records import OK
from curation.shards import StageDir, config_hash, lineage, read_parquet, write_json_atomic
from curation.stats.nouns import VALID_THRESHOLD, NounExtractor, NounStats, count_captions, decode_caption
from curation.stats.report import write_report

STAGE = "stats"
FIELDS = ("caption", "original")
GALLERY_SIZE = 12


@dataclass(frozen=True)
class StatsConfig:
    fields: tuple[str, ...] = FIELDS
    valid_threshold: int = VALID_THRESHOLD
    name: str | None = None  # dataset name in the report; default: the output folder's name
    include_duplicates: bool = False  # count the samples dedup removes too (not in semantics: in the lineage)
    compare: tuple[str, ...] = ()  # other outputs (their stats run) or caption corpora: more rows in the table

    def semantics(self) -> dict[str, Any]:
        # The threshold only shapes the merged report, not the per-shard partials.
        return {"fields": list(self.fields)}


def stats_dir(caption_set: str) -> str:
    """Folder of a caption set's partials: `stats` for the default set (and the originals), else `stats-<NAME>`."""
    return STAGE if caption_set == DEFAULT_SET else f"{STAGE}-{caption_set}"


class StatsStage:
    def __init__(self, output: str, config: StatsConfig, caption_set: str = DEFAULT_SET) -> None:
        root = output.rstrip("/")
        self.captions = StageDir(f"{root}/{set_dir(caption_set)}")
        self.stage_dir = StageDir(f"{root}/{stats_dir(caption_set)}")
        self.config = config
        self.duplicates = DuplicateFilter.for_stage(output, self.captions, config.include_duplicates)

    def setup(self) -> None:
        self.extractor = NounExtractor()

    def process(self, shard: str, payload: None = None) -> dict[str, Any]:
        started = time.time()
        # Duplicates are left out whether the caption stage skipped them or captioned them (--include-duplicates).
        removed = self.duplicates.removed(shard) if self.duplicates is not None else {}
        index = self.captions.read_index(shard).to_pylist()
        rows = [r for r in index if r["status"] == OK and r["key"] not in removed]
        duplicates = sum(r["key"] in removed or r["error_reason"] == DUPLICATE for r in index)
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
        write_json_atomic(self.stage_dir.url.rstrip("/") + f"/{shard}.json", partial)
        done = {
            "stage": STAGE,
            "shard": shard,
            "rows": len(rows),
            **lineage(config_hash(self.config.semantics()), (self.duplicates or self.captions).read_done(shard)),
            "by_caption_bytes": {"invalid_utf8": invalid_utf8} if invalid_utf8 else {},
            "by_skipped": {DUPLICATE: duplicates} if duplicates else {},
            "started": started,
            "seconds": round(time.time() - started, 3),
        }
        write_json_atomic(self.stage_dir.url.rstrip("/") + f"/{shard}.done.json", done)  # last
        return done


def merge_partials(
    output: str, fields: tuple[str, ...], caption_set: str = DEFAULT_SET
) -> tuple[dict[str, NounStats], dict[str, int]]:
    """Sum every done shard's partial: {field: NounStats}, and image counts per aspect-ratio bucket."""
    stage = StageDir(f"{output.rstrip('/')}/{stats_dir(caption_set)}")
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

    captions = StageDir(f"{output.rstrip('/')}/captions")
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


def _run_set(output: str, config: StatsConfig, caption_set: str, ray_address: str | None, progress: bool):
    from curation.runner import Resources, run_stage

    root = output.rstrip("/")
    captions = StageDir(f"{root}/{set_dir(caption_set)}")
    return run_stage(
        output=output,
        stage_dir=StageDir(f"{root}/{stats_dir(caption_set)}"),
        input_dir=DuplicateFilter.for_stage(output, captions, config.include_duplicates) or captions,
        make_stage=lambda: StatsStage(output, config, caption_set),
        tasks=[(s, None) for s in captions.done_shards()],
        semantics=config.semantics(),
        resources=Resources(num_cpus=1),
        ray_address=ray_address,
        progress=progress,
    )


def table_rows(output: str, config: StatsConfig, sets: list[str]) -> dict[str, NounStats]:
    """{row name: NounStats} of an output's merged partials: originals, the default set, then each named set.

    A field whose captions are empty everywhere (a source without alt-text) has no row, rather than a row of 0/0.
    """
    name = config.name or os.path.basename(output.rstrip("/")) or "dataset"
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
            sets = [s for s in named_sets(other) if s != DEFAULT_SET]
            found = table_rows(other, StatsConfig(valid_threshold=valid_threshold), sets)
            if not found:
                raise FileNotFoundError(f"{other} has no caption statistics: run `curation stats --output {other}`")
            rows |= found
        else:
            rows[os.path.basename(path.rstrip("/")).split(".")[0]] = count_captions(read_corpus(other, "caption"))
    return rows


def run_stats(output: str, config: StatsConfig, *, ray_address: str | None = None, progress: bool = True):
    """Count nouns of every done caption shard (every caption set) on Ray, merge, and write `OUT/report/`.

    Returns the summary of the default set's (and originals') stats, and the report's index.html.
    """
    from curation.runner import ray_session

    root = output.rstrip("/")
    sets = [s for s in named_sets(output) if s != DEFAULT_SET] if "caption" in config.fields else []
    # One Ray session for all sets (only when there are several: a finished stage starts none).
    with ray_session(ray_address) if sets else nullcontext():
        summary = _run_set(output, config, DEFAULT_SET, ray_address, progress)
        for s in sets:
            _run_set(output, replace(config, fields=("caption",)), s, ray_address, progress)
    _, buckets = merge_partials(output, config.fields)
    ordered = table_rows(output, config, sets) | compare_rows(config.compare, config.valid_threshold)
    report_dir = write_local_report(
        f"{root}/report",
        lambda local: write_report(
            local, ordered, valid_threshold=config.valid_threshold, bucket_counts=buckets, gallery=gallery(output)
        ),
    )
    return summary, report_dir


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
    rows = {name: count_captions(read_corpus(captions_file, column))} | compare_rows(compare, valid_threshold)
    return write_local_report(
        f"{output.rstrip('/')}/report",
        lambda local: write_report(local, rows, valid_threshold=valid_threshold),
    )


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
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
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
