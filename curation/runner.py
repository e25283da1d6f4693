"""The only module that imports Ray: run a stage's shards on a pool of actors, skip done ones, summarise.

Every stage is a class with `setup()` (load models once) and `process(shard, payload) -> done summary`; the runner
holds one such object per Ray actor. Pure CPU stages have an empty `setup()`, so one code path serves all stages,
with the same retry rule: when an actor dies (OOM, lost node, SIGKILL) its shard goes back to the queue and runs
again from scratch on whichever actor is free; the atomic shard writer guarantees the half-done attempt never became
visible. The dead actor is restarted by Ray and rejoins the pool once it answers, so a cluster that lost a node for
good still finishes on the nodes it has left. An error raised by a shard (disk full, unwritable output) stops the
handing out of shards; the ones in flight finish, then the run fails with one line naming the shard.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import fsspec.implementations.local

from curation.shards import StageDir, config_hash, write_json_atomic


class SetupError(RuntimeError):
    """A problem with the run itself, the user's to fix (lock held, config changed, no GPU): one line, no traceback."""


class ShardError(SetupError):
    """A shard failed for a reason outside the code (disk full, unwritable output, no model): the run stopped.

    Shards done before it stay done; the failed one left nothing visible, so a rerun after the fix resumes.
    """


# Errors a shard raises that are the environment's, not a bug: reported in one line. Anything else keeps its traceback.
_USER_ERRORS = (OSError, ValueError, ImportError, SetupError)


@dataclass(frozen=True)
class Resources:
    """Declared beside each stage: what one worker (actor) needs."""

    num_cpus: float = 1
    num_gpus: float = 0
    gpu_optional: bool = False  # model stages: run on CPU actors when the cluster has no GPU (laptops, CI)
    workers: int | None = None  # default: as many as the cluster's resources allow
    stateless: bool = False  # nothing to load (ingest): Ray tasks on warm pooled workers, no actor to start


@dataclass
class RunSummary:
    stage: str
    shards_total: int
    shards_skipped: int
    shards_run: int = 0
    samples_run: int = 0
    samples: int = 0  # all shards of the stage, skipped ones included
    seconds: float = 0.0
    retried: int = 0  # shard attempts lost with their worker (killed, out of memory, node lost) and run again
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # every `by_*` tally of the done markers

    @property
    def by_status(self) -> dict[str, int]:
        return self.counts.get("by_status", {})

    @property
    def by_reason(self) -> dict[str, int]:
        return self.counts.get("by_reason", {})

    def add(self, done: dict[str, Any]) -> None:
        self.samples += done.get("rows", 0)
        for name, tally in done.items():
            if name.startswith("by_") and isinstance(tally, dict):
                dst = self.counts.setdefault(name, {})
                for k, v in tally.items():
                    dst[k] = dst.get(k, 0) + v

    def lines(self) -> list[str]:
        rate = self.samples_run / self.seconds if self.seconds else 0.0
        out = [
            f"[{self.stage}] shards: {self.shards_run} run, {self.shards_skipped} already done "
            f"(of {self.shards_total}); {self.samples_run} samples in {self.seconds:.1f}s ({rate:.1f}/s); "
            f"{self.samples} samples in all",
        ]
        if self.retried:
            out.append(f"[{self.stage}] {self.retried} shard attempt(s) lost with their worker and run again")
        for name, tally in sorted((n, t) for n, t in self.counts.items() if t):
            label = "failures by reason" if name == "by_reason" else name.removeprefix("by_").replace("_", " ")
            items = sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))
            out.append(f"[{self.stage}] {label}: " + ", ".join(f"{k}={v}" for k, v in items))
        return out


def pending_shards(
    stage_dir: StageDir,
    shards: list[str],
    chash: str,
    force: bool,
    input_lineage: dict[str, str] | None = None,
) -> list[str]:
    """Shards to (re)do: no done marker, made from an input that was redone since, or (composites) incomplete.

    A done shard made with another config is refused unless `force`: a rerun must not silently mix configs.
    """
    done = set(stage_dir.done_shards())
    # Every done shard, planned or not: an output made by an older plan (other shard names) is refused too.
    markers = _markers(stage_dir, sorted(done))
    changed = sorted(s for s, marker in markers.items() if marker.get("config_hash") != chash)
    if changed and not force:
        raise SetupError(
            f"{stage_dir.url} holds {len(changed)} shard(s) made with a different configuration "
            f"(e.g. {changed[0]}); use a new output folder, or --force to redo them with the new one"
        )
    outdated = {
        s
        for s, marker in markers.items()
        if (input_lineage is not None and marker.get("input_lineage") != input_lineage.get(s))
        or not marker.get("complete", True)
    }
    changed = set(changed)
    return [s for s in shards if s not in done or s in changed or s in outdated]


