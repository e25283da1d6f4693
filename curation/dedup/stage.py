"""Dedup stage: `images/` -> `dedup/` shards (same names and keys) marking exact and near-duplicate images.

Three passes (`DedupStage.passes`), each a set of Ray tasks through the runner, each resumable on its own:

1. `dedup/hashes/NNNNN.parquet`: per images shard, each sample's SHA-256 and 64-bit pHash (`hashing.py`).
2. `dedup/edges/band{b}-NNNNN.parquet`: per band of the multi-index (`grouping.py`) and range of query hashes,
   the pairs within the threshold, verified by their true Hamming distance. Identical bytes give identical pHashes,
   so exact duplicates are pairs at distance 0, marked `exact` by comparing their SHA-256.
3. The driver joins the edges into groups (connected components) and picks each group's kept member: the largest
   image (width x height), ties to the smallest key; `dedup/NNNNN.parquet` then gets one row per sample.

Nothing on the driver grows with the number of samples: it hands out shard names and reads back only the edges,
whose number follows the duplicates. Each pass-2 task holds one band index of every hash (~40 bytes a sample).

A dedup shard's `lineage` changes only when the set of samples it removes changes (or its images shard was redone):
later stages read it through `DuplicateFilter` (this stage's `sample_filters`), so a new threshold redoes just the
shards whose removals changed.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.dedup.filter import DuplicateFilter
from curation.dedup.grouping import BAND_WIDTHS, BandIndex, components
from curation.dedup.hashing import hamming, phash, sha256
from curation.errors import ConfigError
from curation.imaging import ImageDecodeError
from curation.layout import Layout
from curation.records import FAILED, OK
from curation.runner.planning import pending_shards
from curation.shards import DoneMarker, StageDir, config_hash, damaged_files, lineage, write_json_atomic
from curation.stage import (
    Needs,
    Pass,
    Resources,
    RowsDone,
    RunContext,
    Stage,
    keep_flags_extra,
    marker_reads,
    needs_images,
    no_progress,
)

STAGE = "dedup"
HASH_VERSION = "phash-dct64-v1"
DEFAULT_THRESHOLD = 8

HASH_INDEX = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("sha256", pa.binary(32)),
        ("phash", pa.uint64()),
        ("width", pa.int64()),  # as displayed, from ingest
        ("height", pa.int64()),
    ]
)
# Each end of an edge carries what choosing the kept member and the report need, so the driver reads only edges.
_END_ATTRS = [("key", pa.string()), ("area", pa.int64()), ("phash", pa.uint64()), ("sha256", pa.binary(32))]
EDGE_INDEX = pa.schema(
    [
        ("a", pa.int64()),  # sample ids: images shard number << 32 | row in its hash partial
        ("b", pa.int64()),
        ("distance", pa.int8()),
        ("exact", pa.bool_()),  # same SHA-256
        *[(f"{name}_{end}", kind) for end in "ab" for name, kind in _END_ATTRS],
    ]
)
DEDUP_INDEX = pa.schema(
    [
        *HASH_INDEX,
        ("group", pa.string()),  # the key of the group's kept member (itself when unique); null when failed
        ("keep", pa.bool_()),  # false: a duplicate that later stages skip
        ("group_size", pa.int64()),
        ("distance", pa.int64()),  # Hamming distance of its pHash to the kept member's
        ("exact", pa.bool_()),  # byte-identical to the kept member
    ]
)


@dataclass(frozen=True)
class DedupConfig:
    threshold: int = field(
        default=DEFAULT_THRESHOLD, metadata={"help": "pHash Hamming distance counted as duplicate"}
    )  # at or below it, two images are duplicates
    query_chunk: int = field(
        default=2_000_000,
        metadata={"help": "query hashes per pair-finding task (bounds a task's time, not what it finds)", "cli": False},
    )  # how the work is cut, not what it finds: not in semantics

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 16:
            raise ConfigError(f"threshold must be within 0..16 bits, got {self.threshold}")
        if self.query_chunk < 1:
            raise ConfigError(f"query_chunk must be at least 1, got {self.query_chunk}")

    def hash_semantics(self) -> dict[str, Any]:
        return {"hash": HASH_VERSION}

    def semantics(self) -> dict[str, Any]:
        return {"hash": HASH_VERSION, "threshold": self.threshold}


def _publish(folder: StageDir, table: pa.Table, done: DoneMarker, started: float) -> DoneMarker:
    """Index first, done marker last: a shard without its marker does not exist."""
    done.rows, done.seconds = table.num_rows, round(time.time() - started, 3)
    done.files = {f"{done.shard}.parquet": folder.write_index(done.shard, table)}
    return folder.write_done(done)


def _counts(statuses: list[str]) -> dict[str, int]:
    return dict(Counter(statuses))


@dataclass(frozen=True)
class _Lineages:
    """A pass's `Upstream` known when the pass is planned: {task: the lineage its output must be made from}."""

    by_task: dict[str, str]

    def lineages(self, shards: list[str]) -> dict[str, str]:
        return {s: self.by_task[s] for s in shards}


