"""The whole pipeline through the CLI: real COCO photos and every hostile file, tiny models, one local Ray."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from curation.buckets import bucket_size
from curation.cli import main
from curation.features.npy import read_npy
from curation.shards import StageDir
from tests.conftest import EDGE_CASES, REPO
from tests.layouts import make_folder
from tests.outputs import export_entries, index_rows, tar_members


def _run_args(src, out, tiny_models, *extra) -> list[str]:
    return [
        "run", "--source", "folder", "--input", str(src), "--output", str(out), "--shard-size", "8",
        "--caption-model", str(tiny_models["llava"]), "--max-new-tokens", "12", "--caption-batch-size", "4",
        "--t5", str(tiny_models["t5"]), "--vae", str(tiny_models["vae"]), "--max-length", "32",
        "--resolutions", "256,512", "--no-progress", *extra,
    ]  # fmt: skip


def test_run_on_coco_every_key_once_in_every_sidecar(tmp_path, coco_files, tiny_models, ray_local, capsys):
    src = make_folder(tmp_path / "in", coco_files)
    out = tmp_path / "out"
    assert main(_run_args(src, out, tiny_models, "--multiscale")) == 0
    printed = capsys.readouterr().out
    assert "[features]" in printed and "report:" in printed
    captions = index_rows(out, "captions")
    assert len(captions) == len(coco_files)
    t5 = tar_members(out, "features/t5")
    assert set(t5) == set(captions)
    for key, m in t5.items():
        feature, mask = read_npy(m["t5.npy"]), read_npy(m["t5mask.npy"])
        assert feature.shape[0] == mask.shape[0] == 32 and feature.dtype == np.float16 and mask.sum() >= 1, key
    for base in (256, 512):
        vae = tar_members(out, f"features/vae{base}ms")
        assert set(vae) == set(captions)
        for key, m in vae.items():
            h, w = bucket_size(captions[key][f"bucket_{base}"], base)
            assert read_npy(m["vae.npy"]).shape == (8, h // 8, w // 8), key
    report = json.loads((out / "report" / "table1.json").read_text())
    assert [r["images"] for r in report] == [len(coco_files)]  # a folder without .txt: no original captions row
    # The trainer's view: export, then every index entry resolves to files of the exact shapes.
    assert main(["export-pixart", "--output", str(out), "--to", str(tmp_path / "px" / "InternData"),
                 "--resolution", "512", "--multiscale"]) == 0  # fmt: skip
    entries = export_entries(tmp_path / "px" / "InternData" / "partition_filter")
    assert len(entries) == len(coco_files)
    for e in entries:
        k = e["path"].replace(".png", "")
        latent = np.load(tmp_path / "px" / "InternData" / "img_vae_fatures_512_multiscale" / "ms" / f"{k}.npy")
        h, w = bucket_size(captions[k]["bucket_512"], 512)
        assert latent.shape == (8, h // 8, w // 8) and latent.dtype == np.float32
        assert (tmp_path / "px" / "InternImgs" / e["path"]).exists()


def test_hostile_files_through_every_stage(tmp_path, tiny_models, ray_local, capsys):
    out = tmp_path / "out"
    assert main(_run_args(EDGE_CASES, out, tiny_models)) == 0
    printed = capsys.readouterr().out
    assert "failures by reason" in printed
    images, captions = index_rows(out, "images"), index_rows(out, "captions")
    files = [p for p in EDGE_CASES.rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert len(images) == len(captions) == len(files)
    for stage in ("features/t5", "features/vae256", "features/vae512"):
        rows = index_rows(out, stage)
        assert set(rows) == set(captions), stage
        for key, row in rows.items():
            if captions[key]["status"] == "failed":
                assert row["status"] == "failed" and row["error_reason"], (stage, key)
            assert row["status"] == "ok" or row["error_reason"], (stage, key)
    ok = [k for k, r in captions.items() if r["status"] == "ok"]
    # Many edge cases are one picture in several encodings: dedup keeps one of each, the others are skipped rows.
    skipped = {k: r["error_reason"] for k, r in captions.items() if r["status"] == "skipped"}
    assert skipped and set(skipped.values()) == {"duplicate"}
    assert len(ok) + len(skipped) >= 25 and set(ok) == set(tar_members(out, "features/vae256"))
    assert (
        main(["export-pixart", "--output", str(out), "--to", str(tmp_path / "InternData"), "--resolution", "256"]) == 0
    )
    entries = export_entries(tmp_path / "InternData" / "partition")
    assert 0 < len(entries) <= len(ok)
    assert all(e["height"] / e["width"] <= 4 for e in entries)  # the 590x88 TIFF (h/w 6.7) is left out


@pytest.mark.slow
def test_sigkill_mid_features_then_rerun_changes_nothing(tmp_path, coco_files, tiny_models):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "curation.cli"]
    src = make_folder(tmp_path / "in", coco_files[:24])
    feats = ["features", "--t5", str(tiny_models["t5"]), "--vae", str(tiny_models["vae"]), "--max-length", "16",
             "--resolutions", "256", "--no-progress"]  # fmt: skip
    outs = [tmp_path / "ref", tmp_path / "out"]
    for args in (
        ["ingest", "--source", "folder", "--input", str(src), "--shard-size", "2"],
        ["caption", "--model", str(tiny_models["llava"]), "--max-new-tokens", "8"],
    ):
        subprocess.run(
            [*cli, *args, "--output", str(outs[0]), "--no-progress"], check=True, env=env, capture_output=True
        )
    shutil.copytree(outs[0], outs[1])  # the same captions under both: only the features run differs
    subprocess.run([*cli, *feats, "--output", str(outs[0])], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cli, *feats, "--output", str(outs[1])], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and len(list((outs[1] / "features" / "vae256").glob("*.done.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((outs[1] / "features" / "vae256").glob("*.done.json"))) < 12, "the kill must land mid-run"
    rerun = subprocess.run([*cli, *feats, "--output", str(outs[1])], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    for stage in ("features/t5", "features/vae256"):
        ref, got = tar_members(outs[0], stage), tar_members(outs[1], stage)
        assert set(ref) == set(got) == set(index_rows(outs[0], "captions"))
        for key in ref:
            for ext in ref[key]:
                if ext.endswith("npy"):
                    np.testing.assert_allclose(read_npy(got[key][ext]), read_npy(ref[key][ext]), rtol=1e-5, atol=1e-6)
        assert not [p for p in (outs[1] / stage).iterdir() if p.name.startswith(".")]


def test_redoing_a_stage_redoes_what_was_made_from_it(tmp_path, coco_files, tiny_models, ray_local):
    from curation.caption.model import CaptionConfig
    from curation.caption.stage import CaptionStageConfig, run_caption
    from curation.features.stage import FeaturesConfig, run_features
    from curation.ingest import IngestConfig, run_ingest

    src, out = str(make_folder(tmp_path / "in", coco_files[:8], nested=False)), str(tmp_path / "out")
    features = FeaturesConfig(t5=str(tiny_models["t5"]), vae=str(tiny_models["vae"]), max_length=16, resolutions=(256,))

    def caption(prompt: str, force: bool = False):
        model = CaptionConfig(model=str(tiny_models["llava"]), prompt=prompt, max_new_tokens=8, batch_size=4)
        return run_caption(out, CaptionStageConfig(model=model), force=force, progress=False)

    run_ingest(out, IngestConfig("folder", src, shard_size=4), progress=False)
    caption("Describe this image.")
    parts = len(StageDir(f"{out}/images").done_shards())
    assert run_features(out, features, progress=False).shards_run == parts > 1
    assert run_features(out, features, progress=False).shards_run == 0  # nothing changed: nothing redone

    # New captions (another prompt, --force): the features made from the old ones are redone, not kept.
    caption("Describe the style of this image in detail.", force=True)
    assert run_features(out, features, progress=False).shards_run == parts
    t5_text = {k: r["text"] for k, r in index_rows(out, "features/t5").items()}
    assert t5_text == {k: r["caption"] for k, r in index_rows(out, "captions").items()}

    # Re-sharded images (--force --shard-size 8): one part now, named by its first key; the old parts' captions
    # and features are removed, so no key is left twice anywhere.
    run_ingest(out, IngestConfig("folder", src, shard_size=8), force=True, progress=False)
    caption("Describe the style of this image in detail.")
    run_features(out, features, progress=False)
    for stage in ("images", "captions", "features/t5", "features/vae256"):
        assert StageDir(f"{out}/{stage}").done_shards() == [f"root-{min(f.stem for f in coco_files[:8])}"], stage
        assert len(index_rows(out, stage)) == 8, stage
