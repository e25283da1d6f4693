"""Every stage, in pipeline order: adding a stage is its module plus one line here.

`curation <name>` runs one stage; `curation run` runs those marked for it, in this order, on one Ray session.
Entries are import paths, so `curation --help` does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from functools import cache

from curation.stage import Stage

# (import path, part of `curation run`)
STAGES: list[tuple[str, bool]] = [
    ("curation.ingest:IngestStage", True),
    ("curation.sizefilter:SizeFilterStage", False),
    ("curation.dedup.stage:DedupStage", True),
    ("curation.quality.stage:QualityStage", True),  # opt-in in `curation run`, and again after caption
    ("curation.caption.stage:CaptionStage", True),
    ("curation.stats.stage:StatsStage", True),
    ("curation.features.stage:FeaturesStage", True),
    ("curation.select:SelectStage", False),
    ("curation.export.pixart:ExportStage", False),
    ("curation.export.sana:SanaStage", False),
]


@cache
def stage_class(path: str) -> type[Stage]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def stage_classes(pipeline_only: bool = False) -> list[type[Stage]]:
    return [stage_class(path) for path, in_run in STAGES if in_run or not pipeline_only]


def get(name: str) -> type[Stage]:
    for cls in stage_classes():
        if cls.name == name:
            return cls
    raise KeyError(name)