# -- pass 1: hashes ---------------------------------------------------------------------------------------------
class HashWorker:
    """One `dedup/hashes` shard per images shard: SHA-256 and pHash of each sound sample."""

    def __init__(self, layout: Layout, config: DedupConfig) -> None:
        self.layout, self.config = layout, config

    def setup(self) -> None:
        pass

    def process(self, shard: str, _payload: Any = None, rows_done: RowsDone = no_progress) -> DoneMarker:
        started = time.time()
        images = self.layout.images
        index = images.read_index(shard).select(["key", "status", "ext", "width", "height"]).to_pylist()
        rows = {r["key"]: r for r in index}
        hashed: dict[str, dict[str, Any]] = {}
        for n, (key, members) in enumerate(images.iter_samples(shard), 1):
            rows_done(n, len(index))
            row = rows[key]
            if row["status"] != OK or row["ext"] not in members:
                continue
            data = members[row["ext"]]
            try:
                hashed[key] = {"sha256": sha256(data), "phash": phash(data)}
            except ImageDecodeError as exc:
                hashed[key] = {"error": str(exc)}
        out = []
        for r in index:
            h = hashed.get(r["key"], {"error": "failed upstream" if r["status"] != OK else "no image member"})
            status = OK if "phash" in h else FAILED
            out.append({"key": r["key"], "status": status, "width": r["width"], "height": r["height"], **h})
        done = DoneMarker(
            shard,
            stage=f"{STAGE}/hashes",
            **lineage(config_hash(self.config.hash_semantics()), images.read_done(shard).upstream),
            counts={"by_status": _counts([r["status"] for r in out])},
        )
        return _publish(self.layout.dedup_hashes, pa.Table.from_pylist(out, schema=HASH_INDEX), done, started)


# -- pass 2: candidate pairs per band ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _AllHashes:
    """Every sound hash of the run, in shard order: positions are what the band index works on."""

    ids: np.ndarray
    hashes: np.ndarray
    table: pa.Table  # key, area, phash, sha256 by position

    @classmethod
    def load(cls, hashes_dir: StageDir, shards: list[str]) -> _AllHashes:
        ids, tables = [], []
        for number, shard in enumerate(shards):
            table = hashes_dir.read_index(shard)
            rows = np.arange(table.num_rows, dtype=np.int64)
            sound = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == OK)
            ids.append((number << 32) | rows[sound])
            tables.append(table.filter(pa.array(sound)))
        table = pa.concat_tables(tables) if tables else HASH_INDEX.empty_table()
        area = pc.multiply(table.column("width"), table.column("height"))
        attrs = pa.table(
            {"key": table.column("key"), "area": area, "phash": table.column("phash"), "sha256": table.column("sha256")}
        )
        hashes = table.column("phash").to_numpy().astype(np.uint64)
        return cls(np.concatenate(ids) if ids else np.empty(0, np.int64), hashes, attrs)


