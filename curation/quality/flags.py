"""The quality stage's two keep flags, as every later stage sees them (`curation.stage.KeepFlags`).

    OUT/quality/flags-images/NNNNN.parquet   low_aesthetic, nsfw: applied from caption on
    OUT/quality/flags-texts/NNNNN.parquet    low_clip_score: applied from stats on (a caption set's scores exist
                                             only once it is captioned)

Each row: key, keep, reason (null when kept), detail (one line, null when kept). A sample without the score a
threshold reads (failed or skipped upstream, no caption in that set) is kept: nothing says it is bad.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from curation.records import OK
from curation.shards import StageDir
from curation.stage import KeepFlags

LOW_AESTHETIC, NSFW, LOW_CLIP_SCORE = "low_aesthetic", "nsfw", "low_clip_score"

INDEX = pa.schema(
    [
        ("key", pa.string()),
        ("keep", pa.bool_()),  # false: later stages skip the sample
        ("reason", pa.string()),  # low_aesthetic | nsfw | low_clip_score; null when kept
        ("detail", pa.string()),  # the score and the threshold, one line; null when kept
    ]
)


def verdict(kind: str, row: dict[str, Any], limits: dict[str, float]) -> tuple[str, str] | None:
    """(reason, detail) when the thresholds leave the scored row out, else None."""
    if kind == "images":
        aesthetic, nsfw = row.get("aesthetic"), row.get("nsfw")  # absent: no such head
        if "min_aesthetic" in limits and aesthetic is not None and aesthetic < limits["min_aesthetic"]:
            return LOW_AESTHETIC, f"aesthetic {aesthetic:.3f} < {limits['min_aesthetic']:g}"
        if "max_nsfw" in limits and nsfw is not None and nsfw > limits["max_nsfw"]:
            return NSFW, f"nsfw {nsfw:.3f} > {limits['max_nsfw']:g}"
        return None
    for name, threshold in sorted(limits.items()):
        score = row.get(f"clip_score_{name}")
        if score is not None and score < threshold:
            return LOW_CLIP_SCORE, f"clip score of {name} {score:.2f} < {threshold:g}"
    return None


def flag_rows(kind: str, scores: list[dict[str, Any]], limits: dict[str, float]) -> tuple[pa.Table, dict]:
    """The keep-flag table of one shard's score rows, and {key: (reason, detail)} of those it leaves out."""
    removed = {}
    rows = []
    for row in scores:
        found = verdict(kind, row, limits) if row["status"] == OK else None
        if found is not None:
            removed[row["key"]] = found
        reason, detail = found or (None, None)
        rows.append({"key": row["key"], "keep": found is None, "reason": reason, "detail": detail})
    return pa.Table.from_pylist(rows, schema=INDEX), removed


class ImageFlags(KeepFlags):
    """Aesthetic and NSFW thresholds: made before caption, so captioning skips what they leave out."""

    reasons = (LOW_AESTHETIC, NSFW)
    applies_after = "quality"

    def folder(self) -> StageDir:
        return self.layout.quality_flags("images")


class TextFlags(KeepFlags):
    """Clip-score thresholds: the scores of a caption set exist once it is captioned, so they apply from stats on."""

    reasons = (LOW_CLIP_SCORE,)
    applies_after = "caption"

    def folder(self) -> StageDir:
        return self.layout.quality_flags("texts")
