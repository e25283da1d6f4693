"""What the features stage knows of a feature kind (`FeatureKind`), and the sidecars of a run as one shard folder.

A kind (T5 text features in `text.py`, VAE latents in `image.py`) says which sidecar folders of `OUT/features/` a
`FeaturesConfig` asks of it and what decides each one's bytes (`sidecars()`), which other folders of the output a
sidecar is made from (`inputs()`), loads its model (`setup()`), and writes its sidecars of one images shard
(`write()`, given a `ShardJob`: the shard's samples, its images, a writer and a done marker per sidecar). Shards,
samples and image bytes come from `images/` (the one copy of the bytes) through the input view; a caption set is
one more input of the sidecars made from its text. The stage
lists the kinds in `curation.features.stage.KINDS` and names none of them: a new kind is its module, its config
fields and one line there.

`FeatureDirs` presents all sidecars of a run to the runner as one `ShardFolder`: a shard counts as done once any
sidecar is, and its marker is `complete` when every sidecar is current (this config, made from its inputs as they
are now, its files as its marker recorded them), so the runner redoes incomplete shards and the worker writes only
the missing, outdated or damaged sidecars. The composite marker's `files` are the sidecars' (`t5/00042.tar`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from curation.layout import Layout
from curation.records import OK, SKIPPED, Sample
from curation.shards import DoneMarker, ShardWriter, StageDir, config_hash, damaged_files, lineage
from curation.stage import InputView

if TYPE_CHECKING:
    from curation.features.stage import FeaturesConfig


class FeatureKind(ABC):
    """One kind of feature, written as sidecar shards beside `images/` (same shard names, same keys).

    Built from the run's config alone, on the driver and on every worker: cheap, nothing is loaded before `setup()`.
    """

    def __init__(self, config: FeaturesConfig) -> None:
        self.config = config

    @abstractmethod
    def sidecars(self) -> dict[str, dict[str, Any]]:
        """{sidecar folder name: its semantics} that the config asks of this kind.

        The semantics' hash is the sidecar's config hash: exactly what decides its bytes (not batch sizes, device).
        """

    def inputs(self, layout: Layout, sidecar: str) -> list[StageDir]:
        """Folders besides `images/` that `sidecar` is made from, with its shard names (a caption set): each one's
        shard lineage joins the sidecar's input lineage, so redoing it redoes the sidecar."""
        return []

    def check(self, layout: Layout, shards: list[str]) -> None:  # noqa: B027 (optional hook)
        """Refuse, before the run, what cannot work for these images shards (an input lacking shards): SetupError."""

    @abstractmethod
    def setup(self) -> None:
        """Load the model, once per worker."""

    @abstractmethod
    def write(self, job: ShardJob, sidecars: list[str]) -> None:
        """Write `sidecars` (those of `sidecars()` that are not current) of one shard: each with `job.writer(name)`,
        one index row per sample of `job.samples` (failed and skipped ones included) and `job.done(name, rows)`."""


def row(sample: Sample, **extra: Any) -> dict[str, Any]:
    """A sidecar index row: the sample's status columns, then the kind's own."""
    return {
        "key": sample.key,
        "status": sample.status,
        "error_reason": sample.error_reason,
        "error": sample.error,
        **extra,
    }


def _counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    by_status: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        if r["error_reason"]:
            by_reason[r["error_reason"]] = by_reason.get(r["error_reason"], 0) + 1
    return {"by_status": by_status, "by_reason": by_reason}


