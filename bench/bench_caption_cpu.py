"""Caption front end on the CPU with the tiny random LLaVA: the whole `CaptionWorker.process` vs model-only.

Run: .venv/bin/python bench/bench_caption_cpu.py [--n 64] [--batch-size 8] [--decode-threads 2]
The tiny model makes the model part cheap, so this measures the stage's overheads around it (tar read, JPEG
decode, the processor's preprocessing and tokenisation, shard write), not LLaVA-7B speed. Four figures:

  generate only   model.generate on tensors the processor already made: what the model thread cannot avoid
  model only      Captioner.caption on decoded images: processor + generate + text decode, one after the other
  stage           CaptionWorker.process on an images/ shard of the same JPEGs: decode and processor run in the
                  prefetch threads ahead of the model; ratio = stage / model-only (goal >= 0.9)
  processor 336   Captioner.prepare with llava-1.5's 336 px image processor, per image: the CPU work that ran on
                  the model's thread before it moved to the prefetch threads (an H200 spends ~37 ms per image)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gpu_caption import COCO, build_processor, write_images_shard  # this folder: the GPU bench's helpers

from curation.caption.model import CaptionConfig, Captioner
from curation.caption.stage import CaptionStageConfig, CaptionWorker
from curation.imaging import decode_image
from curation.layout import Layout
from curation.tiny.llava import build_tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="number of COCO photos")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--decode-threads", type=int, default=2)
    args = parser.parse_args()

    files = sorted(COCO.glob("*.jpg"))
    blobs = [files[i % len(files)].read_bytes() for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        config = CaptionConfig(
            model=str(build_tiny_llava(tmp / "tiny-llava")),
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            num_threads=1,
        )
        captioner = Captioner(config)
        captioner.setup()
        images = [decode_image(b, target_size=captioner.input_size) for b in blobs]
        captioner.caption(images[: args.batch_size])  # warm-up: the first generate() pays one-off costs

        processor, prompt = captioner.processor, captioner.format_prompt(config.prompt)
        ready = []
        for start in range(0, args.n, args.batch_size):
            chunk = images[start : start + args.batch_size]
            ready.append(processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True))
        t0 = time.perf_counter()
        with torch.inference_mode():
            for inputs in ready:
                captioner.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        generate_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        results = captioner.caption(images)
        model_s = time.perf_counter() - t0

        shard = write_images_shard(tmp / "out", blobs)
        stage = CaptionWorker(
            Layout(str(tmp / "out")), CaptionStageConfig(model=config, decode_threads=args.decode_threads)
        )
        stage.captioner = captioner  # the loaded model, handed in: setup() then only records provenance
        stage.setup()
        t0 = time.perf_counter()
        done = stage.process(shard)
        stage_s = time.perf_counter() - t0
        assert sum(done.counts["by_caption_status"].values()) == args.n, done

        real = Captioner.from_loaded(config, captioner.model, build_processor(tmp / "llava-336"))
        photos = [decode_image(b, target_size=real.input_size) for b in blobs]
        t0 = time.perf_counter()
        for start in range(0, args.n, args.batch_size):
            real.prepare(photos[start : start + args.batch_size])
        prepare_ms = (time.perf_counter() - t0) / args.n * 1e3

    tokens = sum(r.new_tokens for r in results)
    print(f"{args.n} COCO photos, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, torch threads 1")
    print(f"generate only (tensors ready):     {args.n / generate_s:8.1f} images/s")
    print(f"model only (processor + generate): {args.n / model_s:8.1f} images/s  ({tokens / model_s:.0f} new tokens/s)")
    print(f"stage ({args.decode_threads} prefetch threads):        {args.n / stage_s:8.1f} images/s", end="")
    print(f"  ratio {model_s / stage_s:.2f} of model-only (goal >= 0.9)")
    print(f"processor at 336 px, one thread:   {prepare_ms:8.2f} ms per image, now off the model's thread")


if __name__ == "__main__":
    main()
