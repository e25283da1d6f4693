"""Noun extraction speed: NLTK's plain calls (the oracle) vs the production path, on the same captions.

    NLTK_DATA=../shared/nltk_data python bench/bench_stats.py [--n 500] [--rounds 3]

Two caption sets from the shared COCO file: ~80-word paragraphs (consecutive human captions joined, the
length of a LLaVA caption; every sentence used once, so no memo hits from repeats) and the raw COCO
captions. Speeds are captions per CPU-second of this one process (``time.process_time``), the best of
``--rounds`` alternating rounds, because the machine is shared. The production path starts each round
with empty memos; "warm" is a second pass over the same captions, the ceiling for repeated text.
Asserts that both paths give identical nouns for every caption.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import nltk

from curation.stats.nouns import NounExtractor, reference_nouns

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COCO_CAPTIONS = SHARED / "data" / "captions" / "coco_val2017_5005.jsonl"


def load_captions(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["caption"].strip() for line in f]


def paragraphs(captions: list[str], words: int) -> list[str]:
    """Join consecutive captions until each paragraph has at least ``words`` words."""
    out, current, count = [], [], 0
    for caption in captions:
        current.append(caption)
        count += len(caption.split())
        if count >= words:
            out.append(" ".join(current))
            current, count = [], 0
    return out


def timed(fn: Callable[[str], list[str]], captions: list[str]) -> tuple[float, list[list[str]]]:
    start = time.process_time()
    nouns = [fn(c) for c in captions]
    return time.process_time() - start, nouns


def bench(name: str, captions: list[str], rounds: int) -> None:
    reference_nouns(captions[0])  # load punkt and the tagger outside the timing
    best_ref = best_fast = best_warm = float("inf")
    for _ in range(rounds):
        ref_s, ref = timed(reference_nouns, captions)
        extractor = NounExtractor()  # fresh memos: a cold pass
        fast_s, fast = timed(extractor.nouns, captions)
        warm_s, warm = timed(extractor.nouns, captions)
        if not (ref == fast == warm):
            bad = next(i for i, (r, f) in enumerate(zip(ref, fast, strict=True)) if r != f)
            raise SystemExit(f"{name}: nouns differ at caption {bad}: {captions[bad]!r}")
        best_ref, best_fast, best_warm = min(best_ref, ref_s), min(best_fast, fast_s), min(best_warm, warm_s)
    n = len(captions)
    words = sum(len(c.split()) for c in captions) / n
    nouns = sum(map(len, ref))
    print(
        f"{name}: {n} captions, {words:.1f} words and {nouns / n:.1f} nouns each, identical nouns ({nouns})\n"
        f"  reference  {n / best_ref:8.0f} captions/s per core\n"
        f"  production {n / best_fast:8.0f} captions/s per core  ({best_ref / best_fast:.2f}x, cold memos)\n"
        f"  warm       {n / best_warm:8.0f} captions/s per core  ({best_ref / best_warm:.2f}x, all memoized)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="number of ~80-word captions")
    parser.add_argument("--coco", type=int, default=5005, help="number of raw COCO captions")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--words", type=int, default=80, help="minimum words per paragraph")
    parser.add_argument("--captions", type=Path, default=COCO_CAPTIONS)
    parser.add_argument("--nltk-data", type=Path, default=SHARED / "nltk_data")
    args = parser.parse_args()
    if args.nltk_data.is_dir():
        nltk.data.path.insert(0, str(args.nltk_data))

    captions = load_captions(args.captions)
    long_captions = paragraphs(captions, args.words)[: args.n]
    if len(long_captions) < args.n:
        print(f"(only {len(long_captions)} paragraphs of {args.words}+ words in {args.captions.name})")
    bench(f"~{args.words}-word captions", long_captions, args.rounds)
    bench("COCO captions", captions[: args.coco], args.rounds)


if __name__ == "__main__":
    main()