@dataclass
class ShardJob:
    """One images shard as a kind writes its sidecars of it."""

    shard: str
    samples: list[Sample]  # the images shard's rows, in key order; samples a filter removes are `skipped`
    dirs: FeatureDirs
    _upstream: str | None = field(default=None, repr=False)

    @property
    def layout(self) -> Layout:
        return self.dirs.layout

    def images(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {extension: bytes}) of the images shard's tar, in key order."""
        return self.dirs.images.iter_samples(self.shard)

    def writer(self, sidecar: str) -> ShardWriter:
        return ShardWriter(self.dirs.dirs[sidecar], self.shard)

    def done(self, sidecar: str, rows: list[dict[str, Any]], **extra: Any) -> DoneMarker:
        """The sidecar's done marker for `ShardWriter.commit`: config hash, lineage, semantics, tallies, `extra`."""
        if self._upstream is None:
            self._upstream = self.dirs.upstream_lineage(self.shard)
        return DoneMarker(
            self.shard,
            stage=f"features/{sidecar}",
            **lineage(self.dirs.hashes[sidecar], self.dirs.input_lineage(sidecar, self.shard, self._upstream)),
            counts=_counts(rows),
            extra={"semantics": self.dirs.semantics[sidecar], **extra},
        )


class FeatureDirs:
    """All sidecars of a run seen as one folder of shards by the runner (a `ShardFolder`).

    A sidecar made with another config is a changed shard: refused unless --force.
    """

    def __init__(self, layout: Layout, config: FeaturesConfig, view: InputView) -> None:
        self.layout, self.config = layout, config
        self.url = layout.features
        self.images = layout.images  # the shard list, the samples and their bytes
        self.input = view  # `images/` through the features stage's filters: its lineage has their outcome
        self.kinds: list[FeatureKind] = config.kinds()
        self.semantics = config.sidecars()
        self.owner = {name: kind for kind in self.kinds for name in kind.sidecars()}
        self.dirs = {name: layout.sidecar(name) for name in self.semantics}
        self.hashes = {name: config_hash(sem) for name, sem in self.semantics.items()}
        self.chash = config_hash(config.semantics())

    # -- the ShardFolder protocol ----------------------------------------------------------------------------
    def done_shards(self) -> list[str]:
        return sorted(set().union(*(set(d.done_shards()) for d in self.dirs.values())))

    def read_dones(self, shards: list[str]) -> dict[str, DoneMarker]:
        """Composite markers of the shards (any sidecar done); `complete` is False where a sidecar is missing or
        outdated, and `input_lineage` None where the sidecars were made from different inputs."""
        if not shards:
            return {}
        markers: dict[str, dict[str, DoneMarker]] = {s: {} for s in shards}
        sizes = {name: d.file_sizes() for name, d in self.dirs.items()}  # one listing per sidecar
        for name, d in self.dirs.items():
            done = set(d.done_shards())
            for shard, marker in d.read_dones([s for s in shards if s in done]).items():
                markers[shard][name] = marker
        return {s: self._composite(s, m, sizes) for s, m in markers.items() if m}

    def file_sizes(self) -> dict[str, int]:
        return {f"{name}/{file}": size for name, d in self.dirs.items() for file, size in d.file_sizes().items()}

    def read_done(self, shard: str) -> DoneMarker:
        """One summary over the sidecars present: a failed sample counts once, with the first sidecar's reason."""
        present = {name: m for name in self.dirs if (m := self._marker(name, shard)) is not None}
        return self._composite(shard, present, {name: self._sizes(name, m) for name, m in present.items()})

    def remove_shard(self, shard: str) -> None:
        for d in self.dirs.values():
            d.remove_shard(shard)

    def remove_stale_temporaries(self) -> None:
        for d in self.dirs.values():
            d.remove_stale_temporaries()

    # -- lineage ---------------------------------------------------------------------------------------------
    def upstream_lineage(self, shard: str) -> str:
        """The images shard's lineage, with every sample filter's outcome folded in."""
        return self.input.read_done(shard).upstream

    def input_lineage(self, name: str, shard: str, upstream: str) -> str:
        """What sidecar `name` of `shard` is made from: the images shard (`upstream`) and its kind's inputs."""
        for folder in self.owner[name].inputs(self.layout, name):
            upstream = config_hash({"input": upstream, "set": folder.read_done(shard).upstream})
        return upstream

    def legacy_lineage(self, name: str, shard: str) -> str | None:
        """The input lineage an earlier release gave sidecar `name`: made from `captions/` (its images and the
        default set's text), a named set's lineage joined; None where `captions/` lacks the shard."""
        captions = self.layout.captions()
        if not captions.has_done(shard):
            return None
        upstream = self.input.over(captions).read_done(shard).upstream
        for folder in self.owner[name].inputs(self.layout, name):
            if folder.url != captions.url:
                upstream = config_hash({"input": upstream, "set": folder.read_done(shard).upstream})
        return upstream

    def current(
        self, name: str, shard: str, *, marker: Any = False, upstream: str | None = None, sizes: Any = None
    ) -> bool:
        """Whether sidecar `name` of `shard` is done with this config, from its inputs as they are now (a sidecar
        an earlier release made from `captions/` as it is now counts too: nothing is recomputed for the change),
        and its files are the size its marker recorded.

        `marker`, `upstream` (the images shard's lineage) and `sizes` (the sidecar's file sizes) may be passed when
        already read.
        """
        marker = self._marker(name, shard) if marker is False else marker
        if marker is None or marker.config_hash != self.hashes[name]:
            return False
        if damaged_files(marker.files, self._sizes(name, marker) if sizes is None else sizes):
            return False
        if upstream is None:
            upstream = self.upstream_lineage(shard)
        if marker.input_lineage == self.input_lineage(name, shard, upstream):
            return True
        return marker.input_lineage == self.legacy_lineage(name, shard)

    def _marker(self, name: str, shard: str) -> DoneMarker | None:
        d = self.dirs[name]
        return d.read_done(shard) if d.has_done(shard) else None

    def _sizes(self, name: str, marker: DoneMarker) -> dict[str, int]:
        """The sizes of the files a sidecar's marker recorded: one stat each."""
        return self.dirs[name].file_sizes(list(marker.files or {}))

    def _composite(self, shard: str, present: dict[str, DoneMarker], sizes: dict[str, dict[str, int]]) -> DoneMarker:
        """`sizes`: {sidecar: {file: size}}. A sidecar whose files are missing or changed is not read (its index
        may be the damaged file); the shard is then incomplete, and redone."""
        upstream = self.upstream_lineage(shard)
        damaged = {name for name, m in present.items() if damaged_files(m.files, sizes[name])}
        stale = sorted(name for name, m in present.items() if m.config_hash != self.hashes[name])
        chash = self.chash if not stale else "changed: " + ", ".join(stale)
        first_failure: dict[str, tuple[str, str]] = {}  # key -> (status, reason)
        keys: list[str] = []
        for name in self.dirs:  # in sidecar order: a failure counts with the first sidecar's reason
            if name not in present or name in damaged:
                continue
            index = self.dirs[name].read_index(shard).select(["key", "status", "error_reason"]).to_pylist()
            if not keys:
                keys = [r["key"] for r in index]
            for r in index:
                if r["status"] != OK and r["key"] not in first_failure:
                    first_failure[r["key"]] = (r["status"], r["error_reason"] or "unknown")
        by_reason: dict[str, int] = {}
        by_skipped: dict[str, int] = {}
        by_status = {OK: len(keys) - len(first_failure)}
        for status, reason in first_failure.values():
            by_status[status] = by_status.get(status, 0) + 1
            tally = by_skipped if status == SKIPPED else by_reason
            tally[reason] = tally.get(reason, 0) + 1
        complete = all(
            self.current(name, shard, marker=present.get(name), upstream=upstream, sizes=sizes.get(name, {}))
            for name in self.dirs
        )
        inputs = {m.input_lineage for m in present.values()}
        if complete:  # every sidecar is made from the images shard as it is (a kind's inputs join it)
            inputs = {upstream}
        return DoneMarker(
            shard,
            stage="features",
            rows=len(keys),
            config_hash=chash,
            input_lineage=inputs.pop() if len(inputs) == 1 else None,  # sidecars from different inputs: outdated
            complete=complete,
            files={f"{name}/{file}": rec for name, m in present.items() for file, rec in (m.files or {}).items()},
            counts={"by_status": {k: v for k, v in by_status.items() if v}, "by_reason": by_reason,
                    "by_skipped": by_skipped},
        )  # fmt: skip
