"""How ingest cuts a source shard into parts (`curation.sources.parts`): part sizes, and the samples one added key
redoes, on 100k random keys at --shard-size 1000, beside the positional cut of the earlier plan.

    python bench/bench_parts.py [--keys 100000] [--shard-size 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.sources.parts import chunk_bounds, positional_bounds  # noqa: E402


def redone(before: list[tuple[int, int]], keys: list[str], after_keys: list[str], after: list[tuple[int, int]]) -> int:
    """Samples in the parts of `after` that are not a part of `before` (the parts a rerun writes again)."""
    old = {tuple(keys[a:b]) for a, b in before}
    return sum(b - a for a, b in after if tuple(after_keys[a:b]) not in old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--inserts", type=int, default=50)
    args = p.parse_args()
    rng = random.Random(0)
    keys = sorted({f"{rng.getrandbits(48):012x}" for _ in range(args.keys)})
    started = time.perf_counter()
    bounds = chunk_bounds(keys, args.shard_size)
    seconds = time.perf_counter() - started
    sizes = sorted(b - a for a, b in bounds)
    redo = {"key-chunks/1": [], "source-shards/1": []}
    for _ in range(args.inserts):
        more = sorted([*keys, f"{rng.getrandbits(48):012x}"])
        redo["key-chunks/1"].append(redone(bounds, keys, more, chunk_bounds(more, args.shard_size)))
        positional = positional_bounds(len(keys), args.shard_size)
        redo["source-shards/1"].append(redone(positional, keys, more, positional_bounds(len(more), args.shard_size)))
    print(json.dumps({
        "keys": len(keys), "shard_size": args.shard_size, "parts": len(sizes),
        "size_min": sizes[0], "size_p5": sizes[len(sizes) // 20], "size_median": sizes[len(sizes) // 2],
        "size_mean": round(statistics.mean(sizes), 1), "size_max": sizes[-1], "cut_seconds": round(seconds, 3),
        "redone_per_added_key_mean": {k: round(statistics.mean(v)) for k, v in redo.items()},
        "redone_per_added_key_max": {k: max(v) for k, v in redo.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
