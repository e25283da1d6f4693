"""Damaged outputs through the CLI: a rerun redoes exactly the shards whose files are missing or changed, and equals
a clean run; `curation verify` finds every damage and is clean on a good output; old markers are trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curation.cli import main
from curation.shards import StageDir
from tests.layouts import make_folder
from tests.outputs import index_rows, tar_members
from tests.reliability import cli

FOLDERS = ("images", "dedup", "dedup/hashes", "captions", "stats", "features/t5", "features/vae256")


def _run(src: Path, out: Path, tiny_models: dict[str, Path]) -> list[str]:
    return [
        "run", "--source", "folder", "--input", str(src), "--output", str(out), "--shard-size", "3",
        "--caption-model", str(tiny_models["llava"]), "--max-new-tokens", "6", "--caption-batch-size", "4",
        "--t5", str(tiny_models["t5"]), "--vae", str(tiny_models["vae"]), "--max-length", "16",
        "--resolutions", "256", "--no-progress",
    ]  # fmt: skip


def _ingest(src: Path, out: Path) -> list[str]:
    return ["ingest", "--source", "folder", "--input", str(src), "--output", str(out), "--shard-size", "4",
            "--no-progress"]  # fmt: skip


def _verify(out: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    code = main(["verify", "--output", str(out), "--no-progress", *extra])
    return code, capsys.readouterr().out.strip().splitlines()


def _files(out: Path) -> dict[str, dict]:
    """Every done shard's recorded files, by folder and shard: equal records mean byte-identical files."""
    found = {}
    for rel in FOLDERS:
        folder = StageDir(f"{out}/{rel}")
        for shard, marker in folder.read_dones(folder.done_shards()).items():
            found[f"{rel}/{shard}"] = marker.files
    return found


def _contents(out: Path) -> dict[str, object]:
    """What a reader of the output gets: every index row, tar member and noun partial."""
    found: dict[str, object] = {rel: index_rows(out, rel) for rel in FOLDERS if rel != "stats"}
    found.update({f"{rel}.tar": tar_members(out, rel) for rel in FOLDERS if rel.startswith(("images", "capt", "feat"))})
    partials = [p for p in (out / "stats").glob("*.json") if not p.name.endswith(".done.json")]
    found["stats"] = {p.name: json.loads(p.read_text()) for p in partials}
    return found


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.slow
def test_damaged_shards_are_found_by_verify_and_redone_by_a_rerun(tmp_path, coco_files, tiny_models, ray_local, capsys):
    src = make_folder(tmp_path / "in", coco_files[:9], nested=False)
    out = tmp_path / "out"
    assert main(_run(src, out, tiny_models)) == 0
    capsys.readouterr()
    clean = _contents(out)
    records = _files(out)
    assert all(records.values()), "every marker records its files"
    code, lines = _verify(out, capsys)
    assert code == 0 and len(lines) == 1 and "no problems" in lines[0], lines

    (out / "images" / "root-000.tar").unlink()
    _truncate(out / "images" / "root-001.parquet")
    _truncate(out / "captions" / "root-002.tar")
    (out / "features" / "t5" / "root-001.tar").unlink()
    _truncate(out / "stats" / "root-000.json")
    _truncate(out / "dedup" / "hashes" / "root-002.parquet")
    code, lines = _verify(out, capsys)
    assert code == 2, lines
    problems = lines[:-1]
    assert "6 problem(s)" in lines[-1], lines
    expected = {
        "images/root-000: root-000.tar missing": "`curation ingest` again",
        "images/root-001: root-001.parquet is": "`curation ingest` again",
        "captions/root-002: root-002.tar is": "`curation caption` again",
        "features/t5/root-001: root-001.tar missing": "`curation features` again",
        "stats/root-000: root-000.json is": "`curation stats` again",
        "dedup/hashes/root-002: root-002.parquet is": "`curation dedup` again",
    }
    for start, fix in expected.items():
        assert sum(p.startswith(start) and fix in p for p in problems) == 1, (start, problems)
    assert len(problems) == len(expected), problems

    assert main(_run(src, out, tiny_models)) == 0
    printed = capsys.readouterr().out
    for label, what in [
        ("images", "images/root-000.tar missing"),
        ("images", "images/root-001.parquet is"),
        ("captions", "captions/root-002.tar is"),
        ("features", "features/t5/root-001.tar missing"),
        ("stats", "stats/root-000.json is"),
        ("dedup/hashes", "dedup/hashes/root-002.parquet is"),
    ]:
        lines = [x for x in printed.splitlines() if x.startswith(f"[{label}] redone:")]
        assert len(lines) == 1 and what in lines[0], (label, printed)
    # Exactly the damaged shards ran; the shards made from them were not (they were made from the same bytes).
    assert "[images] shards: 2 run, 1 already done" in printed, printed
    assert "[captions] shards: 1 run, 2 already done" in printed, printed
    assert "[features] shards: 1 run, 2 already done" in printed, printed
    assert "[stats] shards: 1 run, 2 already done" in printed, printed
    assert "[dedup/hashes] shards: 1 run, 2 already done" in printed, printed
    # The repaired output equals the clean run, byte for byte.
    assert _files(out) == records
    assert _contents(out) == clean
    code, lines = _verify(out, capsys)
    assert code == 0 and "no problems" in lines[-1], lines


