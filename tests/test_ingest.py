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
    assert summary.by_status == {"ok": 12}
    parts = StageDir(f"{out}/images").read_dones(StageDir(f"{out}/images").done_shards())
    assert summary.shards_total == len(parts) >= 3 and all(0 < d.rows <= 5 for d in parts.values())
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
        assert done.extra["members"] == len(samples) == done.counts["by_status"]["ok"]
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
        elif "truncated" in manifest[rel].get("load", "") and opened.startswith(("JPEG", "PNG", "GIF", "WEBP")):
            # a sound header, the end cut off: the cheap end check at ingest fails it (other formats: at decode)
            assert (row["status"], row["error_reason"]) == ("failed", "truncated_image"), rel
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


# --- planning by source shards ------------------------------------------------------------------------------------


def test_img2dataset_output_formats_ingest_to_the_same_rows(tmp_path, coco_files, ray_local):
    """webdataset, files and parquet output of one img2dataset run give the same rows; failures keep their reason."""
    fields = ("status", "error_reason", "error", "original_caption", "source_id", "width", "height", "ext")
    found = {}
    for fmt in ("webdataset", "files", "parquet"):
        src = make_img2dataset(tmp_path / fmt, coco_files[:3], ["a dog", None, "ünïcode"], failed=2, fmt=fmt)
        summary = run_ingest(str(tmp_path / f"out-{fmt}"), IngestConfig("img2dataset", str(src)), progress=False)
        assert summary.by_reason == {"failed_to_download": 1, "failed_to_resize": 1}, fmt
        rows = index_rows(tmp_path / f"out-{fmt}", "images")
        assert StageDir(f"{tmp_path}/out-{fmt}/images").done_shards() == ["00000-000000000"], fmt  # its first key
        found[fmt] = {k: {f: r[f] for f in fields} for k, r in rows.items()}
        assert json.loads(rows["000000003"]["source_meta"])["url"] == "https://example.org/gone/0.jpg"
    assert found["webdataset"] == found["files"] == found["parquet"]
    rows = found["parquet"]
    assert rows["000000001"]["original_caption"] is None, "a null caption stays null"
    assert (rows["000000004"]["error_reason"], rows["000000004"]["error"]) == (
        "failed_to_resize",
        "image file is truncated",
    )
    with Image.open(coco_files[2]) as im:
        assert (rows["000000002"]["width"], rows["000000002"]["height"]) == ImageOps.exif_transpose(im).size


def test_shards_are_named_by_source_shard_and_first_key(tmp_path, coco_files, ray_local):
    src = tmp_path / "in"
    make_sa1b(src / "batch_a", coco_files[:9], first_id=1)
    make_sa1b(src / "batch_b", coco_files[9:11], first_id=100)
    summary = run_ingest(str(tmp_path / "out"), IngestConfig("sa1b", str(src), shard_size=2), progress=False)
    stage = StageDir(f"{tmp_path}/out/images")
    shards = stage.done_shards()
    assert "batch_b__sa_000000-sa_100" in shards  # a source shard of at most --shard-size samples is one part
    assert len(shards) > 5
    for shard in shards:
        keys = stage.read_index(shard).column("key").to_pylist()
        unit = "batch_a__sa_000000" if keys[0] in {f"sa_{i}" for i in range(1, 10)} else "batch_b__sa_000000"
        assert shard == f"{unit}-{keys[0]}" and 0 < len(keys) <= 2
    assert summary.samples == 11 and len(index_rows(tmp_path / "out", "images")) == 11


def test_a_key_clash_across_source_shards_is_refused_before_any_shard(tmp_path, coco_files, ray_local):
    from curation.runner import ShardError

    src = tmp_path / "in"
    make_sa1b(src / "a", coco_files[:3], first_id=1)
    make_sa1b(src / "b", coco_files[3:5], first_id=3)  # sa_3 again
    with pytest.raises(ShardError, match=r"duplicate key 'sa_3': .*a/sa_000000.tar:sa_3.jpg and .*b/sa_000000.tar"):
        run_ingest(str(tmp_path / "out"), IngestConfig("sa1b", str(src)), progress=False)
    assert not (tmp_path / "out" / "images").exists() or not StageDir(f"{tmp_path}/out/images").done_shards()


