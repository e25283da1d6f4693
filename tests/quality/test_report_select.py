"""The report's quality section and `curation select`, through the CLI on COCO photos, checked against a plain
recomputation from the `quality/` parquets."""

from __future__ import annotations

import json
import math
import shutil
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from curation.cli import main
from curation.shards import StageDir
from tests.outputs import index_rows

N_PHOTOS = 18
SHARD = "6"


def _source(root: Path, photos: list[Path]) -> Path:
    src = root / "in"
    src.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(photos):
        shutil.copy(photo, src / photo.name)
        (src / photo.with_suffix(".txt").name).write_text(f"a photo <b>number</b> {i} & more")
    return src


def _quality(out: Path, tiny_models) -> None:
    """Placeholder until `curation quality` lands: the §3 layout, scores from a hash of the key."""
    import hashlib

    import pyarrow as pa

    from curation.shards import DoneMarker

    images, quality = StageDir(f"{out}/images"), StageDir(f"{out}/quality")
    for shard in images.done_shards():
        rows = []
        for r in images.read_index(shard).to_pylist():
            h = int.from_bytes(hashlib.sha256(r["key"].encode()).digest()[:4], "big")
            rows.append(
                {"key": r["key"], "status": r["status"], "error_reason": None, "error": None,
                 "bucket": r["bucket_1024"], "width": r["width"], "height": r["height"],
                 "aesthetic": float(np.float32(2 + (h % 50) / 10)), "nsfw": (h % 97) / 97,
                 "clip_score_original": float(h % 40), "text_truncated_original": h % 3 == 0}
            )  # fmt: skip
        quality.write_index(shard, pa.Table.from_pylist(rows))
        quality.write_done(DoneMarker(shard, stage="quality", rows=len(rows), lineage=images.read_done(shard).upstream))


def _cli(*args: str) -> None:
    assert main([*args, "--no-progress"]) == 0


@pytest.fixture(scope="module")
def output(tmp_path_factory, coco_files, tiny_models, ray_local) -> Path:
    root = tmp_path_factory.mktemp("report-select")
    src = _source(root, coco_files[:N_PHOTOS])
    out = root / "out"
    _cli("ingest", "--source", "folder", "--input", str(src), "--output", str(out), "--shard-size", SHARD)
    _quality(out, tiny_models)
    _cli("stats", "--output", str(out))
    return out


def _scored(out: Path) -> dict[str, dict]:
    return {k: r for k, r in index_rows(out, "quality").items() if r["status"] == "ok" and r["aesthetic"] is not None}


def test_the_report_shows_the_quality_scores(output):
    out, report = output, output / "report"
    page = (report / "index.html").read_text(encoding="utf-8")
    numbers = json.loads((report / "quality.json").read_text())
    scored = _scored(out)
    for column in ("aesthetic", "nsfw", "clip_score_original"):
        values = np.array([r[column] for r in scored.values()], np.float64)
        low, high, bins = numbers["scores"][column]["bins"]
        assert numbers["scores"][column]["count"] == len(values)
        assert numbers["scores"][column]["mean"] == pytest.approx(values.mean())
        assert (
            numbers["scores"][column]["histogram"]
            == np.histogram(np.clip(values, low, high), bins, (low, high))[0].tolist()
        )
    for name in (
        "quality_aesthetic.png",
        "quality_nsfw.png",
        "quality_clip_scores.png",
        "quality_aesthetic_buckets.png",
    ):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{name}"' in page
    by_bucket: dict[str, list[float]] = {}
    for r in scored.values():
        by_bucket.setdefault(r["bucket"], []).append(r["aesthetic"])
    assert {b: (v["count"], pytest.approx(v["mean"])) for b, v in numbers["aesthetic_by_bucket"].items()} == {
        b: (len(v), np.mean(v)) for b, v in by_bucket.items()
    }
    ranked = sorted(scored.values(), key=lambda r: (-r["aesthetic"], r["key"]))
    assert [g["key"] for g in numbers["highest_aesthetic"]] == [r["key"] for r in ranked[:12]]
    ranked = sorted(scored.values(), key=lambda r: (r["aesthetic"], r["key"]))
    assert [g["key"] for g in numbers["lowest_aesthetic"]] == [r["key"] for r in ranked[:12]]
    assert (report / "gallery" / "top-0000.jpg").exists() and (report / "gallery" / "bottom-0011.jpg").exists()
    assert "a photo &lt;b&gt;number&lt;/b&gt;" in page and "<b>number</b>" not in page

    table = json.loads((report / "table1.json").read_text())
    original = next(row for row in table if row["name"].endswith("(original captions)"))
    clip = [r["clip_score_original"] for r in scored.values()]
    assert original["clip_score"] == pytest.approx(np.mean(clip))
    assert "CLIP score" in (report / "table1.md").read_text()


def _expected_selection(out: Path, pct: float, per: str = "bucket") -> tuple[set[str], dict]:
    groups: dict[str, list[tuple[float, str]]] = {}
    for key, r in _scored(out).items():
        groups.setdefault(r["bucket"] if per == "bucket" else "all", []).append((np.float32(r["aesthetic"]), key))
    kept, summary = set(), {}
    for g, members in groups.items():
        k = math.ceil(Decimal(repr(pct)) * len(members) / 100)
        cut = sorted((s for s, _ in members), reverse=True)[k - 1]
        chosen = {key for s, key in members if s >= cut}
        kept |= chosen
        summary[g] = {"count": len(members), "kept": len(chosen), "cut": float(cut)}
    return kept, summary


