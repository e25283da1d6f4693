"""Source layouts, and the plan that turns an input into source shards without the driver touching a sample.

    scan      tasks list the input folder by folder (sub-folders, archives by name, loose files into listing files)
    plan      the driver groups archives and folders into units, one per source shard, from names alone
    list      one task per unit lists its samples into `listings/units/<unit>.parquet`
    keys      partitioned passes over the listings refuse a key that appears twice, naming both places

`map_tasks(label, fn, [(task id, args)]) -> {task id: fn(*args)}` runs each phase: Ray tasks in an ingest, a plain
loop in `list_source` (tests and tools on small inputs). Nothing the driver holds grows with the number of samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from curation.sources import folder, img2dataset, journeydb, sa1b
from curation.sources.base import (
    CONTAINER_SUFFIXES,
    ScannedDir,
    SourceError,
    SourceItem,
    Unit,
    check_unique,
    suffix_of,
    url_of,
)
from curation.sources.listing import check_keys, listing_about, read_keys, read_listing, scan_dir, write_listing
from curation.sources.parts import KEY_CHUNKS, Part, listing_changes, plan_parts

# The registry also feeds the CLI's --source choices.
SOURCES: dict[str, Any] = {"folder": folder, "sa1b": sa1b, "img2dataset": img2dataset, "journeydb": journeydb}
KEYS_PER_PASS = 4_000_000  # keys one key-check task holds (Arrow strings: ~100 MB)
MAX_NOTES = 20  # problem lines the driver keeps and prints; the rest are counted (and kept in each listing)

MapTasks = Callable[[str, Callable[..., Any], list[tuple[str, tuple]]], dict[str, Any]]


@dataclass
class SourcePlan:
    """Per unit: its listing file and how many samples it holds; what was skipped, by reason; its parts (one per
    output shard); and the samples added, changed and removed since the previous listing (`changes`)."""

    units: list[tuple[Unit, str, int]]
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)  # damaged input files, one line each (at most MAX_NOTES)
    remarks: list[str] = field(default_factory=list)  # how the input was read (an annotation file read once of two)
    parts: list[Part] = field(default_factory=list)
    changes: Counter | None = None  # None: nothing was listed here before (a new output)

    @property
    def samples(self) -> int:
        return sum(n for _, _, n in self.units)

    def shards(self) -> list[tuple[str, tuple[str, int, int, str]]]:
        """(shard name, (listing, start, stop, lineage)): the write tasks."""
        return [(p.name, (p.listing, p.start, p.stop, p.lineage)) for p in self.parts]

    def lineages(self, shards: list[str]) -> dict[str, str]:
        """The `Upstream` of the images pass: each part's lineage (what its rows were made from)."""
        by_name = {p.name: p.lineage for p in self.parts}
        return {s: by_name[s] for s in shards if s in by_name}


def plan_source(
    name: str,
    input_url: str,
    listings: Callable[[str], str],
    map_tasks: MapTasks,
    shard_size: int = 1000,
    scheme: str = KEY_CHUNKS,
) -> SourcePlan:
    """Plan the input's source shards and their parts of at most `shard_size` samples, cut by `scheme`
    (`curation.sources.parts`); `listings(part)` is where the plan's files go (`Layout.listings`)."""
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r}; choose from {sorted(SOURCES)}")
    layout = SOURCES[name]
    dirs = scan_input(input_url, listings("scan"), map_tasks)
    remarks: list[str] = []
    if name == "journeydb":
        units, skipped = layout.plan(dirs, input_url, listings("annotations"))
        files, pairs = journeydb.annotation_files(dirs)
        lines = map_tasks(
            "annotations", journeydb.split_annotations, [("annotations", (files, listings("annotations"), pairs))]
        )
        remarks += [journeydb.extracted_note(pair) for pair in pairs]
        claimed = {u.annotations for u in units}
        skipped["not_downloaded"] += sum(n for part, n in lines["annotations"].items() if part not in claimed)
    else:
        units, skipped = layout.plan(dirs, input_url)
    units = _unique_ids(units)
    files = {u.id: f"{listings('units')}/{u.id}.parquet" for u in units}
    listed = map_tasks("listing", list_unit, [(u.id, (name, u, files[u.id], shard_size, scheme)) for u in units])
    notes, more = [], 0
    changes, seen = Counter(), False
    for result in listed.values():
        skipped.update(result["skipped"])
        changes.update(result["changes"])
        seen |= not result["new"]
        kept = result["notes"][: max(0, MAX_NOTES - len(notes))]
        notes += kept
        more += result["notes_total"] - len(kept)
    if more:
        notes.append(f"... and {more} more problem(s) with input files, noted in {listings('units')}/*.parquet")
    removed, seen_removed = _drop_old_listings(listings("units"), {f"{u.id}.parquet" for u in units})
    changes["removed"] += removed
    plan = SourcePlan(
        [(u, files[u.id], listed[u.id]["items"]) for u in units],
        +skipped,
        notes,
        remarks,
        parts=[p for u in units for p in listed[u.id]["parts"]],
        changes=+changes if seen or seen_removed else None,
    )
    if plan.samples == 0:
        found = ", ".join(f"{k}={v}" for k, v in sorted(plan.skipped.items()))
        raise SourceError(
            f"no images found for source {name!r} under {input_url}"
            + (f" (skipped: {found})" * bool(found))
            + (f"; {notes[0]}" if notes else "")
        )
    parts = math.ceil(plan.samples / KEYS_PER_PASS)
    urls = [listing for _, listing, n in plan.units if n]
    map_tasks("keys", check_keys, [(str(p), (urls, p, parts)) for p in range(parts)])
    return plan


