"""How later stages see dedup: a `SampleFilter`. Non-kept samples become `skipped` rows (reason `duplicate`), and
the dedup shard's outcome joins the input's lineage, so a redone dedup redoes exactly the shards whose removed
samples changed. Stages read it through `curation.stage.InputView`, never directly."""

from __future__ import annotations

from typing import Any

from curation.shards import StageDir
from curation.stage import KeepFlags

DUPLICATE = "duplicate"


class DuplicateFilter(KeepFlags):
    reason = DUPLICATE
    keep_option = "include_duplicates"
    columns = ["group"]

    def folder(self) -> StageDir:
        return self.layout.dedup

    def why(self, row: dict[str, Any]) -> str:
        return f"duplicate of {row['group']}"

    def stale(self, shard: str) -> str:
        return "run `curation dedup` first, or pass --include-duplicates"
