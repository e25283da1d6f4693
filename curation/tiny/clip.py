"""A tiny random CLIP checkpoint built offline, loadable exactly like `openai/clip-vit-large-patch14`, and tiny random
LAION heads of the real classes at its width.

Real classes (`CLIPModel`, `CLIPTokenizer` with a byte-level BPE trained here on caption-like text, the PIL
`CLIPImageProcessorPil`, `CLIPProcessor`), saved with `save_pretrained`, so tests and the demo run the same
`AutoModel` / `AutoProcessor` path as production. The text tower keeps CLIP's 77-token context, so long (dense)
captions are truncated as with the real model. Seeded: two builds are identical.
"""

from __future__ import annotations

import json
from pathlib import Path

from curation.tiny.llava import CORPUS

IMAGE_SIZE = 32  # px, the vision tower's square input
PATCH_SIZE = 8
WIDTH = 32  # hidden size of both towers and of the shared embedding
CONTEXT = 77  # tokens, as CLIP's text tower
VOCAB_SIZE = 500
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
AESTHETIC_WIDTHS = (WIDTH, 16, 8, 8, 4, 1)  # AestheticMLP's 768 -> 1024 -> 128 -> 64 -> 16 -> 1, tiny
NSFW_WIDTHS = (WIDTH, 8, 16, 8, 1)  # NSFWHead's 768 -> 64 -> 512 -> 256 -> 1, tiny
AESTHETIC_BIAS = 5.0  # the random head's outputs then sit mid-scale (1-10), like real ratings


def build_tiny_clip(path: Path, *, seed: int = 4) -> Path:
    """Write a tiny random CLIP checkpoint (model, tokenizer, image processor) to `path` and return it."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the text tower pools at the first end token
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=WIDTH)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_clip_tokenizer():  # noqa: ANN201 (a transformers CLIPTokenizer)
    """A `CLIPTokenizer` over a byte-level BPE trained on CORPUS with CLIP's own normaliser and pre-tokeniser."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    # CLIPTokenizer builds its pipeline (lower-casing, word splitting, "</w>" word ends) around a vocab and merges:
    # train a BPE with that pipeline, then hand its vocab and merges over.
    template = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])
    bpe = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    bpe.normalizer = template.backend_tokenizer.normalizer
    bpe.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        initial_alphabet=[chr(c) for c in range(32, 127)],
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.strip().splitlines(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return CLIPTokenizer(vocab=trained["vocab"], merges=merges, model_max_length=CONTEXT)


def build_tiny_heads(aesthetic: Path, nsfw: Path, *, seed: int = 5) -> tuple[Path, Path]:
    """Write random `AestheticMLP` and `NSFWHead` weights at the tiny CLIP's width as safetensors files."""
    import torch
    from safetensors.torch import save_file

    from curation.quality.heads import AestheticMLP, NSFWHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        aesthetic_head = AestheticMLP(AESTHETIC_WIDTHS)
        nsfw_head = NSFWHead(NSFW_WIDTHS)
        with torch.no_grad():
            aesthetic_head.layers[-1].bias.fill_(AESTHETIC_BIAS)
            # Statistics "adapted" to unit-norm embeddings: each coordinate about +-1/sqrt(WIDTH).
            nsfw_head.norm.mean.normal_(0, 0.05)
            nsfw_head.norm.variance.uniform_(0.5 / WIDTH, 2 / WIDTH)
    for head, file in ((aesthetic_head, aesthetic), (nsfw_head, nsfw)):
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(file))
    return Path(aesthetic), Path(nsfw)
