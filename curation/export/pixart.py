"""Export feature shards to the folder layouts PixArt's trainers read: α (`InternalData`, `InternalDataMS`) and
Σ (`InternalDataSigma`, `InternalDataMSSigma`).

α (`--format alpha`, the default):

    <to_dir = .../InternData>/partition/<shard>.json                       single scale index (JSON arrays)
                             /partition_filter/<shard>.json                multi-scale index
                             /caption_feature_wmask/<key>.npz              caption_feature (1, L, D) float32,
                                                                           attention_mask (1, L) int64
                             /img_vae_features_{R}resolution/noflip/<key>.npy   (2C, R/8, R/8) float32
                             /img_vae_fatures_{R}_multiscale/ms/<key>.npy       (sic) (2C, h/8, w/8) float32
    <.../InternImgs>/<key>.png                                             the image (see below)

Σ (`--format sigma`; 300 tokens, the SDXL VAE's latents from `curation features --vae-tag TAG`):

    <to_dir = .../InternData>/data_info_sigma/<shard>.json                 single scale index
                             /data_info_sigma_ms/<shard>.json              multi-scale index
                             /caption_features_new/<key>.npz               T5 of `prompt`: caption_feature
                                                                   (1, L, D) float16, attention_mask (1, L) int16
                             /sharegpt4v_caption_features_new/<key>.npz    T5 of `sharegpt4v`, the same
                             /img_sdxl_vae_features_{R}resolution_new/<key>.npy      (2C, R/8, R/8) float32
                             /img_sdxl_vae_features_{R}resolution_ms_new/<key>.npy   (2C, h/8, w/8) float32
    <.../InternImgs>/<key>.png

Σ entries carry `prompt` (default: the original caption) and `sharegpt4v` (default: the default caption set), each
from its own T5 sidecar (`t5-<field>-300`); a sample whose `prompt` field is empty takes the other field's text and
features (and the other way round), counted as `prompt_fallback` / `sharegpt4v_fallback`.

The index is one JSON file per shard, written by the Ray task that exported the shard, so no process holds every
entry: pass the sorted list of files to the trainer (both α's and Σ's datasets take a list of JSON files).
`path` values are flat `<key>.png`: keys are unique and free of dots and slashes, so the trainers'
`'_'.join(path.rsplit('/', 1)).replace('.png', ext)` maps each entry to `<key>.npz` / `<key>.npy`.
With precomputed latents the trainer never opens the image, but its bucket sampler retries failed loads
within a bucket, so every named file must exist: `<key>.png` holds the original bytes unchanged (no
re-encoding; Pillow reads by content, not by name), or a real PNG with `reencode_png=True`.
`height`/`width` are the image as displayed (EXIF applied), the size the latents were computed from, so the
trainer's bucket for an entry is the one its latent was cropped to. Entries with h/w above the trainer's limit
(α 4, Σ 4.5) are left out and counted, as the trainer would drop them. A shard's JSON is written after its
files: it never names a missing file.

`ExportStage` is one pass of the runner (`curation.export.passes`): a task per images shard, its done marker in
`InternData/.curation/export-pixart-<format>-<R>[ms]/` after its index file, resumable, logged, and refusing a
changed config without --force. Images are read from `images/`, the one copy of the bytes. Paths into OUT come from
`curation.layout.Layout`; the InternData/InternImgs names above are the trainers' contract and live here.

Run: `curation export-pixart --output OUT --to /data/pixart/InternData --resolution 512 [--multiscale]`
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curation.buckets import BASES, MAX_TRAINER_RATIO
from curation.errors import ConfigError, SetupError
from curation.export.passes import ExportDone, ExportInputs, write_file
from curation.features.npy import read_npy
from curation.features.stage import FIELDS, SIGMA_MAX_LENGTH, T5_SIDECAR, t5_sidecar, vae_sidecar
from curation.layout import DEFAULT_SET, ORIGINAL, Layout, check_set_name
from curation.records import OK, SKIPPED
from curation.shards import DoneMarker, StageDir, config_hash, lineage
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
)

if TYPE_CHECKING:
    from curation.runner import StageRun

DATA_DIR, IMAGE_DIR = (
    "InternData",
    "InternImgs",
)  # the trainer finds images by replacing the first by the second
FORMATS = ("alpha", "sigma")
MAX_SIGMA_RATIO = 4.5  # InternalDataSigma drops entries with ratio > 4.5 (α: 4)
PROMPT, SHAREGPT4V = "prompt", "sharegpt4v"


def vae_dir(resolution: int, multiscale: bool, format: str = "alpha") -> str:
    """The trainer's VAE folder, relative to InternData (the α multi-scale name's typo is the trainer's)."""
    if format == "sigma":
        return f"img_sdxl_vae_features_{resolution}resolution{'_ms' if multiscale else ''}_new"
    if multiscale:
        return f"img_vae_fatures_{resolution}_multiscale/ms"
    return f"img_vae_features_{resolution}resolution/noflip"


