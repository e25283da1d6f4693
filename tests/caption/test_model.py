"""Captioner on a tiny random LLaVA built offline and loaded through from_pretrained, on real COCO photos."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from curation.caption.model import CaptionConfig, Captioner, CaptionResult
from curation.caption.quality import STATUSES
from curation.imaging import decode_image
from curation.tiny.llava import build_tiny_llava

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
COCO = SHARED / "data" / "coco"
SHORT_PROMPT = "Describe."
LONG_PROMPT = "Describe this image and its style in a very detailed manner, naming every object you see"
# Different sizes and aspect ratios, so the image processor's resize and crop differ per image.
SIZES = [(640, 480), (300, 500), (200, 200), (500, 120), (96, 160)]


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    files = sorted(COCO.glob("*.jpg"))[:12]
    assert len(files) == 12, f"expected COCO photos in {COCO}"
    return [decode_image(f.read_bytes()) for f in files]


@pytest.fixture(scope="module")
def captioner(tiny_llava: Path) -> Captioner:
    c = Captioner(CaptionConfig(model=str(tiny_llava), max_new_tokens=24, batch_size=5, num_threads=1))
    c.setup()
    return c


def test_loads_like_a_hub_checkpoint(captioner: Captioner) -> None:
    assert type(captioner.model).__name__ == "LlavaForConditionalGeneration"
    assert captioner.processor.tokenizer.padding_side == "left"
    assert captioner.format_prompt("Hi.") == "USER: <image>\nHi. ASSISTANT:"
    assert captioner.input_size == (32, 32)


def test_batched_equals_one_by_one_with_left_padding(captioner: Captioner, photos: list[Image.Image]) -> None:
    images = [im.resize(size) for im, size in zip(photos, SIZES, strict=False)]
    prompts = [SHORT_PROMPT, LONG_PROMPT, SHORT_PROMPT, LONG_PROMPT, LONG_PROMPT]
    lengths = {len(captioner.processor.tokenizer(captioner.format_prompt(p))["input_ids"]) for p in prompts}
    assert len(lengths) == 2  # the batch really is padded

    batched = captioner.caption(images, prompts)
    single = [captioner.caption([im], [p])[0] for im, p in zip(images, prompts, strict=True)]
    assert batched == single
    assert len({r.text for r in batched}) >= 3  # the random model still looks at the image


def test_sub_batches_with_the_default_prompt(tiny_llava: Path, photos: list[Image.Image]) -> None:
    c = Captioner(CaptionConfig(model=str(tiny_llava), max_new_tokens=16, batch_size=2))
    c.setup()
    images = photos[:5]
    assert c.caption(images) == [c.caption([im])[0] for im in images]


def test_statuses_are_counted(tiny_llava: Path, photos: list[Image.Image]) -> None:
    max_new = 8
    c = Captioner(CaptionConfig(model=str(tiny_llava), max_new_tokens=max_new, batch_size=12))
    c.setup()
    results = c.caption(photos)
    assert len(results) == len(photos) and all(isinstance(r, CaptionResult) for r in results)
    counts = Counter(r.status for r in results)
    assert set(counts) <= set(STATUSES) and len(counts) >= 2, counts
    for r in results:
        assert r.text == r.text.strip() and 0 <= r.new_tokens <= max_new
        assert (r.status == "truncated") <= (r.new_tokens == max_new)
    assert any(r.new_tokens < max_new for r in results)  # some captions end with EOS


def test_deterministic_across_loads_and_builds(tiny_llava: Path, photos: list[Image.Image], tmp_path: Path) -> None:
    config = CaptionConfig(model=str(tiny_llava), max_new_tokens=16, batch_size=4)
    first, second = Captioner(config), Captioner(config)
    first.setup()
    second.setup()
    assert first.caption(photos[:4]) == second.caption(photos[:4])

    rebuilt = build_tiny_llava(tmp_path / "again")

    def digest(p: Path) -> str:
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    assert digest(rebuilt) == digest(tiny_llava)


def test_sampling_is_reproducible(tiny_llava: Path, photos: list[Image.Image]) -> None:
    c = Captioner(CaptionConfig(model=str(tiny_llava), max_new_tokens=12, do_sample=True, top_p=0.9, seed=3))
    c.setup()
    assert c.caption(photos[:3]) == c.caption(photos[:3])


def test_provenance(captioner: Captioner) -> None:
    prov = captioner.provenance()
    assert prov["model"] == captioner.config.model
    assert prov["commit_hash"] is None  # a local folder
    assert prov["prompt"] == captioner.config.prompt
    assert prov["prompt_text"] == captioner.format_prompt(captioner.config.prompt)
    assert prov["model_class"] == "LlavaForConditionalGeneration"
    assert prov["dtype"] == "float32" and prov["device"] == "cpu"
    assert {
        "max_new_tokens",
        "do_sample",
        "num_beams",
        "temperature",
        "top_p",
        "repetition_penalty",
        "min_new_tokens",
        "seed",
    } <= set(prov["generation"])
    assert set(prov["versions"]) == {"python", "torch", "transformers"}


def test_misuse_is_refused(tiny_llava: Path, captioner: Captioner, photos: list[Image.Image]) -> None:
    with pytest.raises(RuntimeError, match="setup"):
        Captioner(CaptionConfig(model=str(tiny_llava))).caption(photos[:1])
    with pytest.raises(ValueError, match="prompts"):
        captioner.caption(photos[:2], [SHORT_PROMPT])