class EdgeWorker:
    """One `dedup/edges` partial per (band, range of query positions): the pairs within the threshold."""

    def __init__(self, layout: Layout, config: DedupConfig) -> None:
        self.layout, self.config = layout, config

    def setup(self) -> None:
        pass

    def process(self, task: str, payload: dict[str, Any], rows_done: RowsDone = no_progress) -> DoneMarker:
        started = time.time()
        everything = _AllHashes.load(self.layout.dedup_hashes, payload["shards"])
        queries = np.arange(payload["start"], min(payload["stop"], len(everything.hashes)))
        i, j, distance = BandIndex(everything.hashes, payload["band"]).pairs(self.config.threshold, queries)
        ends = {"a": everything.table.take(pa.array(i)), "b": everything.table.take(pa.array(j))}
        exact = pc.equal(ends["a"].column("sha256"), ends["b"].column("sha256"))
        columns = {"a": everything.ids[i], "b": everything.ids[j], "distance": distance, "exact": exact}
        for end, table in ends.items():
            for name in table.column_names:
                columns[f"{name}_{end}"] = table.column(name)
        edges = pa.table(columns, schema=EDGE_INDEX)
        done = DoneMarker(
            task,
            stage=f"{STAGE}/edges",
            **lineage(config_hash(self.config.semantics()), payload["lineage"]),
            counts={"by_pairs": {"exact": int(np.count_nonzero(exact)), "near": int(len(i) - np.count_nonzero(exact))}},
        )
        return _publish(self.layout.dedup_edges, edges, done, started)


# -- pass 3: groups, kept member, dedup shards ------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    group: str  # the kept member's key
    keep: bool
    group_size: int
    distance: int
    exact: bool


def group_members(edges: pa.Table) -> tuple[dict[int, Member], list[list[int]]]:
    """Each id found in an edge -> its Member; and the groups (ids, kept first). Singletons are not listed."""
    if edges.num_rows == 0:
        return {}, []
    a, b = edges.column("a").to_numpy(), edges.column("b").to_numpy()
    nodes, labels = components(a, b)
    attrs: dict[int, tuple[str, int, int, bytes]] = {}
    for end in "ab":
        cols = [edges.column(f"{n}_{end}").to_pylist() for n in ("key", "area", "phash", "sha256")]
        for node, *values in zip(edges.column(end).to_pylist(), *cols, strict=True):
            attrs[node] = tuple(values)
    by_label: dict[int, list[int]] = {}
    for node, label in zip(nodes.tolist(), labels.tolist(), strict=True):
        by_label.setdefault(label, []).append(node)
    members: dict[int, Member] = {}
    groups = []
    for ids in by_label.values():
        ids.sort(key=lambda n: (-attrs[n][1], attrs[n][0]))  # largest first; ties: smallest key
        kept_key, _, kept_phash, kept_sha = attrs[ids[0]]
        for n in ids:
            key, _, ph, sha = attrs[n]
            members[n] = Member(kept_key, n == ids[0], len(ids), hamming(ph, kept_phash), sha == kept_sha)
        groups.append(ids)
    groups.sort(key=lambda ids: attrs[ids[0]][0])
    return members, groups


class WriteWorker:
    """One `dedup/` shard per images shard: every sample's group, keep flag and distance to the kept member."""

    def __init__(self, layout: Layout, config: DedupConfig) -> None:
        self.layout, self.config = layout, config

    def setup(self) -> None:
        pass

    def process(self, shard: str, payload: dict[str, Any], rows_done: RowsDone = no_progress) -> DoneMarker:
        started = time.time()
        found = {key: Member(*values) for key, values in payload["members"].items()}
        rows = self.layout.dedup_hashes.read_index(shard).to_pylist()
        for row in rows:
            if row["status"] != OK:
                row.update(group=None, keep=True, group_size=None, distance=None, exact=None)
                continue
            m = found.get(row["key"], Member(row["key"], True, 1, 0, False))
            row.update(group=m.group, keep=m.keep, group_size=m.group_size, distance=m.distance, exact=m.exact)
        removed = [r["key"] for r in rows if not r["keep"]]
        extra = keep_flags_extra(self.layout, shard, ["images"], removed)
        images_lineage, digest = extra["reads"]["images"], extra["removed_digest"]
        done = DoneMarker(
            shard,
            stage=STAGE,
            config_hash=config_hash(self.config.semantics()),
            input_lineage=payload["input_lineage"],
            # What later stages depend on: the images shard and which of its samples are removed, not the threshold.
            lineage=config_hash({"images": images_lineage, "removed": digest}),
            counts={
                "by_status": _counts([r["status"] for r in rows]),
                "by_dedup": {k: v for k, v in (("kept", len(rows) - len(removed)), ("removed", len(removed))) if v},
            },
            extra=extra,
        )
        return _publish(self.layout.dedup, pa.Table.from_pylist(rows, schema=DEDUP_INDEX), done, started)