def index_dir(multiscale: bool, format: str = "alpha") -> str:
    """The folder of the per-shard JSON index files, relative to InternData."""
    if format == "sigma":
        return f"data_info_sigma{'_ms' if multiscale else ''}"
    return "partition_filter" if multiscale else "partition"


def feature_dirs(format: str) -> dict[str, str]:
    """{index field: the folder of its T5 .npz files}, relative to InternData."""
    if format == "sigma":
        return {PROMPT: "caption_features_new", SHAREGPT4V: "sharegpt4v_caption_features_new"}
    return {PROMPT: "caption_feature_wmask"}


def image_root(to_dir: str | Path) -> Path:
    """InternImgs beside InternData: the trainer's `root.replace('InternData', 'InternImgs')`, checked."""
    root = os.path.abspath(os.fspath(to_dir))
    count = root.count(DATA_DIR)
    if count != 1:
        raise ConfigError(
            f"the export folder must contain {DATA_DIR!r} exactly once in its path ({count} in {root}): "
            f"PixArt finds images by replacing it with {IMAGE_DIR!r}; pass e.g. /data/pixart/{DATA_DIR}"
        )
    return Path(root.replace(DATA_DIR, IMAGE_DIR))


def _field_sidecar(field: str) -> str:
    """The Σ T5 sidecar of a caption field: `original`, `default` or a caption set's name, at 300 tokens."""
    return t5_sidecar("caption" if field == DEFAULT_SET else field, SIGMA_MAX_LENGTH)


@dataclass(frozen=True)
class ExportConfig:
    to: str = field(metadata={"help": "the InternData folder to write (its path must name InternData once)"})
    resolution: int = field(default=512, metadata={"help": "the bucket base whose latents are exported"})
    multiscale: bool = field(default=False, metadata={"help": "export the multi-scale (bucketed) latents"})
    format: str = field(
        default="alpha", metadata={"help": "PixArt-alpha or PixArt-Sigma layout", "choices": list(FORMATS)}
    )
    prompt_field: str = field(
        default=ORIGINAL, metadata={"help": "Sigma: the `prompt` caption (original or a set name)"}
    )
    sharegpt4v_field: str = field(
        default=DEFAULT_SET, metadata={"help": "Sigma: the `sharegpt4v` caption (a set name)"}
    )
    vae_tag: str | None = field(
        default=None, metadata={"help": "read the VAE sidecars vae512-TAG (e.g. sdxl for Sigma)"}
    )
    include: tuple[str, ...] = include_field("export")  # not in semantics: in the lineage
    reencode_png: bool = field(
        default=False, metadata={"help": "write real PNGs instead of the original bytes", "cli": False}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "to", os.fspath(self.to))
        object.__setattr__(self, "include", check_include(self.include))
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.resolution not in BASES:
            raise ConfigError(f"resolution must be among {BASES} (PixArt's bucket bases), got {self.resolution}")
        for name in (self.prompt_field, self.sharegpt4v_field):
            if name not in FIELDS and name != DEFAULT_SET:
                check_set_name(name)
        if self.vae_tag is not None and not self.vae_tag.isalnum():
            raise ConfigError(f"vae_tag must be letters and digits, got {self.vae_tag!r}")
        image_root(self.to)


