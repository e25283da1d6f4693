"""T5 text features as PixArt reads them: `max_length` tokens (padded, truncated, EOS counted), a 0/1 mask.

Captions are cleaned first (on by default), like PixArt-alpha's T5Embedder: see `clean_caption`.

Batches are sorted by token count and the encoder runs only on the longest real prefix of each batch.
With the attention mask, T5's output at a real token does not depend on how many pad tokens follow (pads are
masked as keys; the relative position bias only looks at distances), so real positions match a full-length
run within float tolerance. Padded positions are written as zeros, where a full-length run leaves non-zero
values: PixArt's cross-attention selects tokens with the mask (`y.masked_select(mask != 0)`) and never reads
them, and zeros are deterministic. Short alt-text captions then cost a fraction of 120 tokens.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.features import resolve_device, resolve_dtype
from curation.records import MAX_CAPTION_CHARS

# PixArt-alpha's cleaning (DeepFloyd IF's `clean_caption`) runs ~40 rules needing bs4 and ftfy; those kept
# here change what T5 sees on web alt-text: case, URLs, HTML markup and entities, LAION's <PERSON>.
_PERSON = re.compile(r"<person>")
_URL = re.compile(
    r"\b(?:https?://|www\.)\S+"  # explicit links
    r"|\b[a-z0-9.\-]+\.(?:com|co|ru|net|org|edu|gov|it)(?:/[\w/.\-?=&%#]*)?(?![\w@])"  # bare domains
)
_TAG = re.compile(r"<[^<>]{0,200}>")


def clean_caption(text: str) -> str:
    """Lower-case; drop URLs, HTML tags and entities; `<person>` -> `person`; collapse whitespace."""
    text = text.lower()
    text = _PERSON.sub("person", text)
    text = html.unescape(text)  # entities first, so escaped markup (&lt;b&gt;) is stripped as markup too
    text = _TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    return " ".join(text.split())


@dataclass(frozen=True)
class TextFeatureConfig:
    model: str  # Hub id or folder holding a T5 encoder and its tokenizer, e.g. "DeepFloyd/t5-v1_1-xxl"
    max_length: int = 120  # PixArt-alpha: 120; PixArt-Sigma: 300
    clean_caption: bool = True
    batch_size: int = 64
    device: str = "auto"  # "auto": CUDA when available
    dtype: str = "auto"  # compute dtype; "auto": bfloat16 on CUDA (fp16 overflows in T5), float32 on CPU


class T5Features:
    """Holds the T5 encoder and tokenizer; `setup()` loads them once per worker."""

    def __init__(self, config: TextFeatureConfig) -> None:
        self.config = config
        self.model: Any = None
        self.tokenizer: Any = None

    def setup(self, model: Any = None, tokenizer: Any = None) -> None:
        """Load `config.model`, or take an encoder/tokenizer already in memory (benchmarks build them)."""
        import torch
        from transformers import AutoTokenizer, T5EncoderModel

        self.device = resolve_device(self.config.device)
        dtype = resolve_dtype(self.config.dtype, self.device)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.config.model)
        if model is None:
            model = T5EncoderModel.from_pretrained(self.config.model, dtype=dtype)
        self.model = model.to(self.device).eval()  # a given model keeps its dtype
        self._torch = torch

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    def prepare(self, texts: Sequence[str]) -> list[str]:
        """What the tokenizer sees: each text's first MAX_CAPTION_CHARS characters (a 1 MB caption costs what an
        ordinary one does; 300 tokens span ~1,500), cleaned when the config says so."""
        texts = [t[:MAX_CAPTION_CHARS] for t in texts]
        return [clean_caption(t) for t in texts] if self.config.clean_caption else texts

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens per (prepared) text before truncation, EOS included: > max_length means truncated."""
        if not texts:
            return np.zeros(0, np.int64)
        ids = self.tokenizer(self.prepare(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return np.array([len(x) for x in ids], dtype=np.int64)

    def encode(self, texts: Sequence[str], dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Features (B, L, D) in `dtype`, zero after each text's tokens, and mask (B, L) int64 0/1.

        L = max_length. Texts are cleaned first when the config says so.
        """
        if self.model is None:
            raise RuntimeError("call setup() first")
        torch = self._torch
        n, length = len(texts), self.config.max_length
        if n == 0:  # the tokenizer cannot batch nothing
            return np.zeros((0, length, self.dim), dtype=dtype), np.zeros((0, length), np.int64)
        tokens = self.tokenizer(
            self.prepare(texts),
            max_length=length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        ids, mask = tokens["input_ids"], tokens["attention_mask"].astype(np.int64)
        out = np.zeros((n, length, self.dim), dtype=dtype)
        out_dtype = torch.from_numpy(out[:0]).dtype
        real = mask.sum(axis=1)
        order = np.argsort(-real, kind="stable")  # longest first: each batch's prefix is set by its first text
        with torch.inference_mode():
            for start in range(0, n, self.config.batch_size):
                rows = order[start : start + self.config.batch_size]
                prefix = int(real[rows].max())
                x = torch.from_numpy(ids[rows, :prefix]).to(self.device)
                m = torch.from_numpy(mask[rows, :prefix]).to(self.device)
                hidden = self.model(input_ids=x, attention_mask=m).last_hidden_state
                hidden = hidden.float() * m.unsqueeze(-1)  # zeros at pads inside the prefix too
                # Cast on the device: a float16 result crosses PCIe at half the bytes.
                out[rows, :prefix] = hidden.to(out_dtype).cpu().numpy()
        return out, mask
