"""Which shards of a pass to (re)do: no done marker, another config (refused unless --force), or an input that was
redone since (lineage), or files missing or changed since its marker recorded them; and, with --force, which shards
of an older plan to remove."""

from __future__ import annotations

from curation.errors import SetupError
from curation.shards import DoneMarker, damaged_files
from curation.stage import ShardFolder


def done_markers(folder: ShardFolder) -> dict[str, DoneMarker]:
    """Every done shard's marker, planned or not (an older plan's shards are checked too)."""
    return folder.read_dones(sorted(folder.done_shards()))


def pending_shards(
    folder: ShardFolder,
    shards: list[str],
    chash: str,
    force: bool,
    upstream: dict[str, str] | None = None,
    markers: dict[str, DoneMarker] | None = None,
    compatible: tuple[str, ...] = (),
) -> list[str]:
    """Shards to (re)do: no done marker, made from an input that was redone since, or (composites) incomplete.

    A done shard made with another config is refused unless `force`: a rerun must not silently mix configs.
    `markers`: `done_markers(folder)`, when the caller has read them already. `compatible`: other config hashes
    whose shards count as made with this config (`Pass.compatible`).
    """
    markers = done_markers(folder) if markers is None else markers
    done = set(markers)
    accepted = {chash, *compatible}
    changed = sorted(s for s, marker in markers.items() if marker.config_hash not in accepted)
    if not force:
        refuse_changed_config(folder.url, markers, accepted)
    outdated = {
        s
        for s, marker in markers.items()
        if (upstream is not None and marker.input_lineage != upstream.get(s)) or not marker.complete
    }
    redo = set(changed) | outdated
    return [s for s in shards if s not in done or s in redo]


def refuse_changed_config(url: str, markers: dict[str, DoneMarker], accepted: set[str]) -> None:
    """A rerun must not silently mix configs: refused, naming a shard, unless --force. Also called by a stage before
    its own planning removes anything (ingest: another --shard-size names other shards)."""
    changed = sorted(s for s, marker in markers.items() if marker.config_hash not in accepted)
    if changed:
        raise SetupError(
            f"{url} holds {len(changed)} shard(s) made with a different configuration "
            f"(e.g. {changed[0]}); use a new output folder, or --force to redo them with the new one"
        )


def drop_stale_shards(
    folder: ShardFolder, markers: dict[str, DoneMarker], shards: list[str], chash: str, compatible: tuple[str, ...] = ()
) -> list[str]:
    """With --force: remove done shards of another config that the new plan does not redo.

    A smaller shard count (a larger --shard-size) leaves the old plan's last shards behind; kept, their keys would
    appear twice in the stage, once in a redone shard and once in the stale one.
    """
    planned = set(shards)
    stale = [s for s, m in markers.items() if s not in planned and m.config_hash not in {chash, *compatible}]
    for shard in stale:
        folder.remove_shard(shard)
    return stale


def drop_orphans(folder: ShardFolder, shards: list[str]) -> None:
    """Shards whose input no longer exists (its keys now live in other shards): removed."""
    for orphan in sorted(set(folder.done_shards()) - set(shards)):
        folder.remove_shard(orphan)


def damaged_shards(folder: ShardFolder, markers: dict[str, DoneMarker], shards: list[str]) -> dict[str, list[str]]:
    """{planned done shard: what is wrong with its files} for shards whose files are missing or changed size since
    their marker recorded them: one listing of the folder, no file read. Markers without `files` are trusted."""
    sizes = folder.file_sizes()
    found = {s: damaged_files(markers[s].files, sizes) for s in shards if s in markers}
    return {s: problems for s, problems in found.items() if problems}