# -- the stage ---------------------------------------------------------------------------------------------------
@dataclass
class DedupResult:
    summaries: list[Any]  # the runner's RunSummary of each pass that ran
    threshold: int
    samples: int
    groups: list[list[str]]  # keys, kept member first
    group_sizes: dict[int, int]
    removed: int
    exact: int
    edges: pa.Table

    def closing_line(self) -> str:
        sizes = ", ".join(f"{n}x{size}" for size, n in sorted(self.group_sizes.items()))
        return (
            f"[dedup] threshold {self.threshold} bits: {len(self.groups)} duplicate group(s) ({sizes or 'none'}); "
            f"{self.removed} of {self.samples} samples removed ({self.exact} byte-identical)"
        )

    def lines(self) -> list[str]:
        return [line for s in self.summaries for line in s.lines()] + [self.closing_line()]

    def totals(self) -> dict[str, Any]:
        """`dedup/summary.json`."""
        return {
            "threshold": self.threshold,
            "samples": self.samples,
            "groups": len(self.groups),
            "group_sizes": {str(k): v for k, v in sorted(self.group_sizes.items())},
            "removed": self.removed,
            "exact_removed": self.exact,
        }


class DedupStage(Stage):
    name = "dedup"
    help = "images/ -> dedup/: exact and near-duplicate groups, one kept member each"
    config_type = DedupConfig
    sample_filters = (DuplicateFilter,)

    def __init__(self, layout: Layout, config: DedupConfig) -> None:
        super().__init__(layout, config)
        self.result: DedupResult | None = None
        self._shards: list[str] = []

    def needs(self) -> list[Needs]:
        return [needs_images(self.layout)]

    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        """Hash every images shard, pair the hashes band by band, then write each shard's groups; nothing at all
        when `dedup/` already describes every images shard as it is now with this config."""
        layout, config = self.layout, self.config
        shards = self._shards = layout.images.done_shards()
        chash = config_hash(config.semantics())
        pending_shards(layout.dedup, shards, chash, ctx.force)  # a changed threshold is refused before any work
        if _up_to_date(layout, shards, chash):
            return
        cpu = Resources(num_cpus=1)
        images = {s: m.upstream for s, m in layout.images.read_dones(shards).items()}
        yield Pass(
            label=f"{STAGE}/hashes",
            folder=layout.dedup_hashes,
            make_worker=functools.partial(HashWorker, layout, config),
            tasks=[(s, None) for s in shards],
            semantics=config.hash_semantics(),
            resources=cpu,
            upstream=_Lineages(images),
        )
        hash_dones = layout.dedup_hashes.read_dones(shards)
        fingerprint = config_hash({s: hash_dones[s].lineage for s in shards})
        tasks = _edge_tasks(shards, hash_dones, config, fingerprint)
        yield Pass(
            label=f"{STAGE}/edges",
            folder=layout.dedup_edges,
            make_worker=functools.partial(EdgeWorker, layout, config),
            tasks=tasks,
            semantics=config.semantics(),
            resources=cpu,
            upstream=_Lineages({t: fingerprint for t, _ in tasks}),
        )
        edges = _read_edges(layout.dedup_edges)
        members, _ = group_members(edges)
        payloads = _write_payloads(shards, members, edges, hash_dones)
        yield Pass(
            label=STAGE,
            folder=layout.dedup,
            make_worker=functools.partial(WriteWorker, layout, config),
            tasks=payloads,
            semantics=config.semantics(),
            resources=cpu,
            upstream=_Lineages({s: p["input_lineage"] for s, p in payloads}),
        )

    def finish(self, summaries: list[Any]) -> list[str]:
        """`dedup/summary.json` and `report/duplicates.html`; the result is kept on `self.result`."""
        from curation.dedup.report import write_duplicates_report

        edges = _read_edges(self.layout.dedup_edges)
        self.result = _result(summaries, self.config, edges, self.layout, self._shards)
        write_json_atomic(self.layout.dedup_summary, self.result.totals())
        write_duplicates_report(self.layout, self.result)
        return [self.result.closing_line()]

    def outputs(self) -> list[str]:
        return [f"dedup: {self.layout.dedup.url}/", f"report: {self.layout.report('duplicates.html')}"]


