"""The quality stage's CLIP work on the CPU at ViT-L/14 shapes with random weights (no downloads), vs the model alone.

Run: .venv/bin/python bench/bench_quality.py [--n 24] [--batch-size 8] [--rounds 2]
At L/14 the vision tower is the cost (~80 GFLOP per 224 px image), so this measures what the stage's code adds around
it; at tiny shapes JPEG decoding dominates instead, which says nothing about a GPU (see bench/gpu_quality.py).

  model only   the CLIP processor + CLIPModel.get_image_features, batch by batch, on the decoded COCO photos
  ours         QualityModel.embed_images (the same, L2-normalised, as float32 numpy) + the aesthetic and NSFW heads
               on the same decoded photos: ratio = model-only time / ours (goal >= 0.9)
Both run on the same batch one after the other, batch after batch, each first half the time, so a busy machine slows
both alike; the ratio is of their total times.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gpu_quality import L14, build_quality, photos  # this folder: the GPU bench's helpers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="number of COCO photos")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        quality = build_quality(Path(tmp), L14, device="cpu", dtype=torch.float32, batch=args.batch_size)
        build_s = time.perf_counter() - t0
        side = quality.input_size
        _, images = photos(args.n, side)
        model, processor = quality.model, quality.processor

        def model_only(chunk: list) -> None:
            with torch.inference_mode():
                model.get_image_features(pixel_values=processor(images=chunk, return_tensors="pt")["pixel_values"])

        def ours(chunk: list) -> None:
            emb = quality.embed_images(chunk)
            quality.aesthetic(emb), quality.nsfw(emb)

        chunks = [images[i : i + args.batch_size] for i in range(0, args.n, args.batch_size)]
        ours(chunks[0])  # warm-up: first-call allocations
        times = {"model": 0.0, "ours": 0.0}
        for turn in range(args.rounds * len(chunks)):
            pair = (("model", model_only), ("ours", ours))
            for name, fn in pair if turn % 2 == 0 else pair[::-1]:  # each goes first half the time
                t0 = time.perf_counter()
                fn(chunks[turn % len(chunks)])
                times[name] += time.perf_counter() - t0

    done = args.rounds * args.n
    print(
        f"CLIP ViT-L/14 shapes, random weights, fp32, {torch.get_num_threads()} torch threads; built in {build_s:.0f} s"
    )
    first = f"{images[0].width}x{images[0].height}"
    print(
        f"{args.n} COCO photos decoded at >= {side} px ({first} first), batch {args.batch_size}, {args.rounds} rounds"
    )
    print(f"model only (processor + get_image_features): {done / times['model']:6.2f} images/s")
    print(f"ours (embed_images + both heads):            {done / times['ours']:6.2f} images/s", end="")
    print(f"  ratio {times['model'] / times['ours']:.3f} of model-only (goal >= 0.9)")


if __name__ == "__main__":
    main()
