"""Captioner families beyond LLaVA-1.5, as tiny random checkpoints built offline, on real COCO photos."""

from __future__ import annotations

from pathlib import Path

import pytest

from curation.caption.model import CaptionConfig, Captioner
from curation.caption.stage import CaptionStageConfig, run_caption
from curation.imaging import decode_image
from curation.ingest import IngestConfig, run_ingest
from curation.tiny.vlm import build_tiny_idefics3, build_tiny_llava_next
from tests.conftest import COCO
from tests.layouts import make_folder
from tests.outputs import index_rows

FAMILIES = {
    "llava_next": (
        build_tiny_llava_next,
        "LlavaNextForConditionalGeneration",
        (64, 64),
        "USER: <image>\nHi. ASSISTANT:",
    ),
    "idefics3": (
        build_tiny_idefics3,
        "Idefics3ForConditionalGeneration",
        (32, 32),
        "<|im_start|>User:<image>Hi.<end_of_utterance>\nAssistant:",
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    build = FAMILIES[request.param][0]
    return request.param, build(tmp_path_factory.mktemp("models") / request.param)


def test_batched_equals_one_by_one_through_from_pretrained(family) -> None:
    name, path = family
    _, model_class, input_size, template = FAMILIES[name]
    captioner = Captioner(CaptionConfig(model=str(path), max_new_tokens=16, batch_size=4, num_threads=1))
    captioner.setup()
    assert type(captioner.model).__name__ == model_class
    assert captioner.format_prompt("Hi.") == template  # the checkpoint's own chat template
    assert captioner.input_size == input_size  # what the processor needs decoded
    photos = [decode_image(f.read_bytes(), target_size=input_size) for f in sorted(COCO.glob("*.jpg"))[:10]]
    prompts = ["Describe.", "Describe this image and its style in a very detailed manner"] * 5
    batched = captioner.caption(photos, prompts)
    assert batched == [captioner.caption([im], [p])[0] for im, p in zip(photos, prompts, strict=True)]
    assert len({r.text for r in batched}) > 1 and any(r.new_tokens for r in batched)  # not one constant answer


def test_a_family_captions_a_named_set(family, tmp_path, ray_local) -> None:
    name, path = family
    out = tmp_path / "out"
    files = sorted(COCO.glob("*.jpg"))[:6]
    run_ingest(str(out), IngestConfig("folder", str(make_folder(tmp_path / "in", files)), 3), progress=False)
    model = CaptionConfig(model=str(path), max_new_tokens=8, batch_size=3)
    summary = run_caption(str(out), CaptionStageConfig(model=model, decode_threads=2, name=name), progress=False)
    rows = index_rows(out, f"captions-{name}")
    assert summary.by_status == {"ok": 6} and len(rows) == 6
    assert all(r["caption_status"] in {"ok", "empty", "truncated", "repetitive"} for r in rows.values())
