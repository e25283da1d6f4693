"""The only module that imports Ray: the session, plain tasks, and the pool of actors that runs a pass's shards.

Each actor holds one `Worker` for its life (models load once per actor). When an actor dies (OOM, lost node,
SIGKILL) its shard goes back to the queue and runs again from scratch on whichever actor is free; the atomic shard
writer guarantees the half-done attempt never became visible. The dead actor is restarted by Ray and rejoins the
pool once it answers, so a cluster that lost a node for good still finishes on the nodes it has left. An error
raised by a shard (disk full, unwritable output) stops the handing out of shards; the ones in flight finish, then
the run fails with one line naming the shard. The decisions live in `Pool`, which knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from curation.errors import CurationError, SetupError, ShardError
from curation.runner.progress import POLL_EVERY_S, Progress
from curation.shards import DoneMarker
from curation.stage import Resources, RowsDone, Worker, no_progress

# Errors that are the environment's, not a bug: reported in one line. Anything else keeps its traceback.
SHARD_ERRORS = (OSError, CurationError)
# Loading a worker's models also fails on the user's choices (an unknown model type is transformers' ValueError).
SETUP_ERRORS = (*SHARD_ERRORS, ImportError, ValueError)


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to a cluster, or start an embedded local one (no dashboard, own temp dir, cleaned up)."""
    import ray

    if ray.is_initialized():  # a caller (tests, a notebook, `curation run`) already holds a session: reuse it
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
    with contextlib.suppress(ValueError):  # the progress board is detached: it would outlive a joined cluster's job
        ray.kill(ray.get_actor(BOARD))
    gc.collect()
    ray.shutdown()


class Cluster:
    """A Ray session started on first use: a stage with nothing left to do connects to nothing."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._stack = contextlib.ExitStack()
        self._started = False

    def ensure(self) -> None:
        if not self._started:
            self._stack.enter_context(ray_session(self.address))
            self._started = True

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


BOARD = "curation-progress"  # the progress board's actor name, in the driver's own namespace


class _Board:
    """Where workers leave their running shards' latest (rows done, rows in the shard) for the driver to take.

    One per Ray session (a named actor, no CPU); each pass run reads its own `key`."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, tuple[int, int]]] = {}

    def report(self, key: str, shard: str, done: int, total: int) -> None:
        self.reports.setdefault(key, {})[shard] = (done, total)

    def take(self, key: str) -> dict[str, tuple[int, int]]:
        return self.reports.pop(key, {})


class _Progress:
    """The driver's end of a pass's progress: the board (None: progress is off) and this pass run's key."""

    def __init__(self, name: str, progress: bool) -> None:
        import ray

        self.key = f"{name} {time.time_ns()}"
        self.board = None
        if progress:
            # Detached: a pass run's handle going away must not kill the board while the next pass run has just
            # looked it up by name (a non-detached actor dies with its creator's last handle). `_shutdown` ends it.
            actor = ray.remote(num_cpus=0)(_Board)
            self.board = actor.options(name=BOARD, get_if_exists=True, lifetime="detached").remote()

    def rows_done(self, shard: str) -> RowsDone:
        """The callback a worker is given for `shard` (picklable: it travels with the task)."""
        return _Reporter(self.board, self.key, shard) if self.board is not None else no_progress

    def take(self) -> dict[str, tuple[int, int]]:
        import ray

        return ray.get(self.board.take.remote(self.key)) if self.board is not None else {}


class _Reporter:
    """A worker's `RowsDone` callback: sends the latest report at most every `POLL_EVERY_S`, and the shard's last."""

    def __init__(self, board: Any, key: str, shard: str) -> None:
        self.board, self.key, self.shard = board, key, shard
        self.last = float("-inf")

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self.last >= POLL_EVERY_S:
            self.last = now
            self.board.report.remote(self.key, self.shard, done, total)  # no reply awaited


