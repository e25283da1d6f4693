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

Run: `curation export-pixart --output OUT --to /data/pixart/InternData --resolution 512 [--multiscale]`
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curation.buckets import MAX_TRAINER_RATIO
from curation.caption.sets import DEFAULT_SET, ORIGINAL
from curation.dedup.filter import DuplicateFilter
from curation.features.npy import read_npy
from curation.features.stage import INPUT, SIGMA_MAX_LENGTH, T5_SIDECAR, t5_sidecar, vae_sidecar
from curation.records import OK, SKIPPED
from curation.shards import StageDir

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
        raise ValueError(
            f"the export folder must contain {DATA_DIR!r} exactly once in its path ({count} in {root}): "
            f"PixArt finds images by replacing it with {IMAGE_DIR!r}; pass e.g. /data/pixart/{DATA_DIR}"
        )
    return Path(root.replace(DATA_DIR, IMAGE_DIR))


def _field_sidecar(field: str) -> str:
    """The Σ T5 sidecar of a caption field: `original`, `default` or a caption set's name, at 300 tokens."""
    return t5_sidecar("caption" if field == DEFAULT_SET else field, SIGMA_MAX_LENGTH)


@dataclass(frozen=True)
class ExportPlan:
    """What every shard's export task needs (sent to the Ray tasks)."""

    output: str
    data: str  # the InternData folder
    resolution: int
    multiscale: bool
    format: str = "alpha"
    prompt_field: str = ORIGINAL  # Σ only
    sharegpt4v_field: str = DEFAULT_SET  # Σ only
    vae_tag: str | None = None
    reencode_png: bool = False
    include_duplicates: bool = False

    @property
    def t5(self) -> dict[str, StageDir]:
        """{index field: the T5 sidecar its features come from}."""
        base = f"{self.output.rstrip('/')}/features"
        if self.format == "sigma":
            return {
                PROMPT: StageDir(f"{base}/{_field_sidecar(self.prompt_field)}"),
                SHAREGPT4V: StageDir(f"{base}/{_field_sidecar(self.sharegpt4v_field)}"),
            }
        return {PROMPT: StageDir(f"{base}/{T5_SIDECAR}")}

    @property
    def vae(self) -> StageDir:
        sidecar = vae_sidecar(self.resolution, self.multiscale, self.vae_tag)
        return StageDir(f"{self.output.rstrip('/')}/features/{sidecar}")

    @property
    def max_ratio(self) -> float:
        return MAX_SIGMA_RATIO if self.format == "sigma" else MAX_TRAINER_RATIO


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a killed export leaves whole files only; a rerun rewrites them


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
    include_duplicates: bool = False,
    ray_address: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write PixArt's InternData/InternImgs layout for one resolution from OUT's feature shards, one Ray task per
    shard; returns counts."""
    from curation.runner import ray_session, run_tasks

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    images = image_root(to_dir)
    data = Path(os.path.abspath(os.fspath(to_dir)))
    plan = ExportPlan(
        output, str(data), resolution, multiscale, format, prompt_field, sharegpt4v_field, vae_tag, reencode_png,
        include_duplicates,
    )  # fmt: skip
    all_shards = StageDir(f"{output.rstrip('/')}/{INPUT}").done_shards()
    needed = [plan.vae, *plan.t5.values()]
    shards = sorted(set(all_shards).intersection(*(d.done_shards() for d in needed)))
    if not shards:
        raise FileNotFoundError(
            f"no shard of {output} has {' and '.join(d.url for d in needed)} done: run `curation features` with "
            f"resolution {resolution}{' and --multiscale' if multiscale else ''} first"
            + (f" (--max-length {SIGMA_MAX_LENGTH}, --field for each of the two captions)" if format == "sigma" else "")
        )
    index = data / index_dir(multiscale, format)
    for d in (*feature_dirs(format).values(), vae_dir(resolution, multiscale, format), index):
        (data / d).mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    for stale in index.glob("*.json"):  # an earlier export's shards that are gone, or α's former single file
        if stale.stem not in shards:
            stale.unlink()
    with ray_session(ray_address):
        results = run_tasks("export-pixart", _export_shard, [(s, (plan, s)) for s in shards], progress=progress)
    counts = {"entries": 0, "left_out_ratio": 0, "failed": 0, "skipped_duplicate": 0}
    if format == "sigma":
        counts |= {"prompt_fallback": 0, "sharegpt4v_fallback": 0}
    for shard_counts in results.values():
        for k, v in shard_counts.items():
            counts[k] += v
    return counts | {"shards": len(shards), "shards_without_features": len(all_shards) - len(shards)}


def _export_shard(plan: ExportPlan, shard: str) -> dict[str, int]:
    """Export one shard's files, then its JSON index file; returns its counts."""
    base = plan.output.rstrip("/")
    captions = StageDir(f"{base}/{INPUT}")
    duplicates = DuplicateFilter.for_stage(base, captions, plan.include_duplicates)
    removed = duplicates.removed(shard) if duplicates is not None else {}
    texts = {field: {r["key"]: r for r in d.read_index(shard).to_pylist()} for field, d in plan.t5.items()}
    counts = {"entries": 0, "left_out_ratio": 0, "failed": 0, "skipped_duplicate": 0}
    if plan.format == "sigma":
        counts |= {"prompt_fallback": 0, "sharegpt4v_fallback": 0}
    # key -> the index entry, and per index field the sidecar whose features it takes (a fallback: the other's)
    keep: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for row in plan.vae.read_index(shard).to_pylist():
        key = row["key"]
        if key in removed or row["status"] == SKIPPED:
            counts["skipped_duplicate"] += 1
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
    _export_files(plan, shard, keep, sources, captions)
    index = Path(plan.data) / index_dir(plan.multiscale, plan.format) / f"{shard}.json"
    _write(index, json.dumps(list(keep.values()), ensure_ascii=False).encode())  # last: names existing files only
    counts["entries"] = len(keep)
    return counts


