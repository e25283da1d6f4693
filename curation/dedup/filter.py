"""How later stages see dedup: non-kept samples become `skipped` rows (reason `duplicate`), and the dedup shard's
outcome joins the input's lineage, so a redone dedup redoes exactly the shards whose removed samples changed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from curation.records import OK, Sample
from curation.shards import StageDir, config_hash

DUPLICATE = "duplicate"


class DuplicateFilter:
    """Presents a stage's input folder (`images/`, `captions/`) to the runner with dedup folded into its lineage."""

    def __init__(self, output: str, input_dir: StageDir) -> None:
        root = output.rstrip("/")
        self.input = input_dir
        self.images = StageDir(f"{root}/images")
        self.dedup = StageDir(f"{root}/dedup")

    @classmethod
    def for_stage(cls, output: str, input_dir: StageDir, include_duplicates: bool) -> DuplicateFilter | None:
        """None when duplicates are to be processed: asked for, or no dedup was run on this output."""
        if include_duplicates:
            return None
        found = cls(output, input_dir)
        return found if found.dedup.done_shards() else None

    def _marker(self, shard: str) -> dict[str, Any]:
        """The shard's dedup done marker, refused when dedup does not describe the images shard as it is now."""
        from curation.runner import SetupError

        images = self.images.read_done(shard).get("lineage", "")
        path = self.dedup.path(f"{shard}.done.json")
        marker = self.dedup.read_done(shard) if self.dedup.fs.exists(path) else None
        if marker is None or marker.get("images_lineage") != images:
            raise SetupError(
                f"{self.dedup.url} is out of date for images shard {shard} (ingested again since dedup ran): "
                "run `curation dedup` first, or pass --include-duplicates"
            )
        return marker

    def read_done(self, shard: str) -> dict[str, Any]:
        """The input shard's done marker with dedup in its lineage (unchanged where dedup removes nothing)."""
        done = self.input.read_done(shard)
        removed = self._marker(shard).get("removed_digest", "")
        if removed:
            done = {**done, "lineage": config_hash({"input": done.get("lineage", ""), "removed": removed})}
        return done

    def removed(self, shard: str) -> dict[str, str]:
        """{key: the key of the kept member of its group} for the shard's samples that dedup removes."""
        if not self._marker(shard).get("removed_digest"):
            return {}
        rows = self.dedup.read_index(shard).select(["key", "keep", "group"]).to_pylist()
        return {r["key"]: r["group"] for r in rows if r["keep"] is False}

    def skip(self, shard: str, samples: Iterable[Sample]) -> int:
        """Mark the sound samples dedup removes as skipped; returns how many."""
        removed = self.removed(shard)
        n = 0
        for s in samples:
            if s.status == OK and s.key in removed:
                s.skip(DUPLICATE, f"duplicate of {removed[s.key]}")
                n += 1
        return n