def test_changed_bytes_of_the_same_size_are_found_by_verify_and_its_fix_repairs_them(
    tmp_path, coco_files, ray_local, capsys
):
    src = make_folder(tmp_path / "in", coco_files[:8], nested=False)
    out = tmp_path / "out"
    assert main(_ingest(src, out)) == 0
    tar = out / "images" / "root-001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF  # inside the first image: same size, other bytes
    tar.write_bytes(bytes(data))
    assert main(_ingest(src, out)) == 0  # a rerun checks sizes only: the shard stays
    assert "0 run, 2 already done" in capsys.readouterr().out
    code, lines = _verify(out, capsys)
    assert code == 2 and len(lines) == 2, lines
    assert lines[0].startswith("images/root-001: root-001.tar: checksum") and "the bytes changed" in lines[0]
    assert "delete images/root-001.done.json, then run `curation ingest` again" in lines[0]
    (out / "images" / "root-001.done.json").unlink()
    assert main(_ingest(src, out)) == 0
    assert "1 run, 1 already done" in capsys.readouterr().out
    assert _verify(out, capsys)[0] == 0


def test_a_marker_without_file_records_is_trusted_on_rerun_and_checked_by_verify(
    tmp_path, coco_files, ray_local, capsys
):
    src = make_folder(tmp_path / "in", coco_files[:8], nested=False)
    out = tmp_path / "out"
    assert main(_ingest(src, out)) == 0
    for marker in (out / "images").glob("*.done.json"):  # as an earlier release wrote them
        data = json.loads(marker.read_text())
        del data["files"]
        marker.write_text(json.dumps(data))
    capsys.readouterr()
    assert _verify(out, capsys)[0] == 0  # sound files under old markers: nothing to report
    (out / "images" / "root-000.tar").unlink()
    assert main(_ingest(src, out)) == 0  # upgrading never redoes an existing output
    printed = capsys.readouterr().out
    assert "0 run, 2 already done" in printed and "redone" not in printed, printed
    code, lines = _verify(out, capsys, "--stage", "images")
    assert code == 2 and lines[0].startswith("images/root-000: root-000.tar missing"), lines
    assert "delete images/root-000.done.json" in lines[0], lines


def test_verify_finds_keys_that_disagree_between_stages_and_missing_shards(tmp_path, coco_files, ray_local, capsys):
    src = make_folder(tmp_path / "in", coco_files[:8], nested=False)
    out = tmp_path / "out"
    assert main(_ingest(src, out)) == 0
    assert main(["size-filter", "--output", str(out), "--min-side", "400", "--no-progress"]) == 0
    capsys.readouterr()
    assert _verify(out, capsys)[0] == 0
    # A size-filter shard that lost a row and one that was never made: the keys checked against images/.
    import pyarrow.parquet as pq

    folder = StageDir(f"{out}/size-filter")
    table = folder.read_index("root-000")
    marker = folder.read_done("root-000")
    marker.files = {"root-000.parquet": folder.write_index("root-000", table.slice(1))}
    folder.write_done(marker)
    lost = table.column("key")[0].as_py()
    folder.remove_shard("root-001")
    code, lines = _verify(out, capsys)
    assert code == 2, lines
    assert any(
        line.startswith(f"size-filter/root-000: 1 key(s) of images/root-000 have no row ({lost})") for line in lines
    )
    assert any(line.startswith("size-filter: shard root-001 of images was not made; fix: run `curation size-filter`")
               for line in lines), lines  # fmt: skip
    assert pq.read_table(out / "images" / "root-000.parquet").num_rows == 4


def test_verify_refuses_in_one_line_what_it_cannot_check(tmp_path, capsys):
    assert main(["verify", "--output", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "nothing to verify" in capsys.readouterr().err


@pytest.mark.slow
def test_caption_on_a_truncated_images_parquet_is_one_line(tmp_path, coco_files, tiny_models, ray_local):
    src = make_folder(tmp_path / "in", coco_files[:8], nested=False)
    out = tmp_path / "out"
    assert main(_ingest(src, out)) == 0
    _truncate(out / "images" / "root-001.parquet")
    proc = cli("caption", "--output", str(out), "--model", str(tiny_models["llava"]), "--max-new-tokens", "4",
               "--workers", "1", "--no-progress")  # fmt: skip
    # The actors' own output (transformers' weight loading bar) reaches stderr too: the error is its one line.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("curation caption: error: ")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr[-3000:]
    line = errors[0]
    assert "root-001" in line and "`curation ingest` again" in line and "curation verify" in line, line
