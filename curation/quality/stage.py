"""Quality stage: `images/` -> CLIP image embeddings, then aesthetic, NSFW and clip scores, then keep flags.

    curation quality --output OUT [--model openai/clip-vit-large-patch14] [--aesthetic-head ...] [--nsfw-head ...]
                     [--min-aesthetic X] [--max-nsfw X] [--min-clip-score SET=X ...]

Four passes, each one shard per `images/` shard:

1. `clip/<tag>/`: each sound image decoded once (as displayed) and embedded by the CLIP vision tower: an (N, D)
   float16 npy of L2-normalised rows, and a parquet mapping each key to its row (null for failed and skipped
   samples, which stay rows). Its config is the model alone, so new heads or thresholds never run the tower again.
2. `quality/`: the heads on the stored embeddings, and the clip score of the original caption and of every caption
   set that exists (text tower only). Its input is the embeddings shard and each set's shard, so re-captioning a
   set redoes exactly the shards made from it.
3. `quality/flags-images/`: keep flags from the aesthetic and NSFW scores (`--min-aesthetic`, `--max-nsfw`),
   applied from caption on.
4. `quality/flags-texts/`: keep flags from the clip scores (`--min-clip-score SET=X`), applied from stats on.

The flag passes load no model: their thresholds are part of their input's lineage, not of a config hash, so a new
threshold rewrites the flags from the stored scores (never refused as a changed config), and the later stages redo
only the shards whose removals changed.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from curation.errors import ConfigError, SetupError
from curation.imaging import ImageDecodeError, chunks, decode_image, prefetch
from curation.layout import ORIGINAL, Layout, check_set_name
from curation.models import check_model
from curation.quality.flags import ImageFlags, TextFlags, flag_rows
from curation.quality.model import QualityModel, QualityModelConfig, check_heads, clip_score, head_source
from curation.records import OK, Sample, count_statuses, table_to_samples
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
    removed_digest,
)

NAME = "quality"

CLIP_INDEX = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_reason", pa.string()),
        ("error", pa.string()),
        ("row", pa.int32()),  # the sample's row of the npy; null when it has no embedding
    ]
)


@dataclass(frozen=True)
class QualityStageConfig:
    model: QualityModelConfig = field(
        default_factory=QualityModelConfig, metadata={"help": "the CLIP model and the aesthetic and NSFW heads"}
    )
    min_aesthetic: float | None = field(
        default=None, metadata={"help": "leave out images whose aesthetic score (1-10) is below this, from caption on"}
    )  # thresholds: in the flags' lineage, never in a config hash
    max_nsfw: float | None = field(
        default=None, metadata={"help": "leave out images whose NSFW score (0-1) is above this, from caption on"}
    )
    min_clip_score: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "SET=X: leave out samples whose SET caption (a caption set, or original) has a clip score "
            "(0-100) below X, from stats on",
            "nargs": "+",
        },
    )
    include: tuple[str, ...] = include_field("score")  # not in semantics: in the lineage
    decode_threads: int = field(
        default=max(2, min(8, (os.cpu_count() or 2))), metadata={"help": "CPU decode threads per actor"}
    )
    workers: int | None = field(
        default=None, metadata={"help": "actors (default: one per GPU, or per CPU without)"}
    )  # how fast, not what: not in semantics

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_clip_score", tuple(self.min_clip_score))
        object.__setattr__(self, "include", check_include(self.include))
        self.clip_thresholds()  # refuses a malformed SET=X before anything runs

    def clip_thresholds(self) -> dict[str, float]:
        """{caption set or "original": the lowest clip score kept}, from `--min-clip-score SET=X ...`."""
        out: dict[str, float] = {}
        for item in self.min_clip_score:
            name, sep, value = item.partition("=")
            try:
                threshold = float(value)
            except ValueError:
                threshold = math.nan
            if not sep or not math.isfinite(threshold):
                raise ConfigError(f"--min-clip-score {item!r}: write SET=X, e.g. original=20 or default=25.5")
            if name != ORIGINAL:
                check_set_name(name)
            out[name] = threshold
        return out

    def image_thresholds(self) -> dict[str, float]:
        return {k: v for k, v in (("min_aesthetic", self.min_aesthetic), ("max_nsfw", self.max_nsfw)) if v is not None}

    def clip_semantics(self) -> dict[str, Any]:
        """What decides the embeddings: the model alone (its tag names the folder)."""
        return {"model": self.model.model, "revision": self.model.revision, "embeddings": "l2-normalised float16"}

    def score_semantics(self) -> dict[str, Any]:
        """What decides the scores: the model's text tower and the heads (the caption sets are input, not config)."""
        return self.clip_semantics() | {"aesthetic_head": self.model.aesthetic_head, "nsfw_head": self.model.nsfw_head}


