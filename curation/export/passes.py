"""What every export shares: its done markers in the target, its input's lineage, and file writes.

An export is a pass of the runner like every stage: one task per `images/` shard, a done marker per shard written
last in `<target>/.curation/<pass>/` (so a kill leaves shards to resume, never a half one marked done), per-shard
logs in `OUT/logs/<pass>/`, a changed config refused without `--force`, and a shard redone when an input it was made
from (the images shard through the input view, a caption set, a feature sidecar) was redone since.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from curation.shards import StageDir, config_hash
from curation.stage import InputView

MARKERS = ".curation"  # in the target: a trainer reads its own index files and never lists this folder


@dataclass(frozen=True)
class ExportDone(StageDir):
    """An export's done markers, in the target; removing a shard removes its files in the target too."""

    target: str = ""
    outputs: tuple[str, ...] = ()  # globs relative to the target, `{shard}` filled in: the shard's own files

    @classmethod
    def at(cls, target: str, label: str, outputs: tuple[str, ...]) -> ExportDone:
        return cls(os.path.join(target, MARKERS, label), target=target, outputs=outputs)

    def remove_shard(self, shard: str) -> None:
        super().remove_shard(shard)  # the marker first: never done without its files
        for pattern in self.outputs:
            for path in Path(self.target).glob(pattern.format(shard=shard)):
                path.unlink()


class ExportInputs:
    """An export's `Upstream`: the images shard's lineage (keep flags folded in) joined with each other input's
    ("" where an input lacks the shard: a caption set that only covers some shards)."""

    def __init__(self, view: InputView, others: list[StageDir]) -> None:
        self.view, self.others = view, others

    def lineages(self, shards: list[str]) -> dict[str, str]:
        images = self.view.lineages(shards)
        return {
            s: config_hash(
                {"images": images[s], **{d.url: d.read_done(s).upstream if d.has_done(s) else "" for d in self.others}}
            )
            for s in shards
        }


def write_file(path: Path, data: bytes) -> None:
    """Write whole or not at all: a killed export leaves whole files only, and a rerun rewrites them."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
