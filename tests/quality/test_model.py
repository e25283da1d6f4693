"""QualityModel on the tiny random CLIP and heads of `curation make-tiny-models`, loaded through AutoModel /
AutoProcessor and the heads' file loading, on real COCO photos."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from curation.errors import ConfigError
from curation.imaging import decode_image
from curation.quality.heads import AestheticMLP, NSFWHead, load_head
from curation.quality.model import QualityModel, QualityModelConfig, check_heads, clip_score, clip_tag

COCO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco"


@pytest.fixture(scope="module")
def quality(tiny_models: dict[str, Path]) -> QualityModel:
    config = QualityModelConfig(
        model=str(tiny_models["clip"]),
        aesthetic_head=str(tiny_models["aesthetic"]),
        nsfw_head=str(tiny_models["nsfw"]),
        batch_size=4,  # smaller than the inputs below: several forwards
        num_threads=1,
    )
    model = QualityModel(config)
    model.setup()
    return model


@pytest.fixture(scope="module")
def photos(quality: QualityModel) -> list:
    files = sorted(COCO.glob("*.jpg"))[:10]
    assert len(files) == 10, f"expected COCO photos in {COCO}"
    side = quality.input_size
    return [decode_image(f.read_bytes(), target_size=(side, side)) for f in files]


def test_image_embeddings_are_normalised_and_in_order(quality: QualityModel, photos: list) -> None:
    emb = quality.embed_images(photos)
    assert emb.shape == (len(photos), quality.dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # Batched rows equal the plain processor + get_image_features of each image alone.
    for i in (0, 5, 9):
        pixels = quality.processor(images=[photos[i]], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            alone = quality.model.get_image_features(pixel_values=pixels).pooler_output[0]
        np.testing.assert_allclose(emb[i], (alone / alone.norm()).numpy(), atol=1e-5)
    assert len({tuple(np.round(r, 4)) for r in emb}) == len(photos)  # distinct photos, distinct embeddings
    assert quality.embed_images([]).shape == (0, quality.dim)


def test_pixels_equal_the_processors(quality: QualityModel, photos: list) -> None:
    odd = [photos[0].resize((20, 50)), photos[1].crop((0, 0, 300, 41)), photos[2].convert("L")]  # upscaled, wide, grey
    images = photos[:4] + odd
    pixels = quality.preprocess(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(images), 3, quality.input_size, quality.input_size)
    ip = quality.processor.image_processor
    expected = ip(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor(ip.image_mean).view(1, 3, 1, 1), torch.tensor(ip.image_std).view(1, 3, 1, 1)
    np.testing.assert_allclose(((pixels / 255 - mean) / std).numpy(), expected.numpy(), atol=1e-5)


def test_texts_past_the_context_are_flagged_and_cut(quality: QualityModel) -> None:
    assert quality.context == 77  # CLIP's, kept by the tiny model
    short = "a small brown dog sitting on a wooden bench in a park"
    long = " ".join(["a dog on a bench"] * 20)  # 100 words: past 77 tokens
    longer = long + " under a red umbrella at night"
    emb, truncated = quality.embed_texts([short, long, "", longer, short])
    assert truncated.tolist() == [False, True, False, True, False]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # The text tower sees only the first 77 tokens: what follows them changes nothing.
    np.testing.assert_allclose(emb[1], emb[3], atol=1e-6)
    # Rows do not depend on the batch (sorted by length, padded): each equals the text alone.
    alone, _ = quality.embed_texts([short])
    np.testing.assert_allclose(emb[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(emb[4], alone[0], atol=1e-5)
    assert not np.allclose(emb[0], emb[1], atol=1e-3)


def test_heads_equal_a_computation_by_hand(quality: QualityModel, photos: list) -> None:
    emb = quality.embed_images(photos)
    x = torch.from_numpy(emb)
    a = quality.heads["aesthetic"].layers
    hand = x
    for i in (0, 2, 4, 6, 7):  # the linear layers; no activations ("linearMSE"), dropouts off
        hand = hand @ a[i].weight.T + a[i].bias
    np.testing.assert_allclose(quality.aesthetic(emb), hand[:, 0].detach().numpy(), rtol=1e-5)
    n = quality.heads["nsfw"]
    h = (x - n.norm.mean) / n.norm.variance.sqrt()
    for layer in (n.linear_1, n.linear_2, n.linear_3):
        h = torch.clamp(h @ layer.weight.T + layer.bias, min=0)
    hand_nsfw = 1 / (1 + torch.exp(-(h @ n.linear_4.weight.T + n.linear_4.bias)))
    scores = quality.nsfw(emb)
    np.testing.assert_allclose(scores, hand_nsfw[:, 0].detach().numpy(), rtol=1e-5)
    assert scores.dtype == np.float32 and ((scores >= 0) & (scores <= 1)).all()
    assert quality.aesthetic(emb[:0]).shape == (0,)
    provenance = quality.provenance()
    digest = hashlib.sha256(Path(quality.config.nsfw_head).read_bytes()).hexdigest()
    assert provenance["heads"]["nsfw"] == {"source": quality.config.nsfw_head, "class": "NSFWHead", "sha256": digest}
    assert (provenance["tag"], provenance["dim"], provenance["context"]) == (quality.tag, 32, 77)


def test_clip_score_on_known_vectors() -> None:
    image = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [2, 0, 0], [1, 1, 0]], np.float32)
    text = np.array([[1, 0, 0], [0, 1, 0], [-1, 0, 0], [3, 0, 0], [1, 0, 0]], np.float32)
    scores = clip_score(image, text)
    np.testing.assert_allclose(scores, [100, 0, 0, 100, 100 / np.sqrt(2)], rtol=1e-6)
    assert scores.dtype == np.float32
    half = clip_score(image.astype(np.float16), text.astype(np.float16))  # stored embeddings are float16
    np.testing.assert_allclose(half, scores, rtol=1e-3)


def test_heads_load_from_safetensors_and_from_a_state_dict(quality: QualityModel, tmp_path: Path) -> None:
    emb = np.random.default_rng(0).normal(size=(6, quality.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for kind, cls in (("aesthetic", AestheticMLP), ("nsfw", NSFWHead)):
        head = quality.heads[kind]
        pth = tmp_path / f"{kind}.pth"
        torch.save(head.state_dict(), pth)  # a plain state dict, as LAION publishes theirs
        loaded = load_head(kind, str(pth), quality.dim)
        assert type(loaded) is cls
        with torch.no_grad():
            np.testing.assert_array_equal(loaded(torch.from_numpy(emb)).numpy(), head(torch.from_numpy(emb)).numpy())


def test_bad_head_files_are_one_line_refusals(quality: QualityModel, tmp_path: Path) -> None:
    head = quality.heads["aesthetic"]
    pickled = tmp_path / "module.pth"
    torch.save(head, pickled)  # the whole module: a pickle of Python objects
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not safetensors at all" * 10)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file" * 10)
    wide = tmp_path / "wide.safetensors"  # the real L/14 architecture: 768-wide input
    save_file(AestheticMLP().state_dict(), str(wide))
    other = tmp_path / "other.safetensors"  # the NSFW head's weights given as the aesthetic head
    save_file(quality.heads["nsfw"].state_dict(), str(other))
    cases = {
        str(pickled): "pickle of Python objects",
        str(garbage): "cannot be read as a weights file",
        str(junk): "is not a torch state dict file",
        str(wide): "reads 768-wide embeddings but the CLIP model makes 32-wide ones",
        str(other): "does not hold AestheticMLP weights",
        str(tmp_path / "missing.pth"): "no such file",
        str(tmp_path): "is a folder",
    }
    for source, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_head("aesthetic", source, quality.dim)
        assert message in str(err.value) and "\n" not in str(err.value)
        assert str(err.value).startswith(f"--aesthetic-head {source}")
    # The driver's check finds the width from the CLIP folder's config.json.
    config = QualityModelConfig(model=str(quality.config.model), aesthetic_head=str(wide), nsfw_head="none")
    with pytest.raises(ConfigError, match="768-wide"):
        check_heads(config)
    check_heads(quality.config)  # the tiny model's own heads pass


def test_a_hub_head_out_of_reach_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as err:
        load_head("nsfw", "someone/nsfw-heads/l14.safetensors")
    text = str(err.value)
    assert "\n" not in text and "--nsfw-head someone/nsfw-heads/l14.safetensors" in text
    assert "hf download someone/nsfw-heads l14.safetensors" in text


def test_embedding_folder_tags(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    assert tiny_models["aesthetic"].name == "aesthetic-head.safetensors"
    assert tiny_models["nsfw"].name == "nsfw-head.safetensors"
    assert clip_tag("openai/clip-vit-large-patch14") == "openai--clip-vit-large-patch14"
    tag = clip_tag(str(tiny_models["clip"]))
    assert tag.startswith("clip-") and len(tag) == len("clip-") + 8
    copy = tmp_path / "clip"
    copy.mkdir()
    config = (tiny_models["clip"] / "config.json").read_text()
    (copy / "config.json").write_text(config)
    assert clip_tag(str(copy)) == tag  # same name and config: same embeddings folder
    (copy / "config.json").write_text(config.replace('"projection_dim": 32', '"projection_dim": 16'))
    assert clip_tag(str(copy)) != tag