@dataclass(frozen=True)
class ExportPlan:
    """What every shard's export task needs (sent to the Ray tasks)."""

    layout: Layout
    config: ExportConfig
    data: str  # the InternData folder, absolute

    @property
    def t5(self) -> dict[str, StageDir]:
        """{index field: the T5 sidecar its features come from}."""
        c = self.config
        if c.format == "sigma":
            return {
                PROMPT: self.layout.sidecar(_field_sidecar(c.prompt_field)),
                SHAREGPT4V: self.layout.sidecar(_field_sidecar(c.sharegpt4v_field)),
            }
        return {PROMPT: self.layout.sidecar(T5_SIDECAR)}

    @property
    def vae(self) -> StageDir:
        return self.layout.sidecar(vae_sidecar(self.config.resolution, self.config.multiscale, self.config.vae_tag))

    @property
    def label(self) -> str:
        """The pass (logs, run_config.json, the markers' folder): one per format, resolution and scale."""
        c = self.config
        return f"export-pixart-{c.format}-{c.resolution}{'ms' if c.multiscale else ''}"

    @property
    def semantics(self) -> dict[str, Any]:
        """What decides the files (the target is where, not what; removed samples are in the lineage)."""
        c = self.config
        fields = {PROMPT: c.prompt_field, SHAREGPT4V: c.sharegpt4v_field} if c.format == "sigma" else {}
        return {"format": c.format, "resolution": c.resolution, "multiscale": c.multiscale, "vae_tag": c.vae_tag,
                "reencode_png": c.reencode_png, **fields}  # fmt: skip

    @property
    def done_dir(self) -> ExportDone:
        index = index_dir(self.config.multiscale, self.config.format)
        return ExportDone.at(self.data, self.label, (f"{index}/{{shard}}.json",))

    @property
    def max_ratio(self) -> float:
        return MAX_SIGMA_RATIO if self.config.format == "sigma" else MAX_TRAINER_RATIO

    def shards(self) -> tuple[list[str], list[str]]:
        """(the images shards with every needed sidecar done, all images shards); SetupError when none has."""
        c = self.config
        all_shards = self.layout.images.done_shards()
        if not all_shards:
            raise SetupError(self.layout.missing_images())
        needed = [self.vae, *self.t5.values()]
        shards = sorted(set(all_shards).intersection(*(d.done_shards() for d in needed)))
        if not shards:
            raise SetupError(
                f"no shard of {self.layout.output} has {' and '.join(d.url for d in needed)} done: run "
                f"`curation features` with resolution {c.resolution}{' and --multiscale' if c.multiscale else ''} "
                "first"
                + (f" (--max-length {SIGMA_MAX_LENGTH}, --field for each of the two captions)" if c.format == "sigma"
                   else "")
            )  # fmt: skip
        return shards, all_shards


class ExportStage(Stage):
    """Writes outside OUT: one runner pass whose shards are the images shards with every needed sidecar, their done
    markers in the target (`curation.export.passes`)."""

    name = "export-pixart"
    help = "feature shards -> PixArt-alpha's or Sigma's InternData/InternImgs layout"
    config_type = ExportConfig

    def __init__(self, layout: Layout, config: ExportConfig) -> None:
        super().__init__(layout, config)
        self.plan = ExportPlan(layout, config, os.path.abspath(config.to))
        self.result: dict[str, int] = {}  # the counts, for callers (`export_pixart`)
        self.shards: tuple[list[str], list[str]] = ([], [])

    def needs(self) -> list[Needs]:
        return [needs_images(self.layout)]

    def check(self) -> None:
        super().check()
        self.shards = self.plan.shards()

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        """One pass: every images shard that has the sidecars, each task writing its files then its index file."""
        plan, c = self.plan, self.config
        shards = self.shards[0]
        data = Path(plan.data)
        index = data / index_dir(c.multiscale, c.format)
        for d in (*feature_dirs(c.format).values(), vae_dir(c.resolution, c.multiscale, c.format), index):
            (data / d).mkdir(parents=True, exist_ok=True)
        image_root(plan.data).mkdir(parents=True, exist_ok=True)
        done = plan.done_dir
        marked = set(done.done_shards())
        for stale in index.glob("*.json"):  # an earlier release's export of shards that are gone (α's single file)
            if stale.stem not in shards and stale.stem not in marked:
                stale.unlink()
        view = self.input_view(self.layout.images)
        yield Pass(
            label=plan.label,
            folder=done,
            make_worker=functools.partial(PixartWorker, plan, view),
            tasks=[(s, None) for s in shards],
            semantics=plan.semantics,
            resources=Resources(stateless=True),
            upstream=ExportInputs(view, [plan.vae, *plan.t5.values()]),
        )

    def finish(self, summaries: list[Any]) -> list[str]:
        shards, all_shards = self.shards
        counts = _zero_counts(self.config.format) | summaries[0].counts.get("by_export", {})
        self.result = counts | {"shards": len(shards), "shards_without_features": len(all_shards) - len(shards)}
        return ["[export-pixart] " + ", ".join(f"{k}={v}" for k, v in self.result.items())]

    def outputs(self) -> list[str]:
        index = index_dir(self.config.multiscale, self.config.format)
        where = f"index: one JSON file per shard in {index}/, pass them all as the list"
        return [f"PixArt InternData: {self.config.to} ({where})"]


