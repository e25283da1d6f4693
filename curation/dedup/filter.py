"""How later stages see dedup: a `SampleFilter`. Non-kept samples become `skipped` rows (reason `duplicate`), and
the dedup shard's outcome joins the input's lineage, so a redone dedup redoes exactly the shards whose removed
samples changed. Stages read it through their `Stage.input_view`, never directly."""

from __future__ import annotations

from typing import Any

from curation.shards import StageDir
from curation.stage import KeepFlags

DUPLICATE = "duplicate"


class DuplicateFilter(KeepFlags):
    reasons = (DUPLICATE,)
    applies_after = "dedup"
    columns = ("group",)  # dedup's index names the kept member; the reason is always the same

    def folder(self) -> StageDir:
        return self.layout.dedup

    def entry(self, row: dict[str, Any]) -> tuple[str, str]:
        return DUPLICATE, f"duplicate of {row['group']}"
