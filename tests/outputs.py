"""Read a run's outputs back in tests: every row and member of a stage's done shards, each key exactly once."""

from __future__ import annotations

from pathlib import Path

from curation.shards import StageDir


def index_rows(out: str | Path, stage: str) -> dict[str, dict]:
    """Every index row of a stage's done shards, by key; a key seen twice fails the test."""
    sd = StageDir(f"{out}/{stage}")
    found: dict[str, dict] = {}
    for shard in sd.done_shards():
        for row in sd.read_index(shard).to_pylist():
            assert row["key"] not in found, f"{stage}: key {row['key']} written twice"
            found[row["key"]] = row
    return found


def tar_members(out: str | Path, stage: str) -> dict[str, dict[str, bytes]]:
    """Every sample of a stage's done tars, by key; a key seen twice fails the test."""
    sd = StageDir(f"{out}/{stage}")
    found: dict[str, dict[str, bytes]] = {}
    for shard in sd.done_shards():
        for key, members in sd.iter_samples(shard):
            assert key not in found, f"{stage}: member {key} written twice"
            found[key] = members
    return found


def export_entries(index_dir: str | Path) -> list[dict]:
    """Every entry of a PixArt export's index: one JSON array per shard, read as the trainers read a list of files."""
    import json

    return [entry for path in sorted(Path(index_dir).glob("*.json")) for entry in json.loads(path.read_text())]
