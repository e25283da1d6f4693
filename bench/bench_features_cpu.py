"""Feature-stage costs on CPU with the tiny random T5 and VAE, and the feature member writer vs the naive one.

Run: .venv/bin/python bench/bench_features_cpu.py [--captions 512] [--images 16]
Prints one JSON line per figure. The tiny models make the model part cheap, so the T5 and VAE figures
measure the stage's own overheads (tokenizer, sorting, preprocessing), not T5-XXL or SD-VAE speed
(bench/gpu_features.py does that at real shapes). The writer figure is per caption: one (120, 4096) feature
plus its mask as `.npy` tar members, against `np.savez_compressed` of the same arrays (the naive way).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from curation.features.npy import npy_bytes
from curation.features.t5 import T5Features, TextFeatureConfig
from curation.features.vae import VaeFeatureConfig, VaeFeatures, to_pixels
from curation.imaging import decode_image
from curation.tiny.t5 import CORPUS, build_tiny_t5
from curation.tiny.vae import build_tiny_vae

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _captions(n: int) -> list[str]:
    path = SHARED / "data" / "captions" / "coco_val2017_5005.jsonl"
    if path.exists():
        lines = path.read_text().splitlines()[:n]
        texts = [json.loads(line)["caption"] for line in lines]
    else:
        texts = CORPUS.strip().splitlines()
    return [texts[i % len(texts)] for i in range(n)]


def _ours(feature: np.ndarray, mask: np.ndarray) -> int:
    return len(npy_bytes(feature)) + len(npy_bytes(mask))


def _naive(feature: np.ndarray, mask: np.ndarray) -> int:
    buf = io.BytesIO()
    np.savez_compressed(buf, caption_feature=feature, attention_mask=mask)
    return len(buf.getvalue())


def _per_call(fn, args: tuple, reps: int) -> tuple[float, int]:
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(reps):
        size = fn(*args)
    return (time.perf_counter() - t0) / reps, size


def bench_writer(reps: int) -> None:
    rng = np.random.default_rng(0)
    for dtype in ("float16", "float32"):
        feature = np.zeros((120, 4096), dtype)
        feature[:60] = rng.standard_normal((60, 4096)).astype(dtype)  # half real tokens, zeros after
        mask = (np.arange(120) < 60).astype(np.uint8)
        ours_s, ours_bytes = _per_call(_ours, (feature, mask), reps)
        naive_s, naive_bytes = _per_call(_naive, (feature, mask), max(3, reps // 50))
        emit(
            what="t5_member_write",
            dtype=dtype,
            shape=[120, 4096],
            us_per_caption=round(ours_s * 1e6, 1),
            naive_savez_compressed_us=round(naive_s * 1e6, 1),
            speedup=round(naive_s / ours_s, 1),
            bytes=ours_bytes,
            naive_bytes=naive_bytes,
        )


def bench_t5(model: Path, n: int) -> None:
    texts = _captions(n)
    for sort in (True, False):
        t5 = T5Features(TextFeatureConfig(str(model), max_length=120, batch_size=64))
        t5.setup()
        t5.encode(texts[:64])
        t0 = time.perf_counter()
        if sort:
            feats, _ = t5.encode(texts, dtype=np.float16)
        else:  # naive: every batch at the full 120 tokens, in input order
            for start in range(0, n, 64):
                tok = t5.tokenizer(
                    t5.prepare(texts[start : start + 64]),
                    max_length=120,
                    padding="max_length",
                    truncation=True,
                    return_tensors="pt",
                )
                with t5._torch.inference_mode():
                    t5.model(**tok).last_hidden_state.half().numpy()
        s = time.perf_counter() - t0
        emit(what="t5_tiny_encode", sorted_prefix=sort, captions=n, captions_per_s=round(n / s, 1))


def bench_vae(model: Path, n: int) -> None:
    files = sorted((SHARED / "data" / "coco").glob("*.jpg"))
    blobs = [files[i % len(files)].read_bytes() for i in range(n)] if files else []
    if not blobs:
        emit(what="vae_skipped", why="no COCO photos in ../shared")
        return
    vae = VaeFeatures(VaeFeatureConfig(str(model), batch_size=8))
    vae.setup()
    for px in (256, 512):
        t0 = time.perf_counter()
        pixels = np.stack([to_pixels(decode_image(b, target_size=(px, px)), (px, px)) for b in blobs])
        prep_s = time.perf_counter() - t0
        vae.encode_pixels(pixels[:2], (px, px))
        t0 = time.perf_counter()
        vae.encode_pixels(pixels, (px, px))
        enc_s = time.perf_counter() - t0
        emit(
            what="vae_tiny",
            px=px,
            images=n,
            decode_crop_images_per_s=round(n / prep_s, 1),
            encode_images_per_s=round(n / enc_s, 1),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=512)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--writer-reps", type=int, default=500)
    args = parser.parse_args()
    bench_writer(args.writer_reps)
    with tempfile.TemporaryDirectory() as tmp:
        bench_t5(build_tiny_t5(Path(tmp) / "t5"), args.captions)
        bench_vae(build_tiny_vae(Path(tmp) / "vae"), args.images)


if __name__ == "__main__":
    main()