class QualityStage(Stage):
    name = NAME
    help = "images/ -> clip/<tag>/ embeddings, quality/ aesthetic, NSFW and clip scores, keep flags from thresholds"
    config_type = QualityStageConfig
    sample_filters = (ImageFlags, TextFlags)
    # `curation run` runs it only when asked (--quality or any of its flags), and once more after caption: image
    # scores before captioning (their thresholds save its time), clip scores of the sets it made after it.
    opt_in = True
    again_after = "caption"

    def __init__(self, layout: Layout, config: QualityStageConfig) -> None:
        super().__init__(layout, config)
        self.early = False  # before `again_after` in `curation run`: thresholds on sets not made yet wait for it

    def before_again(self) -> QualityStage:
        stage = QualityStage(self.layout, self.config)
        stage.early = True
        return stage

    def needs(self) -> list[Needs]:
        return [needs_images(self.layout)]

    def check(self) -> None:
        super().check()
        if not self.early:
            sets = self.layout.caption_sets()
            for name in self.config.clip_thresholds():
                if name != ORIGINAL and name not in sets:
                    raise SetupError(self.layout.missing_set(name))

    def preflight(self) -> None:
        model = self.config.model
        check_model(model.model, "--model", revision=model.revision)
        check_heads(model)
        for flag, threshold, head_flag, head in (
            ("--min-aesthetic", self.config.min_aesthetic, "--aesthetic-head", model.aesthetic_head),
            ("--max-nsfw", self.config.max_nsfw, "--nsfw-head", model.nsfw_head),
        ):
            if threshold is not None and head_source(head) is None:
                raise ConfigError(f"{flag} needs a head to score with: pass {head_flag} (not none)")

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        layout, config = self.layout, self.config
        shards = layout.images.done_shards()
        tasks = [(s, None) for s in shards]
        model = QualityModel(config.model)
        clip = layout.clip(model.tag)
        view = self.input_view(layout.images)  # the size filter's and dedup's removals: no embedding
        sets = layout.caption_sets()
        if not ctx.force:  # pass 1 scores what it embeds (below): refuse other heads before it writes any score
            from curation.runner.planning import refuse_changed_config

            scored = layout.quality.read_dones(layout.quality.done_shards())
            refuse_changed_config(layout.quality.url, scored, {config_hash(config.score_semantics())})
        yield Pass(
            label=f"clip/{model.tag}",
            folder=clip,
            # Each shard embedded is scored at once by the same worker, so pass 2 starts no model for it.
            make_worker=functools.partial(EmbedWorker, layout, config, model.tag, view, sets),
            tasks=tasks,
            semantics=config.clip_semantics(),
            resources=Resources.for_device(config.model.device, config.workers),
            upstream=view,
        )
        yield Pass(
            label=NAME,
            folder=layout.quality,
            make_worker=functools.partial(ScoreWorker, layout, config, model.tag, sets),
            tasks=tasks,
            semantics=config.score_semantics(),
            resources=Resources.for_device(config.model.device, config.workers),
            upstream=_Lineages(lambda s: {"clip": _upstream(clip, s), "sets": _set_lineages(layout, sets, s)}),
        )
        thresholds = config.clip_thresholds()
        texts = {name: t for name, t in thresholds.items() if name == ORIGINAL or name in sets}  # early: made ones
        for kind, limits in (("images", config.image_thresholds()), ("texts", texts)):
            yield Pass(
                label=f"{NAME}/flags-{kind}",
                folder=layout.quality_flags(kind),
                make_worker=functools.partial(FlagWorker, layout, kind, limits),
                tasks=tasks,
                semantics={"flags": kind},  # the thresholds are input (below): a new one is no config change
                resources=Resources(stateless=True),
                upstream=_Lineages(lambda s, limits=limits: {"scores": _upstream(layout.quality, s), "limits": limits}),
            )

    def outputs(self) -> list[str]:
        return [f"quality: {self.layout.quality.url}/"]


