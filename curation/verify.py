"""`curation verify --output OUT [--stage LABEL ...]`: read every done shard back and hold it to its done marker.

A rerun already redoes a shard whose files are missing or changed size (one listing, no read: see
`curation.runner.planning.damaged_shards`); verify reads everything, one Ray task per shard:

- each file the marker recorded is there, of its size and CRC-32 (a marker of an older release, without `files`,
  is checked on the files the shard has);
- the parquet index reads and its keys are unique; the tar reads to its end (summed as it is read, so one read);
- the tar's keys are index keys, and every `ok` row has its members in the tar;
- the index's keys are the keys of the shard of the same name in the folder it was made from (captions: images;
  a stats index holds the samples it counted: a subset).

On the driver, from the folders' listings: every shard of a folder's input has its shard there, and no shard is
left without its input. Per-sample work stays in the tasks; the driver holds shard names and the problem lines.
Each problem is one line naming the file and its fix.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from curation.errors import SetupError
from curation.layout import Layout
from curation.records import OK
from curation.shards import TMP_PREFIX, StageDir

# Folders of an output that hold no shards.
NOT_SHARDS = frozenset({"logs", "listings", "report"})
EXAMPLES = 3  # keys named in a problem line about many keys


def shard_folders(layout: Layout) -> list[str]:
    """The output's folders holding done shards, by their path in it (`images`, `features/t5`, `dedup/hashes`)."""
    base = StageDir(layout.root)
    fs = base.fs
    if not fs.exists(base.root):
        return []
    found = []
    for top in sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base.root, detail=False) if fs.isdir(p)):
        if top in NOT_SHARDS or top.startswith("."):
            continue
        rels = [top]
        if top in ("features", "dedup", "clip", "quality"):
            rels += [f"{top}/{sub.rstrip('/').rsplit('/', 1)[-1]}" for sub in fs.ls(f"{base.root}/{top}", detail=False)]
        for rel in rels:
            try:
                folder, _ = layout.shard_folder(rel)
            except (KeyError, ValueError):  # not a folder of this layout (a user's own folder, a bad set name)
                continue
            if folder.fs.isdir(folder.root) and folder.done_shards():
                found.append(rel)
    return found


def verify(
    output: str, stages: list[str] | None = None, *, ray_address: str | None = None, progress: bool = True
) -> tuple[list[str], list[str]]:
    """(problem lines, summary lines) for the output's folders (or those `stages` names: `features` covers
    `features/*`). Raises SetupError when there is nothing to verify or a name is no folder of the output."""
    from curation.runner import output_lock, run_tasks
    from curation.runner.pool import Cluster

    layout = Layout(output)
    folders = shard_folders(layout)
    if not folders:
        raise SetupError(f"nothing to verify: {output} holds no done shard")
    if stages:
        unknown = [s for s in stages if not any(f == s or f.startswith(f"{s}/") for f in folders)]
        if unknown:
            raise SetupError(f"{output} has no shards under {', '.join(unknown)}; it has: {', '.join(folders)}")
        folders = [f for f in folders if any(f == s or f.startswith(f"{s}/") for s in stages)]
    problems: list[str] = []
    tasks: list[tuple[str, tuple]] = []
    with output_lock(output), Cluster(ray_address) as cluster:
        for rel in folders:
            folder, source = layout.shard_folder(rel)
            sizes = folder.file_sizes()
            shards = folder.done_shards()
            if source is not None and source.fs.isdir(source.root):
                problems += _coverage(rel, folder, source, shards)
            files: dict[str, list[str]] = {}  # shard -> its files in the listing
            for name in sizes:
                if kind := _kind(name):
                    files.setdefault(name.removesuffix(f".{kind}"), []).append(name)
            # What a shard of this folder has, for markers that recorded no `files`: the kinds its shards hold.
            kinds = sorted({_kind(n) for found in files.values() for n in found})
            for shard in shards:
                expected = [f"{shard}.{k}" for k in kinds]
                tasks.append((f"{rel}/{shard}", (output, rel, shard, expected, sorted(files.get(shard, [])))))
        cluster.ensure()
        results = run_tasks("verify", check_shard, tasks, progress=progress, shard_errors=True)
    for task_id, _ in tasks:
        problems += results[task_id]
    summary = f"verify: {len(tasks)} shard(s) in {len(folders)} folder(s) ({', '.join(folders)}): "
    summary += f"{len(problems)} problem(s)" if problems else "no problems"
    return problems, [summary]


def _coverage(rel: str, folder: StageDir, source: StageDir, shards: list[str]) -> list[str]:
    """Shards of the input without their shard here, and shards here without their input."""
    source_rel = source.url.rstrip("/").rsplit("/", 1)[-1]
    mine, theirs = set(shards), set(source.done_shards())
    out = [
        f"{rel}: shard {s} of {source_rel} was not made; fix: run `curation {folder.command}`"
        for s in sorted(theirs - mine)
    ]
    out += [
        f"{rel}/{s}: its {source_rel} shard does not exist; fix: run `curation {folder.command}`, which removes it"
        for s in sorted(mine - theirs)
    ]
    return out


class _SummingReader:
    """A file read through, summing the CRC-32 and size of what was read (`tarfile` reads only through `read`)."""

    def __init__(self, f: Any) -> None:
        self.f, self.crc, self.size = f, 0, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _kind(name: str) -> str | None:
    """`tar`, `parquet` or `json` for a shard's file (not its done marker, nor a temporary)."""
    if name.startswith(TMP_PREFIX) or name.endswith(".done.json"):
        return None
    return name.rsplit(".", 1)[-1] if name.endswith((".tar", ".parquet", ".json", ".npy")) else None