def _markers(stage_dir: StageDir, shards: list[str]) -> dict[str, dict[str, Any]]:
    """Done markers of `shards`: fetched together from a StageDir (concurrently on object stores), else one by one
    (a composite folder such as the features' sidecars, which offers `read_done` only)."""
    if isinstance(stage_dir, StageDir):
        return stage_dir.read_dones(shards)
    return {s: stage_dir.read_done(s) for s in shards}


def drop_stale_shards(stage_dir: StageDir, shards: list[str], chash: str) -> list[str]:
    """With --force: remove done shards of another config that the new plan does not redo.

    A smaller shard count (a larger --shard-size) leaves the old plan's last shards behind; kept, their keys would
    appear twice in the stage, once in a redone shard and once in the stale one.
    """
    planned = set(shards)
    outside = [s for s in stage_dir.done_shards() if s not in planned]
    stale = [s for s, marker in _markers(stage_dir, outside).items() if marker.get("config_hash") != chash]
    for shard in stale:
        stage_dir.remove_shard(shard)
    return stale


_HELD_LOCKS: set[str] = set()


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """One run per output at a time. A local flock dies with its process, so a SIGKILLed run never blocks a rerun.

    Object stores have no such lock: there, only one driver per output is supported (documented in the README).
    """
    fs, root = fsspec.core.url_to_fs(output)
    held = os.path.realpath(root)
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem) or held in _HELD_LOCKS:
        yield  # object store, or already held by this process (a multi-phase stage runs its phases under one lock)
        return
    try:
        os.makedirs(root, exist_ok=True)
        fh = open(os.path.join(root, ".curation.lock"), "a+")
    except OSError as exc:
        raise SetupError(f"cannot write to the output {output}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise SetupError(
            f"another curation run is using {output} ({holder}); wait for it or use another output"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    fh.flush()
    _HELD_LOCKS.add(held)
    try:
        yield
    finally:
        _HELD_LOCKS.discard(held)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def record_run_config(output: str, stage: str, config: dict[str, Any]) -> None:
    """OUT/run_config.json keeps the resolved config of each stage's latest run (nanoGPT-style)."""
    url = f"{output.rstrip('/')}/run_config.json"
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)  # object-store listings are cached per process; another run may have written it
    current = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    current.setdefault("stages", {})[stage] = {
        **config,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "argv": sys.argv,
    }
    write_json_atomic(url, current)


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to a cluster, or start an embedded local one (no dashboard, own temp dir, cleaned up)."""
    import ray

    if ray.is_initialized():  # a caller (tests, a notebook) already holds a session: reuse it
        yield
        return
    # Inside `ray job submit` the job's cluster is in RAY_ADDRESS: join it rather than start a local one.
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            _shutdown(ray)
        return
    # Usage stats send data off the machine; an embedded cluster has no reason to.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short path: Ray's socket names must stay < 108 bytes
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            configure_logging=False,
            log_to_driver=True,
        )
        yield
    finally:
        _shutdown(ray)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _shutdown(ray) -> None:
    # Actor handles and object refs caught in reference cycles are freed by the garbage collector; freed after
    # shutdown, their finalizers call into a dead core worker and abort the process (SIGABRT at exit). Free them now.
    gc.collect()
    ray.shutdown()


class _StageActor:
    """Holds one stage object for the actor's life: models load once per actor, not once per shard.

    The stage is built and set up by the first shard rather than in `__init__`: an error there then reaches the
    driver as the task's own exception (a missing model is one clear line), not as an actor that died in creation.
    """

    def __init__(self, make_stage: Callable[[], Any]) -> None:
        self._make_stage = make_stage
        self.stage: Any = None

    def ready(self) -> int:
        return os.getpid()

    def process(self, shard: str, payload: Any) -> dict[str, Any]:
        if self.stage is None:
            try:
                stage = self._make_stage()
                stage.setup()
            except _USER_ERRORS as exc:
                raise SetupError(f"worker setup failed: {type(exc).__name__}: {exc}") from exc
            self.stage = stage
        return self.stage.process(shard, payload)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _task_failure(name: str, shard: str | None, exc: Exception) -> Exception:
    """The exception that ends the run for a shard that raised: one line for the environment's errors."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, SetupError) or (shard is None and isinstance(cause, _USER_ERRORS)):
        return ShardError(f"[{name}] {_one_line(cause)}")
    if isinstance(cause, _USER_ERRORS):
        return ShardError(f"[{name}] shard {shard} failed: {_one_line(cause)}")
    return exc  # a bug: keep Ray's traceback


