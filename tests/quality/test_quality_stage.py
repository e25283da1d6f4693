"""The quality stage through the CLI: COCO photos with their captions, a tiny LLaVA caption set, tiny CLIP and heads.

One output is built once for the module, step by step (scores, thresholds, captioning, re-captioning, added
files); each step records what it saw, and the tests assert on those records and the files left on disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from curation.cli import main
from curation.quality.stage import read_embeddings
from curation.shards import StageDir
from tests.conftest import COCO, EDGE_CASES
from tests.layouts import make_folder
from tests.outputs import index_rows

pytestmark = pytest.mark.usefixtures("ray_local")


def _cli(*args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one `curation` command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*args, "--no-progress"])
    return rc, out.getvalue(), err.getvalue()


def _ok(*args: str) -> str:
    rc, out, err = _cli(*args)
    assert rc == 0, err
    return out


def _shards_run(printed: str, label: str) -> int:
    """Shards a pass ran, from its summary line `[label] shards: N run, ...`."""
    found = re.findall(rf"^\[{re.escape(label)}\] shards: (\d+) run", printed, re.M)
    assert found, f"no summary line for {label} in:\n{printed}"
    return int(found[-1])


def _markers(out: Path, rel: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / rel).glob("*.done.json"))}


def _digests(out: Path, rel: str) -> dict[str, str]:
    return {n: json.loads(text)["removed_digest"] for n, text in _markers(out, rel).items()}


def _removed(out: Path, rel: str) -> dict[str, str]:
    return {k: r["reason"] for k, r in index_rows(out, rel).items() if not r["keep"]}


def _between(values: list[float], i: int) -> float:
    """A threshold between the i-th and (i+1)-th smallest value, so exactly i values lie below it."""
    ordered = sorted(values)
    return (ordered[i - 1] + ordered[i]) / 2


@pytest.fixture(scope="module")
def built(tmp_path_factory, coco_files, edge_case_files, tiny_models) -> dict:
    """The steps below, each starting as few model workers as it can (a worker start costs more than its work)."""
    root = tmp_path_factory.mktemp("quality")
    originals = {}
    for line in (COCO / "captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        originals[row["file"]] = row["captions"][0]
    src = make_folder(root / "in", coco_files[:8], originals, nested=False)
    out = root / "out"
    models = [
        "--model", str(tiny_models["clip"]),
        "--aesthetic-head", str(tiny_models["aesthetic"]), "--nsfw-head", str(tiny_models["nsfw"]),
    ]  # fmt: skip
    quality = ["quality", "--output", str(out), *models]
    caption = ["caption", "--output", str(out), "--model", str(tiny_models["llava"]), "--max-new-tokens"]
    ingest = ["ingest", "--source", "folder", "--input", str(src), "--output", str(out), "--shard-size", "4"]
    seen: dict = {"out": out}

    _ok(*ingest)
    seen["first"] = _ok(*quality)
    scores = seen["scores"] = index_rows(out, "quality")
    x = _between([r["aesthetic"] for r in scores.values()], 3)  # three images below it
    (clip_dir,) = (out / "clip").iterdir()
    seen["clip_dir"] = clip_dir
    clip_rel = f"clip/{clip_dir.name}"
    clip_before, quality_before = _markers(out, clip_rel), _markers(out, "quality")
    printed = _ok(*quality, "--min-aesthetic", str(x))
    seen["threshold_run"] = {
        "same": _markers(out, clip_rel) == clip_before and _markers(out, "quality") == quality_before,
        "printed": printed,
        "x": x,
        "removed": _removed(out, "quality/flags-images"),
    }

    _ok(*caption, "4")
    seen["captions"] = index_rows(out, "captions")
    seen["after_caption"] = {"printed": _ok(*quality, "--min-aesthetic", str(x)), "scores": index_rows(out, "quality")}
    clip_default = {r["clip_score_default"] for r in seen["after_caption"]["scores"].values()} - {None}
    y = _between(list(clip_default), 1)  # the captions at the lowest score below it (a random CLIP: often 0)
    _ok(*quality, "--min-aesthetic", str(x), "--min-clip-score", f"default={y}")
    seen["clip_threshold"] = {"y": y, "removed": _removed(out, "quality/flags-texts")}
    seen["caption_again"] = _ok(*caption, "4")  # clip-score flags do not reach caption
    _ok("stats", "--output", str(out))

    # A threshold that removes one more image: flags rewritten with no model; stats redoes that one shard.
    x2 = _between([r["aesthetic"] for r in scores.values() if r["aesthetic"] >= x], 1)
    clip_before, quality_before = _markers(out, clip_rel), _markers(out, "quality")
    images_flags = _digests(out, "quality/flags-images")
    clip_args = ["--min-aesthetic", str(x2), "--min-clip-score", f"default={y}"]
    printed = _ok(*quality, *clip_args)
    seen["new_threshold"] = {
        "same": _markers(out, clip_rel) == clip_before and _markers(out, "quality") == quality_before,
        "printed": printed,
        "removed": _removed(out, "quality/flags-images"),
        "removals_changed": {n for n, d in _digests(out, "quality/flags-images").items() if images_flags[n] != d},
        "stats": _ok("stats", "--output", str(out)),
    }
    seen["stats"] = {"default": set(index_rows(out, "stats")), "original": set(index_rows(out, "stats-original"))}

    # Files added (two COCO photos beside the others, the hostile files in a folder of their own), and the set
    # captioned again: its clip-score flags are stale until quality reruns; then the output equals a clean run.
    make_folder(src, coco_files[8:10], originals, nested=False)
    for f in edge_case_files:
        dst = src / "edge" / f.relative_to(EDGE_CASES)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    _ok(*ingest)
    _ok(*quality, *clip_args)
    _ok(*caption, "5", "--force")
    seen["stale"] = _cli("stats", "--output", str(out))
    _ok(*quality, *clip_args)
    seen["fresh"] = _cli("stats", "--output", str(out))
    clean = root / "clean"
    seen["clean"] = clean
    seen["run"] = _ok(
        "run", "--source", "folder", "--input", str(src), "--output", str(clean), "--shard-size", "4",
        "--no-dedup", "--no-stats", "--no-features", "--caption-model", str(tiny_models["llava"]),
        "--max-new-tokens", "5", "--quality-model", str(tiny_models["clip"]),
        "--aesthetic-head", str(tiny_models["aesthetic"]), "--nsfw-head", str(tiny_models["nsfw"]), *clip_args,
    )  # fmt: skip
    seen["verify"] = _cli("verify", "--output", str(out))
    return seen


def test_every_image_has_a_row_with_scores_in_range(built):
    out = built["out"]
    images, scores = index_rows(out, "images"), index_rows(out, "quality")
    assert set(scores) == set(images)
    clip = index_rows(out, f"clip/{built['clip_dir'].name}")
    decode_failed = {k for k, r in clip.items() if r["status"] == "failed" and images[k]["status"] == "ok"}
    assert decode_failed, "some hostile files decode at ingest's header read but not here: failed rows"
    for key, r in scores.items():
        if r["status"] != "ok":
            assert r["aesthetic"] is None and r["nsfw"] is None and r["clip_score_original"] is None, key
            assert r["error_reason"], key
            continue
        assert math.isfinite(r["aesthetic"]), key  # a random head's regression has no fixed range; LAION's is 1-10
        assert 0 <= r["nsfw"] <= 1, key
        for name in ("original", "default"):
            score = r[f"clip_score_{name}"]
            assert score is None or (0 <= score <= 100 and isinstance(r[f"text_truncated_{name}"], bool)), key
        assert r["bucket"] == images[key]["bucket_1024"] and r["width"] == images[key]["width"], key
    coco = [r for k, r in scores.items() if not k.startswith("edge")]
    assert all(r["clip_score_original"] is not None for r in coco), "every COCO photo has its caption scored"
    assert sum(r["status"] == "ok" for k, r in scores.items() if k.startswith("edge")) >= 10


def test_heads_equal_a_plain_recomputation_from_the_stored_embeddings(built, tiny_models):
    import torch
    from safetensors.torch import load_file

    from curation.quality.heads import AestheticMLP, NSFWHead
    from curation.tiny.clip import AESTHETIC_WIDTHS, NSFW_WIDTHS

    out, folder = built["out"], StageDir(str(built["clip_dir"]))
    scores = index_rows(out, "quality")
    heads = {}
    for name, head in (("aesthetic", AestheticMLP(AESTHETIC_WIDTHS)), ("nsfw", NSFWHead(NSFW_WIDTHS))):
        head.load_state_dict(load_file(tiny_models[name]), strict=True)
        heads[name] = head.eval()
    n = 0
    for shard in folder.done_shards():
        emb = read_embeddings(folder, shard)
        assert emb.dtype == np.float16 and np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)
        for row in folder.read_index(shard).to_pylist():
            if row["row"] is None:
                continue
            x = torch.from_numpy(emb[row["row"] : row["row"] + 1].astype(np.float32))
            with torch.no_grad():
                for name, head in heads.items():
                    assert scores[row["key"]][name] == pytest.approx(float(head(x).reshape(-1)[0]), abs=1e-4)
            n += 1
    assert n >= 20


def test_a_new_threshold_rewrites_the_flags_without_a_model(built):
    first, later, tag = built["threshold_run"], built["new_threshold"], built["clip_dir"].name
    assert first["same"] and later["same"], "embeddings and scores untouched"
    for step in (first, later):
        assert _shards_run(step["printed"], "quality") == 0 and _shards_run(step["printed"], f"clip/{tag}") == 0
    assert _shards_run(built["first"], f"clip/{tag}") > 0 and _shards_run(built["first"], "quality") == 0, (
        "the embedding workers score what they embed"
    )
    scores, x = built["scores"], first["x"]
    assert first["removed"] == {k: "low_aesthetic" for k, r in scores.items() if r["aesthetic"] < x}
    assert len(first["removed"]) == 3
    assert len(later["removed"]) == 4 and set(first["removed"]) < set(later["removed"])
    assert len(later["removals_changed"]) == 1
    assert "[quality/flags-images] removed: low_aesthetic=4" in later["printed"]
    assert _shards_run(later["stats"], "stats") == 1 and _shards_run(later["stats"], "stats-original") == 1


def test_image_thresholds_apply_from_caption_on(built):
    captions, removed = built["captions"], built["threshold_run"]["removed"]
    skipped = {k for k, r in captions.items() if r["status"] == "skipped"}
    assert skipped == set(removed)
    assert all(captions[k]["error_reason"] == "low_aesthetic" and captions[k]["caption"] is None for k in skipped)
    assert all(r["status"] == "ok" for k, r in captions.items() if k not in removed)
    after = built["after_caption"]["scores"]
    assert {k for k, r in after.items() if r["clip_score_default"] is None} == set(removed)


def test_clip_score_thresholds_apply_from_stats_on(built):
    scores, y = built["after_caption"]["scores"], built["clip_threshold"]["y"]
    low = {k for k, r in scores.items() if r["clip_score_default"] is not None and r["clip_score_default"] < y}
    assert built["clip_threshold"]["removed"] == {k: "low_clip_score" for k in low}
    assert 0 < len(low) < sum(r["clip_score_default"] is not None for r in scores.values())
    assert _shards_run(built["caption_again"], "captions") == 0, "not from caption on"
    newly_low = set(built["new_threshold"]["removed"]) - set(built["threshold_run"]["removed"])
    kept = {k for k, r in built["captions"].items() if r["status"] == "ok"} - low - newly_low
    assert built["stats"]["default"] == kept
    assert built["stats"]["original"] == kept


def test_a_recaptioned_set_makes_its_clip_flags_stale_until_quality_reruns(built):
    rc, _, err = built["stale"]
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "quality/flags-texts is out of date" in err and "captions" in err and "curation quality" in err
    assert built["fresh"][0] == 0, built["fresh"][2]


def test_rerun_after_adding_files_equals_a_clean_run(built):
    out, clean, tag = built["out"], built["clean"], built["clip_dir"].name
    printed = built["run"]
    assert printed.count("[quality] shards:") == 2, "image scores after dedup, clip scores after caption"
    assert printed.index("[quality/flags-images]") < printed.index("[captions]") < printed.rindex("[quality]")
    for rel in ("quality", "quality/flags-images", "quality/flags-texts", f"clip/{tag}", "captions"):
        assert index_rows(out, rel) == index_rows(clean, rel), rel
    a, b = StageDir(f"{out}/clip/{tag}"), StageDir(f"{clean}/clip/{tag}")
    assert a.done_shards() == b.done_shards()
    for shard in a.done_shards():
        assert np.array_equal(read_embeddings(a, shard), read_embeddings(b, shard)), shard
    rc, printed, err = built["verify"]
    assert rc == 0 and f"clip/{tag}" in printed and "quality/flags-texts" in printed, printed + err


def test_a_missing_caption_set_is_refused_in_one_line(built, tiny_models):
    rc, _, err = _cli("quality", "--output", str(built["out"]), "--model", str(tiny_models["clip"]),
                      "--min-clip-score", "dense=20")  # fmt: skip
    assert rc == 2 and "no caption set 'dense'" in err and "curation caption --name dense" in err
    rc, _, err = _cli("quality", "--output", str(built["out"]), "--min-clip-score", "dense")
    assert rc == 2 and "SET=X" in err
