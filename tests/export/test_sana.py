"""The Sana export, read back by webdataset's `wids.ShardListDataset` over wids-meta.json as Sana's SanaWebDatasetMS
reads it (its path logic re-implemented from github:NVlabs/Sana's diffusion/data/datasets/sana_data*.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation.errors import SetupError
from curation.export.sana import SanaConfig, run_export_sana
from curation.features.npy import read_npy
from curation.features.stage import FeaturesConfig
from curation.imaging import header_size
from curation.records import Sample, samples_to_table
from curation.shards import DoneMarker, ShardWriter, StageDir
from curation.tiny.t5 import build_tiny_t5
from curation.tiny.vae import DCAE_SCALING_FACTOR, build_tiny_dcae
from tests.conftest import COCO, REPO
from tests.features import make_caption_shards, make_named_set, write_features
from tests.outputs import index_rows, tar_members

R = 512


def _jpeg(photo: Path, **save) -> bytes:
    buf = io.BytesIO()
    with Image.open(photo) as im:
        im.convert("RGB").save(buf, format=save.pop("format", "JPEG"), **save)
    return buf.getvalue()


def _odd_shard(out: Path) -> None:
    """images/ and captions/ shard `zz`: a photo stored sideways with EXIF orientation 6, and a WebP."""
    photos = sorted(COCO.glob("*.jpg"))[-2:]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    with Image.open(photos[0]) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", exif=exif.tobytes())
    items = [("zz_rotated", buf.getvalue(), "jpg"), ("zz_webp", _jpeg(photos[1], format="WEBP"), "webp")]
    samples = []
    for key, data, ext in items:
        s = Sample(key=key, source="folder", source_id=f"{key}.{ext}", ext=ext, original_caption=f"alt of {key}")
        s.set_size(*header_size(data))  # as displayed
        samples.append((s, data))
    with ShardWriter(StageDir(f"{out}/images"), "zz") as w:
        for s, data in samples:
            w.add(s.key, {s.ext: data, "json": s.to_json()})
        w.commit(samples_to_table([s for s, _ in samples]), DoneMarker("zz", stage="images", lineage="images-zz"))
    with ShardWriter(StageDir(f"{out}/captions"), "zz") as w:
        for s, _ in samples:
            s.caption, s.caption_status = f"a default caption of {s.key}", "ok"
            w.add(s.key, {"txt": s.caption.encode(), "json": s.to_json()})
        w.commit(samples_to_table([s for s, _ in samples]), DoneMarker("zz", stage="captions", lineage="c-zz"))


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana")
    t5, dcae = build_tiny_t5(root / "t5"), build_tiny_dcae(root / "dcae")
    out = root / "out"
    outcomes = make_caption_shards(out, n_ok=3, per_shard=4)
    _odd_shard(out)
    dense = make_named_set(out, "dense", no_original=frozenset({"coco_000000000790"}))
    config = FeaturesConfig(str(t5), str(dcae), resolutions=(R,), multiscale=True, vae_tag="dcae")
    write_features(out, config)
    return out, outcomes, dense


def _closest(h: int, w: int) -> tuple[int, int]:
    """Sana's get_closest_ratio over its ASPECT_RATIO_512 (PixArt's 512 table): the bucket of height/width."""
    table = json.loads((REPO.parent / "shared" / "reference" / "pixart_aspect_ratios.json").read_text())[str(R)]
    key = min(table, key=lambda r: abs(float(r) - h / w))
    return tuple(int(x) for x in table[key])


def test_wids_reads_every_sample_as_sana_does(tmp_path, output, ray_local):
    import wids

    out, outcomes, dense = output
    to = tmp_path / "sana"
    run = run_export_sana(str(out), SanaConfig(to=str(to), multiscale=True, vae_tag="dcae"), progress=False)
    meta = json.loads((to / "wids-meta.json").read_text())
    assert meta["wids_version"] == 1 and all(not os.path.isabs(s["url"]) for s in meta["shardlist"])
    for s in meta["shardlist"]:
        assert s["filesize"] == (to / s["url"]).stat().st_size
    ds = wids.ShardListDataset(str(to / "wids-meta.json"), cache_dir=str(tmp_path / "wids-cache"))
    samples = [ds[i] for i in range(len(ds))]
    keys = [s["__key__"] for s in samples]
    ok = sorted(k for k, o in outcomes.items() if o in ("ok", "tall"))
    assert sorted(keys) == sorted([*ok, "zz_rotated", "zz_webp"]) and len(set(keys)) == len(keys)
    assert sum(s["nsamples"] for s in meta["shardlist"]) == len(ds)
    assert run.result["converted"] == 2 and run.result["no_prompt"] == 1  # zz_nocaption: no default caption
    assert run.result["failed"] == 1 and run.result["no_latent"] == 1  # failed upstream; zz_corrupt (no latent)
    latents = tar_members(out, f"features/vae{R}ms-dcae")
    originals = {k: r["original_caption"] for k, r in index_rows(out, "images").items()}
    defaults = {k: r["caption"] for k, r in index_rows(out, "captions").items()}
    for s in samples:
        key, info = s["__key__"], s[".json"]
        image = s[".png"] if ".png" in s else s[".jpg"]  # what Sana opens
        assert set(info) == {"prompt", "height", "width", "key", "dense", "original"} and info["key"] == key
        assert info["prompt"] == defaults[key] and info["original"] == originals[key]
        assert info["dense"] == dense.get(key, defaults[key])  # no dense caption: the prompt's text
        assert (info["height"], info["width"]) == (image.height, image.width)
        h, w = _closest(info["height"], info["width"])
        latent = s[".npy"]
        assert latent.shape == (32, h // 32, w // 32) and latent.dtype == np.float32  # Sana's MS assert
        np.testing.assert_allclose(latent, read_npy(latents[key]["vae.npy"]) * DCAE_SCALING_FACTOR, rtol=1e-6)
        shard = s["__shard__"]
        for field in ("dense", "original"):  # Sana: __shard__.replace(".tar", f"{suffix}.json")
            external = json.loads(Path(shard.replace(".tar", f"_{field}.json")).read_text())
            assert external[key] == {field: info[field]}
    # The EXIF-rotated photo is written upright: its stored pixels are the displayed size.
    rotated = next(s for s in samples if s["__key__"] == "zz_rotated")
    row = index_rows(out, "images")["zz_rotated"]
    assert ".png" in rotated and (rotated[".json"]["height"], rotated[".json"]["width"]) == (
        row["height"],
        row["width"],
    )
    assert next(s for s in samples if s["__key__"] == "zz_webp")[".png"].format == "PNG"
    # A JPEG that needs no rotation passes byte for byte.
    images = tar_members(out, "images")
    for name in (to / s["url"] for s in meta["shardlist"]):
        for key, members in StageDir(str(to)).iter_samples(name.stem):
            if "jpg" in members:
                assert members["jpg"] == images[key]["jpg"]
            assert list(members)[0] in ("jpg", "png")  # adjacent members, image first
    for shard in (p.name.removesuffix(".tar") for p in to.glob("*.tar")):
        keys_in = {k for k, _ in StageDir(str(to)).iter_samples(shard)}
        for field in ("dense", "original"):
            assert set(json.loads((to / f"{shard}_{field}.json").read_text())) == keys_in
    assert not list(to.glob("*clip_score*"))  # no quality stage: left out, and said so
    assert any("no clip scores" in line for line in run.lines())


def test_clip_score_files_when_the_quality_stage_scored_the_sets(tmp_path, output, ray_local):
    out, _, _ = output
    quality = StageDir(f"{out}/quality")
    try:
        for shard in StageDir(f"{out}/images").done_shards():
            keys = [r["key"] for r in StageDir(f"{out}/images").read_index(shard).to_pylist()]
            table = pa.table(
                {"key": keys, "clip_score_default": [0.3] * len(keys), "clip_score_dense": [0.2] * len(keys)}
            )
            quality.write_index(shard, table)
            quality.write_done(DoneMarker(shard, stage="quality"))
        to = tmp_path / "sana"
        run_export_sana(str(out), SanaConfig(to=str(to)), progress=False)
        for tar in to.glob("*.tar"):
            keys = {k for k, _ in StageDir(str(to)).iter_samples(tar.stem)}
            if not keys:
                continue
            prompt = json.loads((to / f"{tar.stem}_prompt_clip_score.json").read_text())
            dense = json.loads((to / f"{tar.stem}_dense_clip_score.json").read_text())
            assert set(prompt) == set(dense) == keys
            assert not (to / f"{tar.stem}_default_clip_score.json").exists()  # the prompt's: under `prompt`
            assert all(v == {"prompt": 0.3} for v in prompt.values()) and all(
                v == {"dense": 0.2} for v in dense.values()
            )
    finally:
        for shard in quality.done_shards():
            quality.remove_shard(shard)


def test_a_missing_prompt_set_is_refused_naming_the_sets(tmp_path, output):
    out, _, _ = output
    with pytest.raises(SetupError, match=r"no caption set 'short' .*sets: default, dense"):
        run_export_sana(str(out), SanaConfig(to=str(tmp_path / "x"), prompt_field="short"), progress=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and ".curation" not in p.parts}  # fmt: skip


@pytest.mark.slow
def test_a_killed_export_then_a_rerun_equals_a_clean_one(tmp_path, output):
    out, _, _ = output
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "curation.cli", "export-sana", "--output", str(out), "--no-progress"]
    flags = ["--multiscale", "--vae-tag", "dcae", "--prompt-field", "dense"]
    subprocess.run([*cli, "--to", str(clean), *flags], check=True, env=env, cwd=REPO, capture_output=True)
    proc = subprocess.Popen([*cli, "--to", str(killed), *flags], env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    markers = killed / ".curation" / "export-sana"
    while proc.poll() is None and not list(markers.glob("*.done.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-export
    proc.wait()
    subprocess.run([*cli, "--to", str(killed), *flags], check=True, env=env, cwd=REPO, capture_output=True)
    assert _files(killed) == _files(clean) and "wids-meta.json" in _files(clean)
