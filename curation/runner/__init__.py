"""Run a stage: lock the output, run each of its passes on Ray (done shards skipped), record, log, summarise.

The runner works from the `Stage` contract alone (`curation.stage`) and never knows which stage it runs:

    lock.py       one run per output; OUT/run_config.json
    planning.py   which shards to (re)do: done markers, config hashes, lineage
    pool.py       the Ray session, plain tasks, and the actor pool (its decisions in `Pool`, without Ray)
    logs.py       one JSON record per shard attempt under OUT/logs/, never overwritten
    summary.py    what a pass and a stage did
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from curation.errors import SetupError, ShardError
from curation.layout import Layout
from curation.runner.lock import output_lock, record_run_config
from curation.runner.logs import logged_stages, new_run_id, read_logs, write_failed_attempt_log, write_shard_log
from curation.runner.planning import damaged_shards, done_markers, drop_orphans, drop_stale_shards, pending_shards
from curation.runner.pool import Cluster, ray_session, run_actors, run_stateless, run_tasks
from curation.runner.summary import RunSummary, StageRun
from curation.shards import config_hash
from curation.stage import Pass, Resources, Stage

__all__ = [
    "Resources",
    "RunSummary",
    "SetupError",
    "ShardError",
    "StageRun",
    "logged_stages",
    "new_run_id",
    "output_lock",
    "ray_session",
    "read_logs",
    "run",
    "run_pass",
    "run_tasks",
    "write_shard_log",
]


class _Context:
    """The `RunContext` a stage plans its passes with."""

    def __init__(self, cluster: Cluster, force: bool, progress: bool) -> None:
        self.cluster, self.force, self.progress = cluster, force, progress

    def map(self, label: str, fn: Callable[..., Any], tasks: list[tuple[str, tuple]], **kw: Any) -> dict[str, Any]:
        self.cluster.ensure()
        return run_tasks(label, fn, tasks, progress=self.progress, **kw)


def run(
    stage: Stage,
    *,
    ray_address: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> StageRun:
    """Run every pass of `stage` under the output lock, on one Ray session (started only if there is work).

    A stage that cannot work (no input, then a model that cannot load) is refused before the output is locked, so
    a refused run leaves nothing behind, not even the output folder."""
    stage.check()
    stage.preflight()
    layout = stage.layout
    with output_lock(layout.output), Cluster(ray_address) as cluster:
        ctx = _Context(cluster, force, progress)
        summaries = [run_pass(layout, p, cluster, force=force, progress=progress) for p in stage.passes(ctx)]
        notes = stage.finish(summaries)
    return StageRun(stage.name, summaries, notes, stage.result)


def run_pass(
    layout: Layout,
    p: Pass,
    cluster: Cluster | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Skip done shards, run the rest, and total the pass's done markers.

    A shard whose input was redone since (`p.upstream`) is redone too, and a shard whose input no longer exists is
    removed (its keys now live elsewhere). A done shard of another config is refused unless `force`.
    """
    with output_lock(layout.output), contextlib.ExitStack() as stack:
        if cluster is None:
            cluster = stack.enter_context(Cluster(None))
        chash = config_hash(p.semantics)
        shards = [shard for shard, _ in p.tasks]
        p.folder.remove_stale_temporaries()
        upstream = None
        if p.upstream is not None:
            upstream = p.upstream.lineages(shards)
            drop_orphans(p.folder, shards)
        markers = done_markers(p.folder)  # read once: planning, --force's clean-up, the summary of skipped shards
        todo = set(pending_shards(p.folder, shards, chash, force, upstream, markers, p.compatible))
        damaged = damaged_shards(p.folder, markers, shards)  # redone, as if never done
        todo |= set(damaged)
        if force:
            drop_stale_shards(p.folder, markers, shards, chash, p.compatible)
        record_run_config(layout, p.label, {**p.semantics, "config_hash": chash})
        pending = [t for t in p.tasks if t[0] in todo]
        summary = RunSummary(p.label, shards_total=len(shards), shards_skipped=len(shards) - len(pending))
        where = p.folder.url.rstrip("/").removeprefix(layout.root + "/")  # images, features, captions-dense ...
        summary.damaged = {s: [f"{where}/{problem}" for problem in found] for s, found in sorted(damaged.items())}
        started = time.time()
        run_id = new_run_id()  # this pass run's attempts get their own log objects beside the earlier runs'

        def on_done(done, attempt: int) -> None:
            summary.add(done, ran=True)
            write_shard_log(layout, p.label, done, attempt, run_id)

        def on_failed(shard: str, attempt: int, error: str) -> None:
            write_failed_attempt_log(layout, p.label, shard, attempt, run_id, error)

        try:
            if pending:  # a finished pass connects to no cluster
                cluster.ensure()
                run = run_stateless if p.resources.stateless else run_actors
                summary.retried = run(
                    p.label, p.make_worker, pending, p.resources, on_done, progress=progress, on_failed=on_failed
                )
        finally:
            # The workers are finished or killed: a temporary left now is a dead attempt's (a retried shard's).
            with contextlib.suppress(OSError):
                p.folder.remove_stale_temporaries()
        summary.seconds = time.time() - started if pending else 0.0
        for shard in shards:  # the shards not run are as they were planned: their markers are read already
            if shard not in todo and shard in markers:
                summary.add(markers[shard])
        return summary
