"""The only module that imports Ray: run a stage's shards on a pool of actors, skip done ones, summarise.

Every stage is a class with `setup()` (load models once) and `process(shard, payload) -> done summary`; the runner
holds one such object per Ray actor. Pure CPU stages have an empty `setup()`, so one code path serves all stages,
with the same retry rule: an actor that dies (OOM, lost node, SIGKILL) is restarted and its shard is run again from
scratch; the atomic shard writer guarantees the half-done attempt never became visible.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import fsspec.implementations.local

from curation.shards import StageDir, config_hash, write_json_atomic


class SetupError(RuntimeError):
    """A problem with the run itself (lock held, config changed, no GPU): fail loudly, nothing was written."""


@dataclass(frozen=True)
class Resources:
    """Declared beside each stage: what one worker (actor) needs."""

    num_cpus: float = 1
    num_gpus: float = 0
    gpu_optional: bool = False  # model stages: run on CPU actors when the cluster has no GPU (laptops, CI)
    workers: int | None = None  # default: as many as the cluster's resources allow


@dataclass
class RunSummary:
    stage: str
    shards_total: int
    shards_skipped: int
    shards_run: int = 0
    samples_run: int = 0
    samples: int = 0  # all shards of the stage, skipped ones included
    seconds: float = 0.0
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
        for name, tally in sorted(self.counts.items()):
            label = "failures by reason" if name == "by_reason" else name.removeprefix("by_").replace("_", " ")
            items = sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))
            out.append(f"[{self.stage}] {label}: " + ", ".join(f"{k}={v}" for k, v in items))
        return out


def pending_shards(stage_dir: StageDir, shards: list[str], chash: str, force: bool) -> list[str]:
    """Shards without a done marker. A done shard made with another config is refused unless `force`."""
    done = set(stage_dir.done_shards())
    changed = [s for s in sorted(done & set(shards)) if stage_dir.read_done(s).get("config_hash") != chash]
    if changed and not force:
        raise SetupError(
            f"{stage_dir.url} holds {len(changed)} shard(s) made with a different configuration "
            f"(e.g. {changed[0]}); use a new output folder, or --force to redo them with the new one"
        )
    return [s for s in shards if s not in done or s in changed]


@contextlib.contextmanager
def output_lock(output: str) -> Iterator[None]:
    """One run per output at a time. A local flock dies with its process, so a SIGKILLed run never blocks a rerun.

    Object stores have no such lock: there, only one driver per output is supported (documented in the README).
    """
    fs, root = fsspec.core.url_to_fs(output)
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        yield
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
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def record_run_config(output: str, stage: str, config: dict[str, Any]) -> None:
    """OUT/run_config.json keeps the resolved config of each stage's latest run (nanoGPT-style)."""
    url = f"{output.rstrip('/')}/run_config.json"
    fs, path = fsspec.core.url_to_fs(url)
    current = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    current.setdefault("stages", {})[stage] = {
        **config,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "argv": sys.argv,
    }
    write_json_atomic(url, current)


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to a cluster, or start an embedded local one on loopback (no dashboard, own temp dir, cleaned up)."""
    import ray

    if ray.is_initialized():  # a caller (tests, a notebook) already holds a session: reuse it
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
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
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


class _StageActor:
    """Holds one stage object for the actor's life: models load once per actor, not once per shard."""

    def __init__(self, make_stage: Callable[[], Any]) -> None:
        self.stage = make_stage()
        self.stage.setup()

    def process(self, shard: str, payload: Any) -> dict[str, Any]:
        return self.stage.process(shard, payload)


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
    """Run `tasks` ([(shard, payload)]) on a pool of actors; returns the summary of the shards run."""
    import ray
    from tqdm import tqdm

    summary = RunSummary(name, shards_total=shards_total, shards_skipped=shards_total - len(tasks))
    started = time.time()
    if not tasks:
        return summary
    num_gpus, n_workers = _placement(resources, len(tasks))
    actor_cls = ray.remote(
        num_cpus=resources.num_cpus,
        num_gpus=num_gpus,
        max_restarts=-1,  # a dead actor comes back and takes its shard again ...
        max_task_retries=max_retries,  # ... up to this many times per shard
    )(_StageActor)
    actors = [actor_cls.remote(make_stage) for _ in range(n_workers)]
    queue = list(reversed(tasks))
    in_flight: dict[Any, Any] = {}
    bar = tqdm(total=len(tasks), desc=f"{name} shards", unit="shard", disable=not progress, file=sys.stderr)
    try:
        for actor in actors:
            if queue:
                shard, payload = queue.pop()
                in_flight[actor.process.remote(shard, payload)] = actor
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(ready[0])
            done = ray.get(ready[0])
            summary.add(done)
            summary.samples_run += done.get("rows", 0)
            summary.shards_run += 1
            elapsed = time.time() - started
            bar.set_postfix(samples=summary.samples_run, per_s=f"{summary.samples_run / max(elapsed, 1e-9):.1f}")
            bar.update(1)
            if queue:
                shard, payload = queue.pop()
                in_flight[actor.process.remote(shard, payload)] = actor
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    summary.seconds = time.time() - started
    return summary


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


def run_stage(
    *,
    output: str,
    stage_dir: StageDir,
    make_stage: Callable[[], Any],
    sidecar_dirs: tuple[StageDir, ...] = (),
    tasks: list[tuple[str, Any]],
    semantics: dict[str, Any],
    resources: Resources,
    ray_address: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Lock the output, skip done shards, run the rest on Ray, and total the stage's done markers.

    `sidecar_dirs` are further outputs of the same stage (features/vae512 beside features/t5): a shard is pending
    while any of them lacks its done marker, and the stage's `process` skips the parts already done.
    """
    with output_lock(output):
        chash = config_hash(semantics)
        shards = [shard for shard, _ in tasks]
        todo: set[str] = set()
        for directory in (stage_dir, *sidecar_dirs):
            directory.remove_stale_temporaries()
            todo |= set(pending_shards(directory, shards, chash, force))
        record_run_config(output, stage_dir.url.rstrip("/").rsplit("/", 1)[-1], {**semantics, "config_hash": chash})
        with ray_session(ray_address):
            summary = run_shards(
                stage_dir.url.rstrip("/").rsplit("/", 1)[-1],
                make_stage,
                [t for t in tasks if t[0] in todo],
                resources,
                shards_total=len(tasks),
                progress=progress,
            )
        done = set(stage_dir.done_shards())
        for shard in shards:
            if shard not in todo and shard in done:
                summary.add(stage_dir.read_done(shard))
        return summary
