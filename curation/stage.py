"""The stage contract: what a stage declares, and what the runner does with it without knowing which stage it is.

A `Stage` (one module each, listed in `curation.registry`) has a name (its CLI command), a config dataclass (the
CLI's flags are generated from its fields) and plans its work as one or more `Pass`es. A pass is a set of named
tasks over one folder of shards: its `Worker` is built once per Ray worker (`setup()` loads models) and
`process(shard, payload)` writes one shard and returns its `DoneMarker`. The runner skips done shards, refuses a
changed config unless `--force`, redoes shards whose input was redone, and totals the markers.

A stage with several passes (ingest: list, check keys, write; dedup: hash, pair, group) yields them one at a time,
so each pass is planned from what the previous one wrote; between passes it may map plain Ray tasks through the
`RunContext`.

Filters: a stage that marks samples to leave out (dedup's keep flags, the size filter's) declares its
`SampleFilter`s in `sample_filters`. A stage reads its input through `Stage.input_view(folder)`: the registered
filters that apply to it, found through the registry, so a new filter needs no edit elsewhere. A filter applies only
to the stages after its `applies_after` in registry order; a stage's `include` field (`--include REASON,...`,
`include_field()`) leaves out the filters whose reasons it names. A keep-flag shard records the lineage of each
folder it read (`reads`), and is refused as stale once any of them was made again.

Config dataclasses describe their CLI: every field becomes `--field-name` (underscores to dashes) with
`metadata={"help": "...", ...}`; optional keys: "choices" (a list, or an iterable read when the CLI is built),
"aliases" (older flag names still accepted), "nargs": "+" (a tuple field given as several values; other tuple fields
take one comma-separated value), "shorthands": {flag name: values} (flags taking no value that add these values to a
tuple field, as `--include-duplicates` means `--include duplicate`), and "cli": False (not an option: set by code).
A field holding a nested config dataclass contributes that dataclass's fields. Defaults live only in the dataclass.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from curation.errors import ConfigError, SetupError
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
        the tasks at once (default: twice the cluster's CPUs); `on_result=f` calls `f(task id, result)` as each
        finishes, and with `keep_results=False` no result is kept (a total folded in `f` holds what is needed)."""
        ...


class Stage(ABC):
    """A stage of the pipeline: one module, one line in `curation.registry`."""

    name: ClassVar[str]  # CLI command and registry key
    help: ClassVar[str]  # one line for `curation --help`
    config_type: ClassVar[type]  # a frozen dataclass; each field with `metadata={"help": ...}` becomes a flag
    # Samples this stage marks to leave out (dedup's keep flags): the later stages' input views apply them.
    sample_filters: ClassVar[tuple[type[SampleFilter], ...]] = ()

    def __init__(self, layout: Layout, config: Any) -> None:
        self.layout, self.config = layout, config
        self.result: Any = None  # what `finish` computed (dedup's groups, the report's path): `StageRun.result`

    # `curation run`: an opt-in stage runs only when asked for (`--<name>`, or any of its flags); a stage with
    # `again_after` runs once more right after that stage (quality: clip scores of the sets caption made).
    opt_in: ClassVar[bool] = False
    again_after: ClassVar[str | None] = None

    def before_again(self) -> Stage:
        """This stage as `curation run` runs it the first time, before `again_after` ran (default: itself)."""
        return self

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

    def input_view(self, folder: StageDir) -> InputView:
        """`folder` (`images/`, a caption set) as this stage reads it: with the registered filters of the stages
        before it applied, but those whose reasons are all in the config's `include` (a stage without that field
        applies every one)."""
        return InputView(folder, sample_filters(self.layout, self.name, getattr(self.config, "include", ())))


