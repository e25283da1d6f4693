"""LLaVA captioner: a model stage holding AutoProcessor and the image-text-to-text model, loaded in setup().

Works with any LLaVA-1.5 or LLaVA-NeXT checkpoint (Hub id or local folder), e.g. `llava-hf/llava-1.5-7b-hf`,
and with the tiny random checkpoint from `curation.tiny.llava.build_tiny_llava`. `Captioner.from_loaded` wraps a
model already in memory instead (bench/gpu_caption.py builds LLaVA-1.5-7B shapes with random weights on the GPU).
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curation.caption.quality import caption_status

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_PROMPT = "Describe this image and its style in a very detailed manner"  # PixArt-alpha's prompt


@dataclass(frozen=True)
class CaptionConfig:
    model: str
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 128
    batch_size: int = 8
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    revision: str | None = None
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default alone
    seed: int = 0  # reseeded before each generate() call when do_sample, so a rerun gives the same text
    # Speed lever passed to generate(): "static" preallocates the KV cache, and transformers then compiles the
    # decode step (torch.compile, CUDA graphs) on CUDA only. Off by default: the first call per batch shape pays
    # a compile (~35 s at 7B), and a new batch size (a shard's short last batch) compiles again.
    cache_implementation: str | None = None


@dataclass(frozen=True, slots=True)
class CaptionResult:
    text: str
    status: str  # see curation.caption.quality
    new_tokens: int  # generated tokens before EOS (EOS and padding not counted)


class Captioner:
    """Batched LLaVA captioning. Greedy batched output equals one-by-one output (left padding)."""

    def __init__(self, config: CaptionConfig) -> None:
        self.config = config
        self.processor: Any = None
        self.model: Any = None
        self.device: str | None = None
        self.dtype: Any = None
        self._prompt_text: str | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._handed_in = False  # model came through from_loaded(), not from_pretrained(config.model)

    @classmethod
    def from_loaded(cls, config: CaptionConfig, model: Any, processor: Any) -> Captioner:
        """A ready captioner around a LLaVA model and processor already in memory (no from_pretrained, no disk).

        The model keeps its device and dtype; `config.device` and `num_threads` are not applied, and
        `config.model` only names the model in provenance. The processor's tokenizer is switched to left padding.
        """
        captioner = cls(config)
        captioner._adopt(model, processor, device=str(model.device), dtype=model.dtype)
        captioner._handed_in = True
        return captioner

    def setup(self) -> None:
        if self.model is not None:  # already loaded (from_loaded, or setup twice): heavy state loads once
            return
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        cfg = self.config
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # bf16 is what LLaVA was trained in; CPUs without fast bf16 kernels are far quicker in fp32.
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        processor = AutoProcessor.from_pretrained(cfg.model, revision=cfg.revision)
        # The Auto class resolves LLaVA-1.5 to LlavaForConditionalGeneration and NeXT to its own class.
        model = AutoModelForImageTextToText.from_pretrained(
            cfg.model, revision=cfg.revision, dtype=dtype, attn_implementation="sdpa"
        ).to(device)
        self._adopt(model, processor, device=device, dtype=dtype)

    def _adopt(self, model: Any, processor: Any, *, device: str, dtype: Any) -> None:
        self.model, self.processor = model.eval(), processor
        # Decoder-only generation appends on the right, so prompts of different lengths pad on the left.
        self.processor.tokenizer.padding_side = "left"
        self.device, self.dtype = device, dtype
        self._prompt_text = self.format_prompt(self.config.prompt)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else eos)

    def format_prompt(self, prompt: str) -> str:
        """The prompt wrapped in the checkpoint's chat template (one image + text user turn)."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    @property
    def input_size(self) -> tuple[int, int]:
        """Smallest (width, height) worth decoding for this model: pass as decode_image(target_size=...)."""
        ip = self.processor.image_processor
        pinpoints = getattr(ip, "image_grid_pinpoints", None)
        if pinpoints:  # LLaVA-NeXT tiles the image up to its largest grid resolution
            side = max(max(p) for p in pinpoints)
            return side, side
        crop = getattr(ip, "crop_size", None) or {}
        size = getattr(ip, "size", None) or {}
        side = max(
            crop.get("height", 0),
            crop.get("width", 0),
            size.get("shortest_edge", 0),
            size.get("height", 0),
            size.get("width", 0),
        )
        return side, side

    def caption(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> list[CaptionResult]:
        """Caption RGB images in sub-batches of batch_size; `prompts` optionally sets one prompt per image."""
        if self.model is None:
            raise RuntimeError("Captioner.setup() must be called before caption()")
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        if prompts is None:
            texts = [self._prompt_text] * len(images)
        else:
            texts = [self.format_prompt(p) for p in prompts]
        results: list[CaptionResult] = []
        step = self.config.batch_size
        for start in range(0, len(images), step):
            results.extend(self._generate(list(images[start : start + step]), texts[start : start + step]))
        return results

    def _generate(self, images: list[Image.Image], texts: list[str]) -> list[CaptionResult]:
        import torch

        cfg = self.config
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens,
            do_sample=cfg.do_sample,
            num_beams=cfg.num_beams,
            repetition_penalty=cfg.repetition_penalty,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        if cfg.cache_implementation is not None:  # None leaves the model's generation_config in charge
            kwargs["cache_implementation"] = cfg.cache_implementation
        if cfg.do_sample:  # passing them to greedy search only earns a warning
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
            torch.manual_seed(cfg.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        results = []
        for row in new:
            stop = next((i for i, t in enumerate(row) if t in self._eos_ids), None)
            tokens = row if stop is None else row[:stop]
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            status = caption_status(text, len(tokens), cfg.max_new_tokens, hit_eos=stop is not None)
            results.append(CaptionResult(text=text, status=status, new_tokens=len(tokens)))
        return results

    def provenance(self) -> dict[str, Any]:
        """What produced the captions: model, resolved commit, prompt, generation parameters, versions."""
        import torch
        import transformers

        return {
            "model": self.config.model,
            "revision": self.config.revision,
            "commit_hash": self._commit_hash(),
            "model_class": type(self.model).__name__ if self.model is not None else None,
            "prompt": self.config.prompt,
            "prompt_text": self._prompt_text,
            "generation": {
                f.name: getattr(self.config, f.name)
                for f in dataclasses.fields(self.config)
                if f.name not in ("model", "revision", "prompt", "device", "num_threads", "batch_size")
            },
            "batch_size": self.config.batch_size,
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
            "device": self.device,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }

    def _commit_hash(self) -> str | None:
        if self.model is None or Path(self.config.model).is_dir():
            return None  # a local folder has no commit
        known = getattr(self.model.config, "_commit_hash", None)
        if known:
            return known
        if self._handed_in:
            return None  # config.model need not name a Hub repo: nothing to look up
        from transformers.utils.hub import cached_file, extract_commit_hash

        try:  # from_pretrained already cached config.json under snapshots/<commit>/
            resolved = cached_file(
                self.config.model, "config.json", revision=self.config.revision, local_files_only=True
            )
        except OSError:
            return None
        return extract_commit_hash(resolved, None)
