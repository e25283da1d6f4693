"""Export feature shards to the folder layout PixArt-alpha's trainer reads (`InternalData`, `InternalDataMS`).

    <to_dir = .../InternData>/partition/data_info.json                     single scale (JSON array)
                             /partition_filter/data_info.json              multi-scale
                             /caption_feature_wmask/<key>.npz              caption_feature (1, L, D) float32,
                                                                           attention_mask (1, L) int64
                             /img_vae_features_{R}resolution/noflip/<key>.npy   (2C, R/8, R/8) float32
                             /img_vae_fatures_{R}_multiscale/ms/<key>.npy       (sic) (2C, h/8, w/8) float32
    <.../InternImgs>/<key>.png                                             the image (see below)

`path` values are flat `<key>.png`: keys are unique and free of dots and slashes, so the trainer's
`'_'.join(path.rsplit('/', 1)).replace('.png', ext)` maps each entry to `<key>.npz` / `<key>.npy`.
With precomputed latents the trainer never opens the image, but its bucket sampler retries failed loads
within a bucket, so every named file must exist: `<key>.png` holds the original bytes unchanged (no
re-encoding; Pillow reads by content, not by name), or a real PNG with `reencode_png=True`.
`height`/`width` are the image as displayed (EXIF applied), the size the latents were computed from, so the
trainer's bucket for an entry is the one its latent was cropped to. Entries with h/w > 4 are left out and
counted, as the trainer would drop them. `data_info.json` is written last: it never names a missing file.

Run: `curation export-pixart --output OUT --to /data/pixart/InternData --resolution 512 [--multiscale]`
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from curation.buckets import MAX_TRAINER_RATIO
from curation.dedup.filter import DuplicateFilter
from curation.features.npy import read_npy
from curation.features.stage import INPUT, T5_SIDECAR, vae_sidecar
from curation.records import OK, SKIPPED
from curation.shards import StageDir

DATA_DIR, IMAGE_DIR = (
    "InternData",
    "InternImgs",
)  # the trainer finds images by replacing the first by the second


def vae_dir(resolution: int, multiscale: bool) -> str:
    """The trainer's VAE folder, relative to InternData (the multi-scale name's typo is the trainer's)."""
    if multiscale:
        return f"img_vae_fatures_{resolution}_multiscale/ms"
    return f"img_vae_features_{resolution}resolution/noflip"


def index_file(multiscale: bool) -> str:
    return f"{'partition_filter' if multiscale else 'partition'}/data_info.json"


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


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a killed export leaves whole files only; a rerun rewrites them


def _npz_bytes(feature: np.ndarray, mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # float32 and a batch axis of 1, as PixArt-alpha's extraction saved them; int64 is torch's mask dtype.
    np.savez(
        buf,
        caption_feature=feature.astype(np.float32)[None],
        attention_mask=mask.astype(np.int64)[None],
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
    reencode_png: bool = False,
    include_duplicates: bool = False,
) -> dict[str, Any]:
    """Write the InternData/InternImgs layout for one resolution from OUT's feature shards; returns counts."""
    images = image_root(to_dir)
    data = Path(os.path.abspath(os.fspath(to_dir)))
    base = output.rstrip("/")
    t5, vae = (
        StageDir(f"{base}/features/{T5_SIDECAR}"),
        StageDir(f"{base}/features/{vae_sidecar(resolution, multiscale)}"),
    )
    captions = StageDir(f"{base}/{INPUT}")
    all_shards = captions.done_shards()
    shards = sorted(set(all_shards) & set(t5.done_shards()) & set(vae.done_shards()))
    if not shards:
        raise FileNotFoundError(
            f"no shard of {base} has both {t5.url} and {vae.url} done: run `curation features` with "
            f"resolution {resolution}{' and --multiscale' if multiscale else ''} first"
        )
    feature_dir, vae_out = data / "caption_feature_wmask", data / vae_dir(resolution, multiscale)
    for d in (feature_dir, vae_out, images, (data / index_file(multiscale)).parent):
        d.mkdir(parents=True, exist_ok=True)

    counts = {
        "entries": 0,
        "left_out_ratio": 0,
        "failed": 0,
        "skipped_duplicate": 0,  # removed by dedup (kept with include_duplicates)
        "shards": len(shards),
        "shards_without_features": len(all_shards) - len(shards),
    }
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    duplicates = DuplicateFilter.for_stage(output, captions, include_duplicates)
    for shard in shards:
        texts = {r["key"]: r for r in t5.read_index(shard).to_pylist()}
        removed = duplicates.removed(shard) if duplicates is not None else {}
        keep: dict[str, dict[str, Any]] = {}
        for row in vae.read_index(shard).to_pylist():
            key = row["key"]
            if key in removed or row["status"] == SKIPPED:
                counts["skipped_duplicate"] += 1
                continue
            if row["status"] != OK or texts.get(key, {}).get("status") != OK:
                counts["failed"] += 1
                continue
            if row["orig_height"] / row["orig_width"] > MAX_TRAINER_RATIO:
                counts["left_out_ratio"] += 1
                continue
            if key in seen:
                raise ValueError(f"key {key!r} occurs in two shards: flat trainer paths would collide")
            seen.add(key)
            keep[key] = {
                "path": f"{key}.png",
                "prompt": texts[key]["text"],
                "height": row["orig_height"],
                "width": row["orig_width"],
                "ratio": row["orig_height"] / row["orig_width"],
            }
        _export_shard(shard, keep, t5, vae, captions, feature_dir, vae_out, images, reencode_png)
        entries.extend(keep.values())
    _write(data / index_file(multiscale), json.dumps(entries, ensure_ascii=False).encode())
    counts["entries"] = len(entries)
    return counts


def _export_shard(
    shard: str,
    keep: dict[str, dict[str, Any]],
    t5: StageDir,
    vae: StageDir,
    captions: StageDir,
    feature_dir: Path,
    vae_out: Path,
    images: Path,
    reencode_png: bool,
) -> None:
    """Three streaming passes (T5, VAE, images): a shard's features never sit in memory together."""
    written = {"t5": set(), "vae": set(), "image": set()}
    for key, members in t5.iter_samples(shard):
        if key in keep:
            feature, mask = read_npy(members["t5.npy"]), read_npy(members["t5mask.npy"])
            _write(feature_dir / f"{key}.npz", _npz_bytes(feature, mask))
            written["t5"].add(key)
    for key, members in vae.iter_samples(shard):
        if key in keep:
            _write(vae_out / f"{key}.npy", members["vae.npy"])  # already a float32 .npy of the final shape
            written["vae"].add(key)
    exts = {r["key"]: r["ext"] for r in captions.read_index(shard).select(["key", "ext"]).to_pylist()}
    for key, members in captions.iter_samples(shard):
        if key in keep:
            raw = members[exts[key]]
            _write(images / f"{key}.png", _png_bytes(raw) if reencode_png else raw)
            written["image"].add(key)
    for what, keys in written.items():
        if missing := keep.keys() - keys:
            raise RuntimeError(f"shard {shard}: {len(missing)} {what} member(s) missing, e.g. {min(missing)}")