class SampleFilter(ABC):
    """Samples a stage marks to leave out, seen by the stages after it through their `InputView`.

    A filter applies only to the stages strictly after `applies_after` in registry order: never to the stage that
    makes it, nor to one before it (dedup's flags do not reach the size filter; a filter on captions reaches stats,
    not caption). Later stages turn a removed sample into a `skipped` row with the filter's reason, and fold the
    filter's outcome into their input's lineage, so redoing the filter redoes exactly the shards whose removals
    changed. A stage declares its filters in `Stage.sample_filters`; the registry is how every later stage finds them.
    """

    reasons: ClassVar[tuple[str, ...]]  # every error_reason its skipped rows carry; `--include` names these
    applies_after: ClassVar[str]  # a stage name of `curation.registry.STAGES`

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    @abstractmethod
    def active(self) -> bool:
        """Whether this output has the filter's results at all."""

    @abstractmethod
    def lineage(self, shard: str, input_lineage: str) -> str:
        """The input shard's lineage with this filter's outcome for the shard folded in."""

    @abstractmethod
    def removed(self, shard: str) -> dict[str, tuple[str, str]]:
        """{key: (reason, one-line detail)} for the shard's samples this filter leaves out."""


class KeepFlags(SampleFilter):
    """A filter kept as a folder of shards named like `images/`'s: a parquet of `key`, `keep` (false: removed),
    `reason` and `detail` (null when kept). Each done marker's `extra` holds `removed_digest` (`removed_digest()`)
    and `reads`: {folder, as `Layout.shard_folder` names it: the lineage of its same-named shard when the flags were
    made} (`keep_flags_extra()` writes both). A flag shard is stale when any folder it reads was made again since:
    later stages refuse it, in one line naming what changed and the command to rerun."""

    columns: ClassVar[tuple[str, ...]] = ("reason", "detail")  # the index columns `entry` reads

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        # A shard's flags are asked for twice (its removals, then its lineage): read and checked once. They cannot
        # change while this run holds the output lock.
        self._markers: dict[str, DoneMarker] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_markers": {}}  # workers read their own shards' markers: the driver's stay here

    @abstractmethod
    def folder(self) -> StageDir:
        """Where the flags are (from `Layout`)."""

    def entry(self, row: dict[str, Any]) -> tuple[str, str]:
        """(reason, detail) of a removed row."""
        return row["reason"], row["detail"]

    def active(self) -> bool:
        return bool(self.folder().done_shards())

    def _marker(self, shard: str) -> DoneMarker:
        """The shard's marker, refused when a folder it was made from was made again since."""
        if shard in self._markers:
            return self._markers[shard]
        folder = self.folder()
        name = folder.url[len(self.layout.root) :].strip("/")
        marker = folder.read_done(shard) if folder.has_done(shard) else None
        changed = "images" if marker is None else next(iter(_changed_reads(self.layout, shard, marker)), None)
        if changed is not None:
            raise SetupError(
                f"{name} is out of date for shard {shard} ({changed} made again since): run `curation "
                f"{folder.command}` again, or pass --include {','.join(self.reasons)}"
            )
        self._markers[shard] = marker
        return marker

    def lineage(self, shard: str, input_lineage: str) -> str:
        """Unchanged where the filter removes nothing from the shard."""
        removed = self._marker(shard).extra.get("removed_digest", "")
        return config_hash({"input": input_lineage, "removed": removed}) if removed else input_lineage

    def removed(self, shard: str) -> dict[str, tuple[str, str]]:
        if not self._marker(shard).extra.get("removed_digest"):
            return {}
        table = self.folder().read_index(shard)
        columns = [c for c in ("key", "keep", *self.columns) if c in table.column_names]  # older flags lack some
        return {r["key"]: self.entry(r) for r in table.select(columns).to_pylist() if r["keep"] is False}


