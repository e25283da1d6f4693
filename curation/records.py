"""The one sample record carried from ingest to features, keyed by the upstream key.

`Sample` is the single source of truth: the shard index (parquet), the per-sample `<key>.json` in the tars and the
files in `schemas/` are all derived from it (a test pins `schemas/` to this dataclass).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

import pyarrow as pa

from curation.buckets import BASES, assign_bucket

SCHEMA_VERSION = 1

# A sample is "ok" until a stage fails it; then it stays a row with the reason, and later stages pass it through.
# "skipped" is a sound sample a stage chose not to process (reason "duplicate": not the kept member of its dedup group).
OK, FAILED, SKIPPED = "ok", "failed", "skipped"

# The text paths (noun counting, the report's plots and gallery, T5 tokenisation) read a caption's first
# MAX_CAPTION_CHARS characters: a 1 MB caption then costs what an ordinary one does. Dense LLaVA captions are
# ~1,000 characters and PixArt-Sigma's 300 T5 tokens ~1,500, so the bound changes no ordinary caption.
MAX_CAPTION_CHARS = 4096

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def safe_key(text: str) -> str:
    """A webdataset-safe key: no dots (webdataset splits the extension at the first dot), slashes or spaces."""
    key = _UNSAFE.sub("_", text.replace("/", "__"))
    if not key:
        raise ValueError(f"cannot make a key from {text!r}")
    return key


@dataclass(slots=True)
class Sample:
    key: str
    source: str
    source_id: str
    ext: str = ""
    width: int | None = None  # as displayed: EXIF orientation applied
    height: int | None = None
    bucket_256: str | None = None
    bucket_512: str | None = None
    bucket_1024: str | None = None
    bucket_2048: str | None = None
    original_caption: str | None = None  # alt-text, Midjourney prompt, or a folder's .txt
    source_meta: str | None = None  # the source's own per-sample metadata, as JSON text
    status: str = OK
    error_reason: str | None = None  # short stable category, counted in summaries
    error: str | None = None  # the full message
    caption: str | None = None
    caption_status: str | None = None  # ok | empty | truncated | repetitive (caption stage)

    def set_size(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        for base in BASES:
            setattr(self, f"bucket_{base}", assign_bucket(height, width, base))

    def fail(self, reason: str, message: str) -> None:
        self.status, self.error_reason, self.error = FAILED, reason, message

    def skip(self, reason: str, message: str) -> None:
        self.status, self.error_reason, self.error = SKIPPED, reason, message

    def to_dict(self) -> dict[str, Any]:
        # Every field is a str, int or None: a shallow read, not `dataclasses.asdict`'s deep copy (~3x slower).
        return {name: getattr(self, name) for name in self.__slots__}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_ARROW_TYPES = {str: pa.string(), int: pa.int64()}
_JSON_TYPES = {str: "string", int: "integer"}


def _field_types() -> list[tuple[str, type, bool]]:
    """(name, base type, nullable) for every Sample field."""
    out = []
    for f in fields(Sample):
        hint = get_type_hints(Sample)[f.name]
        args = [a for a in getattr(hint, "__args__", (hint,)) if a is not type(None)]
        nullable = len(getattr(hint, "__args__", ())) > 1
        out.append((f.name, args[0], nullable))
    return out


def arrow_schema() -> pa.Schema:
    """The Arrow schema of a shard's parquet index (one row per sample, failed ones included)."""
    return pa.schema(
        [pa.field(name, _ARROW_TYPES[tp], nullable=nullable) for name, tp, nullable in _field_types()],
        metadata={"schema_version": str(SCHEMA_VERSION)},
    )


def json_schema() -> dict[str, Any]:
    """JSON Schema of one sample record (the `<key>.json` members and the index rows)."""
    props = {}
    for name, tp, nullable in _field_types():
        props[name] = {"type": [_JSON_TYPES[tp], "null"] if nullable else _JSON_TYPES[tp]}
    props["status"]["enum"] = [OK, FAILED, SKIPPED]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"pixart-curation/sample/v{SCHEMA_VERSION}",
        "title": "Sample",
        "type": "object",
        "properties": props,
        "required": [f.name for f in fields(Sample) if f.default is dataclasses.MISSING],
        "additionalProperties": False,
    }


def decode_utf8(raw: bytes) -> tuple[str, bool]:
    """Text from upstream bytes: `(text, invalid)`, invalid UTF-8 sequences replaced by U+FFFD."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def escape_surrogates(text: str | None) -> tuple[str | None, bool]:
    """`(text, escaped)`: lone surrogates (a JSON `\\ud800` escape decodes to one) cannot be written as UTF-8, so
    they become the visible escape text `\\ud800`; any other text is returned as it is."""
    if text is None or text.isascii():
        return text, False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8"), True
    return text, False


def samples_to_table(samples: list[Sample]) -> pa.Table:
    return pa.Table.from_pylist([s.to_dict() for s in samples], schema=arrow_schema())


def table_to_samples(table: pa.Table) -> list[Sample]:
    return [Sample.from_dict(row) for row in table.to_pylist()]


def count_statuses(samples: list[Sample]) -> dict[str, dict[str, int]]:
    """Counts by status, failures by reason, and (when there are any) skipped samples by reason."""
    by_status: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    by_skipped: dict[str, int] = {}
    for s in samples:
        by_status[s.status] = by_status.get(s.status, 0) + 1
        if s.error_reason:
            tally = by_skipped if s.status == SKIPPED else by_reason
            tally[s.error_reason] = tally.get(s.error_reason, 0) + 1
    return {"by_status": by_status, "by_reason": by_reason} | ({"by_skipped": by_skipped} if by_skipped else {})


# Columns only `images/` indexes have: where each sample's image member's data lies in the shard's tar, so a reader
# (`curation browse`'s thumbnails) reads one image without scanning the tar. Null for failed rows (no member), and
# absent from outputs ingested before they existed.
IMAGE_MEMBER_FIELDS = (
    pa.field("member_offset", pa.int64(), nullable=True),  # bytes from the start of the tar to the member's data
    pa.field("member_size", pa.int64(), nullable=True),  # the member's data in bytes
)


def images_schema() -> pa.Schema:
    """The Arrow schema of an `images/` shard's index: the Sample columns, then `IMAGE_MEMBER_FIELDS`."""
    base = arrow_schema()
    return pa.schema([*base, *IMAGE_MEMBER_FIELDS], metadata=base.metadata)


def images_table(samples: list[Sample], members: dict[str, tuple[int, int]]) -> pa.Table:
    """An `images/` index: `members` is {key: (data offset, size)} of the image members written."""
    rows = []
    for s in samples:
        offset, size = members.get(s.key, (None, None))
        rows.append(s.to_dict() | {"member_offset": offset, "member_size": size})
    return pa.Table.from_pylist(rows, schema=images_schema())


def _fields_json(schema_fields: Any) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema_fields]


def arrow_schema_json() -> dict[str, Any]:
    """The index's Arrow schema in a language-neutral form (what `schemas/index.schema.json` holds)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "fields": _fields_json(arrow_schema()),
        "images_fields": _fields_json(IMAGE_MEMBER_FIELDS),
    }


def write_schemas(folder: str) -> None:
    """Regenerate `schemas/` from the dataclass: `python -m curation.records schemas`."""
    import os

    for name, payload in (("sample.schema.json", json_schema()), ("index.schema.json", arrow_schema_json())):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    import sys

    write_schemas(sys.argv[1] if len(sys.argv) > 1 else "schemas")