class _StageActor:
    """Holds one worker for the actor's life: models load once per actor, not once per shard.

    The worker is built and set up by the first shard rather than in `__init__`: an error there then reaches the
    driver as the task's own exception (a missing model is one clear line), not as an actor that died in creation.
    """

    def __init__(self, make_worker: Callable[[], Worker], quiet: bool = False) -> None:
        self._make_worker, self._quiet = make_worker, quiet
        self.worker: Worker | None = None

    def ready(self) -> int:
        return os.getpid()

    def process(self, shard: str, payload: Any, rows_done: RowsDone = no_progress) -> DoneMarker:
        if self.worker is None:
            if self._quiet:
                quiet_model_loading()
            self.worker = _set_up(self._make_worker)
        return self.worker.process(shard, payload, rows_done)


def quiet_model_loading() -> None:
    """`--no-progress` in a worker: no loading bars from huggingface_hub, transformers or diffusers either."""
    import importlib
    import importlib.util

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # huggingface_hub (and transformers) read it on import
    for module, switch in (
        ("huggingface_hub.utils", "disable_progress_bars"),
        ("transformers.utils.logging", "disable_progress_bar"),
        ("diffusers.utils.logging", "disable_progress_bar"),  # diffusers reads no variable: switched off here
    ):
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            getattr(importlib.import_module(module), switch)()


def _set_up(make_worker: Callable[[], Worker]) -> Worker:
    try:
        worker = make_worker()
        worker.setup()
    except SETUP_ERRORS as exc:
        raise SetupError(f"worker setup failed: {type(exc).__name__}: {exc}") from exc
    return worker


