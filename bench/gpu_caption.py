"""Caption throughput of the stage's own code at LLaVA-1.5-7B shapes on one GPU, against naive `generate`.

Run on a CUDA machine (about 4 min, no downloads):     PYTHONPATH=. python3 bench/gpu_caption.py
CPU smoke run of the same code at tiny shapes (< 60 s): TINY=1 .venv/bin/python bench/gpu_caption.py
(bench/device_run.sh runs it with bench/gpu_features.py in one call on a device machine.)

The model is built once, in bf16 with random weights directly on the GPU, at llava-1.5-7b's shapes (CLIP
ViT-L/14-336 + Llama-2-7B, as in ../shared/bench/gpu_baseline.py), and handed to `Captioner.from_loaded`. The
processor is the tiny BPE tokenizer and chat template of `curation.tiny.llava` with a 336 px CLIP image processor
and patch 14, so every prompt carries 576 image tokens as llava-1.5's does. Each generation is forced to exactly
`new_tokens` tokens. One JSON line per figure, named by "what", each with the device, the versions and the batch:

  env, build          the plan; parameters, build time, prompt length
  auto_batch          the batch size and cache a Captioner picks with neither given (free memory, model shapes)
  naive_generate      model.generate on already preprocessed tensors, dynamic cache: the baseline, per batch
  captioner           Captioner.caption (processor + generate + text decode) per batch and cache_implementation;
                      static lines carry `identical_to_dynamic`, the share of their captions equal to the
                      dynamic-cache path's on the same images
  model_only, stage   Captioner.caption on decoded images vs CaptionWorker.process on an images/ shard of COCO JPEGs
                      (tar read, threaded decode and processor, model, shard write); `ratio` = stage / model-only
  <what>_failed       a configuration that did not run (out of memory...), with the reason

Each configuration is called once to warm up (the static cache compiles there: `first_call_s`) and timed once.
The largest static batch runs last, after the stage, since each batch size compiles its own CUDA graphs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from curation.caption.model import CaptionConfig, Captioner
from curation.caption.stage import CaptionStageConfig, CaptionWorker
from curation.imaging import decode_image, header_size
from curation.layout import Layout
from curation.records import Sample, count_statuses, samples_to_table
from curation.shards import DoneMarker, ShardWriter, StageDir, config_hash, lineage

REPO = Path(__file__).resolve().parents[1]
# ../shared does not travel to a device machine: the photos go there copied into bench/.data (see device_run.sh).
CARRIED = REPO / "bench" / ".data" / "coco"
COCO = CARRIED if CARRIED.is_dir() else REPO.parent / "shared" / "data" / "coco"
MODEL_NAME = "random-init/llava-1.5-7b-shapes"  # names the handed-in model in provenance; nothing is loaded
IMAGE_SIZE, PATCH_SIZE = 336, 14  # CLIP ViT-L/14-336: (336 / 14)^2 = 576 image tokens
TEXT_VOCAB = 32064  # llava-1.5's padded Llama vocabulary; ids past the tiny tokenizer's decode to nothing


@dataclass(frozen=True)
class Plan:
    new_tokens: int
    dynamic_batches: tuple[int, ...]  # naive generate and Captioner with the dynamic cache
    static_batches: tuple[int, ...]  # Captioner with cache_implementation="static"; first one also feeds the stage
    stage_samples: int


PLANS = {
    # The baseline doc: naive 16.4 img/s at 128 (107 GiB peak), static 26.8 at 128, 27.7 at 192; 256 ran out.
    "gpu": Plan(new_tokens=128, dynamic_batches=(128,), static_batches=(128, 192), stage_samples=256),
    "tiny": Plan(new_tokens=8, dynamic_batches=(2,), static_batches=(2, 3), stage_samples=8),
}
CONTEXT: dict[str, Any] = {}  # device and versions, on every line


def emit(**fields: Any) -> None:
    print(json.dumps(CONTEXT | fields), flush=True)


class Device:
    """Synchronisation and memory figures, no-ops on the CPU."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cuda = name.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def fresh(self, *, drop_compiled: bool = False) -> None:
        """Free what the previous configuration left, so each peak is its own."""
        gc.collect()
        if drop_compiled:
            # CUDA graphs of the previous static batch keep a private memory pool until dynamo is reset; the
            # baseline's batch 256 ran out of memory on 32 GiB reserved that way.
            torch._dynamo.reset()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict[str, float | None]:
        if not self.cuda:
            return {"peak_mem_gb": None, "reserved_gb": None}
        return {
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            "reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 1),
        }