class PixartWorker:
    """Exports one shard: its files, its index file, then its done marker in the target."""

    def __init__(self, plan: ExportPlan, view: InputView) -> None:
        self.plan, self.view = plan, view
        self.inputs = ExportInputs(view, [plan.vae, *plan.t5.values()])

    def setup(self) -> None:
        pass

    def process(self, shard: str, payload: None = None, rows_done: RowsDone = no_progress) -> DoneMarker:
        started = time.time()
        counts = _export_shard(self.plan, self.view, shard)
        upstream = self.inputs.lineages([shard])[shard]
        done = DoneMarker(
            shard,
            stage=self.plan.label,
            rows=counts["entries"],
            **lineage(config_hash(self.plan.semantics), upstream),
            counts={"by_export": counts},
        )
        done.seconds = round(time.time() - started, 3)
        return self.plan.done_dir.write_done(done)  # last


def _zero_counts(format: str) -> dict[str, int]:
    counts = {"entries": 0, "left_out_ratio": 0, "failed": 0, "skipped_duplicate": 0}
    if format == "sigma":
        counts |= {"prompt_fallback": 0, "sharegpt4v_fallback": 0}
    return counts


def _npz_bytes(feature: np.ndarray, mask: np.ndarray, format: str) -> bytes:
    buf = io.BytesIO()
    # A batch axis of 1, as PixArt's extraction scripts saved them: α float32 and torch's int64 mask,
    # Σ float16 and int16 (what Σ's extractor writes).
    sigma = format == "sigma"
    np.savez(
        buf,
        caption_feature=feature.astype(np.float16 if sigma else np.float32)[None],
        attention_mask=mask.astype(np.int16 if sigma else np.int64)[None],
    )
    return buf.getvalue()


def _png_bytes(data: bytes) -> bytes:
    from curation.imaging import decode_image

    buf = io.BytesIO()
    decode_image(data).save(buf, format="PNG")
    return buf.getvalue()


