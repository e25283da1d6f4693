"""Concept-density statistics (PixArt-alpha Table 1): per-caption nouns, mergeable counts, the report."""

from curation.stats.nouns import (
    NOUN_TAGS,
    VALID_THRESHOLD,
    NounExtractor,
    NounStats,
    count_captions,
    decode_caption,
    reference_nouns,
)
from curation.stats.report import PAPER_ROWS, write_report

__all__ = [
    "NOUN_TAGS",
    "PAPER_ROWS",
    "VALID_THRESHOLD",
    "NounExtractor",
    "NounStats",
    "count_captions",
    "decode_caption",
    "reference_nouns",
    "write_report",
]