def _export_files(
    plan: ExportPlan,
    shard: str,
    keep: dict[str, dict[str, Any]],
    sources: dict[str, dict[str, str]],
    captions: StageDir,
) -> None:
    """Streaming passes (each T5 sidecar, VAE, images): a shard's features never sit in memory together."""
    data = Path(plan.data)
    written: dict[str, set[str]] = {"vae": set(), "image": set()}
    out_dirs = feature_dirs(plan.format)
    for source, sidecar in plan.t5.items():
        for key, members in sidecar.iter_samples(shard):
            # The fields whose features this sidecar provides for the key (its own, and a fallback's).
            fields = [f for f, s in sources.get(key, {}).items() if s == source]
            if fields:
                npz = _npz_bytes(read_npy(members["t5.npy"]), read_npy(members["t5mask.npy"]), plan.format)
                for f in fields:
                    _write(data / out_dirs[f] / f"{key}.npz", npz)
                    written.setdefault(f, set()).add(key)
    vae_out = data / vae_dir(plan.resolution, plan.multiscale, plan.format)
    for key, members in plan.vae.iter_samples(shard):
        if key in keep:
            _write(vae_out / f"{key}.npy", members["vae.npy"])  # already a float32 .npy of the final shape
            written["vae"].add(key)
    exts = {r["key"]: r["ext"] for r in captions.read_index(shard).select(["key", "ext"]).to_pylist()}
    images = image_root(plan.data)
    for key, members in captions.iter_samples(shard):
        if key in keep:
            raw = members[exts[key]]
            _write(images / f"{key}.png", _png_bytes(raw) if plan.reencode_png else raw)
            written["image"].add(key)
    for what in [*out_dirs, "vae", "image"]:
        if missing := keep.keys() - written.get(what, set()):
            raise RuntimeError(f"shard {shard}: {len(missing)} {what} member(s) missing, e.g. {min(missing)}")