def export_pixart(
    output: str,
    to_dir: str | Path,
    resolution: int,
    multiscale: bool,
    *,
    format: str = "alpha",
    prompt_field: str = ORIGINAL,
    sharegpt4v_field: str = DEFAULT_SET,
    vae_tag: str | None = None,
    reencode_png: bool = False,
    include: tuple[str, ...] = (),
    ray_address: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write PixArt's InternData/InternImgs layout for one resolution from OUT's feature shards, one Ray task per
    shard; returns counts (`curation export-pixart` from Python)."""
    config = ExportConfig(
        os.fspath(to_dir), resolution, multiscale, format, prompt_field, sharegpt4v_field, vae_tag,
        include, reencode_png,
    )  # fmt: skip
    return run_export(output, config, ray_address=ray_address, progress=progress).result


def run_export(output: str, config: ExportConfig, **kw: Any) -> StageRun:
    """`curation export-pixart` from Python: see `curation.runner.run` for the keywords; `.result` is the counts."""
    from curation.runner import run

    return run(ExportStage(Layout(output), config), **kw)


def _export_shard(plan: ExportPlan, view: InputView, shard: str) -> dict[str, int]:
    """Export one shard's files, then its JSON index file; returns its counts."""
    c = plan.config
    images = plan.layout.images
    removed = view.removed(shard)  # every filter's before this stage, but those `--include` names
    texts = {field: {r["key"]: r for r in d.read_index(shard).to_pylist()} for field, d in plan.t5.items()}
    counts = _zero_counts(c.format)
    # key -> the index entry, and per index field the sidecar whose features it takes (a fallback: the other's)
    keep: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for row in plan.vae.read_index(shard).to_pylist():
        key = row["key"]
        if key in removed or row["status"] == SKIPPED:
            reason = removed[key][0] if key in removed else row["error_reason"]
            counts[f"skipped_{reason}"] = counts.get(f"skipped_{reason}", 0) + 1
            continue
        have = [f for f in texts if texts[f].get(key, {}).get("status") == OK]
        if row["status"] != OK or not have:
            counts["failed"] += 1
            continue
        if row["orig_height"] / row["orig_width"] > plan.max_ratio:
            counts["left_out_ratio"] += 1
            continue
        chosen = {f: f if f in have else have[0] for f in texts}  # an empty field takes the other's
        for f, source in chosen.items():
            if source != f:
                counts[f"{f}_fallback"] += 1
        sources[key] = chosen
        keep[key] = {
            "path": f"{key}.png",
            **{f: texts[source][key]["text"] for f, source in chosen.items()},
            "height": row["orig_height"],
            "width": row["orig_width"],
            "ratio": row["orig_height"] / row["orig_width"],
        }
    _export_files(plan, shard, keep, sources, images)
    index = Path(plan.data) / index_dir(c.multiscale, c.format) / f"{shard}.json"
    write_file(index, json.dumps(list(keep.values()), ensure_ascii=False).encode())  # last: names existing files only
    counts["entries"] = len(keep)
    return counts


def _export_files(
    plan: ExportPlan,
    shard: str,
    keep: dict[str, dict[str, Any]],
    sources: dict[str, dict[str, str]],
    images_dir: StageDir,
) -> None:
    """Streaming passes (each T5 sidecar, VAE, images): a shard's features never sit in memory together."""
    c = plan.config
    data = Path(plan.data)
    written: dict[str, set[str]] = {"vae": set(), "image": set()}
    out_dirs = feature_dirs(c.format)
    for source, sidecar in plan.t5.items():
        for key, members in sidecar.iter_samples(shard):
            # The fields whose features this sidecar provides for the key (its own, and a fallback's).
            fields = [f for f, s in sources.get(key, {}).items() if s == source]
            if fields:
                npz = _npz_bytes(read_npy(members["t5.npy"]), read_npy(members["t5mask.npy"]), c.format)
                for f in fields:
                    write_file(data / out_dirs[f] / f"{key}.npz", npz)
                    written.setdefault(f, set()).add(key)
    vae_out = data / vae_dir(c.resolution, c.multiscale, c.format)
    for key, members in plan.vae.iter_samples(shard):
        if key in keep:
            write_file(vae_out / f"{key}.npy", members["vae.npy"])  # already a float32 .npy of the final shape
            written["vae"].add(key)
    exts = {r["key"]: r["ext"] for r in images_dir.read_index(shard).select(["key", "ext"]).to_pylist()}
    images = image_root(plan.data)
    for key, members in images_dir.iter_samples(shard):  # `images/`: the one copy of the bytes
        if key in keep:
            raw = members[exts[key]]
            write_file(images / f"{key}.png", _png_bytes(raw) if c.reencode_png else raw)
            written["image"].add(key)
    for what in [*out_dirs, "vae", "image"]:
        if missing := keep.keys() - written.get(what, set()):
            raise RuntimeError(f"shard {shard}: {len(missing)} {what} member(s) missing, e.g. {min(missing)}")
