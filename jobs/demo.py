"""`make demo`: the whole pipeline on the bundled sample images, with tiny random models built offline.

    python -m jobs.demo [--output demo-output]

Two source layouts (a captioned folder and an img2dataset/LAION tar) go through ingest -> caption -> stats ->
features (the LAION one also through quality: CLIP embeddings, aesthetic, NSFW and clip scores); the LAION output
then gets a second caption set (a prompt templated with the alt-text), Table 1 with
a row per caption set, Σ's features (300 tokens, a tiny SDXL-shaped VAE), the PixArt-α and PixArt-Σ exports, one
batch of the bucket-aware loader, and Sana's webdataset export with DC-AE latents (a tiny AutoencoderDC).
The models are random and tiny, so
the captions are noise: the demo shows the machinery. The real-model command is printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from curation.caption.model import CaptionConfig
from curation.caption.stage import CaptionStageConfig, run_caption
from curation.export.pixart import export_pixart
from curation.export.sana import SanaConfig, run_export_sana
from curation.features.stage import SIGMA_MAX_LENGTH, FeaturesConfig, run_features
from curation.ingest import IngestConfig
from curation.layout import Layout
from curation.pipeline import run_pipeline
from curation.quality.model import QualityModelConfig
from curation.quality.stage import QualityStageConfig
from curation.runner import ray_session
from curation.stats.stage import StatsConfig, run_stats
from curation.tiny import make_tiny_models
from curation.tiny.vae import build_tiny_sdxl_vae

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SOURCES = [("folder", "folder", EXAMPLES / "folder"), ("laion", "img2dataset", EXAMPLES / "img2dataset")]

REAL_RUN = """\
A real run (GPU, models from the Hugging Face Hub):
  curation run --source sa1b --input /data/sa1b --output /data/sa1b-curated \\
      --caption-model llava-hf/llava-1.5-7b-hf --t5 DeepFloyd/t5-v1_1-xxl --vae stabilityai/sd-vae-ft-ema \\
      --resolutions 256,512,1024 --multiscale
  curation export-pixart --output /data/sa1b-curated --to /data/pixart/InternData --resolution 512 --multiscale
PixArt-Σ from the same output: a dense caption set, 300-token T5 features of both captions, SDXL VAE latents:
  curation caption --output /data/sa1b-curated --name dense --model llava-hf/llava-v1.6-mistral-7b-hf \\
      --prompt "Describe this image in detail. Its original caption: {original}"
  curation features --output /data/sa1b-curated --field original --max-length 300 \\
      --vae madebyollin/sdxl-vae-fp16-fix --vae-tag sdxl --resolutions 1024 --multiscale
  curation features --output /data/sa1b-curated --field dense --max-length 300 \\
      --vae madebyollin/sdxl-vae-fp16-fix --vae-tag sdxl --resolutions 1024 --multiscale
  curation export-pixart --output /data/sa1b-curated --to /data/pixart-sigma/InternData --format sigma \\
      --sharegpt4v-field dense --vae-tag sdxl --resolution 1024 --multiscale
