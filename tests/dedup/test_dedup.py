"""Dedup on real photos and generated copies: grouping, the kept member, resume, threshold changes, and the
caption stage skipping the removed duplicates."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation import registry
from curation.caption.model import CaptionConfig
from curation.caption.stage import CaptionStageConfig, run_caption
from curation.dedup.filter import DuplicateFilter
from curation.dedup.grouping import components, find_pairs
from curation.dedup.stage import DedupConfig, DedupStage, run_dedup
from curation.errors import ConfigError, SetupError
from curation.ingest import IngestConfig, run_ingest
from curation.layout import Layout
from curation.shards import StageDir
from curation.stats.stage import StatsConfig, run_stats
from tests.conftest import REPO, SHARED
from tests.dedup import variants
from tests.outputs import index_rows

SKIMAGE = SHARED / "data" / "skimage"
COPIED = ("p00", "p03", "p05", "p10")  # p05's resized and recompressed copies hash 2 bits away, the others 0
VARIANTS = {"copy": None, "half": variants.resized, "q15": variants.recompressed, "exif": variants.exif_rotated}


@pytest.fixture(scope="module")
def photos(coco_files, tmp_path_factory) -> dict[str, object]:
    """A folder of 12 distinct real photos, 4 of them with one copy of each kind; ingested 3 samples a shard."""
    originals = [*coco_files[:10], SKIMAGE / "astronaut.png", SKIMAGE / "chelsea.png"]
    src = tmp_path_factory.mktemp("dedup-in")
    expected: dict[str, set[str]] = {}  # original key -> keys of its copies
    for n, path in enumerate(originals):
        key = f"p{n:02d}"
        shutil.copy(path, src / f"{key}{path.suffix}")
        expected[key] = set()
        if key not in COPIED:
            continue
        image = Image.open(path)
        image.load()
        for kind, make in VARIANTS.items():
            data = path.read_bytes() if make is None else make(image)
            (src / f"{key}_{kind}{path.suffix if make is None else '.jpg'}").write_bytes(data)
            expected[key].add(f"{key}_{kind}")
    out = tmp_path_factory.mktemp("dedup-out") / "ingested"
    run_ingest(str(out), IngestConfig("folder", str(src), shard_size=3), progress=False)
    return {"out": out, "expected": expected}


def _fresh(photos, tmp_path) -> str:
    out = tmp_path / "out"
    shutil.copytree(photos["out"], out)
    return str(out)


def _groups(out: str) -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for key, row in index_rows(out, "dedup").items():
        groups.setdefault(row["group"], set()).add(key)
    return groups


def test_copies_grouped_with_their_original_and_distinct_photos_apart(photos, tmp_path, ray_local):
    out = _fresh(photos, tmp_path)
    result = run_dedup(out, DedupConfig(), progress=False)
    images, dedup = index_rows(out, "images"), index_rows(out, "dedup")
    assert StageDir(f"{out}/dedup").done_shards() == StageDir(f"{out}/images").done_shards()
    assert set(dedup) == set(images)

    groups = _groups(out)
    for original, copies in photos["expected"].items():
        group = next(members for members in groups.values() if original in members)
        assert group == {original} | copies, original  # every copy with its original, nothing else
    assert len(groups) == len(photos["expected"])  # so no two distinct photos share a group

    for members in groups.values():  # kept: the largest as displayed, ties to the smallest key
        kept = min(members, key=lambda k: (-images[k]["width"] * images[k]["height"], k))
        assert {k for k in members if dedup[k]["keep"]} == {kept}
        assert all(dedup[k]["group"] == kept and dedup[k]["group_size"] == len(members) for k in members)
    assert all(dedup[f"{o}_exif"]["distance"] <= 8 for o in COPIED)
    assert all(dedup[f"{o}_copy"]["exact"] for o in COPIED)
    assert result.removed == 16 and result.exact == 4
    assert result.group_sizes == {5: 4}
    summary = json.loads(Path(out, "dedup", "summary.json").read_text())
    assert summary["removed"] == 16 and summary["groups"] == 4 and summary["group_sizes"] == {"5": 4}
    page = Path(out, "report", "duplicates.html").read_text()
    assert page.count("<div class=group>") == 4 and page.count("<img ") == 20 and "p00_half" in page
    # The done markers keep their fields: later stages and older outputs read them.
    shard = StageDir(f"{out}/dedup").done_shards()[0]
    marker = json.loads(Path(out, "dedup", f"{shard}.done.json").read_text())
    assert set(marker) - {"seconds"} == {
        "stage", "shard", "rows", "config_hash", "input_lineage", "images_lineage", "reads", "removed_digest",
        "by_status", "by_dedup", "lineage", "files",
    }  # fmt: skip
    assert marker["files"][f"{shard}.parquet"]["size"] == Path(out, "dedup", f"{shard}.parquet").stat().st_size
    images_marker = json.loads(Path(out, "images", f"{shard}.done.json").read_text())
    assert marker["stage"] == "dedup" and marker["images_lineage"] == images_marker["lineage"]
    assert marker["reads"] == {"images": images_marker["lineage"]}
    hashes = json.loads(Path(out, "dedup", "hashes", f"{shard}.done.json").read_text())
    assert hashes["stage"] == "dedup/hashes" and hashes["input_lineage"] == images_marker["lineage"]
    hash_fields = {"stage", "shard", "rows", "config_hash", "input_lineage", "lineage", "by_status", "files"}
    assert set(hashes) - {"seconds"} == hash_fields
    edges = StageDir(f"{out}/dedup/edges")
    assert edges.done_shards() and {edges.read_done(t).stage for t in edges.done_shards()} == {"dedup/edges"}

    again = run_dedup(out, DedupConfig(), progress=False)  # a rerun does nothing and finds the same groups
    assert again.summaries == [] and again.groups == result.groups


def test_caption_skips_duplicates_and_follows_a_new_threshold(photos, tmp_path, tiny_models, ray_local):
    out = _fresh(photos, tmp_path)
    run_dedup(out, DedupConfig(), progress=False)
    config = CaptionStageConfig(model=CaptionConfig(model=str(tiny_models["llava"]), max_new_tokens=6, batch_size=4))
    summary = run_caption(out, config, progress=False)
    captions, dedup = index_rows(out, "captions"), index_rows(out, "dedup")
    removed = {k for k, r in dedup.items() if not r["keep"]}
    assert set(captions) == set(dedup)  # skipped samples are rows, never silently gone
    for key, row in captions.items():
        if key in removed:
            assert (row["status"], row["error_reason"], row["caption"]) == ("skipped", "duplicate", None)
            assert row["error"] == f"duplicate of {dedup[key]['group']}"
        else:
            assert row["status"] == "ok" and row["caption"] is not None
    assert summary.by_status["skipped"] == 16 and summary.counts["by_skipped"] == {"duplicate": 16}
    stats_summary, _ = run_stats(out, StatsConfig(field="caption"), progress=False)
    assert stats_summary.counts["by_skipped"] == {"duplicate": 16}
    assert sum(StageDir(f"{out}/stats").read_done(s).rows for s in StageDir(f"{out}/stats").done_shards()) == 12

    with pytest.raises(SetupError, match="different configuration"):
        run_dedup(out, DedupConfig(threshold=1), progress=False)
    run_dedup(out, DedupConfig(threshold=1), force=True, progress=False)
    strict = index_rows(out, "dedup")
    # p05's resized and recompressed copies sit 2 bits from it: at threshold 1 they leave its group.
    assert dedup["p05_half"]["distance"] == 2 and strict["p05_half"]["group"] != strict["p05"]["group"]
    assert {k for k, r in strict.items() if not r["keep"]} != removed
    run_caption(out, config, progress=False)
    captions = index_rows(out, "captions")
    for key, row in captions.items():  # no caption of a now-kept sample is missing, none of a removed one survives
        assert (row["status"] == "skipped") == (not strict[key]["keep"]), key

    run_caption(out, dataclasses.replace(config, include=("duplicate",)), progress=False)
    assert {r["status"] for r in index_rows(out, "captions").values()} == {"ok"}


def test_new_images_make_dedup_stale_until_it_runs_again(photos, tmp_path, tiny_models, ray_local):
    out = _fresh(photos, tmp_path)
    run_dedup(out, DedupConfig(), progress=False)
    shard = StageDir(f"{out}/images").done_shards()[0]
    done = Path(out, "images", f"{shard}.done.json")
    done.write_text(json.dumps(json.loads(done.read_text()) | {"lineage": "redone"}))  # as a redone ingest would
    config = CaptionStageConfig(model=CaptionConfig(model=str(tiny_models["llava"]), max_new_tokens=4))
    with pytest.raises(SetupError, match="out of date"):
        run_caption(out, config, progress=False)
    before = index_rows(out, "dedup")
    again = run_dedup(out, DedupConfig(), progress=False)
    assert [s.shards_run for s in again.summaries] == [1, 3, 1]  # that shard's hashes, every band, its dedup shard
    assert index_rows(out, "dedup") == before


@pytest.mark.slow
def test_sigkill_mid_dedup_then_rerun_gives_the_same_groups(photos, tmp_path, coco_files):
    src = tmp_path / "in"
    src.mkdir()
    for n, path in enumerate(coco_files[:24]):
        shutil.copy(path, src / f"c{n:02d}.jpg")
        if n % 4 == 0:
            image = Image.open(path)
            (src / f"c{n:02d}_half.jpg").write_bytes(variants.resized(image))
    ref, out = tmp_path / "ref", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "curation.cli"]
    ingest = ["ingest", "--source", "folder", "--input", str(src), "--shard-size", "2", "--no-progress"]
    subprocess.run([*cli, *ingest, "--output", str(ref)], check=True, env=env, capture_output=True)
    shutil.copytree(ref, out)
    dedup = ["dedup", "--no-progress"]
    subprocess.run([*cli, *dedup, "--output", str(ref)], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cli, *dedup, "--output", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    hashes = out / "dedup" / "hashes"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(list(hashes.glob("*.done.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "dedup" / "summary.json").exists(), "the kill must land mid-run"
    subprocess.run([*cli, *dedup, "--output", str(out)], check=True, env=env, capture_output=True)
    assert index_rows(out, "dedup") == index_rows(ref, "dedup")
    assert len(_groups(out)) == 24  # 30 samples: 6 resized copies grouped with their originals
    assert not [p for p in (out / "dedup").rglob(".tmp-*")]


def test_dedup_stage_declares_its_filter_config_and_outputs(tmp_path):
    layout = Layout(str(tmp_path / "out"))
    assert ("curation.dedup.stage:DedupStage", True) in registry.STAGES and DedupStage.name == "dedup"
    assert DedupStage.sample_filters == (DuplicateFilter,)  # how later stages find it (`Stage.input_view`)
    assert (DuplicateFilter.reasons, DuplicateFilter.applies_after) == (("duplicate",), "dedup")
    threshold = next(f for f in dataclasses.fields(DedupConfig) if f.name == "threshold")
    assert threshold.metadata["help"] == "pHash Hamming distance counted as duplicate"
    stage = DedupStage(layout, DedupConfig())
    assert stage.outputs() == [f"dedup: {layout.dedup.url}/", f"report: {layout.report('duplicates.html')}"]
    with pytest.raises(SetupError, match="no images in .*: run curation ingest first"):
        stage.check()
    with pytest.raises(ConfigError, match="0..16"):
        DedupConfig(threshold=17)


def _brute_force(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(distances <= threshold, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize("threshold", [0, 2, 5, 8, 11])
def test_banded_search_finds_exactly_the_pairs_within_the_threshold(threshold):
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**64, size=300, dtype=np.uint64)
    flips = [sum(1 << int(b) for b in rng.choice(64, k % 13, replace=False)) for k in range(300)]
    near = [base[k % 40] ^ np.uint64(f) for k, f in enumerate(flips)]
    hashes = np.concatenate([base, np.array(near, dtype=np.uint64), base[:5]])  # exact repeats too
    i, j, d = find_pairs(hashes, threshold)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == _brute_force(hashes, threshold)
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == len(i)  # each pair once
    assert np.array_equal(d, np.bitwise_count(hashes[i] ^ hashes[j]))


def test_components_join_chains_and_label_by_smallest_node():
    a, b = np.array([5, 9, 1, 7, 20]), np.array([9, 12, 3, 12, 21])
    nodes, labels = components(a, b)
    assert dict(zip(nodes.tolist(), labels.tolist(), strict=True)) == {
        1: 1, 3: 1, 5: 5, 7: 5, 9: 5, 12: 5, 20: 20, 21: 20,
    }  # fmt: skip


def test_phash_sees_the_displayed_image_and_separates_distinct_photos(coco_files):
    from curation.dedup.hashing import hamming, phash

    photos = [p.read_bytes() for p in coco_files[:12]]
    hashes = [phash(d) for d in photos]
    assert min(hamming(a, b) for a, b in itertools.combinations(hashes, 2)) > 8
    image = Image.open(io.BytesIO(photos[0]))
    assert hamming(hashes[0], phash(variants.exif_rotated(image))) <= 4
    turned = io.BytesIO()
    image.transpose(Image.Transpose.ROTATE_90).save(turned, "JPEG", quality=92)  # rotated, no tag: another picture
    assert hamming(hashes[0], phash(turned.getvalue())) > 8
