"""`curation <stage> ...`: a thin CLI over the stage modules. Every stage is resumable: rerun the same command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from curation.caption.model import DEFAULT_PROMPT
from curation.caption.stage import DEFAULT_MODEL
from curation.features.stage import DEFAULT_T5, DEFAULT_VAE
from curation.runner import SetupError
from curation.sources import SOURCES, SourceError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="output folder or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address; default: an embedded local Ray")
    p.add_argument("--force", action="store_true", help="redo shards that were made with a different config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curation", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="a source layout -> images/ shards with sizes and aspect-ratio buckets")
    _common(p)
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--input", required=True, help="input folder, archive or fsspec URL")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per output shard (default 1000)")
    p.add_argument("--workers", type=int, default=None, help="tasks at once (default: one per CPU of the cluster)")
    p = sub.add_parser("dedup", help="images/ -> dedup/: exact and near-duplicate groups, one kept member each")
    _common(p)
    p.add_argument("--threshold", type=int, default=8, help="pHash Hamming distance counted as duplicate (default 8)")

    p = sub.add_parser("caption", help="images/ -> captions/ with LLaVA (the PixArt-alpha prompt by default)")
    _common(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default {DEFAULT_MODEL})")
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="str.format template; {original} is the original caption")
    p.add_argument("--name", default="default", help="caption set [a-z0-9_]+ (default: captions/, else captions-NAME/)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on the CPU, what fits on a GPU")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed for --do-sample")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--workers", type=int, default=None, help="actors (default: one per GPU, or per CPU without)")
    p.add_argument("--decode-threads", type=int, default=None, help="CPU decode threads per actor")
    _include_duplicates(p)

    p = sub.add_parser("stats", help="concept density (PixArt-alpha Table 1) of caption shards or a caption corpus")
    p.add_argument("--output", required=True, help="the run's output (reads captions/), or where a corpus report goes")
    p.add_argument("--field", choices=["caption", "original", "both"], default="both")
    p.add_argument("--captions", default=None, help="a caption corpus instead: JSONL or parquet, one caption per image")
    p.add_argument("--name", default=None, help="dataset name in the table")
    p.add_argument("--column", default="caption", help="the corpus's caption field or column")
    p.add_argument("--valid-threshold", type=int, default=10, help="valid nouns appear more than this many times")
    p.add_argument(
        "--compare", nargs="+", default=(), metavar="OTHER", help="other outputs (stats run) or caption corpora"
    )
    _include_duplicates(p)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("features", help="captions/ -> T5 text features and VAE latents in sidecar shards")
    _common(p)
    _feature_args(p)
    _include_duplicates(p)

    p = sub.add_parser("export-pixart", help="feature shards -> PixArt-alpha's or Sigma's InternData/InternImgs layout")
    p.add_argument("--output", required=True, help="the run's output folder")
    p.add_argument("--to", required=True, help="the InternData folder to write (its path must name InternData once)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--multiscale", action="store_true", help="export the multi-scale (bucketed) latents")
    p.add_argument("--format", choices=["alpha", "sigma"], default="alpha", help="PixArt-alpha or PixArt-Sigma layout")
    p.add_argument("--prompt-field", default="original", help="Sigma: the `prompt` caption (original or a set name)")
    p.add_argument("--sharegpt4v-field", default="default", help="Sigma: the `sharegpt4v` caption (a set name)")
    p.add_argument("--vae-tag", default=None, help="read the VAE sidecars vae512-TAG (e.g. sdxl for Sigma)")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--no-progress", action="store_true")
    _include_duplicates(p)

    p = sub.add_parser("run", help="ingest -> dedup -> caption -> stats -> features in one go, each stage resumable")
    _common(p)
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--input", required=True)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--caption-model", default=DEFAULT_MODEL, help=f"LLaVA Hub id or folder (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--caption-batch-size", type=int, default=None, help="default: 8 on the CPU, what fits on a GPU")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-dedup", action="store_true", help="no dedup pass before captioning")
    p.add_argument("--dedup-threshold", type=int, default=8, help="pHash Hamming distance counted as duplicate")
    _feature_args(p)

    p = sub.add_parser("make-tiny-models", help="build tiny random LLaVA, T5 and VAE checkpoints (tests, demo)")
    p.add_argument("folder")
    return parser


def _include_duplicates(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--include-duplicates", action="store_true", help="also process the samples dedup removes (default: skip them)"
    )


def _feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t5", default=DEFAULT_T5, help=f"T5 encoder Hub id or folder (default {DEFAULT_T5})")
    p.add_argument("--max-length", type=int, default=120, help="T5 tokens (120 for PixArt-alpha, 300 for Sigma)")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"AutoencoderKL Hub id or folder (default {DEFAULT_VAE})")
    p.add_argument("--resolutions", default="256,512,1024", help="comma-separated bucket bases")
    p.add_argument("--multiscale", action="store_true", help="latents at each image's aspect-ratio bucket")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="T5 feature storage")
    p.add_argument(
        "--field", default="caption", help="text to encode: caption (the default set), original, or a set name"
    )
    p.add_argument("--vae-tag", default=None, help="names the VAE sidecars vae512-TAG (e.g. sdxl for Sigma's VAE)")
    p.add_argument("--feature-device", default="auto", choices=["auto", "cuda", "cpu"])


def _features_config(args: argparse.Namespace):
    from curation.features.stage import FeaturesConfig

    return FeaturesConfig(
        t5=args.t5,
        vae=args.vae,
        max_length=args.max_length,
        resolutions=tuple(int(r) for r in args.resolutions.split(",") if r.strip()),
        multiscale=args.multiscale,
        dtype=args.dtype,
        field=args.field,
        vae_tag=args.vae_tag,
        device=args.feature_device,
        include_duplicates=getattr(args, "include_duplicates", False),
    )


@command("features")
def _features(args: argparse.Namespace) -> int:
    from curation.features.stage import run_features

    summary = run_features(
        args.output,
        _features_config(args),
        ray_address=args.ray_address,
        force=args.force,
        progress=not args.no_progress,
    )
    _print_summary(summary)
    print(f"features: {args.output.rstrip('/')}/features/")
    return 0


@command("export-pixart")
def _export_pixart(args: argparse.Namespace) -> int:
    from curation.export.pixart import export_pixart, index_dir

    counts = export_pixart(
        args.output,
        args.to,
        args.resolution,
        args.multiscale,
        format=args.format,
        prompt_field=args.prompt_field,
        sharegpt4v_field=args.sharegpt4v_field,
        vae_tag=args.vae_tag,
        include_duplicates=args.include_duplicates,
        ray_address=args.ray_address,
        progress=not args.no_progress,
    )
    print("[export-pixart] " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    index = index_dir(args.multiscale, args.format)
    print(f"PixArt InternData: {args.to} (index: one JSON file per shard in {index}/, pass them all as the list)")
    return 0


@command("run")
def _run(args: argparse.Namespace) -> int:
    from curation.caption.model import CaptionConfig
    from curation.caption.stage import CaptionStageConfig
    from curation.dedup.stage import DedupConfig
    from curation.ingest import IngestConfig
    from curation.pipeline import run_pipeline
    from curation.stats.stage import StatsConfig

    caption = CaptionStageConfig(
        model=CaptionConfig(
            model=args.caption_model,
            prompt=args.prompt,
            batch_size=args.caption_batch_size,
            max_new_tokens=args.max_new_tokens,
        )
    )
    summaries, report = run_pipeline(
        args.output,
        IngestConfig(source=args.source, input=args.input, shard_size=args.shard_size),
        caption,
        StatsConfig(),
        _features_config(args),
        ray_address=args.ray_address,
        force=args.force,
        progress=not args.no_progress,
        dedup=None if args.no_dedup else DedupConfig(threshold=args.dedup_threshold),
    )
    for summary in summaries:
        _print_summary(summary)
    print(f"output: {args.output}\nreport: {report}")
    return 0


@command("make-tiny-models")
def _make_tiny_models(args: argparse.Namespace) -> int:
    from curation.tiny import make_tiny_models

    for name, path in make_tiny_models(args.folder).items():
        print(f"{name}: {path}")
    return 0


@command("caption")
def _caption(args: argparse.Namespace) -> int:
    from curation.caption.model import CaptionConfig
    from curation.caption.stage import CaptionStageConfig, run_caption

    model = CaptionConfig(
        model=args.model,
        revision=args.revision,
        prompt=args.prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        device=args.device,
    )
    config = CaptionStageConfig(
        model=model, workers=args.workers, include_duplicates=args.include_duplicates, name=args.name
    )
    if args.decode_threads:
        config = dataclasses.replace(config, decode_threads=args.decode_threads)
    summary = run_caption(
        args.output, config, ray_address=args.ray_address, force=args.force, progress=not args.no_progress
    )
    _print_summary(summary)
    print(f"captions: {args.output.rstrip('/')}/{config.folder}/")
    return 0


@command("stats")
def _stats(args: argparse.Namespace) -> int:
    from curation.stats.stage import StatsConfig, run_corpus_stats, run_stats

    if args.captions:
        name = args.name or args.captions.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
        html = run_corpus_stats(
            args.captions,
            name,
            args.output,
            column=args.column,
            valid_threshold=args.valid_threshold,
            compare=tuple(args.compare),
        )
    else:
        fields = ("caption", "original") if args.field == "both" else (args.field,)
        config = StatsConfig(
            fields=fields,
            valid_threshold=args.valid_threshold,
            name=args.name,
            include_duplicates=args.include_duplicates,
            compare=tuple(args.compare),
        )
        summary, html = run_stats(args.output, config, ray_address=args.ray_address, progress=not args.no_progress)
        _print_summary(summary)
    report = str(html).rsplit("/", 1)[0]
    print(open_table(report))
    print(f"report: {html}")
    return 0


def open_table(report_dir: str) -> str:
    import fsspec

    with fsspec.open(f"{report_dir}/table1.md", "rt", encoding="utf-8") as fh:
        return fh.read()


@command("dedup")
def _dedup(args: argparse.Namespace) -> int:
    from curation.dedup.stage import DedupConfig, run_dedup

    result = run_dedup(
        args.output,
        DedupConfig(threshold=args.threshold),
        ray_address=args.ray_address,
        force=args.force,
        progress=not args.no_progress,
    )
    _print_summary(result)
    print(f"dedup: {args.output.rstrip('/')}/dedup/\nreport: {args.output.rstrip('/')}/report/duplicates.html")
    return 0


@command("ingest")
def _ingest(args: argparse.Namespace) -> int:
    from curation.ingest import IngestConfig, run_ingest

    config = IngestConfig(source=args.source, input=args.input, shard_size=args.shard_size)
    summary = run_ingest(
        args.output,
        config,
        ray_address=args.ray_address,
        force=args.force,
        progress=not args.no_progress,
        workers=args.workers,
    )
    _print_summary(summary)
    print(f"images: {args.output.rstrip('/')}/images/")
    return 0


def _print_summary(summary) -> None:
    for line in summary.lines():
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (SetupError, SourceError, FileNotFoundError, ValueError) as exc:
        # Setup problems are the user's to fix: one clear line, no traceback dump.
        print(f"curation {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
