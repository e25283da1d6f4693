"""Hostile or broken inputs through the CLI (ingest -> caption): one clear line and exit 2, or a run that records
every failure and exits 0. Never a traceback."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.conftest import EDGE_CASES
from tests.layouts import make_folder
from tests.outputs import index_rows as rows
from tests.reliability import cli, one_error_line


def _ingest(source: str, src: Path, out: Path) -> list[str]:
    return ["ingest", "--source", source, "--input", str(src), "--output", str(out), "--no-progress"]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_empty_input_folder(tmp_path):
    (tmp_path / "in").mkdir()
    line = one_error_line(cli(*_ingest("folder", tmp_path / "in", tmp_path / "out")), "ingest")
    assert "no images found" in line and str(tmp_path / "in") in line


@pytest.mark.slow
def test_only_broken_images_run_to_the_end_with_a_summary_of_failures(tmp_path, tiny_models):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "text.jpg").write_bytes(b"this is not an image\n")
    (src / "empty.png").write_bytes(b"")
    (src / "noise.webp").write_bytes(bytes(range(256)) * 8)
    shutil.copy(EDGE_CASES / "decompression_bomb" / "decompression_bomb.ico", src / "bomb.ico")

    ingest = cli(*_ingest("folder", src, out))
    assert ingest.returncode == 0 and "Traceback" not in ingest.stderr, ingest.stderr[-3000:]
    assert "[images] status: failed=4" in ingest.stdout and "[images] failures by reason:" in ingest.stdout
    caption = cli("caption", "--output", str(out), "--model", str(tiny_models["llava"]), "--max-new-tokens", "4",
                  "--workers", "1", "--no-progress")  # fmt: skip
    assert caption.returncode == 0 and "Traceback" not in caption.stderr, caption.stderr[-3000:]
    assert "[captions] status: failed=4" in caption.stdout, caption.stdout
    # Every input is a row with its reason, in both stages; nothing was captioned.
    images, captions = rows(out, "images"), rows(out, "captions")
    assert set(images) == set(captions) == {"text", "empty", "noise", "bomb"}
    assert all(r["status"] == "failed" and r["error_reason"] and r["error"] for r in captions.values())
    assert {k: r["error_reason"] for k, r in images.items()} == {k: r["error_reason"] for k, r in captions.items()}


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([("000000000.jpg", b"x"), ("../../evil.jpg", b"x")], "unsafe member name '../../evil.jpg'"),
        ([("000000000.jpg", b"x"), ("/etc/cron.d/evil.jpg", b"x")], "unsafe member name '/etc/cron.d/evil.jpg'"),
        ([("000000001.jpg", b"x"), ("000000001.jpg", b"y")], "duplicate key '000000001'"),
    ],
    ids=["dotdot", "absolute", "duplicate"],
)
def test_img2dataset_tar_with_unsafe_or_duplicate_members(tmp_path, members, expected):
    _tar(tmp_path / "in" / "00000.tar", members)
    line = one_error_line(cli(*_ingest("img2dataset", tmp_path / "in", tmp_path / "out")), "ingest")
    assert expected in line and "00000.tar" in line, line
    assert not (tmp_path / "out" / "images").exists()


def test_duplicate_keys_across_img2dataset_tars(tmp_path, coco_files):
    data = coco_files[0].read_bytes()
    _tar(tmp_path / "in" / "00000.tar", [("000000007.jpg", data)])
    _tar(tmp_path / "in" / "00001.tar", [("000000007.jpg", data)])
    line = one_error_line(cli(*_ingest("img2dataset", tmp_path / "in", tmp_path / "out")), "ingest")
    assert "duplicate key '000000007'" in line and "00000.tar" in line and "00001.tar" in line


def test_journeydb_without_annotation_file(tmp_path, coco_files):
    make_folder(tmp_path / "in", coco_files[:2])
    line = one_error_line(cli(*_ingest("journeydb", tmp_path / "in", tmp_path / "out")), "ingest")
    assert "no JourneyDB annotation file" in line
