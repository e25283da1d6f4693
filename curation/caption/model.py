"""LLaVA captioner: a model stage holding AutoProcessor and the image-text-to-text model, loaded in setup().

Works with any LLaVA-1.5 or LLaVA-NeXT checkpoint (Hub id or local folder), e.g. `llava-hf/llava-1.5-7b-hf`, and
with Idefics3 / SmolVLM (`HuggingFaceTB/SmolVLM-Instruct`): the checkpoint's own chat template and input size; and
with the tiny random checkpoints from `curation.tiny.llava` and `curation.tiny.vlm`. `Captioner.from_loaded` wraps a
model already in memory instead (bench/gpu_caption.py builds LLaVA-1.5-7B shapes with random weights on the GPU).
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import queue
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curation.caption.quality import caption_status

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_PROMPT = "Describe this image and its style in a very detailed manner"  # PixArt-alpha's prompt
CPU_BATCH_SIZE = 8  # batch_size=None on the CPU: batching gains little there
STATIC_CACHES = ("static", "offloaded_static")  # transformers' preallocated KV caches (fixed batch shape)


@dataclass(frozen=True)
class CaptionConfig:
    model: str = field(metadata={"help": "the captioning model: a Hub id or a local folder"})
    prompt: str = field(
        default=DEFAULT_PROMPT, metadata={"help": "str.format template; {original} is the original caption"}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens generated per caption"})
    batch_size: int | None = field(
        default=None,  # None: CPU_BATCH_SIZE on the CPU, on CUDA what fits (auto_batch_size)
        metadata={"help": "images per generate() call (default: 8 on the CPU, what fits on a GPU)"},
    )
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    num_beams: int = field(default=1, metadata={"help": "beam search width (1: no beam search)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with --do-sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling's probability mass (with --do-sample)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "penalty on repeated tokens (1.0: none)"})
    min_new_tokens: int = field(default=0, metadata={"help": "fewest tokens generated per caption"})
    device: str = field(
        default="auto",  # "auto" = cuda if available, else cpu
        metadata={
            "help": "where the model runs (auto: cuda when available, else cpu)",
            "choices": ["auto", "cuda", "cpu"],
        },
    )
    revision: str | None = field(default=None, metadata={"help": "model revision (branch, tag or commit)"})
    num_threads: int | None = field(
        default=None,  # None leaves torch's default alone
        metadata={"help": "torch CPU threads per worker (default: torch's own)"},
    )
    seed: int = field(
        default=0,  # reseeded before each generate() call when do_sample, so a rerun gives the same text
        metadata={"help": "seed for --do-sample"},
    )
    # Passed to generate(): "static" preallocates the KV cache, and transformers then compiles the decode step
    # (torch.compile, CUDA graphs) on CUDA only: 1.6x naive generate at 7B, after a ~35 s compile per batch shape,
    # so a short batch is padded to the full batch shape. None: "static" on CUDA for models that compile,
    # "dynamic" elsewhere (on the CPU the static cache is not compiled and gains nothing).
    cache_implementation: str | None = field(
        default=None,
        metadata={
            "help": "generate()'s KV cache, e.g. static or dynamic (default: static on CUDA for models that "
            "compile, else dynamic)"
        },
    )


@dataclass(frozen=True, slots=True)
class CaptionResult:
    text: str
    status: str  # see curation.caption.quality
    new_tokens: int  # generated tokens before EOS (EOS and padding not counted)


@dataclass(frozen=True)
class Prepared:
    """Model inputs of one batch, made on the CPU by `Captioner.prepare` (any thread), ready for `generate`."""

    inputs: dict[str, Any]  # tensors, batch first, possibly padded past `count` rows
    count: int  # real images: rows past it are padding, and their outputs are dropped


# Peak device memory per sample over its KV cache: prefill activations come on top of a static cache (measured
# 1.16x at LLaVA-1.5-7B on an H200: 67 GiB at batch 128, 94 GiB at 192), and a dynamic cache also reallocates as
# it grows (2.0x: 107 GiB at batch 128).
_PEAK_OVER_KV = {"static": 1.25, "dynamic": 2.1}
# Share of the memory beyond the weights left unplanned: the allocator's fragmentation and the CUDA graphs'
# private pools (static batch 256 ran out of memory at 7B with 32 GiB reserved but unallocated).
_HEADROOM = 0.3
_MAX_AUTO_BATCH = 256  # larger batches no longer speed up generation at 7B (prefill-bound), only pad more


def auto_batch_size(
    free_bytes: int, weights_bytes: int, kv_bytes_per_token: int, tokens_per_sample: int, *, static: bool
) -> int:
    """Largest batch whose KV cache and activations fit beside the weights in `free_bytes`, the device memory free
    before the weights were loaded.

    A multiple of 16 when at least 16 (tensor-core tiles), at least 1, at most `_MAX_AUTO_BATCH`.
    """
    per_sample = kv_bytes_per_token * tokens_per_sample * _PEAK_OVER_KV["static" if static else "dynamic"]
    fits = int((free_bytes - weights_bytes) * (1 - _HEADROOM) / per_sample)
    if fits >= 16:
        fits -= fits % 16
    return max(1, min(fits, _MAX_AUTO_BATCH))


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
        self._idle_processors: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # The config's None resolved once the device and model are known (see CaptionConfig).
        self.batch_size: int = config.batch_size or CPU_BATCH_SIZE
        self.cache_implementation: str = config.cache_implementation or "dynamic"

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
        cuda = device.startswith("cuda")
        compiles = cuda and getattr(model, "_can_compile_fullgraph", False)
        self.cache_implementation = self.config.cache_implementation or ("static" if compiles else "dynamic")
        self.batch_size = self.config.batch_size or (self._fitting_batch_size() if cuda else CPU_BATCH_SIZE)

    def memory_shapes(self) -> tuple[int, int, int]:
        """What auto_batch_size needs of the model: (weights bytes, KV cache bytes per token, tokens per sample)."""
        from PIL import Image

        text = self.model.config.get_text_config()
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * self.dtype.itemsize  # keys and values
        # input_size is the largest input the processor tiles (LLaVA-NeXT), so this is the most image tokens.
        probe = self.processor(images=[Image.new("RGB", self.input_size)], text=[self._prompt_text])
        tokens = len(probe["input_ids"][0]) + self.config.max_new_tokens
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return weights, kv_per_token, tokens

    def _fitting_batch_size(self) -> int:
        import torch

        weights, kv_per_token, tokens = self.memory_shapes()
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        # The weights are resident already: free memory before loading them was free + weights.
        static = self.cache_implementation in STATIC_CACHES
        return auto_batch_size(free + weights, weights, kv_per_token, tokens, static=static)

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
            size.get("longest_edge", 0),  # Idefics3 / SmolVLM resize the longest edge (tiles included) to this
        )
        return side, side

    def caption(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> list[CaptionResult]:
        """Caption RGB images in sub-batches of batch_size; `prompts` optionally sets one prompt per image."""
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        results: list[CaptionResult] = []
        step = self.batch_size
        for start in range(0, len(images), step):
            chunk = None if prompts is None else prompts[start : start + step]
            results.extend(self.generate(self.prepare(images[start : start + step], chunk)))
        return results

    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> Prepared:
        """The processor's preprocessing and tokenisation of at most batch_size images, on the CPU.

        Thread-safe, so the stage runs it in its prefetch threads while the model generates. With a static cache
        a short batch is padded to batch_size with copies of its last row: a new batch shape would compile again.
        """
        import torch

        if self.model is None:
            raise RuntimeError("Captioner.setup() must be called before caption()")
        if not 0 < len(images) <= self.batch_size:
            raise ValueError(f"{len(images)} images for a batch of {self.batch_size}")
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        texts = [self._prompt_text] * len(images) if prompts is None else [self.format_prompt(p) for p in prompts]
        with self._processor() as processor:
            inputs = dict(processor(images=list(images), text=texts, return_tensors="pt", padding=True))
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        pad = self.batch_size - len(images) if self.cache_implementation in STATIC_CACHES else 0
        if pad:
            inputs = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in inputs.items()}
        if self.device.startswith("cuda"):  # page-locked, so the model thread's copy to the GPU is asynchronous
            inputs = {k: v.pin_memory() for k, v in inputs.items()}
        return Prepared(inputs, len(images))

    @contextmanager
    def _processor(self) -> Iterator[Any]:
        """A processor of its own for the calling thread: a fast tokenizer called from two threads at once raises
        "Already borrowed" (huggingface/tokenizers#537). Copies are kept for reuse, one per concurrent caller."""
        try:
            processor = self._idle_processors.get_nowait()
        except queue.Empty:
            processor = copy.deepcopy(self.processor)
        try:
            yield processor
        finally:
            self._idle_processors.put(processor)

    def generate(self, prepared: Prepared) -> list[CaptionResult]:
        """Captions of a prepared batch: its tensors to the device, generate(), the new tokens to text."""
        import torch

        cfg = self.config
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in prepared.inputs.items()}
        kwargs: dict[str, Any] = dict(
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens,
            do_sample=cfg.do_sample,
            num_beams=cfg.num_beams,
            repetition_penalty=cfg.repetition_penalty,
            pad_token_id=self.processor.tokenizer.pad_token_id,
            cache_implementation=self.cache_implementation,
        )
        if cfg.do_sample:  # passing them to greedy search only earns a warning
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
            torch.manual_seed(cfg.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new = out[: prepared.count, inputs["input_ids"].shape[1] :].tolist()
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
            }
            | {"cache_implementation": self.cache_implementation},
            "batch_size": self.batch_size,
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