def _exported(to: Path) -> set[str]:
    """The keys of a Sana export, read from its tars."""
    import tarfile

    keys = set()
    for tar in to.glob("*.tar"):
        with tarfile.open(tar) as t:
            keys |= {m.name.rsplit(".", 1)[0] for m in t.getmembers() if m.name.endswith(".json")}
    return keys


def _export(out: Path, to: Path):
    from curation.export.sana import SanaConfig, run_export_sana

    return run_export_sana(str(out), SanaConfig(to=str(to), prompt_field="original"), progress=False).summaries[0]


def _removed_by_shard(out: Path) -> dict[str, set[str]]:
    flags = StageDir(f"{out}/select")
    return {s: {r["key"] for r in flags.read_index(s).to_pylist() if not r["keep"]} for s in flags.done_shards()}


def test_select_keeps_the_top_percent_of_each_bucket_and_the_export_holds_them(output, tmp_path, capsys):
    out, to = output, tmp_path / "sana"
    _cli("select", "--output", str(out), "--top-aesthetic", "30")
    flags = index_rows(out, "select")
    expected, groups = _expected_selection(out, 30)
    assert {k for k, r in flags.items() if r["keep"]} == expected
    assert all(r["reason"] == "not_selected" and r["detail"] for r in flags.values() if not r["keep"])
    summary = json.loads((out / "select" / "summary.json").read_text())
    assert summary["groups"] == groups and summary["kept"] == len(expected)
    assert _export(out, to).counts["by_export"]["skipped_not_selected"] == N_PHOTOS - len(expected)
    assert _exported(to) == expected
    _cli("stats", "--output", str(out))  # the report counts what select removed, from its flags' markers
    removed = json.loads((out / "report" / "quality.json").read_text())["removed"]
    assert removed == [{"flags": "select", "reason": "not_selected", "samples": N_PHOTOS - len(expected)}]

    # Another PCT rewrites the flags (no --force); the export redoes only the shards whose removals changed. The
    # PCT is chosen so that some shards change and some do not.
    before = _removed_by_shard(out)
    pct = next(p for p in range(35, 100, 5) if 0 < _changed_shards(out, before, p) < len(before))
    _cli("select", "--output", str(out), "--top-aesthetic", str(pct))
    after = _removed_by_shard(out)
    assert {k for k, r in index_rows(out, "select").items() if r["keep"]} == _expected_selection(out, pct)[0]
    again = _export(out, to)
    assert again.shards_run == sum(before[s] != after[s] for s in after) < again.shards_total
    assert _exported(to) == _expected_selection(out, pct)[0]

    _cli("select", "--output", str(out), "--top-aesthetic", "100", "--per", "all")
    assert all(r["keep"] for r in index_rows(out, "select").values()), "100%: everything ranked is kept"
    capsys.readouterr()
    assert main(["select", "--output", str(out), "--top-aesthetic", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("--top-aesthetic 0: a percentage above 0 and at most 100")


def _changed_shards(out: Path, before: dict[str, set[str]], pct: float) -> int:
    kept = _expected_selection(out, pct)[0]
    images = StageDir(f"{out}/images")
    keys = {s: set(images.read_index(s)["key"].to_pylist()) for s in before}
    return sum(keys[s] - kept != before[s] for s in before)


def test_select_refuses_an_output_without_aesthetic_scores(tmp_path, coco_files, ray_local, capsys):
    src = _source(tmp_path, coco_files[:2])
    out = tmp_path / "out"
    _cli("ingest", "--source", "folder", "--input", str(src), "--output", str(out))
    capsys.readouterr()
    assert main(["select", "--output", str(out), "--top-aesthetic", "10"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no quality scores in {out}: run curation quality first")


def test_a_rerun_after_adding_images_equals_a_clean_run(output, coco_files, tiny_models, tmp_path, capsys):
    out = output
    src = _source(out.parent, coco_files[: N_PHOTOS + 4])
    _cli("ingest", "--source", "folder", "--input", str(src), "--output", str(out), "--shard-size", SHARD)
    _quality(out, tiny_models)
    capsys.readouterr()
    assert (
        main(["export-sana", "--output", str(out), "--to", str(tmp_path / "early"), "--prompt-field", "original"]) == 2
    )
    assert "run `curation select` again, or pass --include not_selected" in capsys.readouterr().err
    _cli("select", "--output", str(out), "--top-aesthetic", "30")
    clean = tmp_path / "out"
    _cli("ingest", "--source", "folder", "--input", str(src), "--output", str(clean), "--shard-size", SHARD)
    _quality(clean, tiny_models)
    _cli("select", "--output", str(clean), "--top-aesthetic", "30")
    assert index_rows(out, "select") == index_rows(clean, "select")
    assert len(index_rows(out, "select")) == N_PHOTOS + 4
    assert json.loads((out / "select" / "summary.json").read_text()) == json.loads(
        (clean / "select" / "summary.json").read_text()
    )
    assert _exported(_export_to(out, tmp_path / "a")) == _exported(_export_to(clean, tmp_path / "b"))


def _export_to(out: Path, to: Path) -> Path:
    _export(out, to)
    return to
