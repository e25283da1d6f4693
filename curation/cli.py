"""`curation <stage> ...`: a thin CLI over the stage modules. Every stage is resumable: rerun the same command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

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
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    return parser


@command("ingest")
def _ingest(args: argparse.Namespace) -> int:
    from curation.ingest import IngestConfig, run_ingest

    config = IngestConfig(source=args.source, input=args.input, shard_size=args.shard_size)
    summary = run_ingest(
        args.output, config, ray_address=args.ray_address, force=args.force, progress=not args.no_progress
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
