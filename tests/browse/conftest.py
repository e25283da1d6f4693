"""One curated output for the browse tests, built once: COCO photos with their COCO captions as originals, an exact
copy (a dedup group), hostile files, a caption holding markup, two caption sets by tiny LLaVA, stats, and a
`quality/` folder of scores; and one `curation browse --port 0` server over it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from tests.conftest import COCO, EDGE_CASES, REPO, SHARED

HOSTILE_CAPTION = 'A cat <script>alert(1)</script> on a mat <img src=x onerror="alert(2)"> & "quotes"'
EDGE_FILES = [
    "truncated/shortfile.bmp", "corrupt_or_unidentified/broken.png", "decompression_bomb/reallybig.bmp",
    "exif_orientation/hopper_orientation_6.jpg", "cmyk/pil_sample_cmyk.jpg",
]  # fmt: skip
PHOTOS = 8
TEMPLATE = "Describe this image, knowing its alt-text: {original}"


def coco_captions() -> dict[str, str]:
    """image id -> its first COCO caption (the shared photos and captions are different samples of val2017)."""
    found: dict[str, str] = {}
    with open(SHARED / "data" / "captions" / "coco_val2017_5005.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            found.setdefault(str(row["image_id"]), row["caption"])
    return found


def write_input(folder: Path) -> None:
    folder.mkdir(parents=True)
    captions = coco_captions()
    spare = iter(captions.values())
    photos = sorted(COCO.glob("*.jpg"))[:PHOTOS]
    for p in photos:
        shutil.copy(p, folder / p.name)
        (folder / f"{p.stem}.txt").write_text(captions.get(str(int(p.stem))) or next(spare), encoding="utf-8")
    shutil.copy(photos[0], folder / "copy_of_first.jpg")  # byte-identical: one dedup group of two
    shutil.copy(sorted(COCO.glob("*.jpg"))[PHOTOS], folder / "hostile.jpg")
    (folder / "hostile.txt").write_text(HOSTILE_CAPTION, encoding="utf-8")
    for name in EDGE_FILES:  # flat, so the input is one source shard (a subfolder would be one more)
        shutil.copy(EDGE_CASES / name, folder / f"edge_{name.replace('/', '_')}")


def write_quality(out: Path) -> None:
    """A `quality/` folder as a scoring stage would leave it: per images shard, key and numeric scores."""
    from curation.shards import DoneMarker, StageDir

    images, quality = StageDir(str(out / "images")), StageDir(str(out / "quality"))
    for shard in images.done_shards():
        keys = images.read_index(shard).column("key").to_pylist()
        scores = [int(hashlib.sha256(k.encode()).hexdigest()[:4], 16) / 65535 * 10 for k in keys]
        quality.write_index(shard, pa.table({"key": keys, "aesthetic": scores}))
        quality.write_done(DoneMarker(shard, stage="quality", rows=len(keys)))


@pytest.fixture(scope="package")
def browse_output(tmp_path_factory, tiny_models, ray_local) -> Path:
    from curation.caption.model import CaptionConfig
    from curation.caption.stage import CaptionStageConfig, run_caption
    from curation.ingest import IngestConfig
    from curation.pipeline import run_pipeline
    from curation.stats.stage import StatsConfig, run_stats

    root = tmp_path_factory.mktemp("browse")
    write_input(root / "input")
    out = root / "out"
    caption = CaptionStageConfig(model=CaptionConfig(model=str(tiny_models["llava"]), max_new_tokens=8, batch_size=8))
    configs = {"ingest": IngestConfig(source="folder", input=str(root / "input"), shard_size=8), "caption": caption}
    run_pipeline(str(out), configs, skip=["features", "stats"], progress=False)
    named = CaptionStageConfig(
        model=CaptionConfig(model=str(tiny_models["llava"]), max_new_tokens=8, batch_size=8, prompt=TEMPLATE),
        name="alttext",
    )
    run_caption(str(out), named, progress=False)
    run_stats(str(out), StatsConfig(), progress=False)
    write_quality(out)
    return out


@pytest.fixture(scope="package")
def browse_server(browse_output):
    """`curation browse --output OUT --port 0` as a user starts it; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "browse", "--output", str(browse_output), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    line = proc.stdout.readline()  # blocks until the server says where it listens (or exits)
    if not line.startswith("browse: http://127.0.0.1:"):
        proc.kill()
        raise AssertionError(f"browse did not start: {line!r} {proc.communicate()[1][-2000:]}")
    url = line.split()[1].rstrip("/")
    try:
        yield url
    finally:
        proc.terminate()  # SIGTERM: uvicorn's graceful shutdown, as Ctrl-C
        proc.communicate(timeout=60)
