"""What bench/gpu_caption.py relies on: Captioner.from_loaded, the static-cache lever, and its TINY=1 smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from curation.caption.model import CaptionConfig, Captioner
from curation.imaging import decode_image
from curation.tiny.llava import build_tiny_llava
from tests.conftest import COCO, REPO

NEW_TOKENS = 8  # the tiny plan's forced new tokens
SAMPLES = 8  # the tiny plan's stage shard


def test_handed_in_model_and_static_cache_caption_like_setup(tmp_path: Path) -> None:
    config = CaptionConfig(model=str(build_tiny_llava(tmp_path / "tiny-llava")), max_new_tokens=12, batch_size=3)
    loaded = Captioner(config)
    loaded.setup()
    photos = [decode_image(f.read_bytes()) for f in sorted(COCO.glob("*.jpg"))[:4]]
    expected = loaded.caption(photos)

    handed = Captioner.from_loaded(config, loaded.model, loaded.processor)
    handed.setup()  # a no-op: nothing is loaded twice
    assert handed.model is loaded.model and handed.caption(photos) == expected
    assert handed.provenance()["commit_hash"] is None

    static = Captioner.from_loaded(replace(config, cache_implementation="static"), loaded.model, loaded.processor)
    assert static.caption(photos) == expected  # greedy text does not depend on the cache layout
    assert static.provenance()["generation"]["cache_implementation"] == "static"


@pytest.mark.slow  # about 25 s on two shared cores
def test_tiny_run_prints_every_figure() -> None:
    env = os.environ | {"TINY": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_caption.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [line for line in lines if line["what"].endswith("_failed")]
    assert not failed, failed
    assert Counter(line["what"] for line in lines) == {
        "env": 1,
        "auto_batch": 1,
        "build": 1,
        "naive_generate": 1,
        "captioner": 3,
        "model_only": 1,
        "stage": 1,
    }
    by_what = {line["what"]: line for line in lines}
    assert all({"device", "torch", "transformers"} <= set(line) for line in lines)
    assert all("batch" in line for line in lines if line["what"] not in ("env", "build"))
    assert (by_what["auto_batch"]["batch"], by_what["auto_batch"]["cache"]) == (8, "dynamic")  # CPU defaults

    build = by_what["build"]
    assert build["image_tokens"] == 576 and build["prompt_tokens"] > 576  # llava-1.5's 336 px / patch 14
    assert build["params_b"] > 0 and build["new_tokens"] == NEW_TOKENS

    naive = by_what["naive_generate"]
    assert naive["new_tokens"] == NEW_TOKENS  # forced: min_new_tokens = max_new_tokens
    captioners = [line for line in lines if line["what"] == "captioner"]
    assert {(c["batch"], c["cache"]) for c in captioners} == {(2, "dynamic"), (2, "static"), (3, "static")}
    for line in [naive, *captioners]:
        assert line["s_per_batch"] > 0 and line["images_per_s"] > 0 and line["out_tokens_per_s"] > 0, line
    for c in captioners:
        assert c["mean_new_tokens"] == NEW_TOKENS, c
        # fp32 on the CPU: the static cache (batch 3 pads the reference's short batch) changes no caption
        assert c.get("identical_to_dynamic", 1.0) == 1.0, c
    assert sum("identical_to_dynamic" in c for c in captioners) == 2
    assert all(c["vs_naive"] > 0 for c in captioners if c["batch"] == naive["batch"])

    model_only, stage = by_what["model_only"], by_what["stage"]
    assert model_only["samples"] == stage["samples"] == SAMPLES and model_only["images_per_s"] > 0
    assert stage["captioned"] == SAMPLES and stage["images_per_s"] > 0 and stage["ratio"] > 0
    assert (stage["batch"], stage["cache"]) == (model_only["batch"], model_only["cache"])
