from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.features.vae import VaeFeatureConfig, VaeFeatures, cover_crop, cover_size, to_pixels
from curation.tiny.vae import build_tiny_vae

COCO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco"


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    v = VaeFeatures(VaeFeatureConfig(str(build_tiny_vae(tmp_path_factory.mktemp("vae"))), batch_size=2))
    v.setup()
    return v


@pytest.fixture(scope="module")
def photos():
    return [Image.open(p).convert("RGB") for p in sorted(COCO.glob("*.jpg"))[:3]]


def test_cover_crop_never_stretches():
    # Left half red, right half blue, 200 x 100: a 100 x 100 centre crop is half red, half blue.
    im = Image.new("RGB", (200, 100), (255, 0, 0))
    im.paste((0, 0, 255), (100, 0, 200, 100))
    out = np.asarray(cover_crop(im, (50, 50))).astype(int)
    assert out.shape == (50, 50, 3)
    assert (out[:, :20, 0] > 250).all() and (out[:, 30:, 2] > 250).all()  # same aspect: nothing squeezed
    # A target wider than the image: full width kept, top and bottom cropped equally.
    rows = np.zeros((100, 10, 3), np.uint8)
    rows[:, :, 1] = np.arange(100)[:, None]
    out = np.asarray(cover_crop(Image.fromarray(rows), (10, 20))).astype(int)
    assert out.shape == (10, 20, 3) and abs(out[:, :, 1].mean() - 49.5) < 1.0
    assert cover_size(480, 640, (256, 256)) == (256, 341)
    assert cover_size(1000, 100, (128, 512)) == (5120, 512)


def test_cover_crop_matches_resize_then_centre_crop(photos):
    im = photos[0]  # 640 x 422
    w, h = im.size
    scale = 256 / h
    two_step = im.resize((round(w * scale), 256), Image.Resampling.BICUBIC)
    left = (two_step.width - 256) // 2
    two_step = np.asarray(two_step.crop((left, 0, left + 256, 256))).astype(int)
    one_step = np.asarray(cover_crop(im, (256, 256))).astype(int)
    assert np.abs(one_step - two_step).mean() < 4  # sub-pixel offsets only


def test_encode_returns_unscaled_mean_and_std(vae, photos):
    z = vae.encode(photos, (64, 96))
    assert z.shape == (3, 8, 8, 12) and z.dtype == np.float32 and vae.channels == 8
    mean, std = z[:, :4], z[:, 4:]
    assert (std > 0).all() and np.isfinite(z).all()
    # Batches of 2 and 1 give the same latents as one batch of 3, and inputs are pixels in [-1, 1].
    one = vae.encode(photos[2:], (64, 96))
    np.testing.assert_allclose(one[0], z[2], atol=1e-4)
    import torch

    x = torch.from_numpy(np.array(to_pixels(photos[1], (64, 96)))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        ref = vae.vae.encode(x).latent_dist
    np.testing.assert_allclose(mean[1], ref.mean[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(std[1], ref.std[0].numpy(), rtol=1e-4)


def test_encode_checks_sizes(vae, photos):
    with pytest.raises(ValueError, match="multiple"):
        vae.encode(photos[:1], (60, 64))
    with pytest.raises(ValueError, match="uint8"):
        vae.encode_pixels(np.zeros((1, 64, 64, 3), np.float32), (64, 64))
    assert vae.encode([], (64, 64)).shape == (0, 8, 8, 8)
