"""How later stages see dedup: a `SampleFilter`. Non-kept samples become `skipped` rows (reason `duplicate`), and
the dedup shard's outcome joins the input's lineage, so a redone dedup redoes exactly the shards whose removed
samples changed. Stages read it through `curation.stage.InputView`, never directly."""

from __future__ import annotations

from curation.errors import SetupError
from curation.shards import DoneMarker, config_hash
from curation.stage import SampleFilter

DUPLICATE = "duplicate"


class DuplicateFilter(SampleFilter):
    reason = DUPLICATE
    keep_option = "include_duplicates"

    def active(self) -> bool:
        """Whether dedup was run on this output."""
        return bool(self.layout.dedup.done_shards())

    def _marker(self, shard: str) -> DoneMarker:
        """The shard's dedup done marker, refused when dedup does not describe the images shard as it is now."""
        images = self.layout.images.read_done(shard).upstream
        dedup = self.layout.dedup
        marker = dedup.read_done(shard) if dedup.has_done(shard) else None
        if marker is None or marker.extra.get("images_lineage") != images:
            raise SetupError(
                f"{dedup.url} is out of date for images shard {shard} (ingested again since dedup ran): "
                "run `curation dedup` first, or pass --include-duplicates"
            )
        return marker

    def lineage(self, shard: str, input_lineage: str) -> str:
        """Unchanged where dedup removes nothing from the shard."""
        removed = self._marker(shard).extra.get("removed_digest", "")
        return config_hash({"input": input_lineage, "removed": removed}) if removed else input_lineage

    def removed(self, shard: str) -> dict[str, str]:
        """{key: "duplicate of <kept key>"} for the shard's samples that dedup removes."""
        if not self._marker(shard).extra.get("removed_digest"):
            return {}
        rows = self.layout.dedup.read_index(shard).select(["key", "keep", "group"]).to_pylist()
        return {r["key"]: f"duplicate of {r['group']}" for r in rows if r["keep"] is False}
