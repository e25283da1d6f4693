"""The features stage's own encode code vs a naive loop, at real shapes with random weights (no downloads).

Run on a CUDA machine: PYTHONPATH=. python3 bench/gpu_features.py [t5] [vae] [decode]   (< 5 min on one H200)
CPU smoke test at tiny shapes: TINY=1 python bench/gpu_features.py
Prints one JSON line per figure, each with the device, the versions and the batch size
(../shared/reference/gpu_baselines.md has the naive figures so far).

t5:     T5-v1.1-XXL encoder shapes (4.76B), 120 tokens, batch 256. Naive: every caption padded to 120
        tokens, run in input order (PixArt's T5Embedder). Ours: `T5Features.encode` (sorted, real prefix
        only) on two length mixes: LLaVA-like (80-160 tokens, most truncated) and the COCO captions of
        ../shared/data/captions (copied to bench/.data on a device machine), their T5 lengths estimated as
        words and punctuation marks + EOS (the real tokenizer is not available offline).
vae:    sd-vae-ft-ema shapes at 256/512/1024. Naive: float pixels normalised on the host, copied, `encode`,
        mean and std back. Ours: `VaeFeatures.encode_pixels` (uint8 to the GPU, normalised there), eager
        and compiled.
decode: CPU side of the VAE path per thread (decode a 1500x2250 JPEG, DCT-scaled, + cover crop), to compare
        with the GPU rate: the number of decode threads one GPU needs.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout, installed or not

from curation.features.t5 import T5Features, TextFeatureConfig  # noqa: E402
from curation.features.vae import VaeFeatureConfig, VaeFeatures, to_pixels  # noqa: E402
from curation.imaging import decode_image  # noqa: E402
from curation.tiny.t5 import build_tiny_t5  # noqa: E402

TINY = os.environ.get("TINY") == "1"
DEV = "cpu" if TINY else "cuda"
DTYPE = torch.float32 if TINY else torch.bfloat16
REPO = Path(__file__).resolve().parents[1]
CAPTIONS = "coco_val2017_5005.jsonl"
CONTEXT: dict = {}  # device and versions, on every line


def emit(**kw) -> None:
    print(json.dumps(CONTEXT | kw), flush=True)


def coco_lengths(n: int) -> np.ndarray:
    """Estimated T5 token counts of the first n COCO captions: words and punctuation marks, + EOS."""
    carried = REPO / "bench" / ".data" / "captions" / CAPTIONS  # ../shared does not travel to a device machine
    path = carried if carried.is_file() else REPO.parent / "shared" / "data" / "captions" / CAPTIONS
    with open(path, encoding="utf-8") as f:
        captions = [json.loads(line)["caption"] for line, _ in zip(f, range(n), strict=False)]
    return np.array([len(re.findall(r"\w+|[^\w\s]", c)) + 1 for c in captions])


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int) -> float:
    fn()  # warm-up (and compilation)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def _texts(lengths: np.ndarray) -> list[str]:
    # The tiny tokenizer (built offline) maps each " a" to one token: n words + EOS = n + 1 tokens.
    return [" ".join(["a"] * int(max(n - 1, 0))) for n in lengths]


def t5() -> None:
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    if TINY:
        cfg = T5Config(
            d_model=32,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            d_kv=16,
            vocab_size=32128,
            feed_forward_proj="gated-gelu",
        )
    else:  # t5-v1_1-xxl encoder
        cfg = T5Config(
            d_model=4096,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            d_kv=64,
            vocab_size=32128,
            feed_forward_proj="gated-gelu",
        )
    t0 = time.perf_counter()
    torch.set_default_dtype(DTYPE)
    with torch.device(DEV):
        enc = T5EncoderModel(cfg).eval()
    torch.set_default_dtype(torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(build_tiny_t5(Path(tmp) / "tok"))
    bs, length = (4, 120) if TINY else (256, 120)
    emit(
        what="t5_build",
        batch=bs,
        params_b=round(sum(p.numel() for p in enc.parameters()) / 1e9, 3),
        s=round(time.perf_counter() - t0, 1),
    )
    ours = T5Features(TextFeatureConfig("in-memory", max_length=length, batch_size=bs, device=DEV))
    ours.setup(model=enc, tokenizer=tokenizer)
    rng = np.random.default_rng(0)
    n = bs * 4
    mixes = {"llava_80_160": rng.integers(80, 161, n), "coco_captions": coco_lengths(n)}

    def naive(texts: list[str]) -> None:
        for start in range(0, len(texts), bs):
            tok = tokenizer(
                texts[start : start + bs],
                max_length=length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).to(DEV)
            with torch.inference_mode():
                enc(**tok).last_hidden_state.float().cpu().numpy()

    for name, lengths in mixes.items():
        texts = _texts(lengths)
        s_naive = timed(lambda t=texts: naive(t), 1 if TINY else 2)
        s_ours = timed(lambda t=texts: ours.encode(t, dtype=np.float16), 1 if TINY else 2)
        real = int(np.minimum(lengths, length).sum())
        emit(
            what="t5_encode",
            mix=name,
            captions=n,
            batch=bs,
            tokens=length,
            real_tokens_mean=round(real / n, 1),
            naive_captions_per_s=round(n / s_naive, 1),
            ours_captions_per_s=round(n / s_ours, 1),
            speedup=round(s_naive / s_ours, 2),
        )


def vae() -> None:
    import diffusers
    from diffusers import AutoencoderKL

    CONTEXT["diffusers"] = diffusers.__version__

    if TINY:
        ae = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=4,
        )
        shapes = [(64, 2)]
    else:  # sd-vae-ft-ema
        ae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        shapes = [(256, 64), (512, 32), (1024, 8)]
    ae = ae.to(DEV, DTYPE).eval()
    rng = np.random.default_rng(0)
    for px, bs in shapes:
        pixels = rng.integers(0, 256, (bs * 2, px, px, 3), dtype=np.uint8)

        def naive(p: np.ndarray = pixels, b: int = bs) -> None:
            for start in range(0, len(p), b):
                x = torch.from_numpy(p[start : start + b]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
                with torch.inference_mode():
                    d = ae.encode(x.to(DEV, DTYPE)).latent_dist
                    torch.cat([d.mean, d.std], 1).float().cpu().numpy()

        reps = 1 if TINY else 3
        s_naive = timed(naive, reps)
        eager = VaeFeatures(VaeFeatureConfig("in-memory", batch_size=bs, device=DEV))
        eager.setup(vae=ae)
        s_eager = timed(lambda p=pixels, z=px, f=eager.encode_pixels: f(p, (z, z)), reps)
        row = dict(
            what="vae_encode",
            px=px,
            batch=bs,
            naive_images_per_s=round(len(pixels) / s_naive, 1),
            ours_eager_images_per_s=round(len(pixels) / s_eager, 1),
        )
        if not TINY:  # compiling is minutes of CPU time: GPU runs only
            compiled = VaeFeatures(VaeFeatureConfig("in-memory", batch_size=bs, device=DEV, compile=True))
            compiled.setup(vae=ae)  # makes the weights channels_last ...
            t0 = time.perf_counter()
            compiled.encode_pixels(pixels[:bs], (px, px))
            first = time.perf_counter() - t0
            s_comp = timed(lambda p=pixels, z=px, f=compiled.encode_pixels: f(p, (z, z)), reps)
            row.update(ours_compiled_images_per_s=round(len(pixels) / s_comp, 1), compile_s=round(first, 1))
            ae.to(memory_format=torch.contiguous_format)  # ... and back, so the next eager figures are eager
        if DEV == "cuda":
            row["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        emit(**row)


def decode() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (150, 225, 3), dtype=np.uint8)).resize((2250, 1500))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=90)  # an SA-1B-sized photo (smooth: upsampled noise)
    data = buf.getvalue()
    for px in (256, 512, 1024):
        n = 3 if TINY else 20
        t0 = time.perf_counter()
        for _ in range(n):
            to_pixels(decode_image(data, target_size=(px * 3 // 2, px)), (px, px))
        emit(
            what="decode_cover_crop_one_thread",
            batch=1,
            src="1500x2250 jpeg",
            px=px,
            images_per_s=round(n / (time.perf_counter() - t0), 1),
        )


if __name__ == "__main__":
    import transformers

    CONTEXT.update(
        device=torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    emit(what="env", tiny=TINY)
    for name in sys.argv[1:] or ["decode", "t5", "vae"]:
        try:
            globals()[name]()
        except Exception as e:  # noqa: BLE001 - one failing figure must not hide the others
            emit(what=f"{name}_failed", why=repr(e)[:500])
        if DEV == "cuda":
            torch.cuda.empty_cache()  # T5-XXL's 9.5 GB go before the VAE runs