def _process_once(make_worker: Callable[[], Worker], shard: str, payload: Any, rows_done: RowsDone) -> DoneMarker:
    return _set_up(make_worker).process(shard, payload, rows_done)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def task_failure(name: str, shard: str | None, exc: Exception) -> Exception:
    """The exception that ends the run for a shard that raised: one line for the environment's errors."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, SetupError) or (shard is None and isinstance(cause, SHARD_ERRORS)):
        return ShardError(f"[{name}] {_one_line(cause)}")
    if isinstance(cause, SHARD_ERRORS):
        return ShardError(f"[{name}] shard {shard} failed: {_one_line(cause)}")
    return exc  # a bug: keep Ray's traceback


@dataclass
class Pool:
    """The actor pool's bookkeeping, without Ray: which shard goes to which actor, and what a lost worker means.

    The Ray loop reports events (`finished`, `raised`, `worker_lost`, `woke`) and asks for `assignments()`; a
    shard whose worker died goes back to the front of the queue, at most `max_retries` times; a shard that raised
    stops the handing out, and the shards in flight still finish.
    """

    name: str
    queue: deque[tuple[str, Any]]
    idle: list[Any]
    max_retries: int = 3
    working: dict[Any, tuple[Any, str, Any]] = field(default_factory=dict)  # task -> (actor, shard, payload)
    restarting: set[Any] = field(default_factory=set)  # actors whose restart we wait for
    lost: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    failure: Exception | None = None

    def assignments(self) -> list[tuple[Any, str, Any]]:
        """(actor, shard, payload) to start now; the caller reports each started task with `started`."""
        out = []
        while self.queue and self.idle and self.failure is None:
            out.append((self.idle.pop(), *self.queue.popleft()))
        return out

    def started(self, task: Any, actor: Any, shard: str, payload: Any) -> None:
        self.working[task] = (actor, shard, payload)

    @property
    def running(self) -> bool:
        """Whether to keep waiting: work in flight, or shards left while nothing has failed."""
        if self.queue and self.failure is None and not (self.working or self.restarting or self.idle):
            raise SetupError(f"[{self.name}] every worker is gone; {len(self.queue)} shard(s) were not run")
        return bool(self.working) or (bool(self.queue) and self.failure is None)

    def finished(self, task: Any) -> str:
        actor, shard, _ = self.working.pop(task)
        self.idle.append(actor)
        return shard

    def raised(self, task: Any, failure: Exception) -> None:
        actor, _, _ = self.working.pop(task)
        self.failure = self.failure or failure
        self.idle.append(actor)

    def worker_lost(self, task: Any, error: str) -> Any:
        """The actor died mid-shard: requeue the shard (or fail after `max_retries`); returns the actor to wake."""
        actor, shard, payload = self.working.pop(task)
        self.lost[shard] = self.lost.get(shard, 0) + 1
        if self.lost[shard] > self.max_retries:
            self.failure = self.failure or ShardError(
                f"[{self.name}] shard {shard} lost its worker {self.lost[shard]} times "
                f"(out of memory? lost nodes?); last: {_one_line(error)[:300]}"
            )
        else:
            self.retried += 1
            self.queue.appendleft((shard, payload))
        self.restarting.add(actor)
        return actor

    def woke(self, actor: Any, alive: bool | None) -> None:
        """A restarting actor answered: back in the pool (True), gone for good (False), or not yet (None)."""
        if alive is None:
            return
        self.restarting.discard(actor)
        if alive:
            self.idle.append(actor)


def run_actors(
    name: str,
    make_worker: Callable[[], Worker],
    tasks: list[tuple[str, Any]],
    resources: Resources,
    on_done: Callable[[DoneMarker, int], None],
    *,
    max_retries: int = 3,
    progress: bool = True,
    on_failed: Callable[[str, int, str], None] | None = None,
) -> int:
    """Run `tasks` ([(shard, payload)]) on a pool of actors, calling `on_done(marker, attempt)` per shard, and
    `on_failed(shard, attempt, error)` per attempt that wrote no shard; returns how many attempts were lost with
    their worker and run again.

    Retries are the runner's, not Ray's (`max_task_retries=0`): Ray would hold the shard for the same actor until it
    restarts, which never happens when its node is gone and the rest of the cluster is full.
    """
    import ray
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

    if not tasks:
        return 0
    num_gpus, n_workers = _placement(resources, len(tasks))
    actor_cls = ray.remote(
        num_cpus=resources.num_cpus,
        num_gpus=num_gpus,
        max_restarts=-1,  # a dead actor comes back (on any node with room) and rejoins the pool
        max_task_retries=0,  # ... but its shard is requeued by us, for any free actor
    )(_StageActor)
    actors = [actor_cls.remote(make_worker, resources.models and not progress) for _ in range(n_workers)]
    pool = Pool(name, deque(tasks), list(reversed(actors)), max_retries)
    waking: dict[Any, Any] = {}  # ready() ref -> a restarting actor
    board = _Progress(name, progress)
    view = Progress(name, len(tasks), enabled=progress, poll=board.take)
    try:
        while pool.running:
            for actor, shard, payload in pool.assignments():
                pool.started(actor.process.remote(shard, payload, board.rows_done(shard)), actor, shard, payload)
            # With nothing in flight this waits for a restarted actor: on a cluster with no room left for one,
            # that is as long as it takes a node to join.
            ready, _ = ray.wait([*pool.working, *waking], num_returns=1, timeout=POLL_EVERY_S)
            view.tick()
            if not ready:
                continue
            ref = ready[0]
            if ref in waking:
                actor = waking.pop(ref)
                try:
                    ray.get(ref)
                    pool.woke(actor, True)
                except ActorDiedError:
                    pool.woke(actor, False)  # gone for good (killed, or its constructor failed): the pool shrinks
                except RayActorError:
                    waking[actor.ready.remote()] = actor  # still restarting: ask again
                continue
            shard = pool.working[ref][1]
            try:
                done = ray.get(ref)
            except RayActorError as exc:
                # The worker died mid-shard: what it wrote were temporaries, so the shard simply runs again.
                actor = pool.worker_lost(ref, str(exc))
                waking[actor.ready.remote()] = actor
                if on_failed is not None:
                    on_failed(shard, pool.lost[shard], f"worker lost: {_one_line(exc)[:300]}")
                continue
            except RayTaskError as exc:
                pool.raised(ref, task_failure(name, shard, exc))  # the shards in flight finish first
                if on_failed is not None:
                    on_failed(shard, pool.lost.get(shard, 0) + 1, _one_line(getattr(exc, "cause", exc))[:300])
                continue
            pool.finished(ref)
            on_done(done, pool.lost.get(shard, 0) + 1)
            view.finished(shard, done.rows)
        if pool.failure is not None:
            raise pool.failure
    finally:
        view.close()
        for actor in actors:
            ray.kill(actor)
    return pool.retried


def run_tasks(
    name: str,
    fn: Callable[..., Any],
    tasks: list[tuple[str, tuple]],
    *,
    max_in_flight: int | None = None,
    progress: bool = True,
    shard_errors: bool = False,
    on_result: Callable[[str, Any], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
    view: Progress | None = None,
    keep_results: bool = True,
) -> dict[str, Any]:
    """Run `fn(*args)` for each (task id, args) as Ray tasks; returns {task id: result} (empty with
    `keep_results=False`: a caller that folds each result into a total through `on_result` holds none of them).

    For work with nothing to load whose results are small (listings, key checks, ingest shards): Ray's own retry
    serves (a task whose worker dies runs again; what it writes is atomic). An error raised by a task stops the
    handing out of tasks; the ones in flight finish (a shard is never cut off between its files and its done
    marker), then the run fails in one line (naming the task as a shard with `shard_errors`). Progress counts tasks,
    unless the caller passes its own `view` (and reports what finished through `on_result`).
    """
    import ray
    from ray.exceptions import RayTaskError

    remote = ray.remote(num_cpus=1, max_retries=3)(fn)
    # Twice the cluster's CPUs in flight: every CPU busy, and a failure stops the run within about one wave.
    limit = max_in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    queue = deque(tasks)
    running: dict[Any, str] = {}
    results: dict[str, Any] = {}
    failure: Exception | None = None
    own_view = view is None
    view = view or Progress(name, len(tasks), unit="task", enabled=progress)
    try:
        while running or (queue and failure is None):
            while queue and failure is None and len(running) < limit:
                task_id, args = queue.popleft()
                running[remote.remote(*args)] = task_id
            # The first to finish, then whatever else has finished by now: no task waits on another's end.
            ready, rest = ray.wait(list(running), num_returns=1, timeout=POLL_EVERY_S)
            view.tick()
            if ready and rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                task_id = running.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as exc:
                    failure = failure or task_failure(name, task_id if shard_errors else None, exc)
                    if on_error is not None:
                        on_error(task_id, _one_line(getattr(exc, "cause", exc))[:300])
                    continue
                if keep_results:
                    results[task_id] = result
                if on_result is not None:
                    on_result(task_id, result)
                if own_view:
                    view.finished(task_id, 1)
        if failure is not None:
            raise failure
    finally:
        if own_view:
            view.close()
        for ref in running:  # only when interrupted (Ctrl-C): nothing is left running otherwise
            ray.cancel(ref)
    return results


def run_stateless(
    name: str,
    make_worker: Callable[[], Worker],
    tasks: list[tuple[str, Any]],
    resources: Resources,
    on_done: Callable[[DoneMarker, int], None],
    *,
    progress: bool = True,
    on_failed: Callable[[str, int, str], None] | None = None,
) -> int:
    """`run_actors` for passes with nothing to load: each shard a Ray task, on workers that are already warm."""
    board = _Progress(name, progress)
    view = Progress(name, len(tasks), enabled=progress, poll=board.take)

    def finished(shard: str, done: DoneMarker) -> None:
        on_done(done, 1)
        view.finished(shard, done.rows)

    try:
        run_tasks(
            name,
            _process_once,
            [(shard, (make_worker, shard, payload, board.rows_done(shard))) for shard, payload in tasks],
            max_in_flight=resources.workers,
            shard_errors=True,
            on_result=finished,
            on_error=None if on_failed is None else lambda shard, error: on_failed(shard, 1, error),
            view=view,
        )
    finally:
        view.close()
    return 0


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