def run_shards(
    name: str,
    make_stage: Callable[[], Any],
    tasks: list[tuple[str, Any]],
    resources: Resources,
    *,
    shards_total: int,
    max_retries: int = 3,
    progress: bool = True,
) -> RunSummary:
    """Run `tasks` ([(shard, payload)]) on a pool of actors; returns the summary of the shards run.

    A shard whose actor dies is queued again, at most `max_retries` times. Retries are the runner's, not Ray's
    (`max_task_retries=0`): Ray would hold the shard for the same actor until it restarts, which never happens
    when its node is gone and the rest of the cluster is full.
    """
    import ray
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
    from tqdm import tqdm

    summary = RunSummary(name, shards_total=shards_total, shards_skipped=shards_total - len(tasks))
    started = time.time()
    if not tasks:
        return summary
    num_gpus, n_workers = _placement(resources, len(tasks))
    actor_cls = ray.remote(
        num_cpus=resources.num_cpus,
        num_gpus=num_gpus,
        max_restarts=-1,  # a dead actor comes back (on any node with room) and rejoins the pool
        max_task_retries=0,  # ... but its shard is requeued by us, for any free actor
    )(_StageActor)
    actors = [actor_cls.remote(make_stage) for _ in range(n_workers)]
    queue: deque[tuple[str, Any]] = deque(tasks)
    idle = list(reversed(actors))
    working: dict[Any, tuple[Any, str, Any]] = {}  # task ref -> (actor, shard, payload)
    waking: dict[Any, Any] = {}  # ready() ref -> an actor restarting after its death
    lost: dict[str, int] = {}
    failure: Exception | None = None
    bar = tqdm(total=len(tasks), desc=f"{name} shards", unit="shard", disable=not progress, file=sys.stderr)
    try:
        while working or (queue and failure is None):
            while queue and idle and failure is None:
                actor = idle.pop()
                shard, payload = queue.popleft()
                working[actor.process.remote(shard, payload)] = (actor, shard, payload)
            if not working and not waking:
                raise SetupError(f"[{name}] every worker is gone; {len(queue)} shard(s) were not run")
            # With nothing in flight this waits for a restarted actor: on a cluster with no room left for one,
            # that is as long as it takes a node to join.
            ready, _ = ray.wait([*working, *waking], num_returns=1)
            ref = ready[0]
            if ref in waking:
                actor = waking.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except ActorDiedError:
                    pass  # gone for good (killed, or its constructor failed): the pool shrinks
                except RayActorError:
                    waking[actor.ready.remote()] = actor  # still restarting: ask again
                continue
            actor, shard, payload = working.pop(ref)
            try:
                done = ray.get(ref)
            except RayActorError as exc:
                # The worker died mid-shard: what it wrote were temporaries, so the shard simply runs again.
                lost[shard] = lost.get(shard, 0) + 1
                if lost[shard] > max_retries:
                    failure = failure or ShardError(
                        f"[{name}] shard {shard} lost its worker {lost[shard]} times "
                        f"(out of memory? lost nodes?); last: {_one_line(exc)[:300]}"
                    )
                else:
                    summary.retried += 1
                    queue.appendleft((shard, payload))
                waking[actor.ready.remote()] = actor
                continue
            except RayTaskError as exc:
                failure = failure or _task_failure(name, shard, exc)  # let the shards in flight finish first
                idle.append(actor)
                continue
            summary.add(done)
            summary.samples_run += done.get("rows", 0)
            summary.shards_run += 1
            elapsed = time.time() - started
            bar.set_postfix(samples=summary.samples_run, per_s=f"{summary.samples_run / max(elapsed, 1e-9):.1f}")
            bar.update(1)
            idle.append(actor)
        if failure is not None:
            raise failure
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    summary.seconds = time.time() - started
    return summary


def run_tasks(
    name: str,
    fn: Callable[..., Any],
    tasks: list[tuple[str, tuple]],
    *,
    max_in_flight: int | None = None,
    progress: bool = True,
    shard_errors: bool = False,
) -> dict[str, Any]:
    """Run `fn(*args)` for each (task id, args) as Ray tasks; returns {task id: result}.

    For work with nothing to load whose results are small (listings, key checks, ingest shards): Ray's own retry
    serves (a task whose worker dies runs again; what it writes is atomic). An error raised by a task stops the
    handing out of tasks; the ones in flight finish (a shard is never cut off between its files and its done
    marker), then the run fails in one line (naming the task as a shard with `shard_errors`).
    """
    import ray
    from ray.exceptions import RayTaskError
    from tqdm import tqdm

    remote = ray.remote(num_cpus=1, max_retries=3)(fn)
    # Twice the cluster's CPUs in flight: every CPU busy, and a failure stops the run within about one wave.
    limit = max_in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    queue = deque(tasks)
    running: dict[Any, str] = {}
    results: dict[str, Any] = {}
    failure: Exception | None = None
    bar = tqdm(total=len(tasks), desc=name, unit="task", disable=not progress, file=sys.stderr)
    try:
        while running or (queue and failure is None):
            while queue and failure is None and len(running) < limit:
                task_id, args = queue.popleft()
                running[remote.remote(*args)] = task_id
            # The first to finish, then whatever else has finished by now: no task waits on another's end.
            ready, rest = ray.wait(list(running), num_returns=1)
            if rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                task_id = running.pop(ref)
                try:
                    results[task_id] = ray.get(ref)
                except RayTaskError as exc:
                    failure = failure or _task_failure(name, task_id if shard_errors else None, exc)
                    continue
                bar.update(1)
        if failure is not None:
            raise failure
    finally:
        bar.close()
        for ref in running:  # only when interrupted (Ctrl-C): nothing is left running otherwise
            ray.cancel(ref)
    return results


