"""Source layouts. Each lists its samples cheaply on the driver; shard workers read the bytes."""

from __future__ import annotations

from collections.abc import Callable

from curation.sources.base import SourceError, SourceItem
from curation.sources.folder import list_folder
from curation.sources.img2dataset import list_img2dataset
from curation.sources.journeydb import list_journeydb
from curation.sources.sa1b import list_sa1b

# The registry also feeds the CLI's --source choices.
SOURCES: dict[str, Callable[[str], list[SourceItem]]] = {
    "folder": list_folder,
    "sa1b": list_sa1b,
    "img2dataset": list_img2dataset,
    "journeydb": list_journeydb,
}


def list_source(name: str, input_url: str) -> list[SourceItem]:
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r}; choose from {sorted(SOURCES)}")
    items = SOURCES[name](input_url)
    if not items:
        raise SourceError(f"no images found for source {name!r} under {input_url}")
    return items


__all__ = ["SOURCES", "SourceError", "SourceItem", "list_source"]
