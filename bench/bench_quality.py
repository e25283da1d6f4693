"""The quality stage's CLIP work on the CPU at ViT-L/14 shapes with random weights (no downloads), vs the model alone.

Run: .venv/bin/python bench/bench_quality.py [--n 24] [--batch-size 8] [--rounds 2]
At L/14 the vision tower is the cost (~80 GFLOP per 224 px image), so this measures what the stage's code adds around
it; at tiny shapes JPEG decoding dominates instead, which says nothing about a GPU (see bench/gpu_quality.py).

  model only   the CLIP processor + CLIPModel.get_image_features, batch by batch, on the decoded COCO photos
  ours         QualityModel.embed_images (the same, L2-normalised, as float32 numpy) + the aesthetic and NSFW heads
               on the same decoded photos: ratio = model-only time / ours (goal >= 0.9)
Both run on the same batch one after the other, batch after batch, each first half the time, so a busy machine slows
both alike; the ratio is of their total times.
  decodes      decode_image calls of the stage's EmbedWorker.process on an images/ shard of COCO photos with their
               original captions and two tiny-LLaVA caption sets, scoring aesthetic, NSFW and three clip scores
               (tiny CLIP: the count does not depend on shapes); goal: one per image
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gpu_caption import write_images_shard  # this folder: the GPU benches' helpers
from gpu_quality import COCO, L14, build_quality, photos


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
    decodes(args.n)


def decodes(n: int) -> None:
    """Count decode_image calls of one EmbedWorker.process, which embeds and then scores every head and set."""
    import json

    import curation.quality.stage as quality_stage
    from curation.caption.model import CaptionConfig
    from curation.caption.stage import CaptionStageConfig, CaptionWorker
    from curation.layout import Layout
    from curation.quality.model import QualityModelConfig, clip_tag
    from curation.quality.stage import EmbedWorker, QualityStage, QualityStageConfig
    from curation.tiny.clip import build_tiny_clip, build_tiny_heads
    from curation.tiny.llava import build_tiny_llava

    files = sorted(COCO.glob("*.jpg"))[:n]
    first: dict[int, str] = {}  # image id -> its first COCO caption
    with open(COCO.parent / "captions" / "coco_val2017_5005.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            first.setdefault(row["image_id"], row["caption"])
    captions = [first.get(int(f.stem), "a photo") for f in files]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        shard = write_images_shard(tmp / "out", [f.read_bytes() for f in files], captions)
        layout = Layout(str(tmp / "out"))
        llava = build_tiny_llava(tmp / "llava")
        sets = ["default", "short"]
        for name, tokens in zip(sets, (24, 6), strict=True):
            model = CaptionConfig(model=str(llava), max_new_tokens=tokens, batch_size=4, num_threads=1)
            worker = CaptionWorker(layout, CaptionStageConfig(model=model, name=name))
            worker.setup()
            worker.process(shard)
        aesthetic, nsfw = build_tiny_heads(tmp / "aesthetic.safetensors", tmp / "nsfw.safetensors")
        clip = str(build_tiny_clip(tmp / "clip"))
        model = QualityModelConfig(model=clip, aesthetic_head=str(aesthetic), nsfw_head=str(nsfw), num_threads=1)
        config = QualityStageConfig(model=model)
        view = QualityStage(layout, config).input_view(layout.images)
        worker = EmbedWorker(layout, config, clip_tag(clip), view, sets)
        worker.setup()
        calls = 0
        decode = quality_stage.decode_image

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 (decode_image's own signature)
            nonlocal calls
            calls += 1
            return decode(*args, **kwargs)

        quality_stage.decode_image = counted
        try:
            worker.process(shard)
        finally:
            quality_stage.decode_image = decode
        rows = layout.quality.read_index(shard).to_pylist()
    columns = ["aesthetic", "nsfw", *(f"clip_score_{s}" for s in ("original", *sets))]
    scored = {c: sum(r[c] is not None for r in rows) for c in columns}
    print(f"decode_image calls: {calls} for {n} images ({calls / n:.2f} per image; goal 1), scored: {scored}")


if __name__ == "__main__":
    main()