class _Lineages:
    """An `Upstream` from a function of one shard: {what the shard is made from}, hashed."""

    def __init__(self, made_from: Callable[[str], dict[str, Any]]) -> None:
        self.made_from = made_from

    def lineages(self, shards: list[str]) -> dict[str, str]:
        return {s: config_hash(self.made_from(s)) for s in shards}


def _upstream(folder: StageDir, shard: str) -> str:
    return folder.read_done(shard).upstream if folder.has_done(shard) else ""


def _set_lineages(layout: Layout, sets: list[str], shard: str) -> dict[str, str]:
    return {name: _upstream(layout.captions(name), shard) for name in sets}


def _decode(size: int, item: tuple[Sample, bytes]) -> tuple[Sample, object]:
    sample, raw = item
    try:
        return sample, decode_image(raw, target_size=(size, size))
    except ImageDecodeError as exc:
        return sample, exc


class EmbedWorker:
    """Embeds one `images/` shard's sound images into `clip/<tag>/`; the model loads once per worker.

    As in caption, the CPU works ahead of the model: threads decode the next images and one thread runs the
    processor on the next batch while the model embeds this one."""

    def __init__(self, layout: Layout, config: QualityStageConfig, tag: str, view: InputView, sets: list[str]) -> None:
        self.images, self.folder = layout.images, layout.clip(tag)
        self.input = view
        self.config = config
        self.scorer = ScoreWorker(layout, config, tag, sets)
        self.model = self.scorer.model  # one model for both: a worker start costs more than a tiny shard's work

    def setup(self) -> None:
        self.model.setup()

    def process(self, shard: str, payload: None = None, rows_done: RowsDone = no_progress) -> DoneMarker:
        samples = {s.key: s for s in table_to_samples(self.images.read_index(shard))}
        self.input.skip(shard, samples.values())  # removed samples (duplicates, too small) get no embedding
        todo = ((samples[k], m[samples[k].ext]) for k, m in self.images.iter_samples(shard) if samples[k].status == OK)
        model, threads = self.model, self.config.decode_threads
        decoded = prefetch(
            todo, functools.partial(_decode, model.input_size), threads=threads, ahead=2 * model.batch_size + threads
        )

        def prepare(batch: list[tuple[Sample, object]]) -> tuple[int, list[Sample], Any]:
            """(images in the batch, those decoded, their pixel values or None): decode failures become rows."""
            for sample, image in batch:
                if isinstance(image, ImageDecodeError):
                    sample.fail(image.reason, str(image))
            ok = [(s, image) for s, image in batch if not isinstance(image, ImageDecodeError)]
            return len(batch), [s for s, _ in ok], model.preprocess([image for _, image in ok]) if ok else None

        rows: dict[str, int] = {}
        vectors: list[np.ndarray] = []
        done = sum(s.status != OK for s in samples.values())
        rows_done(done, len(samples))
        for outcome in prefetch(chunks(decoded, model.batch_size), prepare, threads=1, ahead=2):
            if isinstance(outcome, Exception):  # decode errors are per sample; a processor error fails the shard
                raise outcome
            size, embedded, pixels = outcome
            if pixels is not None:
                vectors.append(model.embed_pixels(pixels).astype(np.float16))
            for sample in embedded:
                rows[sample.key] = len(rows)
            done += size
            rows_done(done, len(samples))
        # Key order in the npy too: row i of the array is the i-th embedded key.
        ordered = sorted(samples.values(), key=lambda s: s.key)
        order = [rows[s.key] for s in ordered if s.key in rows]
        embeddings = np.concatenate(vectors)[order] if vectors else np.zeros((0, model.dim), np.float16)
        index = pa.Table.from_pylist(
            [
                {"key": s.key, "status": s.status, "error_reason": s.error_reason, "error": s.error, "row": row}
                for s, row in _positions(ordered, rows)
            ],
            schema=CLIP_INDEX,
        )
        files = {f"{shard}.npy": self.folder.write_file(f"{shard}.npy", _npy_bytes(embeddings))}
        files[f"{shard}.parquet"] = self.folder.write_index(shard, index)  # the files first, the done marker last
        marker = DoneMarker(
            shard,
            stage=NAME,
            rows=len(ordered),
            **lineage(config_hash(self.config.clip_semantics()), self.input.read_done(shard).upstream),
            counts=count_statuses(ordered),
            files=files,
            extra={"provenance": model.provenance(), "dim": int(embeddings.shape[1])},
        )
        self.folder.write_done(marker)
        self.scorer.process(shard)  # the scores pass finds this shard done, with the lineage it would give it
        return marker


