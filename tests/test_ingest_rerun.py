"""A done shard is done for its input: files added, changed and removed between runs, through the CLI.

Each rerun is compared with a clean run on the final input, key for key; and only the parts whose files changed
are redone (their later stages with them)."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.shards import StageDir
from curation.sources.parts import chunk_bounds
from tests.layouts import make_folder, make_img2dataset, make_journeydb, make_sa1b
from tests.outputs import index_rows, tar_members


def _run_args(src, out, tiny_models, shard_size: int, *extra: str) -> list[str]:
    return [
        "run", "--source", "folder", "--input", str(src), "--output", str(out), "--shard-size", str(shard_size),
        "--caption-model", str(tiny_models["llava"]), "--max-new-tokens", "6", "--caption-batch-size", "4",
        "--no-features", "--no-progress", *extra,
    ]  # fmt: skip


def _images(out) -> dict:
    """What ingest made, as a clean run is compared: shard names, and per key its bytes, record and index row."""
    stage = StageDir(f"{out}/images")
    return {
        "shards": stage.done_shards(),
        "members": tar_members(out, "images"),
        "rows": {k: {f: v for f, v in r.items()} for k, r in index_rows(out, "images").items()},
    }


def _pipeline(out) -> dict:
    return {
        **_images(out),
        "captions": {k: (r["status"], r["caption"]) for k, r in index_rows(out, "captions").items()},
        "table1": json.loads((out / "report" / "table1.json").read_text()),
    }


def _printed(capsys, label: str) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"[{label}]")]


def test_add_change_delete_between_runs_equal_a_clean_run(tmp_path, coco_files, tiny_models, ray_local, capsys):
    # sub/ holds 3 photos (one part), the input folder 4 (cut at --shard-size 3).
    src = make_folder(tmp_path / "in", coco_files[:7], captions={coco_files[1].name: "two dogs on a bench"})
    out = tmp_path / "run" / "out"  # every output is named `out`: the report names the dataset after its folder
    assert main(_run_args(src, out, tiny_models, 3, "--no-dedup")) == 0
    capsys.readouterr()

    for f in coco_files[7:9]:  # two new photos
        shutil.copy(f, src / f.name)
    assert main(_run_args(src, out, tiny_models, 3, "--no-dedup")) == 0
    assert "[images] input since the last run: 2 added, 0 changed, 0 removed (samples)" in _printed(capsys, "images")
    assert main(_run_args(src, tmp_path / "clean1" / "out", tiny_models, 3, "--no-dedup")) == 0
    assert _pipeline(out) == _pipeline(tmp_path / "clean1" / "out")

    (src / coco_files[2].name).write_bytes(coco_files[20].read_bytes())  # another photo under the same name
    (src / coco_files[1].with_suffix(".txt").name).write_text("a dog")  # an edited caption
    (src / coco_files[4].name).unlink()
    (src / "sub" / coco_files[3].name).unlink()
    capsys.readouterr()
    assert main(_run_args(src, out, tiny_models, 3, "--no-dedup")) == 0
    assert "[images] input since the last run: 0 added, 2 changed, 2 removed (samples)" in _printed(capsys, "images")
    assert main(_run_args(src, tmp_path / "clean2" / "out", tiny_models, 3, "--no-dedup")) == 0
    assert _pipeline(out) == _pipeline(tmp_path / "clean2" / "out")
    assert index_rows(out, "images")[coco_files[1].stem]["original_caption"] == "a dog"


def _three_parts_and_three_that_land_in_one(coco_files, shard_size: int):
    """A flat folder whose keys cut into 3 parts, and 3 more photos that change exactly one of them."""
    for n in range(6, 14):
        base = coco_files[:n]
        keys = sorted(f.stem for f in base)
        before = {tuple(keys[a:b]) for a, b in chunk_bounds(keys, shard_size)}
        if len(before) != 3:
            continue
        pool = coco_files[n:40]
        for i in range(len(pool) - 2):
            new = pool[i : i + 3]
            after_keys = sorted(keys + [f.stem for f in new])
            after = {tuple(after_keys[a:b]) for a, b in chunk_bounds(after_keys, shard_size)}
            if len(after) == 3 and len(before - after) == 1:
                return base, new
    raise AssertionError("no such photos among the shared COCO files")


def test_three_new_images_in_a_three_part_folder_recaption_one_part(
    tmp_path, coco_files, tiny_models, ray_local, capsys
):
    base, new = _three_parts_and_three_that_land_in_one(coco_files, shard_size=4)
    src = make_folder(tmp_path / "in", base, nested=False)
    out = tmp_path / "out"
    args = _run_args(src, out, tiny_models, 4, "--no-stats")  # dedup between: its keep flags change nothing here
    assert main(args) == 0
    captions = out / "captions"
    before = {p.name: p.stat().st_mtime_ns for p in captions.glob("*.done.json")}
    assert len(before) == 3
    capsys.readouterr()

    for f in new:
        shutil.copy(f, src / f.name)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[images] shards: 1 run, 2 already done (of 3)" in printed
    assert "[dedup/hashes] shards: 1 run, 2 already done (of 3)" in printed
    assert "[captions] shards: 1 run, 2 already done (of 3)" in printed
    after = {p.name: p.stat().st_mtime_ns for p in captions.glob("*.done.json")}
    assert len(set(before.items()) & set(after.items())) == 2, "the two parts without new photos are untouched"
    assert set(index_rows(out, "captions")) == {f.stem for f in [*base, *new]}


def _ingest(capsys, source: str, src, out, shard_size: int) -> list[str]:
    capsys.readouterr()
    args = ["ingest", "--source", source, "--input", str(src), "--output", str(out), "--shard-size", str(shard_size)]
    assert main([*args, "--no-progress"]) == 0
    return _printed(capsys, "images")


def _done_times(out) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.done.json")}


def test_img2dataset_a_changed_tar_redoes_its_parts_only(tmp_path, coco_files, ray_local, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    make_img2dataset(src, coco_files[:3], ["a", "b", "c"], failed=0, shard=0)
    make_img2dataset(src, coco_files[3:11], [f"photo {i}" for i in range(8)], failed=1, shard=1)
    _ingest(capsys, "img2dataset", src, out, 3)
    first = _done_times(out)
    tar0 = {n for n in first if n.startswith("00000-")}
    assert len(tar0) == 1 and len(first) > 3, "tar 0 fits one part; tar 1 is cut into several"

    # tar 1 written again by img2dataset, one caption changed: only the part holding that key is redone.
    make_img2dataset(src, coco_files[3:11], [f"photo {i}" for i in range(7)] + ["a longer caption"], failed=1, shard=1)
    lines = _ingest(capsys, "img2dataset", src, out, 3)
    assert "[images] input since the last run: 0 added, 1 changed, 0 removed (samples)" in lines
    assert f"[images] shards: 1 run, {len(first) - 1} already done (of {len(first)})" in lines[0]
    assert index_rows(out, "images")["000010007"]["original_caption"] == "a longer caption"
    assert _images(out) == _images(_clean(capsys, "img2dataset", src, tmp_path / "clean1", 3))

    # A new tar is ingested; a deleted one's parts are removed.
    make_img2dataset(src, coco_files[11:13], ["x", "y"], failed=0, shard=2)
    for name in ("00000.tar", "00000.parquet", "00000_stats.json"):
        (src / name).unlink()
    lines = _ingest(capsys, "img2dataset", src, out, 3)
    assert "[images] input since the last run: 2 added, 0 changed, 3 removed (samples)" in lines
    assert not [n for n in _done_times(out) if n.startswith("00000-")]
    assert _images(out) == _images(_clean(capsys, "img2dataset", src, tmp_path / "clean2", 3))


def _clean(capsys, source: str, src, where, shard_size: int):
    _ingest(capsys, source, src, where / "out", shard_size)
    return where / "out"


def test_journeydb_an_updated_annotation_file_redoes_the_parts_whose_prompts_changed(
    tmp_path, coco_files, ray_local, capsys
):
    src, out = make_journeydb(tmp_path / "in", coco_files[:8], missing=1), tmp_path / "out"
    _ingest(capsys, "journeydb", src, out, 3)
    first = _done_times(out)
    assert len(first) > 1
    lines = (src / "annotation.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in reversed(lines)]  # every line moves
    changed = next(r for r in records if r["img_path"].endswith("0005deadbeef.jpg"))
    changed["prompt"] = "a new prompt"
    (src / "annotation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    printed = _ingest(capsys, "journeydb", src, out, 3)
    assert "[images] input since the last run: 0 added, 1 changed, 0 removed (samples)" in printed
    assert f"[images] shards: 1 run, {len(first) - 1} already done (of {len(first)})" in printed[0]
    assert index_rows(out, "images")["0005deadbeef"]["original_caption"] == "a new prompt"
    assert _images(out) == _images(_clean(capsys, "journeydb", src, tmp_path / "clean", 3))


def test_sa1b_a_tar_with_one_more_image_redoes_a_part_or_two(tmp_path, coco_files, ray_local, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    make_sa1b(src, coco_files[:12], first_id=100)
    _ingest(capsys, "sa1b", src, out, 3)
    first = _done_times(out)
    make_sa1b(src, coco_files[:13], first_id=100)  # the tar written again with sa_112 added
    lines = _ingest(capsys, "sa1b", src, out, 3)
    assert "[images] input since the last run: 1 added, 0 changed, 0 removed (samples)" in lines
    kept = set(first.items()) & set(_done_times(out).items())
    assert len(kept) >= len(first) - 2, "one key moves at most one cut: at most two parts change"
    assert _images(out) == _images(_clean(capsys, "sa1b", src, tmp_path / "clean", 3))


def test_an_output_made_before_parts_by_keys_stays_trusted(tmp_path, coco_files, tiny_models, ray_local, capsys):
    """An output of the positional plan (`source-shards/1`, markers without an input lineage), as the earlier release
    wrote it: upgrading redoes nothing, not even its captions; an added file redoes what it shifts; --force re-plans."""
    from curation.ingest import IngestConfig, IngestWriter
    from curation.layout import Layout
    from curation.shards import config_hash, lineage
    from curation.sources import local_map, plan_source
    from curation.sources.parts import POSITIONAL

    src, out = make_folder(tmp_path / "in", coco_files[:5], nested=False), tmp_path / "out"
    config = IngestConfig("folder", str(src), shard_size=2)
    plan = plan_source("folder", str(src), Layout(str(out)).listings, local_map, 2, POSITIONAL)
    writer = IngestWriter(Layout(str(out)), config, POSITIONAL)
    old_chash = config_hash({k: v for k, v in config.semantics(POSITIONAL).items()})
    for shard, (listing, start, stop, _) in plan.shards():
        done = writer.process(shard, (listing, start, stop, ""))  # what the release before wrote: no input lineage
        assert done.to_json()["input_lineage"] == "" and done.lineage == lineage(old_chash, None)["lineage"]
    listing = plan.units[0][1]  # and its listing: no identities, made from other files as far as a rerun can tell
    pq.write_table(pq.read_table(listing).drop(["identity"]).replace_schema_metadata(None), listing)
    assert StageDir(f"{out}/images").done_shards() == ["root-000", "root-001", "root-002"]
    caption = ["caption", "--output", str(out), "--model", str(tiny_models["llava"]), "--max-new-tokens", "6",
               "--no-progress"]  # fmt: skip
    assert main(caption) == 0
    capsys.readouterr()
    tars = {p.name: p.stat().st_mtime_ns for p in out.glob("*/*.tar")}

    lines = _ingest(capsys, "folder", src, out, 2)
    assert "[images] shards: 0 run, 3 already done (of 3)" in lines[0]
    assert main(caption) == 0
    assert "[captions] shards: 0 run, 3 already done (of 3)" in capsys.readouterr().out
    assert tars == {p.name: p.stat().st_mtime_ns for p in out.glob("*/*.tar")}
    assert all(StageDir(f"{out}/images").read_done(s).input_lineage for s in ("root-000", "root-001", "root-002"))

    new = max(coco_files[5:], key=lambda f: f.stem)  # sorts last: only the last positional part changes
    shutil.copy(new, src / new.name)
    lines = _ingest(capsys, "folder", src, out, 2)
    assert "[images] shards: 1 run, 2 already done (of 3)" in lines[0]
    assert main(caption) == 0
    assert "[captions] shards: 1 run, 2 already done (of 3)" in capsys.readouterr().out

    capsys.readouterr()
    args = ["ingest", "--source", "folder", "--input", str(src), "--output", str(out), "--shard-size", "2"]
    assert main([*args, "--force", "--no-progress"]) == 0
    assert _images(out) == _images(_clean(capsys, "folder", src, tmp_path / "clean", 2))


@pytest.mark.parametrize("shard_size", [1, 3, 1000])
def test_parts_are_a_function_of_the_keys(shard_size):
    """Cut by keys: sizes within bounds, and one inserted key changes at most the chunk it lands in."""
    import random

    rng = random.Random(shard_size)
    keys = sorted({f"{rng.getrandbits(40):012x}" for _ in range(20 * shard_size + 7)})
    bounds = chunk_bounds(keys, shard_size)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(keys)
    assert all(b0[1] == b1[0] for b0, b1 in zip(bounds, bounds[1:], strict=False))
    assert all(0 < b - a <= shard_size for a, b in bounds)
    parts = {tuple(keys[a:b]) for a, b in bounds}
    for _ in range(20):
        more = sorted([*keys, f"{rng.getrandbits(40):012x}z"])
        changed = parts - {tuple(more[a:b]) for a, b in chunk_bounds(more, shard_size)}
        # The chunk the key lands in (its pieces, when it is longer than shard_size), not every later part.
        assert sum(map(len, changed)) <= 4 * shard_size