Sana from the same output: DC-AE latents at each bucket, then its webdataset shards:
  curation features --output /data/sa1b-curated --field dense --max-length 300 \\
      --vae mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers --vae-tag dcae --resolutions 1024 --multiscale
  curation export-sana --output /data/sa1b-curated --to /data/sana --prompt-field dense --vae-tag dcae --multiscale"""
TEMPLATE = "Describe this image, knowing its alt-text: {original}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output")
    args = parser.parse_args(argv)
    out = Path(args.output).resolve()
    models = make_tiny_models(out / "models")
    caption = CaptionStageConfig(model=CaptionConfig(model=str(models["llava"]), max_new_tokens=48, batch_size=4))
    features = FeaturesConfig(t5=str(models["t5"]), vae=str(models["vae"]), resolutions=(256, 512))
    reports = {}
    with ray_session(None, num_cpus=2):
        for name, source, folder in SOURCES:
            configs = {
                "ingest": IngestConfig(source=source, input=str(folder), shard_size=4),
                "caption": caption,
                "stats": StatsConfig(name=name),
                "features": features,
            }  # dedup: its defaults
            if name == "laion":  # quality signals (tiny CLIP and heads): scores only, no threshold removes a sample
                configs["quality"] = QualityStageConfig(
                    model=QualityModelConfig(
                        str(models["clip"]), aesthetic_head=str(models["aesthetic"]), nsfw_head=str(models["nsfw"])
                    )
                )
            summaries = [result.run for result in run_pipeline(str(out / name), configs, progress=False)]
            reports[name] = Layout(str(out / name)).report("index.html")
            # Multi-scale latents too (each image at its aspect-ratio bucket): only the new sidecar is computed.
            summaries.append(
                run_features(str(out / name), dataclasses.replace(features, multiscale=True), progress=False)
            )
            print(f"\n== {name} ({source} layout, {folder.relative_to(EXAMPLES.parent)})")
            for summary in summaries:
                print("\n".join(summary.lines()))
        laion = str(out / "laion")
        print("\n== laion: a second caption set, Table 1 across sets, PixArt-Σ features")
        alttext = dataclasses.replace(
            caption, model=dataclasses.replace(caption.model, prompt=TEMPLATE), name="alttext"
        )
        print("\n".join(run_caption(laion, alttext, progress=False).lines()))
        _, reports["laion"] = run_stats(laion, StatsConfig(name="laion"), progress=False)  # counts the new set only
        sdxl = out / "models" / "sdxl-vae"
        if not (sdxl / "config.json").exists():
            build_tiny_sdxl_vae(sdxl)
        sigma = dataclasses.replace(
            features, vae=str(sdxl), vae_tag="sdxl", max_length=SIGMA_MAX_LENGTH, resolutions=(512,)
        )
        for field, multiscale in (("original", False), ("default", False), ("default", True)):
            config = dataclasses.replace(sigma, field=field, multiscale=multiscale)
            print("\n".join(run_features(laion, config, progress=False).lines()))
        pixart = out / "pixart" / "InternData"
        for multiscale in (False, True):
            counts = export_pixart(laion, pixart, 512, multiscale)
            print(f"[export-pixart alpha 512{' multiscale' if multiscale else ''}] {counts}")
        pixart_sigma = out / "pixart-sigma" / "InternData"
        for multiscale in (False, True):
            counts = export_pixart(laion, pixart_sigma, 512, multiscale, format="sigma", vae_tag="sdxl")
            print(f"[export-pixart sigma 512{' multiscale' if multiscale else ''}] {counts}")
        # Sana: DC-AE latents (32 channels, /32) at each bucket of base 512, then its webdataset layout.
        dcae = dataclasses.replace(
            features, vae=str(models["dcae"]), vae_tag="dcae", resolutions=(512,), multiscale=True
        )
        print("\n".join(run_features(laion, dcae, progress=False).lines()))
        sana = out / "sana"
        export = SanaConfig(to=str(sana), prompt_field="default", multiscale=True, vae_tag="dcae")
        print("\n".join(run_export_sana(laion, export, progress=False).lines()))
    print("\n" + _loader_batch(out / "laion"))
    print("\n" + (out / "laion" / "report" / "table1.md").read_text().split("\n## ")[0].strip())
    print(
        "\nThe captions and features above come from RANDOM TINY MODELS (built offline by "
        "`curation make-tiny-models`): they show the machinery, not caption quality."
    )
    print(f"\nOutputs under {out}:")
    for name in reports:
        print(f"  {name}: images/ captions/ stats/ features/  report: {reports[name]}")
    print(f"  PixArt-alpha layout: {pixart} (and {pixart.parent / 'InternImgs'})")
    print(f"  PixArt-Sigma layout: {pixart_sigma} (and {pixart_sigma.parent / 'InternImgs'})")
    print(f"  Sana webdataset: {sana} (data_dir; wids-meta.json, external caption files NNNNN_alttext.json)")
    print("\n" + REAL_RUN)
    # The virtualenv's own entry point, so the line works pasted into a shell that has not activated it.
    command = Path(sys.executable).parent / "curation"
    print(f"\nLook at the LAION output in a browser (then open http://127.0.0.1:8470/, Ctrl-C stops):\n"
          f"  {command} browse --output {out / 'laion'}")  # fmt: skip
    return 0


def _loader_batch(run: Path) -> str:
    """One batch of the trainer-side loader over the multi-scale sidecars: one bucket, stacked shapes."""
    from torch.utils.data import DataLoader

    from curation.loader import AspectRatioBatchSampler, FeatureDataset

    dataset = FeatureDataset(run / "features", vae="vae512ms", captions=run / "captions")
    loader = DataLoader(dataset, batch_sampler=AspectRatioBatchSampler(dataset.buckets, batch_size=2))
    batch = next(iter(loader))
    return (
        f"[loader] {len(dataset)} samples in buckets {sorted(set(dataset.buckets))}; first batch: "
        f"latent {tuple(batch['latent'].shape)}, t5 {tuple(batch['t5'].shape)}, mask {tuple(batch['mask'].shape)}"
    )


if __name__ == "__main__":
    sys.exit(main())
