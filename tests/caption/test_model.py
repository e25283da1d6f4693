"""Captioner on a tiny random LLaVA built offline and loaded through from_pretrained, on real COCO photos."""

from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from curation.caption.model import CaptionConfig, Captioner, CaptionResult, auto_batch_size
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


def test_static_cache_pads_a_short_batch_and_changes_no_caption(tiny_llava: Path, photos: list[Image.Image]) -> None:
    prompts = [SHORT_PROMPT, LONG_PROMPT, LONG_PROMPT, SHORT_PROMPT, LONG_PROMPT, SHORT_PROMPT, LONG_PROMPT]
    padded = Captioner(
        CaptionConfig(model=str(tiny_llava), max_new_tokens=16, batch_size=5, cache_implementation="static")
    )
    padded.setup()
    short = padded.prepare(photos[5:7], prompts[5:7])
    assert short.count == 2 and {len(v) for v in short.inputs.values()} == {5}  # the compiled batch shape

    results = padded.caption(photos[:7], prompts)  # a full batch of 5, then 2 padded to 5
    assert len(results) == 7  # the padding rows' outputs are dropped
    unpadded = Captioner.from_loaded(
        CaptionConfig(model=str(tiny_llava), max_new_tokens=16, batch_size=2, cache_implementation="static"),
        padded.model,
        padded.processor,
    )
    assert results[5:] == unpadded.caption(photos[5:7], prompts[5:7])  # the same 2 images as a full batch
    assert len({r.text for r in results}) >= 3


def test_defaults_resolve_per_device(tiny_llava: Path, photos: list[Image.Image]) -> None:
    config = CaptionConfig(model=str(tiny_llava), max_new_tokens=8)
    assert (config.batch_size, config.cache_implementation) == (None, None)  # "auto": the CLI passes None too
    c = Captioner(config)
    c.setup()
    assert (c.batch_size, c.cache_implementation) == (8, "dynamic")  # the CPU: no compile, no padding
    assert {len(v) for v in c.prepare(photos[:3]).inputs.values()} == {3}
    prov = c.provenance()
    assert prov["batch_size"] == 8 and prov["generation"]["cache_implementation"] == "dynamic"


def test_prepare_from_several_threads_equals_one_thread(captioner: Captioner, photos: list[Image.Image]) -> None:
    chunks = [photos[i : i + 5] for i in range(0, 10, 5)] * 4
    expected = [captioner.prepare(chunk).inputs for chunk in chunks]
    with ThreadPoolExecutor(4) as pool:  # as the stage's prefetch threads call it
        got = list(pool.map(lambda chunk: captioner.prepare(chunk).inputs, chunks))
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


GIB = 2**30
# LLaVA-1.5-7B (Llama-2-7B text model): 32 layers x 32 KV heads x 128 head dim, keys and values, bf16.
KV_7B = 2 * 32 * 32 * 128 * 2
WEIGHTS_7B = 7_060_000_000 * 2
TOKENS_7B = 606 + 128  # the 606-token prompt (576 image tokens) and 128 new tokens


def test_auto_batch_size_at_llava_7b_shapes() -> None:
    h200 = int(139.5 * GIB)  # 143,771 MiB less the CUDA context
    static = auto_batch_size(h200, WEIGHTS_7B, KV_7B, TOKENS_7B, static=True)
    # Measured on an H200: static batch 192 fit (94 GiB peak), 256 ran out of memory.
    assert 128 <= static <= 192 and static % 16 == 0
    dynamic = auto_batch_size(h200, WEIGHTS_7B, KV_7B, TOKENS_7B, static=False)
    assert 64 <= dynamic <= 128 and dynamic < static  # dynamic batch 128 peaked at 107 GiB
    h100 = auto_batch_size(int(79.1 * GIB), WEIGHTS_7B, KV_7B, TOKENS_7B, static=True)
    assert 64 <= h100 < static
    longer = auto_batch_size(h200, WEIGHTS_7B, KV_7B, 606 + 512, static=True)
    assert longer < static  # more new tokens, more KV cache per sample


def test_memory_shapes_of_the_loaded_model(captioner: Captioner, photos: list[Image.Image]) -> None:
    weights, kv_per_token, tokens = captioner.memory_shapes()
    text = captioner.model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert kv_per_token == 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4  # fp32 on the CPU
    assert weights == 4 * sum(p.numel() for p in captioner.model.parameters())
    prompt = captioner.processor(images=photos[:1], text=[captioner.format_prompt(captioner.config.prompt)])
    assert tokens == len(prompt["input_ids"][0]) + 24  # the prompt with its image tokens, and max_new_tokens
    assert tokens > 24 + captioner.model.config.image_seq_length


def test_auto_batch_size_bounds() -> None:
    for free_gib in (13, 14):  # the weights alone, or hardly more: still one
        assert auto_batch_size(free_gib * GIB, WEIGHTS_7B, KV_7B, TOKENS_7B, static=True) == 1
    assert auto_batch_size(20 * GIB, WEIGHTS_7B, KV_7B, TOKENS_7B, static=True) in range(2, 16)  # not rounded to 0
    assert auto_batch_size(139 * GIB, 10**6, 2 * 2 * 4 * 16 * 4, 700, static=True) == 256  # a tiny model: capped