def check_shard(output: str, rel: str, shard: str, expected: list[str], present: list[str]) -> list[str]:
    """Problem lines of one done shard (a Ray task): its files against its marker, its index, its tar, its keys
    against its input shard's. `present`: the shard's files in the folder's listing; `expected`: the files a shard
    of this folder has, for a marker that recorded none."""
    layout = Layout(output)
    folder, source = layout.shard_folder(rel)
    out: list[str] = []
    rerun = f"run `curation {folder.command}` again (it redoes this shard)"
    redo = f"delete {rel}/{shard}.done.json, then run `curation {folder.command}` again"

    def problem(what: str, fix: str = redo) -> None:
        out.append(f"{rel}/{shard}: {what}; fix: {fix}")

    try:
        marker = folder.read_done(shard)
    except (OSError, ValueError, TypeError) as exc:
        problem(f"done marker unreadable ({type(exc).__name__}: {_short(exc)})")
        return out
    recorded = marker.files
    names = sorted(recorded) if recorded is not None else expected
    keys: set[str] | None = None
    sound: set[str] = set()
    tar_keys: set[str] | None = None
    for name in names:
        path = folder.path(name)
        if name not in present:
            problem(f"{name} missing", rerun if recorded is not None else redo)  # a rerun trusts an old marker
            continue
        reader = None
        try:
            with folder.fs.open(path, "rb") as f:
                reader = _SummingReader(f)
                if name.endswith(".tar"):
                    tar_keys = _tar_keys(reader)
                    reader.drain()
                elif name.endswith(".parquet"):
                    table = pq.ParquetFile(io.BytesIO(reader.read())).read(use_threads=False)
                    if "key" in table.column_names:
                        column = table.column("key").to_pylist()
                        keys = set(column)
                        if len(keys) != len(column):
                            twice = sorted(k for k, n in Counter(column).items() if n > 1)
                            problem(f"{name}: {len(twice)} key(s) twice in the index ({_some(twice)})")
                        if "status" in table.column_names:
                            statuses = table.column("status").to_pylist()
                            sound = {k for k, s in zip(column, statuses, strict=True) if s == OK}
                elif name.endswith(".npy"):  # clip/<tag>/: plain arrays, never pickles
                    np.load(io.BytesIO(reader.read()), allow_pickle=False)
                else:
                    json.loads(reader.read())
        except Exception as exc:  # noqa: BLE001 (any failure to read the file is the finding, not a crash)
            if recorded is not None and reader is not None and recorded[name]["size"] != _size(folder, path):
                problem(f"{name} is {_size(folder, path)} bytes, {recorded[name]['size']} recorded", rerun)
            else:
                problem(f"{name} unreadable ({type(exc).__name__}: {_short(exc)})")
            continue
        if recorded is not None:
            want = recorded[name]
            if reader.size != want["size"]:
                problem(f"{name} is {reader.size} bytes, {want['size']} recorded", rerun)
            elif reader.crc != want["crc32"]:
                problem(f"{name}: checksum {reader.crc:08x}, {want['crc32']:08x} recorded (the bytes changed)")
            if (reader.size, reader.crc) != (want["size"], want["crc32"]):  # its keys would only repeat the finding
                tar_keys, keys = (None, keys) if name.endswith(".tar") else (tar_keys, None)
    if tar_keys is not None and keys is not None:
        if extra := sorted(tar_keys - keys):
            problem(f"{len(extra)} tar key(s) not in the index ({_some(extra)})")
        if lacking := sorted(sound - tar_keys):
            problem(f"{len(lacking)} ok row(s) without members in the tar ({_some(lacking)})")
    if keys is not None and source is not None:
        # Stats index the samples they counted; every other folder keeps a row per input row.
        out += _against_source(rel, shard, keys, source, redo, every_row=not rel.startswith("stats"))
    return out


def _tar_keys(reader: _SummingReader) -> set[str]:
    """The keys of a tar's members, every member read to its end."""
    found = set()
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for info in tar:
            if info.isfile():
                tar.extractfile(info).read()
                found.add(info.name.partition(".")[0])
    return found


def _against_source(rel: str, shard: str, keys: set[str], source: StageDir, fix: str, every_row: bool) -> list[str]:
    """The shard's keys against those of the input shard it was made from (all of them when `every_row`)."""
    try:
        if not source.has_done(shard):
            return []  # reported once by `_coverage`
        table = pq.read_table(io.BytesIO(source.fs.cat_file(source.path(f"{shard}.parquet"))), columns=["key"])
    except Exception:  # noqa: BLE001 (the input shard's own check reports why it cannot be read)
        return []
    theirs = set(table.column("key").to_pylist())
    name = source.url.rstrip("/").rsplit("/", 1)[-1]
    out = []
    if extra := sorted(keys - theirs):
        out.append(f"{rel}/{shard}: {len(extra)} key(s) not in {name}/{shard} ({_some(extra)}); fix: {fix}")
    if every_row and (lacking := sorted(theirs - keys)):
        out.append(f"{rel}/{shard}: {len(lacking)} key(s) of {name}/{shard} have no row ({_some(lacking)}); fix: {fix}")
    return out


def _size(folder: StageDir, path: str) -> int | None:
    try:
        return folder.fs.size(path)
    except OSError:
        return None


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:EXAMPLES])
    return shown + (f", … {len(keys) - EXAMPLES} more" if len(keys) > EXAMPLES else "")


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