def _placement(resources: Resources, n_tasks: int) -> tuple[float, int]:
    """(GPUs per actor, number of actors) for this cluster."""
    import ray

    available = ray.cluster_resources()
    gpus = available.get("GPU", 0)
    num_gpus = resources.num_gpus
    if num_gpus and gpus < num_gpus:
        if not resources.gpu_optional:
            raise SetupError(f"this stage asks for {num_gpus} GPU per worker, the cluster has {gpus}")
        num_gpus = 0
    if resources.workers:
        return num_gpus, max(1, min(resources.workers, n_tasks))
    if num_gpus:
        slots = int(gpus // num_gpus)
    else:
        slots = int(available.get("CPU", 1) // max(resources.num_cpus, 1e-9))
    return num_gpus, max(1, min(slots, n_tasks))


def _process_once(make_stage: Callable[[], Any], shard: str, payload: Any) -> dict[str, Any]:
    stage = make_stage()
    stage.setup()
    return stage.process(shard, payload)


def _run_stateless(
    name: str,
    make_stage: Callable[[], Any],
    tasks: list[tuple[str, Any]],
    resources: Resources,
    *,
    shards_total: int,
    progress: bool = True,
) -> RunSummary:
    """`run_shards` for stages with nothing to load: each shard a Ray task, on workers that are already warm."""
    started = time.time()
    summary = RunSummary(name, shards_total=shards_total, shards_skipped=shards_total - len(tasks))
    results = run_tasks(
        name,
        _process_once,
        [(shard, (make_stage, shard, payload)) for shard, payload in tasks],
        max_in_flight=resources.workers,
        progress=progress,
        shard_errors=True,
    )
    for done in results.values():
        summary.add(done)
        summary.samples_run += done.get("rows", 0)
        summary.shards_run += 1
    summary.seconds = time.time() - started
    return summary


def run_stage(
    *,
    output: str,
    stage_dir: StageDir,
    make_stage: Callable[[], Any],
    tasks: list[tuple[str, Any]],
    semantics: dict[str, Any],
    input_dir: StageDir | None = None,
    resources: Resources,
    ray_address: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Lock the output, skip done shards, run the rest on Ray, and total the stage's done markers.

    `stage_dir` is a `StageDir`, or an object with the same listing methods that presents several sidecar folders
    as one (features: `FeatureDirs`). `input_dir` is the stage the tasks' shards come from: a shard whose input was
    redone since is redone too, and a shard whose input no longer exists is removed (its keys now live elsewhere).
    """
    with output_lock(output):
        chash = config_hash(semantics)
        shards = [shard for shard, _ in tasks]
        stage_dir.remove_stale_temporaries()
        upstream = None
        if input_dir is not None:
            upstream = {s: m.get("lineage", "") for s, m in _markers(input_dir, shards).items()}
            for orphan in sorted(set(stage_dir.done_shards()) - set(shards)):
                stage_dir.remove_shard(orphan)
        todo = set(pending_shards(stage_dir, shards, chash, force, upstream))
        if force:
            drop_stale_shards(stage_dir, shards, chash)
        name = stage_dir.url.rstrip("/").rsplit("/", 1)[-1]
        record_run_config(output, name, {**semantics, "config_hash": chash})
        pending = [t for t in tasks if t[0] in todo]
        try:
            if pending:
                with ray_session(ray_address):
                    run = _run_stateless if resources.stateless else run_shards
                    summary = run(name, make_stage, pending, resources, shards_total=len(tasks), progress=progress)
            else:  # a finished stage: no cluster to start or connect to
                summary = RunSummary(name, shards_total=len(tasks), shards_skipped=len(tasks))
        finally:
            # The workers are finished or killed: a temporary left now is a dead attempt's (a retried shard's).
            with contextlib.suppress(OSError):
                stage_dir.remove_stale_temporaries()
        done = set(stage_dir.done_shards())
        for marker in _markers(stage_dir, [s for s in shards if s not in todo and s in done]).values():
            summary.add(marker)
        return summary
