"""The benchmark scripts run (at tiny shapes on CPU) and print their figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_features_bench_runs_tiny_on_cpu():
    env = {**os.environ, "TINY": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_features.py"), "t5", "vae"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    whats = [r["what"] for r in rows]
    assert not [w for w in whats if w.endswith("_failed")], rows
    t5 = [r for r in rows if r["what"] == "t5_encode"]
    assert {r["mix"] for r in t5} == {"llava_80_160", "coco_captions"}
    coco = next(r for r in t5 if r["mix"] == "coco_captions")
    assert 8 < coco["real_tokens_mean"] < 20  # COCO captions: about 10 words and a full stop
    assert all({"device", "torch", "transformers", "batch"} <= set(r) for r in rows if r["what"] != "env"), rows
    assert all(r["ours_captions_per_s"] > 0 and r["naive_captions_per_s"] > 0 for r in t5)
    vae = [r for r in rows if r["what"] == "vae_encode"]
    assert vae and all(r["ours_eager_images_per_s"] > 0 for r in vae)
