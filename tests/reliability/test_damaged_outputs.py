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


def _shards(out: Path) -> list[str]:
    """The images shards' names (ingest names them by source shard and first key)."""
    return sorted(p.name.removesuffix(".done.json") for p in (out / "images").glob("*.done.json"))


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

    a, b, c, *_ = shards = _shards(out)
    n = len(shards)
    (out / "images" / f"{a}.tar").unlink()
    _truncate(out / "images" / f"{b}.parquet")
    _truncate(out / "captions" / f"{c}.tar")
    (out / "features" / "t5" / f"{b}.tar").unlink()
    _truncate(out / "stats" / f"{a}.json")
    _truncate(out / "dedup" / "hashes" / f"{c}.parquet")
    code, lines = _verify(out, capsys)
    assert code == 2, lines
    problems = lines[:-1]
    assert "6 problem(s)" in lines[-1], lines
    expected = {
        f"images/{a}: {a}.tar missing": "`curation ingest` again",
        f"images/{b}: {b}.parquet is": "`curation ingest` again",
        f"captions/{c}: {c}.tar is": "`curation caption` again",
        f"features/t5/{b}: {b}.tar missing": "`curation features` again",
        f"stats/{a}: {a}.json is": "`curation stats` again",
        f"dedup/hashes/{c}: {c}.parquet is": "`curation dedup` again",
    }
    for start, fix in expected.items():
        assert sum(p.startswith(start) and fix in p for p in problems) == 1, (start, problems)
    assert len(problems) == len(expected), problems

    assert main(_run(src, out, tiny_models)) == 0
    printed = capsys.readouterr().out
    for label, what in [
        ("images", f"images/{a}.tar missing"),
        ("images", f"images/{b}.parquet is"),
        ("captions", f"captions/{c}.tar is"),
        ("features", f"features/t5/{b}.tar missing"),
        ("stats", f"stats/{a}.json is"),
        ("dedup/hashes", f"dedup/hashes/{c}.parquet is"),
    ]:
        lines = [x for x in printed.splitlines() if x.startswith(f"[{label}] redone:")]
        assert len(lines) == 1 and what in lines[0], (label, printed)
    # Exactly the damaged shards ran; the shards made from them were not (they were made from the same bytes).
    assert f"[images] shards: 2 run, {n - 2} already done" in printed, printed
    for label in ("captions", "features", "stats", "dedup/hashes"):
        assert f"[{label}] shards: 1 run, {n - 1} already done" in printed, (label, printed)
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
    shard = _shards(out)[1]
    n = len(_shards(out))
    tar = out / "images" / f"{shard}.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF  # inside the first image: same size, other bytes
    tar.write_bytes(bytes(data))
    assert main(_ingest(src, out)) == 0  # a rerun checks sizes only: the shard stays
    assert f"0 run, {n} already done" in capsys.readouterr().out
    code, lines = _verify(out, capsys)
    assert code == 2 and len(lines) == 2, lines
    assert lines[0].startswith(f"images/{shard}: {shard}.tar: checksum") and "the bytes changed" in lines[0]
    assert f"delete images/{shard}.done.json, then run `curation ingest` again" in lines[0]
    (out / "images" / f"{shard}.done.json").unlink()
    assert main(_ingest(src, out)) == 0
    assert f"1 run, {n - 1} already done" in capsys.readouterr().out
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
    shard, n = _shards(out)[0], len(_shards(out))
    (out / "images" / f"{shard}.tar").unlink()
    assert main(_ingest(src, out)) == 0  # upgrading never redoes an existing output
    printed = capsys.readouterr().out
    assert f"0 run, {n} already done" in printed and "redone" not in printed, printed
    code, lines = _verify(out, capsys, "--stage", "images")
    assert code == 2 and lines[0].startswith(f"images/{shard}: {shard}.tar missing"), lines
    assert f"delete images/{shard}.done.json" in lines[0], lines


def test_verify_finds_keys_that_disagree_between_stages_and_missing_shards(tmp_path, coco_files, ray_local, capsys):
    src = make_folder(tmp_path / "in", coco_files[:8], nested=False)
    out = tmp_path / "out"
    assert main(_ingest(src, out)) == 0
    assert main(["size-filter", "--output", str(out), "--min-side", "400", "--no-progress"]) == 0
    capsys.readouterr()
    assert _verify(out, capsys)[0] == 0
    # A size-filter shard that lost a row and one that was never made: the keys checked against images/.
    import pyarrow.parquet as pq

    a, b, *_ = _shards(out)
    folder = StageDir(f"{out}/size-filter")
    table = folder.read_index(a)
    marker = folder.read_done(a)
    marker.files = {f"{a}.parquet": folder.write_index(a, table.slice(1))}
    folder.write_done(marker)
    lost = table.column("key")[0].as_py()
    folder.remove_shard(b)
    code, lines = _verify(out, capsys)
    assert code == 2, lines
    assert any(line.startswith(f"size-filter/{a}: 1 key(s) of images/{a} have no row ({lost})") for line in lines)
    assert any(line.startswith(f"size-filter: shard {b} of images was not made; fix: run `curation size-filter`")
               for line in lines), lines  # fmt: skip
    assert pq.read_table(out / "images" / f"{a}.parquet").num_rows == table.num_rows


def test_verify_refuses_in_one_line_what_it_cannot_check(tmp_path, capsys):
    assert main(["verify", "--output", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "nothing to verify" in capsys.readouterr().err


@pytest.mark.slow
def test_caption_on_a_truncated_images_parquet_is_one_line(tmp_path, coco_files, tiny_models, ray_local):
    src = make_folder(tmp_path / "in", coco_files[:8], nested=False)
    out = tmp_path / "out"
    assert main(_ingest(src, out)) == 0
    shard = _shards(out)[1]
    _truncate(out / "images" / f"{shard}.parquet")
    proc = cli("caption", "--output", str(out), "--model", str(tiny_models["llava"]), "--max-new-tokens", "4",
               "--workers", "1", "--no-progress")  # fmt: skip
    # The actors' own output (transformers' weight loading bar) reaches stderr too: the error is its one line.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("curation caption: error: ")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr[-3000:]
    line = errors[0]
    assert shard in line and "`curation ingest` again" in line and "curation verify" in line, line