def test_an_output_of_the_old_plan_is_refused_and_force_replans_it(tmp_path, coco_files, ray_local):
    """Outputs written before planning by source shards were cut by position into 00000, 00001, ...: rebuild one."""
    from curation.runner import SetupError
    from curation.shards import config_hash

    src, out = make_folder(tmp_path / "in", coco_files[:5], nested=False), tmp_path / "out"
    config = IngestConfig("folder", str(src), shard_size=2)
    run_ingest(str(out), config, progress=False)
    old_semantics = {k: v for k, v in config.semantics().items() if k != "plan"}
    for i, shard in enumerate(StageDir(f"{out}/images").done_shards()):
        for ext in ("tar", "parquet", "done.json"):
            (out / "images" / f"{shard}.{ext}").rename(out / "images" / f"{i:05d}.{ext}")
        done = json.loads((out / "images" / f"{i:05d}.done.json").read_text())
        done.update(shard=f"{i:05d}", config_hash=config_hash(old_semantics))
        (out / "images" / f"{i:05d}.done.json").write_text(json.dumps(done))
    with pytest.raises(SetupError, match=r"different configuration \(e.g. 00000\).*--force"):
        run_ingest(str(out), config, progress=False)
    summary = run_ingest(str(out), config, force=True, progress=False)
    clean = run_ingest(str(tmp_path / "clean"), config, progress=False)
    assert summary.shards_run == clean.shards_run
    assert StageDir(f"{out}/images").done_shards() == StageDir(f"{tmp_path}/clean/images").done_shards()
    assert len(index_rows(out, "images")) == 5  # every key once: the old plan's shards are gone


def test_journeydb_partial_download_is_one_summary_line(tmp_path, coco_files, ray_local):
    src = make_journeydb(tmp_path / "in", coco_files[:2], missing=1, annotations="jsonl.tgz", absent={"001": 4})
    summary = run_ingest(str(tmp_path / "out"), IngestConfig("journeydb", str(src)), progress=False)
    assert summary.by_status == {"ok": 2, "failed": 1} and summary.by_reason == {"missing_image": 1}
    assert "[images] skipped: not_downloaded=4" in summary.lines()


def test_user_mistakes_are_one_line(tmp_path, coco_files):
    from tests.reliability import cli, one_error_line

    src = make_folder(tmp_path / "in", coco_files[:2])
    inside = one_error_line(cli("ingest", "--source", "folder", "--input", str(src), "--output", str(src / "out")),
                            "ingest")  # fmt: skip
    assert "is inside the input" in inside and "outside" in inside
    assert not (src / "out").exists()
    missing = one_error_line(cli("ingest", "--source", "folder", "--input", str(tmp_path / "nope"), "--output",
                                 str(tmp_path / "out")), "ingest")  # fmt: skip
    assert f"the input {tmp_path / 'nope'} does not exist" in missing
    make_sa1b(tmp_path / "sa", coco_files[:2])
    wrong = one_error_line(cli("ingest", "--source", "img2dataset", "--input", str(tmp_path / "sa"), "--output",
                               str(tmp_path / "out"), "--no-progress"), "ingest")  # fmt: skip
    assert "use --source sa1b" in wrong


def _probe(*args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "driver_probe.py"), *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _many_tars(root, coco_files, tars: int, per_tar: int):
    for t in range(tars):
        make_img2dataset(root, coco_files[:per_tar], [f"photo {i}" for i in range(per_tar)], failed=1, shard=t)
    return root


@pytest.mark.slow
def test_the_driver_reads_no_archive_bytes(tmp_path, coco_files):
    src = _many_tars(tmp_path / "in", coco_files, tars=20, per_tar=5)
    result = _probe("--source", "img2dataset", "--input", str(src), "--output", str(tmp_path / "out"))
    assert result["samples"] == 20 * 6 and result["shards"] == 20
    assert (result["driver_input_bytes"], result["driver_input_opens"]) == (0, 0)
    assert len(index_rows(tmp_path / "out", "images")) == 120


@pytest.mark.slow
def test_the_driver_reads_no_archive_bytes_from_s3(tmp_path, coco_files, s3_server):
    import fsspec

    local = _many_tars(tmp_path / "in", coco_files, tars=4, per_tar=3)
    fs = fsspec.filesystem("s3")
    fs.mkdir("probe")
    fs.put(str(local) + "/", "probe/laion/", recursive=True)
    result = _probe("--source", "img2dataset", "--input", "s3://probe/laion", "--output", str(tmp_path / "out"),
                    env=s3_server)  # fmt: skip
    assert result["samples"] == 16 and (result["driver_input_bytes"], result["driver_input_opens"]) == (0, 0)
    assert len(index_rows(tmp_path / "out", "images")) == 16
