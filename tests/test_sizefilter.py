"""The size filter: a stage added as one module and one registry line, whose keep flags later stages apply."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from curation.caption.model import CaptionConfig
from curation.caption.stage import CaptionStageConfig, run_caption
from curation.ingest import IngestConfig, run_ingest
from curation.layout import Layout
from curation.runner import SetupError, run
from curation.shards import StageDir
from curation.sizefilter import SizeFilterConfig, SizeFilterStage
from curation.stats.stage import StatsConfig, run_stats
from tests.outputs import index_rows


@pytest.fixture()
def ingested(tmp_path, coco_files) -> str:
    """6 COCO photos (every side >= 300 px) and two small copies, 4 samples a shard."""
    src = tmp_path / "in"
    src.mkdir()
    for f in coco_files[:6]:
        shutil.copy(f, src / f.name)
    with Image.open(coco_files[0]) as im:
        im.resize((160, 120)).save(src / "thumb.jpg")  # too small at --min-side 200
        im.resize((1500, 250)).save(src / "strip.jpg")  # 6:1, beyond PixArt's widest bucket
    out = str(tmp_path / "out")
    run_ingest(out, IngestConfig("folder", str(src), shard_size=4), progress=False)
    return out


def _filter(out: str, force: bool = False, **config):
    return run(SizeFilterStage(Layout(out), SizeFilterConfig(**config)), force=force, progress=False)


def test_small_and_elongated_images_are_marked_and_later_stages_skip_them(ingested, tiny_models, ray_local):
    out = ingested
    summary = _filter(out, min_side=200)
    assert summary.counts["by_size_filter"] == {"kept": 6, "removed": 2}
    flags = index_rows(out, "size-filter")
    assert {k for k, r in flags.items() if not r["keep"]} == {"thumb", "strip"}
    assert flags["thumb"]["detail"] == "short side 120 px < 200" and flags["strip"]["detail"] == "aspect 6.00 > 4"
    assert {flags[k]["reason"] for k in ("thumb", "strip")} == {"too_small"} and flags["000000000790"]["reason"] is None

    # The caption stage was not edited for this filter: it finds it through the registry.
    caption = CaptionStageConfig(model=CaptionConfig(model=str(tiny_models["llava"]), max_new_tokens=4))
    first = run_caption(out, caption, progress=False)
    assert first.counts["by_skipped"] == {"too_small": 2}
    rows = index_rows(out, "captions")
    assert rows["thumb"]["status"] == "skipped" and rows["thumb"]["error_reason"] == "too_small"
    assert rows["strip"]["status"] == "skipped" and rows["thumb"]["caption"] is None
    assert sum(r["status"] == "ok" for r in rows.values()) == 6
    stats, _ = run_stats(out, StatsConfig(field="caption"), progress=False)
    assert stats.samples == 6, "the nouns of the 6 kept images are counted"

    # Another threshold is refused without --force; with it, only the shards whose removals changed are redone.
    with pytest.raises(SetupError, match="different configuration"):
        _filter(out, min_side=130)
    _filter(out, force=True, min_side=130)  # the 160x120 thumbnail is still too small, the strip still too long
    assert {k for k, r in index_rows(out, "size-filter").items() if not r["keep"]} == {"thumb", "strip"}
    unchanged = run_caption(out, caption, progress=False)
    assert unchanged.shards_run == 0, "same removals: the captions stay"
    _filter(out, force=True, min_side=100, max_aspect=8)
    again = run_caption(out, caption, progress=False)
    images = StageDir(f"{out}/images")
    changed = {"thumb", "strip"}
    shards_with_changes = {s for s in images.done_shards() if changed & set(images.read_index(s)["key"].to_pylist())}
    assert again.shards_run == len(shards_with_changes) < again.shards_total
    assert {k for k, r in index_rows(out, "captions").items() if r["status"] == "skipped"} == set()


def test_the_filter_refuses_an_output_without_images(tmp_path):
    with pytest.raises(SetupError, match="no images in .*: run curation ingest first"):
        _filter(str(tmp_path / "empty"))
