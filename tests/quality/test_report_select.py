"""The report's quality section, through the CLI on COCO photos, checked against a plain recomputation from the
`quality/` parquets."""

from __future__ import annotations

import json
import shutil
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
