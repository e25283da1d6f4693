"""The stage contract: what a stage declares, and what the runner does with it without knowing which stage it is.

A `Stage` (one module each, listed in `curation.registry`) has a name (its CLI command), a config dataclass (the
CLI's flags are generated from its fields) and plans its work as one or more `Pass`es. A pass is a set of named
tasks over one folder of shards: its `Worker` is built once per Ray worker (`setup()` loads models) and
`process(shard, payload)` writes one shard and returns its `DoneMarker`. The runner skips done shards, refuses a
changed config unless `--force`, redoes shards whose input was redone, and totals the markers.

A stage with several passes (ingest: list, check keys, write; dedup: hash, pair, group) yields them one at a time,
so each pass is planned from what the previous one wrote; between passes it may map plain Ray tasks through the
`RunContext`. A stage that marks samples to leave out (dedup's keep flag) declares a `SampleFilter`; every stage
reads its input through `InputView`, which applies all registered filters, so a new filter needs no edit elsewhere.

Config dataclasses describe their CLI: every field becomes `--field-name` (underscores to dashes) with
`metadata={"help": "...", ...}`; optional keys: "choices" (a list), "aliases" (older flag names still accepted),
"nargs": "+" (a tuple field given as several values; other tuple fields take one comma-separated value), and
"cli": False (not an option: set by code). A field holding a nested config dataclass contributes that
dataclass's fields. Defaults live only in the dataclass.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from curation.errors import SetupError
from curation.layout import Layout
from curation.records import OK, Sample
from curation.shards import DoneMarker, StageDir, config_hash, lineage  # noqa: F401  (part of the contract)

RowsDone = Callable[[int, int], None]  # (rows done, rows in the shard): how far a running shard is


def no_progress(done: int, total: int) -> None:
    """The `RowsDone` of a shard nobody watches (tests, benches, `--no-progress`)."""


class Worker(Protocol):
    """One per Ray worker: `setup()` once (load models), then `process()` per shard, reporting its rows as it goes
    through `rows_done` (the runner's callback; the stage never sees how it reaches the driver)."""

    def setup(self) -> None: ...

    def process(self, shard: str, payload: Any, rows_done: RowsDone = no_progress) -> DoneMarker: ...


class ShardFolder(Protocol):
    """What the runner reads of a pass's output: a `StageDir`, or a composite of several (feature sidecars)."""

    url: str

    def done_shards(self) -> list[str]: ...

    def read_dones(self, shards: list[str]) -> dict[str, DoneMarker]: ...

    def file_sizes(self) -> dict[str, int]:
        """{file name as its done markers' `files` name it: size}, without reading a file."""
        ...

    def remove_shard(self, shard: str) -> None: ...

    def remove_stale_temporaries(self) -> None: ...


class Upstream(Protocol):
    """A pass's input as lineage: {shard: the lineage its output must be made from}."""

    def lineages(self, shards: list[str]) -> dict[str, str]: ...


@dataclass(frozen=True)
class Resources:
    """What one worker needs."""

    num_cpus: float = 1
    num_gpus: float = 0
    gpu_optional: bool = False  # model stages: run on CPU workers when the cluster has no GPU (laptops, CI)
    workers: int | None = None  # default: as many as the cluster's resources allow
    stateless: bool = False  # nothing to load: Ray tasks on warm pooled workers, no actor to start
    models: bool = False  # loads checkpoints: --no-progress silences their loading bars too

    @classmethod
    def for_device(cls, device: str, workers: int | None = None) -> Resources:
        """A model stage's workers: one GPU each ("auto": CPU workers where the cluster has no GPU)."""
        return cls(num_gpus=0 if device == "cpu" else 1, gpu_optional=device == "auto", workers=workers, models=True)


@dataclass(frozen=True)
class Needs:
    """An input a stage cannot run without: `what` ("images"), the folder holding it, and the stage that makes it."""

    what: str
    folder: ShardFolder
    stage: str  # the command to run first: "ingest"

    def missing(self) -> bool:
        return not self.folder.done_shards()

    def refusal(self, layout: Layout) -> SetupError:
        return SetupError(layout.missing(self.what, self.stage))


def needs_images(layout: Layout) -> Needs:
    return Needs("images", layout.images, "ingest")


@dataclass
class Pass:
    """One set of shard tasks writing one folder; the runner's unit of planning."""

    label: str  # "images", "dedup/hashes", "captions-dense": summary lines, logs, run_config.json
    folder: ShardFolder
    make_worker: Callable[[], Worker]  # picklable: it runs on the Ray worker
    tasks: list[tuple[str, Any]]  # (shard, payload)
    semantics: dict[str, Any]  # what decides the output: its hash is in every done marker
    resources: Resources = field(default_factory=Resources)
    upstream: Upstream | None = None  # redo a shard whose input's lineage changed; drop shards with no input
    # Config hashes of earlier releases whose shards hold what this pass writes (a superset): kept, not refused.
    compatible: tuple[str, ...] = ()


class RunContext(Protocol):
    """What the runner offers a stage while it plans its passes."""

    force: bool
    progress: bool

    def map(self, label: str, fn: Callable[..., Any], tasks: list[tuple[str, tuple]], **kw: Any) -> dict[str, Any]:
        """Run `fn(*args)` as plain Ray tasks (listings, key checks): {task id: result}. `max_in_flight=N` bounds
        the tasks at once (default: twice the cluster's CPUs)."""
        ...


class Stage(ABC):
    """A stage of the pipeline: one module, one line in `curation.registry`."""

    name: ClassVar[str]  # CLI command and registry key
    help: ClassVar[str]  # one line for `curation --help`
    config_type: ClassVar[type]  # a frozen dataclass; each field with `metadata={"help": ...}` becomes a flag
    sample_filter: ClassVar[type[SampleFilter] | None] = None  # a keep flag later stages apply

    def __init__(self, layout: Layout, config: Any) -> None:
        self.layout, self.config = layout, config
        self.result: Any = None  # what `finish` computed (dedup's groups, the report's path): `StageRun.result`

    def needs(self) -> list[Needs]:
        """The inputs this stage reads, earliest in the pipeline first (none: ingest reads the user's input)."""
        return []

    def preflight(self) -> None:  # noqa: B027 (optional hook)
        """Refuse what cannot work whatever the output holds (a model that cannot load): raise a CurationError.
        `curation run` calls it for every stage before the first one starts."""

    def check(self) -> None:
        """Refuse what cannot work on this output, before the output is locked or created: by default, the first
        input of `needs()` with no done shard, in one line naming the stage to run first."""
        for need in self.needs():
            if need.missing():
                raise need.refusal(self.layout)

    @abstractmethod
    def passes(self, ctx: RunContext) -> Iterator[Pass]:
        """The passes, one at a time: the runner runs each before asking for the next."""

    def finish(self, summaries: list[Any]) -> list[str]:
        """After the passes, under the lock: write reports; returns lines for the run summary."""
        return []

    def outputs(self) -> list[str]:
        """Where the results are, for the last lines the CLI prints."""
        return []


class SampleFilter(ABC):
    """Samples a stage marks to leave out, seen by every later stage through `InputView`.

    Later stages turn a removed sample into a `skipped` row with this filter's reason, and fold the filter's
    outcome into their input's lineage, so redoing the filter redoes exactly the shards whose removals changed.
    """

    reason: ClassVar[str]  # the skipped rows' error_reason
    keep_option: ClassVar[str]  # a config field that, when true, processes the removed samples too

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    @abstractmethod
    def active(self) -> bool:
        """Whether this output has the filter's results at all."""

    @abstractmethod
    def lineage(self, shard: str, input_lineage: str) -> str:
        """The input shard's lineage with this filter's outcome for the shard folded in."""

    @abstractmethod
    def removed(self, shard: str) -> dict[str, str]:
        """{key: why (one line)} for the shard's samples this filter leaves out."""


class KeepFlags(SampleFilter):
    """A filter kept as a folder of shards named like `images/`'s, each a parquet of keys with a `keep` flag; each
    done marker holds `images_lineage` (the images shard it describes) and `removed_digest` (`removed_digest()`)."""

    columns: ClassVar[list[str]]  # the index columns `why` reads

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        # A shard's flags are asked for twice (its removals, then its lineage): read and checked once. They cannot
        # change while this run holds the output lock.
        self._markers: dict[str, DoneMarker] = {}

    @abstractmethod
    def folder(self) -> StageDir:
        """Where the flags are (from `Layout`)."""

    @abstractmethod
    def why(self, row: dict[str, Any]) -> str:
        """The one-line reason of a removed row."""

    def stale(self, shard: str) -> str:
        """What to tell the user when the flags describe an older images shard."""
        return f"run `curation {self.folder().url.rstrip('/').rsplit('/', 1)[-1]}` again"

    def active(self) -> bool:
        return bool(self.folder().done_shards())

    def _marker(self, shard: str) -> DoneMarker:
        """The shard's marker, refused when it does not describe the images shard as it is now."""
        if shard in self._markers:
            return self._markers[shard]
        folder = self.folder()
        marker = folder.read_done(shard) if folder.has_done(shard) else None
        if marker is None or marker.extra.get("images_lineage") != self.layout.images.read_done(shard).upstream:
            raise SetupError(
                f"{folder.url} is out of date for images shard {shard} (ingested again since): {self.stale(shard)}"
            )
        self._markers[shard] = marker
        return marker

    def lineage(self, shard: str, input_lineage: str) -> str:
        """Unchanged where the filter removes nothing from the shard."""
        removed = self._marker(shard).extra.get("removed_digest", "")
        return config_hash({"input": input_lineage, "removed": removed}) if removed else input_lineage

    def removed(self, shard: str) -> dict[str, str]:
        if not self._marker(shard).extra.get("removed_digest"):
            return {}
        rows = self.folder().read_index(shard).select(["key", "keep", *self.columns]).to_pylist()
        return {r["key"]: self.why(r) for r in rows if r["keep"] is False}


def removed_digest(keys: list[str]) -> str:
    """What later stages' lineage sees of a keep-flag shard: which of its samples are removed ("" for none)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16] if keys else ""


def sample_filters(layout: Layout, config: Any) -> list[SampleFilter]:
    """The registered filters that apply to a stage with `config` on this output."""
    from curation.registry import stage_classes

    found = []
    for stage in stage_classes():
        kind = stage.sample_filter
        if kind is None or getattr(config, kind.keep_option, False):
            continue
        f = kind(layout)
        if f.active():
            found.append(f)
    return found


class InputView:
    """A stage's input folder with every applicable `SampleFilter` applied (an `Upstream` for the runner)."""

    def __init__(self, layout: Layout, folder: StageDir, config: Any) -> None:
        self.folder = folder
        self.filters = sample_filters(layout, config)

    def read_done(self, shard: str) -> DoneMarker:
        """The input shard's done marker, its lineage folded with each filter's outcome."""
        done = self.folder.read_done(shard)
        for f in self.filters:
            done.lineage = f.lineage(shard, done.upstream)
        return done

    def lineages(self, shards: list[str]) -> dict[str, str]:
        if not self.filters:
            return {s: m.upstream for s, m in self.folder.read_dones(shards).items()}
        return {s: self.read_done(s).upstream for s in shards}

    def removed(self, shard: str) -> dict[str, tuple[str, str]]:
        """{key: (reason, detail)} of the samples left out of the shard."""
        out: dict[str, tuple[str, str]] = {}
        for f in self.filters:
            for key, why in f.removed(shard).items():
                out.setdefault(key, (f.reason, why))
        return out

    def skip(self, shard: str, samples: Iterable[Sample]) -> int:
        """Turn the sound samples the filters leave out into skipped rows; returns how many."""
        removed = self.removed(shard)
        n = 0
        for s in samples:
            if s.status == OK and s.key in removed:
                s.skip(*removed[s.key])
                n += 1
        return n
