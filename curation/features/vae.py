"""VAE latents as PixArt reads them: the posterior's mean and std on the channel axis, (2C, h/8, w/8) float32.

Not sampled and not scaled: the trainer draws `mean + std * randn` each epoch and multiplies by the
VAE's scale (`SD_LATENT_SCALE` for sd-vae-ft-ema). A deterministic autoencoder (diffusers' `AutoencoderDC`, Sana's
DC-AE: 32 channels, /32) has no posterior: its latent (C, h/32, w/32) is stored as it is, unscaled too (Sana's
export applies the scale: the config's `scaling_factor`, recorded in the sidecar's done markers).
Preprocessing never stretches: the image is resized to
cover the target and centre-cropped, in one antialiased bicubic PIL resize over the crop box (PixArt's
multi-scale transform is a bicubic Resize + CenterCrop). Single scale R: target R x R. Multi-scale: the
sample's bucket size at base R.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from curation.features import resolve_device, resolve_dtype

# sd-vae-ft-ema's latent scale. Applied by the trainer to sampled latents, never to what is stored here.
SD_LATENT_SCALE = 0.18215
# Sana's fallback DC-AE scale (`vae_encode` in its diffusion/model/builder.py) when the config has none.
DCAE_LATENT_SCALE = 0.41407


def cover_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an image of `height` x `width` resized to just cover `size` = (h, w), before the crop."""
    th, tw = size
    scale = max(th / height, tw / width)
    return max(th, round(height * scale)), max(tw, round(width * scale))


def cover_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize `image` to cover `size` = (h, w), keeping its aspect ratio, then centre-crop to `size`."""
    th, tw = size
    w, h = image.size
    scale = max(th / h, tw / w)
    cw, ch = tw / scale, th / scale  # the crop in source pixels (floats: no rounding drift before the resize)
    left, top = (
        max(0.0, (w - cw) / 2),
        max(0.0, (h - ch) / 2),
    )  # max/min: float error must not leave the image
    box = (left, top, min(float(w), left + cw), min(float(h), top + ch))
    return image.resize((tw, th), Image.Resampling.BICUBIC, box=box)


def to_pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 RGB at `size`: the CPU half of preprocessing (runs in decode threads)."""
    out = cover_crop(image.convert("RGB") if image.mode != "RGB" else image, size)
    return np.asarray(out, dtype=np.uint8)


@dataclass(frozen=True)
class VaeFeatureConfig:
    model: str  # Hub id or folder of a diffusers AutoencoderKL, e.g. "stabilityai/sd-vae-ft-ema"
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"  # compute dtype; "auto": bfloat16 on CUDA, float32 on CPU
    # torch.compile + channels_last. On an H200 at 512 px: 182 (eager) vs 324 images/s, but channels_last
    # alone is slower (133), and every new input shape (bucket) recompiles: worth it for single-scale runs.
    compile: bool = False


class VaeFeatures:
    """Holds the VAE; `setup()` loads it once per worker."""

    def __init__(self, config: VaeFeatureConfig) -> None:
        self.config = config
        self.vae: Any = None

    def setup(self, vae: Any = None) -> None:
        """Load `config.model` (an AutoencoderKL or an AutoencoderDC, by its config's class name), or take one
        already in memory (benchmarks build one)."""
        import torch

        self.device = resolve_device(self.config.device)
        if vae is None:
            vae = autoencoder_class(self.config.model).from_pretrained(
                self.config.model, torch_dtype=resolve_dtype(self.config.dtype, self.device)
            )
        self.vae = vae.to(self.device).eval()
        self.dtype = next(self.vae.parameters()).dtype  # inputs follow the weights (a given VAE keeps its own)
        self.deterministic = type(self.vae).__name__ == "AutoencoderDC"
        self.scaling_factor = float(self.vae.config.scaling_factor or DCAE_LATENT_SCALE)
        config = self.vae.config
        self.downsample = 2 ** (
            len(config.encoder_block_out_channels if self.deterministic else config.block_out_channels) - 1
        )
        self._forward = self._moments
        if self.config.compile:
            self.vae = self.vae.to(memory_format=torch.channels_last)
            self._forward = torch.compile(self._moments, dynamic=False)
        self._torch = torch

    def _moments(self, x: Any) -> Any:
        # AutoencoderKL.encode without its output wrappers (which torch.compile would break the graph on);
        # AutoencoderDC's encoder gives the latent itself.
        h = self.vae.encoder(x)
        return self.vae.quant_conv(h) if getattr(self.vae, "quant_conv", None) is not None else h

    @property
    def channels(self) -> int:
        """Channels of a stored latent: mean and std of each latent channel (the latent's own for a DC-AE)."""
        return int(self.vae.config.latent_channels) * (1 if self.deterministic else 2)

    def encode(self, images: list[Image.Image], size: tuple[int, int]) -> np.ndarray:
        """(B, 2C, h/8, w/8) float32 posterior mean and std for PIL images brought to `size` = (h, w)."""
        return self.encode_pixels(np.stack([to_pixels(im, size) for im in images]) if images else None, size)

    def encode_pixels(self, pixels: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
        """Same as `encode` for (B, h, w, 3) uint8 pixels already at `size` (see `to_pixels`)."""
        if self.vae is None:
            raise RuntimeError("call setup() first")
        h, w = size
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"size {h}x{w} is not a multiple of the VAE's downsampling ({self.downsample})")
        out_shape = (self.channels, h // self.downsample, w // self.downsample)
        if pixels is None or len(pixels) == 0:
            return np.zeros((0, *out_shape), np.float32)
        if pixels.shape[1:] != (h, w, 3) or pixels.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels of shape (B, {h}, {w}, 3), got {pixels.dtype} {pixels.shape}")
        torch = self._torch
        out = np.empty((len(pixels), *out_shape), np.float32)
        bs = self.config.batch_size
        with torch.inference_mode():
            for start in range(0, len(pixels), bs):
                # uint8 crosses to the GPU (4x less than float), then becomes [-1, 1] there.
                x = torch.from_numpy(pixels[start : start + bs]).to(self.device, non_blocking=True)
                x = x.permute(0, 3, 1, 2).to(self.dtype).div_(127.5).sub_(1.0)
                if self.config.compile:
                    x = x.contiguous(memory_format=torch.channels_last)
                moments = self._forward(x).float()
                if not self.deterministic:
                    mean, logvar = moments.chunk(2, dim=1)
                    # As diffusers' DiagonalGaussianDistribution, with exp in float32 (bf16 keeps 3 digits).
                    moments = torch.cat([mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))], dim=1)
                out[start : start + bs] = moments.cpu().numpy()
        return out


def autoencoder_class(model: str) -> Any:
    """diffusers' AutoencoderKL, or AutoencoderDC when the checkpoint's config names it (Sana's DC-AE)."""
    import diffusers

    return (
        diffusers.AutoencoderDC
        if checkpoint_config(model).get("_class_name") == "AutoencoderDC"
        else (diffusers.AutoencoderKL)
    )


def checkpoint_config(model: str) -> dict[str, Any]:
    """A checkpoint's config.json: a local folder's, or a Hub checkpoint's (fetched once, then cached)."""
    import json
    import os

    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, "config.json")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
