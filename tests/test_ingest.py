import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image, ImageOps

from curation.ingest import IngestConfig, run_ingest
from curation.shards import StageDir
from tests.conftest import EDGE_CASES, REPO
from tests.layouts import make_folder, make_img2dataset, make_journeydb, make_sa1b
from tests.outputs import index_rows


def test_folder_ingest_end_to_end(tmp_path, coco_files, ray_local):
    src = make_folder(tmp_path / "in", coco_files[:12], captions={coco_files[2].name: "two dogs"})
    out = tmp_path / "out"
    summary = run_ingest(str(out), IngestConfig("folder", str(src), shard_size=5), progress=False)
    assert summary.shards_total == 3 and summary.by_status == {"ok": 12}
    rows = index_rows(out, "images")
    assert len(rows) == 12
    # Sizes come from headers and equal a full decode; bytes pass through unchanged.
    for f in coco_files[:12]:
        key = f"sub__{f.stem}" if f in coco_files[:12:3] else f.stem
        with Image.open(f) as im:
            assert (rows[key]["width"], rows[key]["height"]) == ImageOps.exif_transpose(im).size
    assert rows[coco_files[2].stem]["original_caption"] == "two dogs"
    # webdataset and tarfile read the shards unchanged; done-marker counts equal the members.
    stage = StageDir(f"{out}/images")
    for shard in stage.done_shards():
        done = stage.read_done(shard)
        samples = list(wds.WebDataset(f"{out}/images/{shard}.tar", shardshuffle=False, empty_check=False))
        assert done["members"] == len(samples) == done["by_status"]["ok"]
        with tarfile.open(f"{out}/images/{shard}.tar") as tar:
            assert len(tar.getnames()) == 2 * len(samples)
        for s in samples:
            original = next(p for p in coco_files if p.stem == s["__key__"].removeprefix("sub__"))
            assert s["jpg"] == original.read_bytes()
            assert json.loads(s["json"])["key"] == s["__key__"]
    assert json.loads((out / "run_config.json").read_text())["stages"]["images"]["source"] == "folder"


def test_rerun_skips_done_shards_and_changed_config_is_refused(tmp_path, coco_files, ray_local):
    from curation.runner import SetupError

    src = make_folder(tmp_path / "in", coco_files[:4])
    out = str(tmp_path / "out")
    run_ingest(out, IngestConfig("folder", str(src), shard_size=2), progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").iterdir()}
    again = run_ingest(out, IngestConfig("folder", str(src), shard_size=2), progress=False)
    assert again.shards_run == 0 and again.shards_skipped == 2 and again.samples == 4
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").iterdir()}
    with pytest.raises(SetupError, match="different configuration"):
        run_ingest(out, IngestConfig("folder", str(src), shard_size=3), progress=False)


@pytest.mark.parametrize("layout", ["sa1b", "img2dataset", "journeydb"])
def test_archive_layouts(tmp_path, coco_files, ray_local, layout):
    src = tmp_path / "in"
    if layout == "sa1b":
        make_sa1b(src, coco_files[:3], first_id=223750)
        expect_ok, expect_failed = 3, 0
    elif layout == "img2dataset":
        make_img2dataset(src, coco_files[:3], ["a dog", "a cat", "ünïcode"], failed=2)
        expect_ok, expect_failed = 3, 2
    else:
        make_journeydb(src, coco_files[:3], missing=1)
        expect_ok, expect_failed = 3, 1
    out = tmp_path / "out"
    summary = run_ingest(str(out), IngestConfig(layout, str(src), shard_size=4), progress=False)
    assert summary.by_status.get("ok") == expect_ok and summary.by_status.get("failed", 0) == expect_failed
    rows = index_rows(out, "images")
    if layout == "sa1b":
        assert rows["sa_223750"]["source_id"] == "223750"
        assert json.loads(rows["sa_223750"]["source_meta"])["file_name"] == "sa_223750.jpg"
    if layout == "img2dataset":
        assert rows["000000002"]["original_caption"] == "ünïcode"
        assert rows["000000000"]["source_id"].startswith("https://")
        assert rows["000000003"]["error_reason"] == "failed_to_download" and "404" in rows["000000003"]["error"]
    if layout == "journeydb":
        assert rows["0000deadbeef"]["original_caption"].startswith("a photo number 0")


def test_every_edge_case_is_ingested_or_a_failed_row(tmp_path, edge_case_files, ray_local):
    manifest = {e["file"]: e for e in json.loads((EDGE_CASES / "manifest.json").read_text())}
    out = tmp_path / "out"
    summary = run_ingest(str(out), IngestConfig("folder", str(EDGE_CASES), shard_size=10), progress=False)
    rows = index_rows(out, "images")
    assert len(rows) == len(edge_case_files) == sum(summary.by_status.values())
    for path in edge_case_files:
        rel = path.relative_to(EDGE_CASES).as_posix()
        row = next(r for r in rows.values() if r["source_id"] == rel)
        opened = manifest[rel]["open"]
        if opened.startswith(("UnidentifiedImageError", "DecompressionBombError")):
            assert row["status"] == "failed" and row["error_reason"] and row["error"], rel
        elif opened.startswith("OSError"):  # a truncated body behind a sound header: failed here or at decode
            assert row["status"] == "failed" or row["width"] > 0, rel
        else:  # the manifest records Pillow's header: "JPEG RGB (100, 100) frames=1 orient=6"
            assert row["status"] == "ok", (rel, row["error"])
            size = re.search(r"\((\d+), (\d+)\).*orient=(\w+)", manifest[rel]["open"])
            w, h, orient = int(size[1]), int(size[2]), size[3]
            expected = (h, w) if orient in {"5", "6", "7", "8"} else (w, h)
            assert (row["width"], row["height"]) == expected, rel
    assert summary.by_reason, "failures are counted by reason"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "curation.cli", *args]


@pytest.mark.slow
def test_sigkill_mid_ingest_then_rerun_gives_the_uninterrupted_keys(tmp_path, coco_files):
    src = make_folder(tmp_path / "in", coco_files[:50])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["ingest", "--source", "folder", "--input", str(src), "--shard-size", "1", "--no-progress"]
    subprocess.run(_cli(*args, "--output", str(ref)), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_cli(*args, "--output", str(out)), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "images").glob("*.done.json"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole local Ray, mid-run
    proc.wait()
    partial = len(list((out / "images").glob("*.done.json")))
    assert 3 <= partial < 50, "the kill must land mid-run"
    subprocess.run(_cli(*args, "--output", str(out)), check=True, env=env, capture_output=True)
    assert set(index_rows(out, "images")) == set(index_rows(ref, "images"))
    assert not [p for p in (out / "images").iterdir() if p.name.startswith(".")], "temporaries left visible"
    for shard in StageDir(f"{ref}/images").done_shards():
        assert pq.read_table(out / "images" / f"{shard}.parquet").equals(
            pq.read_table(ref / "images" / f"{shard}.parquet")
        )
        assert (out / "images" / f"{shard}.tar").read_bytes() == (ref / "images" / f"{shard}.tar").read_bytes()
