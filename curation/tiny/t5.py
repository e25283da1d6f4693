"""A tiny random T5 encoder checkpoint built offline, loadable exactly like `google/t5-v1_1-xxl`.

Real classes (`T5EncoderModel`, a SentencePiece unigram model converted by `T5Tokenizer`), saved with
`save_pretrained`, so tests run the same `from_pretrained` path as production. T5's conventions hold:
pad=0, eos=1, unk=2, EOS appended, 100 `<extra_id_N>` sentinels after the pieces. Seeded: builds match.
"""

from __future__ import annotations

import io
import string
from pathlib import Path

D_MODEL = 32
N_LAYERS = 2
SPM_PIECES = 320  # a soft limit: the corpus below is too small for more unigram pieces
EXTRA_IDS = 100  # T5's sentinels; kept so token ids are laid out like the real tokenizer's

# Tokenizer training text, written for this module so nothing is read at runtime. Lower-case like cleaned
# captions; the last line puts every printable ASCII character in the vocabulary (few <unk> in tests).
CORPUS = """
a close-up photograph of a red apple on a wooden table next to a glass of water and a knife.
the image shows a busy city street at night with neon signs, taxis and people holding umbrellas.
a golden retriever runs across a green field, its ears flying, with mountains in the background.
an oil painting of a quiet harbour at sunrise, with fishing boats and soft pink and orange clouds.
two women sit on a bench in a park, talking and laughing while pigeons walk around their feet.
the kitchen is bright and modern, with white tiles, a steel fridge and a bowl of lemons.
a tall lighthouse stands on a rocky cliff above the stormy sea under a dark grey sky.
a plate of sushi with salmon, tuna and avocado rolls, chopsticks and a small dish of soy sauce.
the digital illustration shows a dragon flying over a castle, drawn in a bold fantasy style.
a man in a yellow jacket rides a bicycle along a canal lined with old brick houses and trees.
the living room has a large window, a blue sofa, a rug with a geometric pattern and many books.
a snowy forest path at dusk, with footprints in the snow and warm light from a distant cabin.
a child in a striped shirt holds a kite on a windy beach while waves break on the sand.
the style is photorealistic, with shallow depth of field, natural light and a centered subject.
a vintage car, painted mint green, is parked in front of a diner with a glowing sign.
a bowl of ramen with noodles, an egg, green onions and slices of pork in a rich broth.
a cat with green eyes looks out of a window at the rain falling on the garden outside.
an aerial view of a river winding through farmland, with fields in shades of green and brown.
a watercolor of wildflowers in a meadow: poppies, daisies and cornflowers under a pale sky.
the photo shows a train station platform with travelers, luggage, clocks and a departure board.
a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9
"""


def build_tiny_t5(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random T5 encoder (config, safetensors weights, tokenizer) to `path` and return it."""
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lines = CORPUS.strip().splitlines() + [" ".join(string.printable.strip())]
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model_proto,
        vocab_size=SPM_PIECES,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,  # T5 has no BOS
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,  # the result is deterministic with one thread
        minloglevel=2,
    )
    (path / "spiece.model").write_bytes(model_proto.getvalue())
    # T5Tokenizer converts spiece.model to a fast tokenizer.json; save_pretrained writes both files.
    tokenizer = T5Tokenizer.from_pretrained(path, extra_ids=EXTRA_IDS, model_max_length=512)
    tokenizer.save_pretrained(path)

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=D_MODEL,
        d_kv=16,
        d_ff=2 * D_MODEL,
        num_layers=N_LAYERS,
        num_heads=2,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as used by PixArt
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(path)
    return path
