"""Caption throughput on CPU with the tiny random LLaVA: decode only, model only, decode prefetched + model.

Run: .venv/bin/python bench/bench_caption_cpu.py [--n 32] [--batch-size 8] [--decode-threads 2]
The tiny model makes the model part cheap, so this measures the pipeline's overheads (decode, processor,
generate loop), not LLaVA-7B speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from curation.caption.model import CaptionConfig, Captioner
from curation.imaging import decode_image, prefetch
from curation.tiny.llava import build_tiny_llava

COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco"


def _batches(stream: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in stream:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="number of COCO photos")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--decode-threads", type=int, default=2)
    args = parser.parse_args()

    files = sorted(COCO.glob("*.jpg"))
    blobs = [files[i % len(files)].read_bytes() for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = build_tiny_llava(Path(tmp) / "tiny-llava")
        config = CaptionConfig(
            model=str(model_dir),
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            num_threads=1,
        )
        captioner = Captioner(config)
        captioner.setup()
        print(f"build + load: {time.perf_counter() - t0:.2f} s")
        target = captioner.input_size

        t0 = time.perf_counter()
        images = [decode_image(b, target_size=target) for b in blobs]
        decode_s = time.perf_counter() - t0

        captioner.caption(images[: args.batch_size])  # warm-up: first generate() call pays one-off costs
        t0 = time.perf_counter()
        results = captioner.caption(images)
        model_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        decoded = prefetch(
            blobs,
            lambda b: decode_image(b, target_size=target),
            threads=args.decode_threads,
            ahead=2 * args.batch_size,
        )
        n_piped = 0
        for batch in _batches(decoded, args.batch_size):
            n_piped += len(captioner.caption([im for im in batch if not isinstance(im, Exception)]))
        piped_s = time.perf_counter() - t0

    tokens = sum(r.new_tokens for r in results)
    print(f"images: {args.n}, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, torch threads 1")
    print(f"decode only (target {target}):      {args.n / decode_s:8.1f} images/s")
    print(f"model only:                        {args.n / model_s:8.1f} images/s", end="")
    print(f"  ({tokens / model_s:.0f} new tokens/s)")
    print(f"decode prefetched ({args.decode_threads} thr) + model: {n_piped / piped_s:8.1f} images/s")


if __name__ == "__main__":
    main()