def _up_to_date(layout: Layout, shards: list[str], chash: str) -> bool:
    """Every images shard has a dedup shard of this config made from it as it is now (and nothing else), and no
    file of the three passes is missing or changed (the passes' runner then redoes exactly those shards)."""
    if set(layout.dedup.done_shards()) != set(shards):
        return False
    for folder in (layout.dedup, layout.dedup_hashes, layout.dedup_edges):
        sizes = folder.file_sizes()
        if any(damaged_files(m.files, sizes) for m in folder.read_dones(folder.done_shards()).values()):
            return False
    images = layout.images.read_dones(shards)
    return all(
        m.config_hash == chash and marker_reads(m).get("images") == images[s].upstream
        for s, m in layout.dedup.read_dones(shards).items()
    )


def run_dedup(
    output: str,
    config: DedupConfig,
    *,
    ray_address: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> DedupResult:
    """`curation dedup` from Python: hash, pair and group every done images shard; writes `dedup/`,
    `dedup/summary.json` and the report. See `curation.runner.run` for the keywords."""
    from curation.runner import run

    stage = DedupStage(Layout(output), config)
    run(stage, ray_address=ray_address, force=force, progress=progress)
    assert stage.result is not None  # set by `finish`
    return stage.result


def _edge_tasks(
    shards: list[str], hash_dones: dict[str, DoneMarker], config: DedupConfig, fingerprint: str
) -> list[tuple[str, dict[str, Any]]]:
    """One task per (band, range of query positions); each loads every hash and probes from its range."""
    sound = sum(hash_dones[s].counts.get("by_status", {}).get(OK, 0) for s in shards)
    tasks = []
    for band in range(len(BAND_WIDTHS)):
        for n, start in enumerate(range(0, max(sound, 1), config.query_chunk)):
            payload = {"band": band, "start": start, "stop": start + config.query_chunk}
            tasks.append((f"band{band}-{n:05d}", {**payload, "shards": shards, "lineage": fingerprint}))
    return tasks


def _read_edges(edges_dir: StageDir) -> pa.Table:
    """All edge partials; a pair met in several bands is kept once."""
    tables = [edges_dir.read_index(task).cast(EDGE_INDEX) for task in edges_dir.done_shards()]
    if not tables:
        return EDGE_INDEX.empty_table()
    edges = pa.concat_tables(tables)
    pair = np.stack([edges.column("a").to_numpy(), edges.column("b").to_numpy()], axis=1)
    _, first = np.unique(pair, axis=0, return_index=True)
    return edges.take(pa.array(np.sort(first)))


def _write_payloads(
    shards: list[str], members: dict[int, Member], edges: pa.Table, hash_dones: dict[str, DoneMarker]
) -> list[tuple[str, dict[str, Any]]]:
    """Per shard: the duplicates it holds (key -> Member fields) and the lineage of that input."""
    keys: dict[int, str] = {}
    for end in "ab":
        keys.update(zip(edges.column(end).to_pylist(), edges.column(f"key_{end}").to_pylist(), strict=True))
    by_shard: dict[int, dict[str, list]] = {}
    for node, m in members.items():
        by_shard.setdefault(node >> 32, {})[keys[node]] = [m.group, m.keep, m.group_size, m.distance, m.exact]
    payloads = []
    for number, shard in enumerate(shards):
        found = by_shard.get(number, {})
        digest = json.dumps(found, sort_keys=True)
        payloads.append(
            (
                shard,
                {
                    "members": found,
                    "input_lineage": config_hash({"hashes": hash_dones[shard].lineage, "groups": digest}),
                },
            )
        )
    return payloads


def _result(
    summaries: list[Any], config: DedupConfig, edges: pa.Table, layout: Layout, shards: list[str]
) -> DedupResult:
    members, groups = group_members(edges)
    keys: dict[int, str] = {}
    for end in "ab":
        keys.update(zip(edges.column(end).to_pylist(), edges.column(f"key_{end}").to_pylist(), strict=True))
    sizes: dict[int, int] = {}
    for ids in groups:
        sizes[len(ids)] = sizes.get(len(ids), 0) + 1
    removed = [m for m in members.values() if not m.keep]
    samples = sum(m.rows for m in layout.dedup.read_dones(shards).values())
    return DedupResult(
        summaries=summaries,
        threshold=config.threshold,
        samples=samples,
        groups=[[keys[n] for n in ids] for ids in groups],
        group_sizes=sizes,
        removed=len(removed),
        exact=sum(m.exact for m in removed),
        edges=edges,
    )
