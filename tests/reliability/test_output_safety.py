"""The output is never corrupted: one run at a time, unwritable or full disks fail cleanly, configs never mix."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.ingest import IngestConfig, run_ingest
from curation.runner import ShardError, output_lock
from curation.shards import StageDir
from tests.layouts import make_folder
from tests.outputs import index_rows as rows
from tests.reliability import assert_only_done_shards, cli, one_error_line


def _ingest_args(src: Path, out: Path, shard_size: int = 2) -> list[str]:
    return ["ingest", "--source", "folder", "--input", str(src), "--output", str(out),
            "--shard-size", str(shard_size), "--no-progress"]  # fmt: skip


def test_second_run_on_a_locked_output_is_refused(tmp_path, coco_files):
    src, out = make_folder(tmp_path / "in", coco_files[:2]), tmp_path / "out"
    with output_lock(str(out)):  # this process is "the run in progress"; the CLI below is a second, real process
        proc = cli(*_ingest_args(src, out))
    line = one_error_line(proc, "ingest")
    assert "another curation run is using" in line and f"pid {os.getpid()}" in line
    assert not (out / "images").exists()


def test_output_under_a_regular_file_is_a_clear_error(tmp_path, coco_files):
    # Root ignores file modes, so chmod cannot make a folder unwritable here; a parent that is a file can.
    src = make_folder(tmp_path / "in", coco_files[:2])
    (tmp_path / "a_file").write_text("not a folder")
    line = one_error_line(cli(*_ingest_args(src, tmp_path / "a_file" / "out")), "ingest")
    assert "cannot write to the output" in line and "a_file" in line


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")


@pytest.fixture()
def mounts():
    """Mount points made by a test, unmounted after it whatever happened."""
    made: list[Path] = []
    yield made
    for where in reversed(made):
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_stage_folder_fails_naming_the_shard(tmp_path, coco_files, ray_local, mounts):
    # A read-only mount stops root too: the output folder itself is writable (lock, run_config), images/ is not.
    src, out = make_folder(tmp_path / "in", coco_files[:4]), tmp_path / "out"
    _mount_tmpfs(out / "images", "ro,size=1m")
    mounts.append(out / "images")
    expected = r"\[images\] shard [\w-]+ failed: cannot write .*images/[\w-]+\.tar: .*[Rr]ead-only"
    with pytest.raises(ShardError, match=expected):
        run_ingest(str(out), IngestConfig("folder", str(src), shard_size=2), progress=False)
    assert list((out / "images").iterdir()) == []


@pytest.mark.slow
def test_full_disk_fails_cleanly_then_resumes_to_the_uninterrupted_keys(tmp_path, coco_files, ray_local, mounts):
    src = make_folder(tmp_path / "in", coco_files[:20])  # ~3 MB of photos onto a 1 MiB disk
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_ingest(str(ref), IngestConfig("folder", str(src), shard_size=2), progress=False)
    _mount_tmpfs(out / "images", "size=1m")
    mounts.append(out / "images")

    line = one_error_line(cli(*_ingest_args(src, out)), "ingest")
    assert "No space left on device" in line and "[images] shard " in line and "/images/" in line, line
    # What is there is whole: every file belongs to a done shard that reads back in full.
    images = out / "images"
    assert_only_done_shards(images)
    done = StageDir(str(images)).done_shards()
    assert 1 <= len(done) < 10, "the disk must fill mid-run"
    for shard in done:
        marker = StageDir(str(images)).read_done(shard)
        with tarfile.open(images / f"{shard}.tar") as tar:
            assert len({n.split(".")[0] for n in tar.getnames()}) == marker.extra["members"]
        assert pq.read_table(images / f"{shard}.parquet").num_rows == marker.rows

    # Space freed (the tmpfs grown in place): the same command resumes and ends where an uninterrupted run does.
    subprocess.run(["mount", "-o", "remount,size=64m", str(images)], check=True)
    resumed = cli(*_ingest_args(src, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(done)} already done" in resumed.stdout
    assert set(rows(out, "images")) == set(rows(ref, "images"))
    for shard in StageDir(str(ref / "images")).done_shards():
        assert (images / f"{shard}.tar").read_bytes() == (ref / "images" / f"{shard}.tar").read_bytes()
    assert_only_done_shards(images)


def test_changed_config_is_one_line_exit_2_and_force_redoes_without_stale_shards(tmp_path, coco_files, ray_local):
    src, out = make_folder(tmp_path / "in", coco_files[:6], nested=False), tmp_path / "out"
    run_ingest(str(out), IngestConfig("folder", str(src), shard_size=2), progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    line = one_error_line(cli(*_ingest_args(src, out, shard_size=3)), "ingest")
    assert "different configuration" in line and "--force" in line
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before  # untouched, none removed

    forced = cli(*_ingest_args(src, out, shard_size=3), "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    # Cut for 3 per shard now: the old plan's shards are gone rather than repeating keys of the new ones.
    run_ingest(str(tmp_path / "clean"), IngestConfig("folder", str(src), shard_size=3), progress=False)
    assert StageDir(str(out / "images")).done_shards() == StageDir(str(tmp_path / "clean" / "images")).done_shards()
    assert len(rows(out, "images")) == 6
    assert_only_done_shards(out / "images")
