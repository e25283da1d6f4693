"""Tiny random checkpoints of other captioner families, built offline like `curation.tiny.llava`: LLaVA-NeXT
(`llava-hf/llava-v1.6-*`: images tiled up to a grid of crops) and Idefics3, SmolVLM's architecture
(`HuggingFaceTB/SmolVLM-Instruct`: its own vision tower, pixel-shuffle connector, its own chat template). Real
classes, saved with `save_pretrained`, loaded through the captioner's one `AutoProcessor` /
`AutoModelForImageTextToText.from_pretrained` path. Seeded: two builds are identical.

Qwen2-VL is not among them: its processor needs a video processor, which needs torchvision (not a dependency).
"""

from __future__ import annotations

from pathlib import Path

from curation.tiny.llava import CHAT_TEMPLATE, IMAGE_SIZE, IMAGE_TOKEN, PATCH_SIZE, save_tiny, tiny_tokenizer

NEXT_PINPOINTS = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]


def build_tiny_llava_next(path: Path, *, seed: int = 0) -> Path:
    """A tiny random LLaVA-NeXT: LLaVA-1.5's towers, images tiled into up to 2 x 2 crops plus the overview."""
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from curation.tiny.llava import tiny_towers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe, tokenizer, ids = tiny_tokenizer()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision, text = tiny_towers(tokenizer, ids)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids[IMAGE_TOKEN],
        image_grid_pinpoints=NEXT_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    save_tiny(LlavaNextForConditionalGeneration(config), processor, bpe, ids, path)
    return path


# SmolVLM's template (HuggingFaceTB/SmolVLM-Instruct, an Idefics3 model) for one user turn.
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% else %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
IDEFICS3_SPECIAL = ("<|im_start|>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
IDEFICS3_SCALE = 2  # pixel shuffle: 2 x 2 patches per image token


def build_tiny_idefics3(path: Path, *, seed: int = 3) -> Path:
    """A tiny random Idefics3 (SmolVLM's architecture): SigLIP-style tower, pixel-shuffle connector, Llama text.

    Seed 3: its random captions on COCO photos differ in length and some end at once (empty), as LLaVA's do."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    from curation.tiny.llava import INIT_STD, tiny_towers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe, tokenizer, ids = tiny_tokenizer(IDEFICS3_SPECIAL)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    image_seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // IDEFICS3_SCALE**2
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    vision = Idefics3VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE, initializer_range=INIT_STD,
    )  # fmt: skip
    _, text = tiny_towers(tokenizer, ids)
    text.eos_token_id = ids["<end_of_utterance>"]
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=ids[IMAGE_TOKEN],
        scale_factor=IDEFICS3_SCALE,
        initializer_range=INIT_STD,  # the top-level init covers the connector and text model: peaked logits
    )
    torch.manual_seed(seed)
    save_tiny(Idefics3ForConditionalGeneration(config), processor, bpe, ids, path, eos="<end_of_utterance>")
    return path
