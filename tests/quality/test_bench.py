"""bench/gpu_quality.py runs at tiny shapes on the CPU (TINY=1) and prints every figure as a JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # about 20 s on two shared cores, most of it imports
def test_gpu_quality_bench_runs_tiny_on_cpu() -> None:
    env = os.environ | {"TINY": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_quality.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["what"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {"build", "model_only", "embed_pixels", "preprocess", "stage"}, rows
    assert all({"device", "torch", "transformers", "dtype", "batch"} <= set(r) for r in rows.values()), rows
    assert rows["model_only"]["images_per_s"] > 0 and rows["embed_pixels"]["images_per_s"] > 0
    assert (
        rows["preprocess"]["ms_per_image"] > 0 and rows["stage"]["images"] == 16 and rows["stage"]["images_per_s"] > 0
    )
