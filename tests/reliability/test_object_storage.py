"""s3:// input and output through fsspec/s3fs, against a real S3 server (moto) on loopback."""

from __future__ import annotations

import json

import fsspec
import pytest
from webdataset.tariterators import group_by_keys, tar_file_iterator

from curation.caption.model import CaptionConfig
from curation.caption.stage import CaptionStageConfig, run_caption
from curation.ingest import IngestConfig, run_ingest
from curation.shards import StageDir
from curation.sources import list_source
from curation.sources.base import read_members
from tests.layouts import make_folder, make_img2dataset
from tests.outputs import index_rows as rows
from tests.reliability import cli


def _bucket(fs: fsspec.AbstractFileSystem, name: str) -> str:
    fs.mkdir(name)
    return name


@pytest.mark.slow
def test_s3_ingest_then_caption_matches_a_local_run(tmp_path, coco_files, tiny_models, ray_local, s3_server):
    local = make_folder(tmp_path / "in", coco_files[:10], captions={coco_files[1].name: "two dogs"})
    fs = fsspec.filesystem("s3")
    bucket = _bucket(fs, "curation-test")
    fs.put(str(local) + "/", f"{bucket}/in/", recursive=True)
    src, out = f"s3://{bucket}/in", f"s3://{bucket}/out"

    # The reference: the same photos, local in and out, in this process.
    ref = tmp_path / "ref"
    caption_args = ["--model", str(tiny_models["llava"]), "--max-new-tokens", "12", "--batch-size", "2",
                    "--decode-threads", "1", "--workers", "1", "--no-progress"]  # fmt: skip
    run_ingest(str(ref), IngestConfig("folder", str(local), shard_size=4), progress=False)
    model = CaptionConfig(model=str(tiny_models["llava"]), max_new_tokens=12, batch_size=2)
    run_caption(str(ref), CaptionStageConfig(model=model, decode_threads=1), progress=False)

    # The CLI, as a user runs it: s3:// in, s3:// out, its own local Ray whose workers inherit the credentials.
    ingest = cli("ingest", "--source", "folder", "--input", src, "--output", out, "--shard-size", "4", "--no-progress")
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    caption = cli("caption", "--output", out, *caption_args)
    assert caption.returncode == 0, caption.stderr[-3000:]

    for stage in ("images", "captions"):
        assert set(rows(out, stage)) == set(rows(ref, stage)) and len(rows(out, stage)) == 10
    out_rows, ref_rows = rows(out, "captions"), rows(ref, "captions")
    assert {k: r["caption"] for k, r in out_rows.items()} == {k: r["caption"] for k, r in ref_rows.items()}
    assert out_rows[coco_files[1].stem]["original_caption"] == "two dogs"
    # The shards equal the local ones byte for byte and read back from the bucket with webdataset.
    captions = StageDir(f"{out}/captions")
    parts = len(captions.done_shards())
    assert captions.done_shards() == StageDir(str(ref / "captions")).done_shards() and parts >= 3
    for shard in captions.done_shards():
        assert fs.cat_file(f"{bucket}/out/captions/{shard}.tar") == (ref / "captions" / f"{shard}.tar").read_bytes()
        url = f"{out}/captions/{shard}.tar"
        with fsspec.open(url, "rb") as stream:  # webdataset's own tar reader, on an s3 stream opened by fsspec
            seen = list(group_by_keys({**m, "__url__": url} for m in tar_file_iterator(stream)))
        assert len(seen) == captions.read_done(shard).extra["members"]
        for s in seen:
            assert s["txt"].decode() == json.loads(s["json"])["caption"] == out_rows[s["__key__"]]["caption"]
    assert not [p for p in fs.find(f"{bucket}/out") if "/.tmp-" in p]

    # A rerun finds every shard done through the bucket's (uncached) listing and has nothing to run.
    again = run_caption(out, CaptionStageConfig(model=model, decode_threads=1), progress=False)
    assert (again.shards_run, again.shards_skipped, again.samples) == (0, parts, 10)


def test_s3_archive_listing_and_ranged_reads(tmp_path, coco_files, s3_server):
    """An img2dataset tar in a bucket: listed once, then each member read by seeking to its offset."""
    local = make_img2dataset(tmp_path / "i2d", coco_files[:3], ["a", "b", "c"], failed=1)
    fs = fsspec.filesystem("s3")
    bucket = _bucket(fs, "i2d")
    fs.put(str(local) + "/", f"{bucket}/laion/", recursive=True)
    items = list_source("img2dataset", f"s3://{bucket}/laion")
    assert [i.key for i in items] == ["000000000", "000000001", "000000002", "000000003"]
    images = [i.image for i in items if i.image is not None]
    assert all(m.container.startswith("s3://") and m.offset is not None for m in images)
    read = dict(read_members(images))
    assert [read[m] for m in images] == [p.read_bytes() for p in coco_files[:3]]
