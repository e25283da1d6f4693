"""A tiny random `AutoencoderKL` built offline, loadable exactly like `stabilityai/sd-vae-ft-ema`.

Same class and block types as SD's VAE, with 4 latent channels and 4 down blocks: diffusers downsamples
between blocks (2 ** (blocks - 1)), so the latent is H/8 x W/8 as with the real VAE. Only the widths are tiny.
Seeded: two builds are identical. `build_tiny_sdxl_vae` is the same architecture (SDXL's VAE is SD's, retrained)
with SDXL's latent scale and its own weights, standing in for PixArt-Σ's `madebyollin/sdxl-vae-fp16-fix`.
"""

from __future__ import annotations

from pathlib import Path

BLOCK_OUT_CHANNELS = (4, 8, 8, 8)  # SD: (128, 256, 512, 512)
LATENT_CHANNELS = 4
DOWNSAMPLE = 2 ** (len(BLOCK_OUT_CHANNELS) - 1)  # 8, like SD
SD_SCALING_FACTOR, SDXL_SCALING_FACTOR = 0.18215, 0.13025


def build_tiny_vae(path: Path, *, seed: int = 0, scaling_factor: float = SD_SCALING_FACTOR) -> Path:
    """Write a tiny random AutoencoderKL (config.json + safetensors) to `path` and return it."""
    import torch
    from diffusers import AutoencoderKL

    path = Path(path)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(BLOCK_OUT_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(BLOCK_OUT_CHANNELS),
            block_out_channels=BLOCK_OUT_CHANNELS,
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,  # must divide every block width
            sample_size=256,
            scaling_factor=scaling_factor,
        ).eval()
    vae.save_pretrained(path)
    return path


def build_tiny_sdxl_vae(path: Path, *, seed: int = 1) -> Path:
    """A tiny random SDXL-shaped VAE: SD's architecture at SDXL's latent scale, other weights."""
    return build_tiny_vae(path, seed=seed, scaling_factor=SDXL_SCALING_FACTOR)


DCAE_BLOCK_OUT_CHANNELS = (8, 8, 16, 16, 32, 32)  # six levels: 2 ** 5 = /32; the last >= the latent channels
DCAE_LATENT_CHANNELS = 32
DCAE_SCALING_FACTOR = 0.41407  # mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers


def build_tiny_dcae(path: Path, *, seed: int = 2) -> Path:
    """A tiny random `AutoencoderDC` (Sana's DC-AE class: 32 latent channels, /32), saved like a Hub checkpoint."""
    import torch
    from diffusers import AutoencoderDC

    path = Path(path)
    levels = len(DCAE_BLOCK_OUT_CHANNELS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderDC(
            in_channels=3,
            latent_channels=DCAE_LATENT_CHANNELS,
            attention_head_dim=8,
            encoder_block_types="ResBlock",
            decoder_block_types="ResBlock",
            encoder_block_out_channels=DCAE_BLOCK_OUT_CHANNELS,
            decoder_block_out_channels=DCAE_BLOCK_OUT_CHANNELS,
            encoder_layers_per_block=(1,) * levels,
            decoder_layers_per_block=(1,) * levels,
            encoder_qkv_multiscales=((),) * levels,
            decoder_qkv_multiscales=((),) * levels,
            scaling_factor=DCAE_SCALING_FACTOR,
        ).eval()
    vae.save_pretrained(path)
    return path