def timed(dev: Device, fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(first call s, second call s, second result): one warm-up call, then one measured call."""
    t0 = time.perf_counter()
    fn()
    dev.sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fn()
    dev.sync()
    return first, time.perf_counter() - t0, out


def attempt(what: str, fields: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run one configuration and print its line; a failure (out of memory...) is printed as data, the run goes on."""
    try:
        figures = fn()
    except Exception as exc:  # noqa: BLE001 - every configuration gets its line; the next one still runs
        emit(what=f"{what}_failed", **fields, why=f"{type(exc).__name__}: {exc}"[:500])
        return None
    line = {"what": what, **fields, **figures}
    emit(**line)
    return line


def build_processor(tmp: Path) -> Any:
    """The tiny checkpoint's BPE tokenizer and chat template with llava-1.5's 336 px image processor."""
    from transformers import AutoProcessor, CLIPImageProcessorPil, LlavaProcessor

    from curation.tiny.llava import build_tiny_llava

    tiny = AutoProcessor.from_pretrained(build_tiny_llava(tmp / "tiny-llava"))
    tokenizer = tiny.tokenizer
    tokenizer.model_max_length = 4096  # prompts carry 576 image tokens, past the tiny checkpoint's 512
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tiny.chat_template,
    )


def build_model(tiny: bool, tokenizer: Any, dev: Device, dtype: torch.dtype) -> Any:
    """LLaVA-1.5 with random weights, initialised directly on the device (no 14 GB host copy or checkpoint)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision |= dict(projection_dim=32)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        text |= dict(num_key_value_heads=4)
    else:  # llava-1.5-7b: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2-7B shapes)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        vision |= dict(projection_dim=768, hidden_act="quick_gelu")
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
        text |= dict(num_key_value_heads=32)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        text_config=LlamaConfig(
            **text,
            vocab_size=TEXT_VOCAB,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            # The tokenizer's ids, so generate() stops and pads with the tokens the captioner decodes.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        # Must be the processor's <image> id, or the image features have nowhere to go.
        image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev.name):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def caption_config(plan: Plan, batch: int | None, cache: str | None) -> CaptionConfig:
    n = plan.new_tokens
    return CaptionConfig(
        model=MODEL_NAME, max_new_tokens=n, min_new_tokens=n, batch_size=batch, cache_implementation=cache
    )


def write_images_shard(out: Path, blobs: list[bytes], captions: list[str] | None = None) -> str:
    """An images/ shard of the given JPEGs (and original captions) as ingest writes one (tar, index, done marker).

    Written here rather than through ingest's sources, so a device machine needs no source listing code.
    """
    shard, samples = "00000", []
    with ShardWriter(StageDir(f"{out}/images"), shard) as writer:
        for i, blob in enumerate(blobs):
            caption = captions[i] if captions else None
            sample = Sample(key=f"coco_{i:05d}", source="bench", source_id=str(i), ext="jpg", original_caption=caption)
            sample.set_size(*header_size(blob))
            samples.append(sample)
            writer.add(sample.key, {"jpg": blob, "json": sample.to_json()})
        done = DoneMarker(
            shard, stage="images", **lineage(config_hash({"bench": len(blobs)}), None), counts=count_statuses(samples)
        )
        writer.commit(samples_to_table(samples), done)
    return shard


def main() -> None:
    tiny = os.environ.get("TINY") == "1"  # CPU smoke run of this script itself, as in ../shared/bench
    plan = PLANS["tiny" if tiny else "gpu"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dynamic-batches", default=",".join(map(str, plan.dynamic_batches)))
    parser.add_argument("--static-batches", default=",".join(map(str, plan.static_batches)))
    parser.add_argument("--stage-samples", type=int, default=plan.stage_samples)
    args = parser.parse_args()

    def batches(text: str) -> tuple[int, ...]:
        return tuple(int(b) for b in text.split(",") if b)

    plan = Plan(plan.new_tokens, batches(args.dynamic_batches), batches(args.static_batches), args.stage_samples)
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with TINY=1 for the CPU smoke run")
    dev = Device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16

    import transformers

    CONTEXT.update(
        device=torch.cuda.get_device_name(0) if dev.cuda else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    emit(what="env", tiny=tiny, plan=asdict(plan))
    with tempfile.TemporaryDirectory(prefix="gpu-caption-") as tmp_dir:
        tmp = Path(tmp_dir)
        t0 = time.perf_counter()
        processor = build_processor(tmp)
        model = build_model(tiny, processor.tokenizer, dev, dtype)
        dev.sync()
        build_s = time.perf_counter() - t0
        # With neither batch nor cache given, as a user who passes no flag: the pick, and the prompt and input size.
        probe = Captioner.from_loaded(caption_config(plan, None, None), model, processor)
        emit(
            what="auto_batch",
            batch=probe.batch_size,
            cache=probe.cache_implementation,
            free_gb=round(torch.cuda.mem_get_info()[0] / 2**30, 1) if dev.cuda else None,
        )
        n_images = max(plan.stage_samples, *plan.dynamic_batches, *plan.static_batches)
        files = sorted(COCO.glob("*.jpg"))
        if not files:
            raise SystemExit(f"no COCO photos in {COCO}")
        blobs = [files[i % len(files)].read_bytes() for i in range(n_images)]
        # Decoded as the stage decodes them (draft-mode JPEG decode down to the model's input size).
        images = [decode_image(b, target_size=probe.input_size) for b in blobs]
        prompt_text = probe.format_prompt(probe.config.prompt)
        prompt_tokens = len(processor(images=images[:1], text=[prompt_text])["input_ids"][0])
        emit(
            what="build",
            params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            build_s=round(build_s, 1),
            attn=model.config._attn_implementation,
            image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
            prompt_tokens=prompt_tokens,
            new_tokens=plan.new_tokens,
        )

        naive_ips: dict[int, float] = {}

        def naive(batch: int) -> dict[str, Any]:
            dev.fresh()
            inputs = processor(images=images[:batch], text=[prompt_text] * batch, return_tensors="pt", padding=True)
            inputs = inputs.to(dev.name)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            new = plan.new_tokens

            def call() -> Any:
                with torch.inference_mode():
                    return model.generate(
                        **inputs,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        pad_token_id=processor.tokenizer.pad_token_id,
                    )

            first, s, out = timed(dev, call)
            produced = out.shape[1] - inputs["input_ids"].shape[1]
            naive_ips[batch] = batch / s
            return dict(
                new_tokens=produced,
                first_call_s=round(first, 2),
                s_per_batch=round(s, 3),
                images_per_s=round(batch / s, 2),
                out_tokens_per_s=round(batch * produced / s, 1),
                **dev.memory(),
            )

        dynamic_texts: list[str] = []  # the dynamic-cache path's captions of images[:len]

        def dynamic_reference(n: int) -> list[str]:
            if len(dynamic_texts) < n:
                cap = Captioner.from_loaded(caption_config(plan, plan.dynamic_batches[-1], "dynamic"), model, processor)
                dynamic_texts.extend(r.text for r in cap.caption(images[len(dynamic_texts) : n]))
            return dynamic_texts[:n]

        def captioner(batch: int, cache: str, *, drop_compiled: bool = False) -> dict[str, Any]:
            dev.fresh(drop_compiled=drop_compiled)
            cap = Captioner.from_loaded(caption_config(plan, batch, cache), model, processor)
            first, s, results = timed(dev, lambda: cap.caption(images[:batch]))
            texts = [r.text for r in results]
            if cache == "dynamic" and len(texts) > len(dynamic_texts):
                dynamic_texts[:] = texts
            tokens = sum(r.new_tokens for r in results)
            figures = dict(
                first_call_s=round(first, 2),
                s_per_batch=round(s, 3),
                images_per_s=round(batch / s, 2),
                out_tokens_per_s=round(tokens / s, 1),
                mean_new_tokens=round(tokens / batch, 1),
                **dev.memory(),
            )
            if batch in naive_ips:
                figures["vs_naive"] = round(batch / s / naive_ips[batch], 3)
            if cache != "dynamic":
                same = sum(a == b for a, b in zip(texts, dynamic_reference(batch), strict=True))
                figures["identical_to_dynamic"] = round(same / batch, 3)
            return figures

        measured = []
        for b in plan.dynamic_batches:
            attempt("naive_generate", {"batch": b, "cache": "dynamic"}, lambda b=b: naive(b))
            measured.append(attempt("captioner", {"batch": b, "cache": "dynamic"}, lambda b=b: captioner(b, "dynamic")))
        static_first, *static_rest = plan.static_batches or (None,)
        if static_first is not None:
            fields = {"batch": static_first, "cache": "static"}
            measured.append(attempt("captioner", fields, lambda: captioner(static_first, "static")))

        # The stage against model-only, with the fastest configuration so far (already warm, compiled if static).
        ok = [m for m in measured if m is not None]
        if ok:
            best = max(ok, key=lambda m: m["images_per_s"])
            config = caption_config(plan, best["batch"], best["cache"])
            fields = {"samples": plan.stage_samples, "batch": best["batch"], "cache": best["cache"]}

            def stage_vs_model() -> dict[str, Any]:
                cap = Captioner.from_loaded(config, model, processor)
                n = plan.stage_samples
                t0 = time.perf_counter()
                cap.caption(images[:n])
                dev.sync()
                model_s = time.perf_counter() - t0
                emit(what="model_only", **fields, s=round(model_s, 2), images_per_s=round(n / model_s, 2))

                out = tmp / "out"
                shard = write_images_shard(out, blobs[:n])
                stage = CaptionWorker(Layout(str(out)), CaptionStageConfig(model=config))
                stage.captioner = cap  # the loaded model, handed in: setup() then only records provenance
                stage.setup()
                t0 = time.perf_counter()
                done = stage.process(shard)
                dev.sync()
                stage_s = time.perf_counter() - t0
                captioned = sum(done.counts["by_caption_status"].values())
                if captioned != n or done.counts["by_status"] != {"ok": n}:
                    raise RuntimeError(f"stage captioned {captioned} of {n}: {done.counts['by_status']}")
                return dict(
                    s=round(stage_s, 2),
                    images_per_s=round(n / stage_s, 2),
                    ratio=round(model_s / stage_s, 3),
                    goal=0.9,
                    decode_threads=stage.config.decode_threads,
                    captioned=captioned,
                )

            attempt("stage", fields, stage_vs_model)

        for b in static_rest:
            attempt(
                "captioner", {"batch": b, "cache": "static"}, lambda b=b: captioner(b, "static", drop_compiled=True)
            )


if __name__ == "__main__":
    main()
