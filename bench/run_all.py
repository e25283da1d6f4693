"""`make bench`: every CPU benchmark, one after the other (each prints its figures and the naive baseline).

GPU benchmarks (bench/gpu_*.py) need a CUDA machine and are run by hand there; see the README's performance table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    "bench_ingest.py",
    "bench_ingest_scale.py",
    "bench_stats.py",
    "bench_stats_ray.py",
    "bench_caption_cpu.py",
    "bench_features_cpu.py",
    "bench_dedup.py",
    "bench_browse.py",
    "bench_rerun_check.py",
    "bench_quality.py",
]


def main() -> int:
    failed = []
    for name in BENCHES:
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)], cwd=HERE.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
