"""A tiny random LLaVA-1.5 checkpoint built offline, loadable exactly like `llava-hf/llava-1.5-7b-hf`.

Real classes throughout (CLIP vision tower, Llama text model, byte-level BPE fast tokenizer,
CLIPImageProcessorPil, LlavaProcessor), saved with `save_pretrained`, so tests exercise the same
`from_pretrained` path as production. Weights are random but seeded: two builds are byte-identical.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

IMAGE_SIZE = 32  # px, the vision tower's square input
PATCH_SIZE = 8  # (32 / 8)^2 = 16 image tokens once the CLS token is dropped ("default" strategy)
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", IMAGE_TOKEN]
VOCAB_SIZE = 640
# Weight std at init. Far above the usual 0.02 so the random model's logits are peaked: greedy text then
# depends on the image and sometimes reaches </s>, which exercises caption statuses.
INIT_STD = 0.35
EOS_GAIN = 2.0  # scales the </s> row of lm_head so that some captions end before max_new_tokens

# llava-hf/llava-1.5-*-hf's template: "USER: <image>\n{prompt} ASSISTANT:" (BOS comes from the tokenizer).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Tokenizer training text: caption-like English written for this module, so no file is needed at runtime.
CORPUS = """
The image shows a small brown dog sitting on a wooden bench in a green park on a sunny afternoon.
A young woman in a red coat walks along a busy city street while people wait at the crossing.
Two children play with a yellow ball on a sandy beach near the blue sea under a clear sky.
This is a close-up photograph of a bowl of fresh fruit: apples, oranges, bananas and grapes.
The painting is done in the style of impressionism, with soft brush strokes and warm light.
An old man reads a newspaper at a table in a quiet cafe, holding a cup of coffee in his hand.
A large white airplane is parked on the runway of an airport, with trucks and workers around it.
The kitchen has white cabinets, a steel sink, a window with curtains and plants on the shelf.
A cat sleeps on a soft pillow next to a laptop computer on a desk covered with papers and books.
A group of people ride bicycles down a mountain road surrounded by tall pine trees and rocks.
The scene is a snowy landscape at dusk, with a frozen lake, distant hills and a pink horizon.
A black and white photo of a train crossing an iron bridge over a wide river in the fog.
The living room is decorated in a modern minimalist style with a grey sofa and a glass table.
A plate of pasta with tomato sauce, basil leaves and grated cheese sits on a checkered cloth.
Several boats are moored in a small harbour; the water reflects the houses and the evening sun.
A man in a blue shirt throws a frisbee to a dog jumping high in the air over the grass.
The illustration uses bright colors, bold outlines and flat shapes, like a children's book.
A giraffe stands beside a zebra in a dry field, with acacia trees and clouds in the background.
A street sign, a traffic light and a parked car are visible at the corner of the building.
The digital artwork shows a futuristic city at night with neon lights, towers and flying cars.
A vase of flowers is placed on a windowsill; the petals are purple, white and orange.
A baseball player swings the bat while the catcher and the umpire watch the ball closely.
The bathroom has a white toilet, a bathtub with a shower curtain and a mirror above the sink.
A horse grazes in a meadow beside a wooden fence, and a red barn stands far behind it.
The portrait shows a smiling girl with curly hair, wearing glasses and a striped sweater.
Describe this image and its style in a very detailed manner. What is shown in the picture?
The style is realistic, the lighting is natural, the composition is balanced and centered.
In the foreground there is a table; in the background there are windows, doors and a wall.
A pizza with mushrooms, olives and peppers is cut into slices on a round wooden board.
An elephant walks slowly through tall grass while birds fly above the herd in the heat.
A skier in an orange jacket descends a steep slope, leaving a trail of powder snow behind.
The motorcycle is parked on the side of the road next to a fire hydrant and a bench.
"""


def build_tiny_llava(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random LLaVA-1.5 checkpoint (model, tokenizer, processor, chat template) to `path`."""
    import torch
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe, tokenizer, ids = tiny_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=CHAT_TEMPLATE,
    )
    vision, text = tiny_towers(tokenizer, ids)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids[IMAGE_TOKEN],
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    save_tiny(LlavaForConditionalGeneration(config), processor, bpe, ids, path)
    return path


def tiny_tokenizer(extra_special: tuple[str, ...] = ()) -> tuple[Any, Any, dict[str, int]]:
    """(tokenizers BPE, its PreTrainedTokenizerFast, {special token: id}): a byte-level BPE trained on CORPUS, with
    `extra_special` tokens (another family's chat markers) after LLaVA's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[*SPECIAL_TOKENS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.strip().splitlines(), trainer=trainer)
    ids = {t: bpe.token_to_id(t) for t in [*SPECIAL_TOKENS, *extra_special]}
    # Llama tokenizers prepend BOS and nothing else.
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", ids["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=512,
        padding_side="left",
    )
    return bpe, tokenizer, ids


def tiny_towers(tokenizer: Any, ids: dict[str, int]) -> tuple[Any, Any]:
    """The tiny CLIP vision config and Llama text config of LLaVA-1.5 and LLaVA-NeXT."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
        initializer_range=INIT_STD,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
    )
    return vision, text


def save_tiny(model: Any, processor: Any, bpe: Any, ids: dict[str, int], path: Path, eos: str = "</s>") -> None:
    """Peak the random model's end-of-text logit, keep its text printable, save model and processor to `path`."""
    import torch
    from transformers import GenerationConfig

    model.eval()
    with torch.no_grad():
        model.lm_head.weight[ids[eos]] *= EOS_GAIN
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"],
        eos_token_id=ids[eos],
        pad_token_id=ids["<pad>"],
        # Keep random captions readable ASCII words: no control bytes, no half UTF-8 sequences.
        suppress_tokens=_unprintable_ids(bpe, special=set(ids), exclude={ids[eos]}),
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _unprintable_ids(tokenizer: Any, special: set[str], exclude: set[int]) -> list[int]:
    """Ids of special tokens and of tokens that decode to anything but printable ASCII (newline included)."""
    allowed = set(string.ascii_letters + string.digits + string.punctuation + " ")
    suppressed = []
    for i in range(tokenizer.get_vocab_size()):
        printable = set(tokenizer.decode([i], skip_special_tokens=False)) <= allowed
        if i not in exclude and (tokenizer.id_to_token(i) in special or not printable):
            suppressed.append(i)
    return suppressed
