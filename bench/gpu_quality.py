"""CLIP ViT-L/14 image embeddings through the quality stage's code, at real shapes with random weights (no downloads).

Run on a CUDA machine: PYTHONPATH=. python3 bench/gpu_quality.py   (~2 min on one H200; goal >= 2,000 images/s)
CPU smoke test at tiny shapes: TINY=1 python bench/gpu_quality.py
Prints one JSON line per figure, each with the device, the versions and the batch size:

  build         the random CLIPModel at openai/clip-vit-large-patch14's shapes (vision 24 x 1024, patch 14, 224 px;
                text 12 x 768; projection 768), fp16 on CUDA, and random LAION heads at width 768
  model_only    CLIPModel.get_image_features on pixel tensors already on the GPU: the tower's own ceiling
  embed_pixels  QualityModel.embed_pixels on the processor's CPU tensors (copy in, forward, normalise, back) + the heads
  preprocess    QualityModel.preprocess (the CLIP processor: resize, crop, normalise) per image on one CPU thread,
                and the threads one GPU needs at embed_pixels' rate
  stage         the stage's EmbedWorker.process on an images/ shard of COCO JPEGs (decode and preprocess in its
                prefetch threads, embeddings written): the figure the goal is about
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout, installed or not

from curation.imaging import decode_image  # noqa: E402
from curation.quality.heads import AESTHETIC_WIDTHS, NSFW_WIDTHS, AestheticMLP, NSFWHead  # noqa: E402
from curation.quality.model import QualityModel, QualityModelConfig  # noqa: E402
from curation.tiny.clip import tiny_clip_tokenizer  # noqa: E402

TINY = os.environ.get("TINY") == "1"
DEV = "cpu" if TINY else "cuda"
DTYPE = torch.float32 if TINY else torch.float16  # QualityModel.setup's choice on each device
REPO = Path(__file__).resolve().parents[1]
CARRIED = REPO / "bench" / ".data" / "coco"  # ../shared does not travel to a device machine (see device_run.sh)
COCO = CARRIED if CARRIED.is_dir() else REPO.parent / "shared" / "data" / "coco"
MODEL_NAME = "random-init/clip-vit-large-patch14-shapes"  # names the handed-in model; nothing is loaded
L14 = {
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "image_size": 224,
    "projection_dim": 768,
}
TINY_SHAPES = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "image_size": 32,
    "projection_dim": 32,
}
BATCH = 8 if TINY else 256
STAGE_SAMPLES = 16 if TINY else 4096  # ~2 s at the goal
STAGE_THREADS = (2,) if TINY else (8, 15)  # the stage's default decode threads on a 16-core machine, and all but one
CONTEXT: dict[str, Any] = {}  # device and versions, on every line


def emit(**fields: Any) -> None:
    print(json.dumps(CONTEXT | fields), flush=True)


def build_quality(folder: Path, shapes: dict, *, device: str, dtype: torch.dtype, batch: int) -> QualityModel:
    """A QualityModel around a random CLIPModel of `shapes` (made on `device`) and random heads at its width."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    side, dim = shapes["image_size"], shapes["projection_dim"]
    tokenizer = tiny_clip_tokenizer()  # the real tokenizer is a download; text is not what this measures
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
    )
    config = CLIPConfig(
        text_config=dict(shapes["text"], vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(shapes["vision"], image_size=side, patch_size=14 if side == 224 else 8),
        projection_dim=dim,
    )  # fmt: skip
    config._attn_implementation = "sdpa"  # what from_pretrained(..., attn_implementation="sdpa") sets
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = CLIPModel(config).eval()
    torch.set_default_dtype(torch.float32)
    heads = {}
    for name, head in (
        ("aesthetic", AestheticMLP((dim, *AESTHETIC_WIDTHS[1:]))),
        ("nsfw", NSFWHead((dim, *NSFW_WIDTHS[1:]))),
    ):
        heads[name] = folder / f"{name}.safetensors"
        save_file(head.state_dict(), str(heads[name]))
    config = QualityModelConfig(
        model=MODEL_NAME, aesthetic_head=str(heads["aesthetic"]), nsfw_head=str(heads["nsfw"]), batch_size=batch
    )
    return QualityModel.from_loaded(config, model, processor)


def photos(n: int, side: int) -> tuple[list[bytes], list]:
    files = sorted(COCO.glob("*.jpg"))
    blobs = [files[i % len(files)].read_bytes() for i in range(n)]
    return blobs, [decode_image(b, target_size=(side, side)) for b in blobs]


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def rate(fn, images: int, reps: int) -> float:
    """Images per second of fn() over `reps` calls after one warm-up call."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return images * reps / (time.perf_counter() - t0)


def main() -> None:
    import transformers

    CONTEXT.update(
        device=torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        dtype=str(DTYPE).removeprefix("torch."),
        batch=BATCH,
    )
    shapes = TINY_SHAPES if TINY else L14
    reps = 2 if TINY else 10
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        quality = build_quality(Path(tmp), shapes, device=DEV, dtype=DTYPE, batch=BATCH)
        params = sum(p.numel() for p in quality.model.vision_model.parameters())
        emit(what="build", vision_params_m=round(params / 1e6, 2), s=round(time.perf_counter() - t0, 1))

        side = quality.input_size
        blobs, images = photos(BATCH, side)
        pixels = quality.preprocess(images)
        on_device = pixels.to(DEV, DTYPE)

        def model_only() -> None:
            with torch.inference_mode():
                quality.model.get_image_features(pixel_values=on_device)

        emit(what="model_only", images_per_s=round(rate(model_only, BATCH, reps), 1))

        def embed() -> None:
            emb = quality.embed_pixels(pixels)
            quality.aesthetic(emb), quality.nsfw(emb)

        embed_rate = rate(embed, BATCH, reps)
        emit(what="embed_pixels", images_per_s=round(embed_rate, 1), goal=2000)

        one = images[: min(32, BATCH)]
        per_image = 1 / rate(lambda: quality.preprocess(one), len(one), 2)
        emit(
            what="preprocess",
            ms_per_image=round(per_image * 1e3, 2),
            threads_for_embed_rate=round(embed_rate * per_image, 1),
            source_px=f"{images[0].width}x{images[0].height}",
        )
        for threads in STAGE_THREADS:
            stage(quality, Path(tmp) / f"out-{threads}", STAGE_SAMPLES, threads)


def stage(quality: QualityModel, out: Path, n: int, threads: int) -> None:
    """EmbedWorker.process on an images/ shard of n COCO JPEGs, with the handed-in model (a warm-up shard first)."""
    from gpu_caption import write_images_shard  # this folder: the caption bench's shard writer

    from curation.layout import Layout
    from curation.quality.stage import EmbedWorker, QualityStage, QualityStageConfig

    files = sorted(COCO.glob("*.jpg"))
    blobs = [files[i % len(files)].read_bytes() for i in range(n)]
    config = QualityStageConfig(model=quality.config, decode_threads=threads)

    def worker(folder: Path, shard_blobs: list[bytes]) -> tuple[EmbedWorker, str]:
        shard = write_images_shard(folder, shard_blobs)
        layout = Layout(str(folder))
        made = EmbedWorker(layout, config, quality.tag, QualityStage(layout, config).input_view(layout.images), [])
        made.model = made.scorer.model = quality  # loaded already: setup() loads nothing
        made.setup()
        return made, shard

    warm, shard = worker(out / "warm", blobs[: quality.batch_size])
    warm.process(shard)
    timed, shard = worker(out / "timed", blobs)
    sync()
    t0 = time.perf_counter()
    marker = timed.process(shard)
    sync()
    seconds = time.perf_counter() - t0
    assert marker.rows == n, marker
    emit(what="stage", images=n, decode_threads=threads, images_per_s=round(n / seconds, 1), goal=2000)


if __name__ == "__main__":
    main()