def removed_digest(keys: list[str]) -> str:
    """What later stages' lineage sees of a keep-flag shard: which of its samples are removed ("" for none)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16] if keys else ""


def keep_flags_extra(layout: Layout, shard: str, reads: Iterable[str], removed: list[str]) -> dict[str, Any]:
    """A keep-flag shard's done marker `extra`: the lineage of each folder it `reads` (`images`, `captions-dense`)
    now, and the digest of the keys it removes."""
    lineages = {rel: layout.shard_folder(rel)[0].read_done(shard).upstream for rel in reads}
    extra = {"reads": lineages, "removed_digest": removed_digest(removed)}
    if "images" in lineages:  # what releases before `reads` check: they keep reading these flags
        extra["images_lineage"] = lineages["images"]
    return extra


def marker_reads(marker: DoneMarker) -> dict[str, str]:
    """{folder: lineage} a keep-flag shard was made from (markers before `reads` hold `images_lineage` alone)."""
    reads = marker.extra.get("reads")
    return dict(reads) if reads is not None else {"images": marker.extra.get("images_lineage")}


def _changed_reads(layout: Layout, shard: str, marker: DoneMarker) -> list[str]:
    """The folders a keep-flag shard read whose same-named shard is not the one it was made from any more."""
    changed = []
    for rel, made_from in marker_reads(marker).items():
        folder = layout.shard_folder(rel)[0]
        if (folder.read_done(shard).upstream if folder.has_done(shard) else None) != made_from:
            changed.append(rel)
    return changed


def registered_reasons() -> tuple[str, ...]:
    """Every registered filter's reasons, in registry order: what `--include` may name."""
    from curation.registry import stage_classes

    return tuple(dict.fromkeys(r for stage in stage_classes() for kind in stage.sample_filters for r in kind.reasons))


class _RegisteredReasons:
    """`--include`'s choices, read from the registry when the CLI is built (a config class cannot import it)."""

    def __iter__(self) -> Iterator[str]:
        return iter(registered_reasons())


# The flag earlier releases had on every stage that honours filters: {flag: the `--include` values it means}.
INCLUDE_ALIASES = {"include-duplicates": ("duplicate",)}


def include_field(what: str = "process") -> Any:
    """The `include` config field of a stage that honours filters: the reasons whose removals it ignores. Not in
    any config hash: the filters a stage applies are in its input's lineage."""
    return field(
        default=(),
        metadata={
            "help": f"also {what} the samples these filters remove (default: skip them)",
            "choices": _RegisteredReasons(),
            "shorthands": INCLUDE_ALIASES,
        },
    )


def check_include(include: Iterable[str]) -> tuple[str, ...]:
    """`include` as a tuple; ConfigError (one line) naming a reason no registered filter has."""
    include = tuple(include)
    if not include:
        return include  # the common case reads no registry (it imports every stage module)
    known = registered_reasons()
    unknown = [r for r in include if r not in known]
    if unknown:
        choose = ", ".join(known) or "none (no filter is registered)"
        raise ConfigError(f"--include {unknown[0]}: no filter removes samples for this reason; one of {choose}")
    return include


def sample_filters(layout: Layout, stage: str, include: Iterable[str] = ()) -> list[SampleFilter]:
    """The registered filters that apply to `stage` on this output, in registry order: made by an earlier stage
    (`applies_after` before `stage`), active, and not all of whose reasons are in `include`."""
    from curation.registry import stage_classes

    order = [cls.name for cls in stage_classes()]
    if stage not in order:
        raise TypeError(f"stage {stage!r} is not in curation.registry.STAGES")
    included = set(include)
    found = []
    for cls in stage_classes():
        for kind in cls.sample_filters:
            if kind.applies_after not in order:
                raise TypeError(f"{kind.__name__}.applies_after {kind.applies_after!r} is no registered stage")
            if order.index(kind.applies_after) >= order.index(stage) or set(kind.reasons) <= included:
                continue
            f = kind(layout)
            if f.active():
                found.append(f)
    return found


class InputView:
    """A stage's input folder with the `SampleFilter`s that apply to it (an `Upstream` for the runner). Made by
    `Stage.input_view`; picklable, so the stage gives it to its workers."""

    def __init__(self, folder: StageDir, filters: list[SampleFilter]) -> None:
        self.folder, self.filters = folder, filters

    def over(self, folder: StageDir) -> InputView:
        """The same filters over another input folder (a caption set beside `images/`)."""
        return InputView(folder, self.filters)

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
        """{key: (reason, detail)} of the samples left out of the shard (the first filter's, where several are)."""
        out: dict[str, tuple[str, str]] = {}
        for f in self.filters:
            for key, why in f.removed(shard).items():
                out.setdefault(key, why)
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