def scan_input(input_url: str, scan_url: str, map_tasks: MapTasks) -> list[ScannedDir]:
    """Every folder of the input, scanned by tasks one level at a time (the driver learns folder names only)."""
    fs, root = fsspec.core.url_to_fs(input_url)
    if not fs.exists(root):
        raise SourceError(f"the input {input_url} does not exist")
    if fs.isfile(root):  # one archive or annotation file given directly
        if not suffix_of(root, CONTAINER_SUFFIXES):
            raise SourceError(f"the input {input_url} is a single file; give the folder that holds it")
        parent = input_url.rsplit("/", 1)[0]
        return [ScannedDir(parent, "", (), ((input_url, fs.size(root)),), 0, (), None)]
    dirs, wave = [], [(input_url.rstrip("/"), "")]
    while wave:
        found = map_tasks("scan", scan_dir, [(rel or ".", (url, rel, scan_url)) for url, rel in wave])
        wave = []
        for d in found.values():
            dirs.append(d)
            wave += [(s, f"{d.rel}/{_name(s)}" if d.rel else _name(s)) for s in d.subdirs]
    return sorted(dirs, key=lambda d: d.rel)


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def list_unit(source: str, unit: Unit, listing: str, shard_size: int, scheme: str) -> dict[str, Any]:
    """The listing task of one unit: its samples into `listing`; their count, what was skipped, its problems, its
    parts (`Part`s), and the samples added, changed and removed since the listing it replaces (`new`: there was none).

    A listing made from the very same files (sizes and modification times or ETags, the folder listing's content)
    is kept: a rerun after a crash does not read every archive's headers again (on object storage, its bytes).
    """
    fingerprint = unit_fingerprint(source, unit)
    about = listing_about(listing)
    if about and about.get("fingerprint") == fingerprint:
        result = {k: about[k] for k in ("items", "skipped", "notes", "notes_total")} | {"changes": {}, "new": False}
        keys, identities = read_keys(listing)
    else:
        old = read_keys(listing) if about is not None else None
        items, skipped, notes = SOURCES[source].list_unit(unit)
        check_unique(items)
        result = {"items": len(items), "skipped": dict(skipped), "notes": notes[:MAX_NOTES], "notes_total": len(notes)}
        write_listing(listing, items, {"fingerprint": fingerprint, **result})
        items.sort(key=lambda i: i.key)
        keys, identities = [i.key for i in items], [i.identity() for i in items]
        result |= {"changes": dict(listing_changes(old or ([], None), (keys, identities))), "new": old is None}
    return {**result, "parts": plan_parts(unit.id, listing, keys, identities, shard_size, scheme)}


def _drop_old_listings(units_url: str, current: set[str]) -> tuple[int, bool]:
    """Listings of units the input no longer has (a deleted tar or folder; `current`: the file names of the units it
    has): their samples count as removed, and the files go, so they are counted once. Returns (samples, whether
    there were any)."""
    fs, path = fsspec.core.url_to_fs(units_url)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return 0, False
    removed, found = 0, False
    for name in fs.ls(path, detail=False):
        base = name.rsplit("/", 1)[-1]
        if not base.endswith(".parquet") or base in current or base.startswith("."):
            continue
        found = True
        removed += (listing_about(url_of(fs, name, units_url)) or {}).get("items", 0)
        fs.rm(name)
    return removed, found


LISTING_VERSION = 3  # bump when what a listing holds changes: older listings are then made again


def unit_fingerprint(source: str, unit: Unit) -> str:
    """What a unit's listing depends on: the source, the unit, and the state of every file it reads."""
    state: list[Any] = [LISTING_VERSION, source, dataclasses.astuple(unit)]
    for url in (unit.url if unit.kind != "dir" else None, unit.sidecar, unit.listing, unit.annotations):
        if url is None:
            continue
        fs, path = fsspec.core.url_to_fs(url)
        if url in (unit.listing, unit.annotations):  # rewritten by every run: their content is what counts
            state.append(hashlib.sha256(fs.cat_file(path)).hexdigest() if fs.exists(path) else None)
        else:
            info = fs.info(path)
            state.append([info.get("size"), info.get("mtime"), info.get("ETag"), info.get("LastModified")])
    return hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()


def _unique_ids(units: list[Unit]) -> list[Unit]:
    """Ids are safe relative paths; two can meet (`a b.tar`, `a_b.tar`): the later one gets a numbered suffix."""
    seen: set[str] = set()
    out = []
    for unit in sorted(units, key=lambda u: (u.rel, u.kind)):
        uid, n = unit.id, 1
        while uid in seen:
            n += 1
            uid = f"{unit.id}_{n}"
        seen.add(uid)
        out.append(unit if uid == unit.id else Unit(uid, unit.kind, unit.url, unit.rel, unit.listing, unit.sidecar,
                                                     unit.annotations))  # fmt: skip
    return out


def local_map(label: str, fn: Callable[..., Any], tasks: list[tuple[str, tuple]]) -> dict[str, Any]:
    return {task_id: fn(*args) for task_id, args in tasks}


def list_source(name: str, input_url: str) -> list[SourceItem]:
    """Every item of a (small) input, listed in this process: for tests and tools, not for ingest at scale."""
    import tempfile

    from curation.layout import Layout

    with tempfile.TemporaryDirectory(prefix="curation-listing-") as tmp:
        plan = plan_source(name, input_url, Layout(tmp).listings, local_map)
        return [item for _, listing, _ in plan.units for item in read_listing(listing)]


__all__ = ["SOURCES", "Part", "SourceError", "SourceItem", "SourcePlan", "list_source", "plan_source"]
