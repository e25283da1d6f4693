"""The report's quality section and `curation select`, through the CLI on COCO photos, checked against a plain
recomputation from the `quality/` parquets."""

from __future__ import annotations

import json
import math
import re
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
        if (src / photo.name).exists():  # left as it is: a rerun sees the photos added, nothing changed
            continue
        shutil.copy(photo, src / photo.name)
        (src / photo.with_suffix(".txt").name).write_text(f"a photo <b>number</b> {i} & more")
    return src


def _between(values: list[float], i: int) -> float:
    """A threshold with exactly i of `values` below it."""
    ordered = sorted(values)
    return (ordered[i - 1] + ordered[i]) / 2


class Pipeline:
    """The commands run on an output: ingest, caption (tiny LLaVA), quality (tiny CLIP and heads, thresholds)."""

    def __init__(self, src: Path, out: Path, tiny_models) -> None:
        self.src, self.out, self.tiny = src, out, tiny_models
        self.thresholds: list[str] = []

    def ingest(self) -> None:
        _cli("ingest", "--source", "folder", "--input", str(self.src), "--output", str(self.out), "--shard-size", SHARD)

    def caption(self) -> None:
        _cli("caption", "--output", str(self.out), "--model", str(self.tiny["llava"]), "--max-new-tokens", "4")

    def quality(self) -> None:
        models = ["--model", str(self.tiny["clip"]), "--aesthetic-head", str(self.tiny["aesthetic"])]
        models += ["--nsfw-head", str(self.tiny["nsfw"])]
        _cli("quality", "--output", str(self.out), *models, *self.thresholds)


def _cli(*args: str) -> None:
    assert main([*args, "--no-progress"]) == 0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, coco_files, tiny_models, ray_local) -> Pipeline:
    """18 photos with hostile alt-text; scores, then thresholds that remove 3 by aesthetic and 2 more by NSFW, the
    set `default`, its clip scores, and the report."""
    root = tmp_path_factory.mktemp("report-select")
    p = Pipeline(_source(root, coco_files[:N_PHOTOS]), root / "out", tiny_models)
    p.ingest()
    p.quality()
    scores = index_rows(p.out, "quality").values()
    x = _between([r["aesthetic"] for r in scores], 3)
    y = _between([-r["nsfw"] for r in scores if r["aesthetic"] >= x], 2)  # two of the others above -y
    p.thresholds = ["--min-aesthetic", repr(x), "--max-nsfw", repr(-y)]
    p.caption()
    p.quality()  # the thresholds' flags, and the clip scores of `default`
    _cli("stats", "--output", str(p.out))
    return p


@pytest.fixture(scope="module")
def output(pipeline) -> Path:
    return pipeline.out


def _scored(out: Path) -> dict[str, dict]:
    return {k: r for k, r in index_rows(out, "quality").items() if r["status"] == "ok" and r["aesthetic"] is not None}


def test_the_report_shows_the_quality_scores(output):
    out, report = output, output / "report"
    page = (report / "index.html").read_text(encoding="utf-8")
    numbers = json.loads((report / "quality.json").read_text())
    scored = _scored(out)
    for column in ("aesthetic", "nsfw", "clip_score_original", "clip_score_default"):
        values = np.array([r[column] for r in scored.values() if r[column] is not None], np.float64)
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
    for stage in ("quality", "quality/flags-images"):  # in the stages' counts: name, shards, rows
        assert re.search(rf"<tr><td>{stage}</td><td>\d+</td><td>{N_PHOTOS}</td>", page), stage

    table = {row["name"]: row["clip_score"] for row in json.loads((report / "table1.json").read_text())}
    for row, field in (("out (original captions)", "original"), ("out (generated captions)", "default")):
        clip = [r[f"clip_score_{field}"] for r in scored.values() if r[f"clip_score_{field}"] is not None]
        assert table[row] == pytest.approx(np.mean(clip))
    assert "CLIP score" in (report / "table1.md").read_text()
    removed = {(r["flags"], r["reason"]): r["samples"] for r in numbers["removed"]}
    flags = index_rows(out, "quality/flags-images")
    for reason in ("low_aesthetic", "nsfw"):
        assert removed["quality/flags-images", reason] == sum(r["reason"] == reason for r in flags.values())
    assert (removed["quality/flags-images", "low_aesthetic"], removed["quality/flags-images", "nsfw"]) == (3, 2)


def _quality_removed(out: Path) -> set[str]:
    """The samples the quality thresholds remove: select does not rank them."""
    return {k for k, r in index_rows(out, "quality/flags-images").items() if not r["keep"]}


def _expected_selection(out: Path, pct: float, per: str = "bucket") -> tuple[set[str], dict]:
    """(the keys kept, summary.json's groups), recomputed from the quality parquets and flags."""
    groups: dict[str, list[tuple[float, str]]] = {}
    removed = _quality_removed(out)
    for key, r in _scored(out).items():
        if key in removed:
            continue
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
    not_ranked = len(_quality_removed(out))
    counts = _export(out, to).counts["by_export"]
    assert counts["skipped_not_selected"] == N_PHOTOS - not_ranked - len(expected)
    assert counts["skipped_low_aesthetic"] + counts["skipped_nsfw"] == not_ranked
    assert _exported(to) == expected
    _cli("stats", "--output", str(out))  # the report counts what select removed, from its flags' markers
    removed = json.loads((out / "report" / "quality.json").read_text())["removed"]
    assert {"flags": "select", "reason": "not_selected", "samples": N_PHOTOS - not_ranked - len(expected)} in removed
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert re.search(rf"<tr><td>select</td><td>\d+</td><td>{N_PHOTOS}</td>", page), "select in the stages' counts"

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
    kept = {k for k, r in index_rows(out, "select").items() if r["keep"]}
    assert kept == set(_scored(out)) - _quality_removed(out), "100%: everything ranked is kept"
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


def test_a_rerun_after_adding_images_equals_a_clean_run(pipeline, coco_files, tiny_models, tmp_path, capsys):
    out = pipeline.out
    _source(out.parent, coco_files[: N_PHOTOS + 4])
    pipeline.ingest()
    pipeline.quality()  # the new images' scores (select reads no caption: the new shards are not captioned)
    capsys.readouterr()
    assert (
        main(["export-sana", "--output", str(out), "--to", str(tmp_path / "early"), "--prompt-field", "original"]) == 2
    )
    assert "run `curation select` again, or pass --include not_selected" in capsys.readouterr().err
    _cli("select", "--output", str(out), "--top-aesthetic", "30")
    clean = Pipeline(pipeline.src, tmp_path / "out", tiny_models)
    clean.thresholds = pipeline.thresholds
    clean.ingest()
    clean.quality()
    _cli("select", "--output", str(clean.out), "--top-aesthetic", "30")
    clean = clean.out
    assert index_rows(out, "select") == index_rows(clean, "select")
    assert len(index_rows(out, "select")) == N_PHOTOS + 4
    assert json.loads((out / "select" / "summary.json").read_text()) == json.loads(
        (clean / "select" / "summary.json").read_text()
    )
    assert _exported(_export_to(out, tmp_path / "a")) == _exported(_export_to(clean, tmp_path / "b"))


def _export_to(out: Path, to: Path) -> Path:
    _export(out, to)
    return to
