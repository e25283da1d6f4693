"""The quality model: a CLIP model (image and text towers) and LAION's aesthetic and NSFW heads, loaded once per
worker in `setup()`.

CLIP loads through transformers' `AutoModel` + `AutoProcessor` from a Hub id or a local folder (never remote code):
`openai/clip-vit-large-patch14` by default, the embedding both LAION heads were trained on, or the tiny random CLIP
of `curation.tiny.clip`. Embeddings are L2-normalised; the heads read image embeddings (see `heads.py`).
`clip_score` is torchmetrics' CLIPScore of an image and a text embedding: max(100 x cosine, 0).

Texts are cut to the text tower's context (`max_position_embeddings`: 77 tokens for CLIP, start and end tokens
included); `embed_texts` says which were, since the score then only sees a caption's beginning.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curation.records import MAX_CAPTION_CHARS

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# The improved aesthetic predictor v2's published L/14 weights (sac+logos+ava1-l14-linearMSE), as TRL hosts them for
# its DDPO example.
DEFAULT_AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
# LAION's NSFW detector is published as a Keras model only: examples/convert_nsfw_keras.py writes this file.
DEFAULT_NSFW_HEAD = "~/.cache/curation/clip-vit-l-14-nsfw-head.safetensors"
NO_HEAD = ("", "none")  # --aesthetic-head none / --nsfw-head none: no such score
CPU_BATCH_SIZE = 32
CUDA_BATCH_SIZE = 256


@dataclass(frozen=True)
class QualityModelConfig:
    model: str = field(default=DEFAULT_CLIP, metadata={"help": "the CLIP model: a Hub id or a local folder"})
    aesthetic_head: str | None = field(
        default=DEFAULT_AESTHETIC_HEAD,
        metadata={
            "help": "LAION improved aesthetic predictor v2 weights: a local file (.safetensors or a state dict "
            ".pth) or a Hub file repo_id/filename; none: no aesthetic score"
        },
    )
    nsfw_head: str | None = field(
        default=DEFAULT_NSFW_HEAD,
        metadata={
            "help": "LAION CLIP-based NSFW detector weights (examples/convert_nsfw_keras.py writes the default "
            "file): a local file or a Hub file repo_id/filename; none: no NSFW score"
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": "where CLIP runs (auto: cuda when available, else cpu)", "choices": ["auto", "cuda", "cpu"]},
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": f"images or texts per forward (default: {CPU_BATCH_SIZE} CPU, {CUDA_BATCH_SIZE} CUDA)"},
    )
    revision: str | None = field(default=None, metadata={"help": "model revision (branch, tag or commit)"})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads per worker (default: torch's own)"}
    )


def clip_tag(model: str) -> str:
    """The name of a CLIP model's embeddings folder: a Hub id with "/" as "--" (`openai--clip-vit-large-patch14`);
    a local folder's name, "-", and 8 hex digits of its config.json's SHA-256 (another model saved under the same
    name gets another folder)."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        digest = hashlib.sha256(Path(path, "config.json").read_bytes()).hexdigest()[:8]
        return f"{_safe(Path(path).resolve().name)}-{digest}"
    return _safe(model.replace("/", "--"))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "model"


def head_source(source: str | None) -> str | None:
    """A head flag's value, None when it asks for no head (`none`, empty)."""
    return None if source is None or source.strip().lower() in NO_HEAD else source


def check_heads(config: QualityModelConfig) -> None:
    """Refuse on the driver, in one line (ConfigError), a head file that is missing, out of reach, a pickle, or not
    the head's architecture, and one whose width is not the CLIP model's when its config.json is at hand."""
    from curation.quality.heads import load_head

    dim = _projection_dim(config.model, config.revision)
    for kind in ("aesthetic", "nsfw"):
        source = head_source(getattr(config, f"{kind}_head"))
        if source is not None:
            load_head(kind, source, dim)


def _projection_dim(model: str, revision: str | None) -> int | None:
    """The embedding width in a local folder's or the Hub cache's config.json; None when neither has it."""
    import json

    path = Path(os.path.expanduser(model), "config.json")
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        try:
            cached = try_to_load_from_cache(model, "config.json", revision=revision)
        except HFValidationError:  # not a Hub id (check_model says what it is)
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    dim = json.loads(path.read_text()).get("projection_dim")
    return dim if isinstance(dim, int) else None