def _positions(ordered: list[Sample], rows: dict[str, int]) -> Iterator[tuple[Sample, int | None]]:
    """Each sample with its row of the key-ordered npy (None without an embedding)."""
    position = 0
    for s in ordered:
        if s.key in rows:
            yield s, position
            position += 1
        else:
            yield s, None


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def read_embeddings(folder: StageDir, shard: str) -> np.ndarray:
    """A shard's (N, D) float16 embeddings (no pickle: plain arrays only)."""
    import io

    with folder.fs.open(folder.path(f"{shard}.npy"), "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


class ScoreWorker:
    """Scores one shard from its stored embeddings: the heads, and the clip score of each caption (text tower only)."""

    def __init__(self, layout: Layout, config: QualityStageConfig, tag: str, sets: list[str]) -> None:
        self.layout, self.config, self.sets = layout, config, sets
        self.clip = layout.clip(tag)
        self.model = QualityModel(config.model)

    def setup(self) -> None:
        self.model.setup()

    def process(self, shard: str, payload: None = None, rows_done: RowsDone = no_progress) -> DoneMarker:
        layout = self.layout
        embedded = self.clip.read_index(shard).to_pylist()
        vectors = read_embeddings(self.clip, shard).astype(np.float32)
        images = read_parquet(
            layout.images.fs,
            layout.images.path(f"{shard}.parquet"),
            ["key", "bucket_1024", "width", "height", "original_caption"],
        ).to_pylist()
        meta = {r["key"]: r for r in images}
        at = {r["key"]: r["row"] for r in embedded if r["row"] is not None}
        columns: dict[str, Any] = {
            "key": [r["key"] for r in embedded],
            "status": [r["status"] for r in embedded],
            "error_reason": [r["error_reason"] for r in embedded],
            "error": [r["error"] for r in embedded],
            "bucket": [meta[r["key"]]["bucket_1024"] for r in embedded],
            "width": [meta[r["key"]]["width"] for r in embedded],
            "height": [meta[r["key"]]["height"] for r in embedded],
        }
        keys = columns["key"]
        for head, score in (("aesthetic", self.model.aesthetic), ("nsfw", self.model.nsfw)):
            if head in self.model.heads:  # `--aesthetic-head none`: no such column
                values = score(vectors) if len(vectors) else np.zeros(0, np.float32)
                columns[head] = pa.array([float(values[at[k]]) if k in at else None for k in keys], pa.float32())
        texts = {ORIGINAL: {r["key"]: r["original_caption"] for r in images}}
        for name in self.sets:
            captions = layout.captions(name)
            if captions.has_done(shard):
                rows = captions.read_index(shard).select(["key", "status", "caption"]).to_pylist()
                texts[name] = {r["key"]: r["caption"] for r in rows if r["status"] == OK}
            else:
                texts[name] = {}
        for name, by_key in texts.items():
            scored = [k for k in keys if k in at and (by_key.get(k) or "").strip()]
            texts_emb, truncated = self.model.embed_texts([by_key[k] for k in scored])
            scores = clip_score(vectors[[at[k] for k in scored]], texts_emb) if scored else []
            found = {k: (float(s), bool(t)) for k, s, t in zip(scored, scores, truncated, strict=True)}
            columns[f"clip_score_{name}"] = pa.array([found[k][0] if k in found else None for k in keys], pa.float32())
            columns[f"text_truncated_{name}"] = pa.array(
                [found[k][1] if k in found else None for k in keys], pa.bool_()
            )
        rows_done(len(keys), len(keys))
        table = pa.table(columns)
        files = {f"{shard}.parquet": layout.quality.write_index(shard, table)}
        made_from = {"clip": self.clip.read_done(shard).upstream, "sets": _set_lineages(layout, self.sets, shard)}
        marker = DoneMarker(
            shard,
            stage=NAME,
            rows=len(keys),
            **lineage(config_hash(self.config.score_semantics()), config_hash(made_from)),
            counts={"by_status": _tally(columns["status"]), "by_clip_scored": _scored(columns, list(texts))},
            files=files,
            extra={"provenance": self.model.provenance(), "sets": list(texts)},
        )
        return layout.quality.write_done(marker)


def _tally(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _scored(columns: dict[str, Any], fields: list[str]) -> dict[str, int]:
    """{field: samples with a clip score}."""
    return {f: len(columns[f"clip_score_{f}"]) - columns[f"clip_score_{f}"].null_count for f in fields}


class FlagWorker:
    """Writes one shard's keep flags from the stored scores and the thresholds: no model."""

    def __init__(self, layout: Layout, kind: str, limits: dict[str, float]) -> None:
        self.layout, self.kind, self.limits = layout, kind, limits

    def setup(self) -> None:
        pass

    def process(self, shard: str, payload: None = None, rows_done: RowsDone = no_progress) -> DoneMarker:
        layout = self.layout
        scores = layout.quality.read_index(shard).to_pylist()
        table, removed = flag_rows(self.kind, scores, self.limits)
        folder = layout.quality_flags(self.kind)
        files = {f"{shard}.parquet": folder.write_index(shard, table)}
        reads = {"images": layout.images.read_done(shard).upstream}
        if self.kind == "texts":  # a clip-score flag is made from its set's captions: stale when they change
            for name in self.limits:
                if name != ORIGINAL:  # None: no such shard yet (stale once caption makes it)
                    captions = layout.captions(name)
                    reads[captions.url.rsplit("/", 1)[-1]] = _upstream(captions, shard) or None
        made_from = {"scores": layout.quality.read_done(shard).upstream, "limits": self.limits}
        marker = DoneMarker(
            shard,
            stage=NAME,
            rows=len(scores),
            **lineage(config_hash({"flags": self.kind}), config_hash(made_from)),
            counts={"by_removed": _tally([reason for reason, _ in removed.values()])},
            files=files,
            extra={"removed_digest": removed_digest(sorted(removed)), "reads": reads, "thresholds": self.limits},
        )
        return folder.write_done(marker)


def run_quality(output: str, config: QualityStageConfig, **kw: Any) -> Any:
    """`curation quality` from Python: see `curation.runner.run` for the keywords."""
    from curation.runner import run

    return run(QualityStage(Layout(output), config), **kw)