class QualityModel:
    """CLIP image and text embeddings and the heads on them. `setup()` loads everything once; the rest is batched."""

    def __init__(self, config: QualityModelConfig) -> None:
        self.config = config
        self.model: Any = None
        self.processor: Any = None
        self.device: str | None = None
        self.dtype: Any = None
        self.heads: dict[str, Any] = {}  # "aesthetic" / "nsfw" -> torch module, for the heads the config names
        self.batch_size: int = config.batch_size or CPU_BATCH_SIZE
        self._head_digests: dict[str, str] = {}  # SHA-256 of each head's file, for provenance
        self._crop: tuple[int, int] | None = None  # see _crop_plan
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer raises "Already borrowed" when shared by threads

    @classmethod
    def from_loaded(cls, config: QualityModelConfig, model: Any, processor: Any) -> QualityModel:
        """A ready quality model around a CLIP model and processor already in memory (benchmarks build random ones
        at real shapes); the model keeps its device and dtype, the heads load from the config."""
        quality = cls(config)
        quality._adopt(model, processor, device=str(model.device), dtype=model.dtype)
        return quality

    def setup(self) -> None:
        if self.model is not None:  # heavy state loads once
            return
        import torch
        from transformers import AutoModel, AutoProcessor

        from curation.features import resolve_device

        cfg = self.config
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        device = resolve_device(cfg.device)
        # CLIP was trained in mixed precision with fp16 weights; fp16 keeps more mantissa than bf16 and its
        # activations stay in range. CPUs are far quicker in fp32.
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        processor = AutoProcessor.from_pretrained(cfg.model, revision=cfg.revision)
        model = AutoModel.from_pretrained(cfg.model, revision=cfg.revision, dtype=dtype, attn_implementation="sdpa")
        self._adopt(model.to(device), processor, device=device, dtype=dtype)

    def _adopt(self, model: Any, processor: Any, *, device: str, dtype: Any) -> None:
        import torch

        from curation.errors import SetupError
        from curation.quality.heads import load_head, resolve_head

        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise SetupError(
                f"--model {self.config.model} is a {type(model).__name__}, which has no image and text embeddings: "
                "pass a CLIP model (e.g. openai/clip-vit-large-patch14)"
            )
        self.model, self.processor = model.eval(), processor
        self.device, self.dtype = device, dtype
        cuda = device.startswith("cuda")
        self.batch_size = self.config.batch_size or (CUDA_BATCH_SIZE if cuda else CPU_BATCH_SIZE)
        self._crop = self._crop_plan()
        if self._crop is not None:
            ip = self.processor.image_processor
            self._rescale = float(ip.rescale_factor)
            self._mean, self._std = (
                torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (ip.image_mean, ip.image_std)
            )
        for kind, source in (("aesthetic", self.config.aesthetic_head), ("nsfw", self.config.nsfw_head)):
            source = head_source(source)
            if source is not None:
                self.heads[kind] = load_head(kind, source, self.dim).to(device)
                digest = hashlib.sha256(Path(resolve_head(source, f"--{kind}-head")).read_bytes()).hexdigest()
                self._head_digests[kind] = digest

    @property
    def tag(self) -> str:
        return clip_tag(self.config.model)

    @property
    def dim(self) -> int:
        """Embedding width (the projection's)."""
        config = self.model.config
        return int(getattr(config, "projection_dim", None) or config.vision_config.hidden_size)

    @property
    def context(self) -> int:
        """Most tokens the text tower reads, start and end tokens included."""
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def input_size(self) -> int:
        """The square side CLIP sees (the processor's crop): pass (side, side) as decode_image's target_size."""
        ip = self.processor.image_processor
        crop, size = dict(ip.crop_size or {}), dict(ip.size or {})
        return int(crop.get("height") or size.get("shortest_edge") or size.get("height"))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Pixels of RGB images as CLIP sees them, on the CPU: (n, 3, side, side) uint8 after the processor's resize
        and centre crop, for `embed_pixels` to normalise on the device; a processor this does not know gives its own
        float pixel values instead. Thread-safe, so a worker may prepare the next batch while the model embeds one.

        CLIP's PIL image processor resizes uint8 images with PIL, crops, then rescales and normalises in float32
        numpy; doing the same resize and crop here and the float work on the device gives identical pixel values
        (tested) for half the CPU time and a quarter of the bytes to copy."""
        import torch

        if self._crop is None:
            return self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        side, resample = self._crop
        out = np.empty((len(images), side, side, 3), np.uint8)
        for i, image in enumerate(images):
            w, h = image.size
            # transformers' shortest-edge resize: the short side to `side`, the long one to int(side * long / short)
            size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
            resized = (image if image.mode == "RGB" else image.convert("RGB")).resize(size, resample)
            left, top = (size[0] - side) // 2, (size[1] - side) // 2
            out[i] = np.asarray(resized.crop((left, top, left + side, top + side)))
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    def _crop_plan(self) -> tuple[int, int] | None:
        """(side, PIL resample) when the image processor is CLIP's PIL one doing just shortest-edge resize, square
        centre crop, 1/255 rescale and mean/std normalisation, which `preprocess` then does itself; else None."""
        ip = self.processor.image_processor
        size, crop = dict(ip.size or {}), dict(ip.crop_size or {})
        plain = (
            getattr(ip, "backend", None) == "pil"
            and ip.do_resize
            and set(size) == {"shortest_edge"}
            and ip.do_center_crop
            and crop.get("height") == crop.get("width") == size["shortest_edge"]
            and ip.do_rescale
            and abs(ip.rescale_factor - 1 / 255) < 1e-12
            and ip.do_normalize
            and not getattr(ip, "do_pad", False)
        )
        return (int(size["shortest_edge"]), int(ip.resample)) if plain else None

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """(n, dim) float32 L2-normalised image embeddings of RGB images, in order."""
        out = [
            self.embed_pixels(self.preprocess(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(n, dim) float32 L2-normalised embeddings of `preprocess`'s output (one forward: at most a batch)."""
        import torch

        with torch.inference_mode():
            x = pixels.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:  # preprocess's pixels: the processor's rescale and normalisation, here
                x = (x.float() * self._rescale - self._mean) / self._std
            return self._normalised(self.model.get_image_features(pixel_values=x.to(self.dtype)))

    def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """((n, dim) float32 L2-normalised text embeddings, (n,) bool: the text was longer than the context and its
        end was cut off). Batches are sorted by length: the text tower is causal, so padding changes nothing."""
        import torch

        n = len(texts)
        out = np.zeros((n, self.dim), np.float32)
        if n == 0:
            return out, np.zeros(0, bool)
        texts = [t[:MAX_CAPTION_CHARS] for t in texts]  # a 1 MB caption costs what a long one does; still truncated
        tokenizer, context = self.processor.tokenizer, self.context
        with self._tokenizer_lock:
            lengths = np.array([len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]])
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            with self._tokenizer_lock:
                tokens = tokenizer(
                    [texts[i] for i in rows], truncation=True, max_length=context, padding=True, return_tensors="pt"
                )
            with torch.inference_mode():
                features = self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
                out[rows] = self._normalised(features)
        return out, lengths > context

    @staticmethod
    def _normalised(features: Any) -> np.ndarray:
        import torch

        # transformers 5 returns the projected embedding as the output's pooler_output; older releases a tensor.
        emb = features if isinstance(features, torch.Tensor) else features.pooler_output
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()

    def aesthetic(self, embeddings: np.ndarray) -> np.ndarray:
        """(n,) float32 predicted aesthetic ratings (1-10 scale, not clipped) of L2-normalised image embeddings."""
        return self._head("aesthetic", embeddings)

    def nsfw(self, embeddings: np.ndarray) -> np.ndarray:
        """(n,) float32 NSFW probabilities in [0, 1] of L2-normalised image embeddings."""
        return self._head("nsfw", embeddings)

    def _head(self, kind: str, embeddings: np.ndarray) -> np.ndarray:
        import torch

        head = self.heads.get(kind)
        if head is None:
            raise RuntimeError(f"no {kind} head: the config's --{kind}-head is none (check model.heads first)")
        x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            return head(x).float().cpu().numpy().astype(np.float32, copy=False)

    def provenance(self) -> dict[str, Any]:
        """What made the embeddings and scores: model, commit, dtype, heads and their files' SHA-256, versions."""
        import torch
        import transformers

        heads = {
            kind: {
                "source": getattr(self.config, f"{kind}_head"),
                "class": type(head).__name__,
                "sha256": self._head_digests[kind],
            }
            for kind, head in self.heads.items()
        }
        return {
            "model": self.config.model,
            "revision": self.config.revision,
            "commit_hash": getattr(self.model.config, "_commit_hash", None),
            "model_class": type(self.model).__name__,
            "tag": self.tag,
            "dim": self.dim,
            "context": self.context,
            "input_size": self.input_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
            "batch_size": self.batch_size,
            "heads": heads,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise max(100 x cosine, 0) of image and text embeddings, float32: torchmetrics' CLIPScore per pair."""
    a, b = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape} image embeddings against {b.shape} text embeddings")
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cosine = (a * b).sum(axis=-1) / np.maximum(norms, np.float32(1e-12))
    return np.maximum(100 * cosine, 0).astype(np.float32)
