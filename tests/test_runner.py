"""The runner's decisions without Ray (the pool's requeue rules), done markers, and the per-shard logs.

The real-Ray fault tests (workers SIGKILLed, nodes removed) are in tests/reliability/test_faults.py.
"""

from __future__ import annotations

import json
from collections import deque

import pytest

from curation.errors import SetupError, ShardError
from curation.layout import Layout
from curation.runner import read_logs
from curation.runner.logs import new_run_id, shard_record, write_shard_log
from curation.runner.pool import Pool
from curation.shards import DoneMarker


def _pool(shards: list[str], actors: list[str], max_retries: int = 3) -> Pool:
    return Pool("test", deque((s, None) for s in shards), list(reversed(actors)), max_retries)


def _start_all(pool: Pool) -> dict[str, str]:
    """Start every assignment; the task id is `<shard>@<actor>`. Returns {shard: task}."""
    started = {}
    for actor, shard, payload in pool.assignments():
        task = f"{shard}@{actor}"
        pool.started(task, actor, shard, payload)
        started[shard] = task
    return started


def test_each_idle_actor_gets_the_next_shard_in_order():
    pool = _pool(["s0", "s1", "s2"], ["a", "b"])
    assert _start_all(pool) == {"s0": "s0@a", "s1": "s1@b"}
    assert pool.assignments() == []  # no idle actor left
    pool.finished("s0@a")
    assert _start_all(pool) == {"s2": "s2@a"}
    pool.finished("s1@b")
    pool.finished("s2@a")
    assert not pool.running


def test_a_shard_whose_worker_died_runs_again_first_on_the_next_free_actor():
    pool = _pool(["s0", "s1", "s2"], ["a", "b"])
    _start_all(pool)
    actor = pool.worker_lost("s0@a", "killed")
    assert actor == "a" and pool.retried == 1 and pool.failure is None
    assert list(pool.queue)[0] == ("s0", None), "the lost shard goes to the front of the queue"
    pool.finished("s1@b")
    assert _start_all(pool) == {"s0": "s0@b"}, "not held for the dead actor: any free actor takes it"
    pool.woke("a", None)  # still restarting
    assert "a" in pool.restarting and pool.assignments() == []
    pool.woke("a", True)
    assert _start_all(pool) == {"s2": "s2@a"}


def test_a_shard_that_keeps_losing_its_worker_fails_the_run_after_max_retries():
    pool = _pool(["s0"], ["a"], max_retries=2)
    for attempt in range(3):
        _start_all(pool)
        pool.worker_lost("s0@a", f"oom {attempt}")
        pool.woke("a", True)
    assert isinstance(pool.failure, ShardError)
    assert "lost its worker 3 times" in str(pool.failure) and "oom 2" in str(pool.failure)
    assert pool.retried == 2
    assert pool.assignments() == [] and not pool.running


def test_a_shard_that_raised_stops_handing_out_but_shards_in_flight_finish():
    pool = _pool(["s0", "s1", "s2", "s3"], ["a", "b"])
    _start_all(pool)
    pool.raised("s0@a", ShardError("disk full"))
    assert pool.assignments() == [], "no new shard after a failure"
    assert pool.running, "s1 is still in flight: wait for it"
    pool.finished("s1@b")
    assert not pool.running
    assert str(pool.failure) == "disk full" and [s for s, _ in pool.queue] == ["s2", "s3"]


def test_the_first_failure_is_the_one_reported():
    pool = _pool(["s0", "s1"], ["a", "b"])
    _start_all(pool)
    pool.raised("s0@a", ShardError("first"))
    pool.raised("s1@b", ShardError("second"))
    assert str(pool.failure) == "first"


def test_a_pool_whose_every_actor_is_gone_for_good_fails_in_one_line():
    pool = _pool(["s0", "s1"], ["a"])
    _start_all(pool)
    pool.worker_lost("s0@a", "node removed")
    assert pool.running  # waiting for "a" to restart
    pool.woke("a", False)  # its node is gone
    with pytest.raises(SetupError, match=r"every worker is gone; 2 shard\(s\) were not run"):
        pool.running  # noqa: B018


def test_done_marker_json_round_trip_keeps_every_field():
    on_disk = {
        "shard": "00001",
        "stage": "captions",
        "rows": 7,
        "members": 6,
        "seconds": 1.5,
        "config_hash": "abc",
        "input_lineage": "in",
        "lineage": "out",
        "by_status": {"ok": 6, "failed": 1},
        "by_reason": {"decode_error": 1},
        "provenance": {"model": "x"},
    }
    marker = DoneMarker.from_json(on_disk)
    assert marker.rows == 7 and marker.counts["by_reason"] == {"decode_error": 1}
    assert marker.extra == {"members": 6, "provenance": {"model": "x"}}
    assert marker.complete and marker.to_json() == on_disk
    partial = DoneMarker("00002", complete=False)
    assert DoneMarker.from_json(partial.to_json()) == partial


def test_shard_logs_keep_one_object_per_attempt_and_read_back_the_latest(tmp_path):
    layout = Layout(str(tmp_path / "out"))
    first, second = new_run_id(), new_run_id()
    assert first < second  # run ids sort by time
    for shard, rows in (("00001", 3), ("00000", 4)):
        done = DoneMarker(shard, rows=rows, seconds=2.0, counts={"by_reason": {"decode_error": 1}})
        write_shard_log(layout, "images", done, run=first)
    write_shard_log(layout, "dedup/hashes", DoneMarker("00000", rows=4, seconds=0.0), run=first)
    write_shard_log(layout, "images", DoneMarker("00001", rows=3, seconds=1.0), attempt=2, run=second)  # a rerun
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out" / "logs").rglob("*.json"))
    assert files == [
        f"logs/dedup/hashes/00000/{first}-1.json",
        f"logs/images/00000/{first}-1.json",
        f"logs/images/00001/{first}-1.json",  # the first run's record is still there ...
        f"logs/images/00001/{second}-2.json",  # ... beside the rerun's
    ]
    assert all(len(p.read_text().splitlines()) == 1 for p in (tmp_path / "out" / "logs").rglob("*.json"))
    merged = read_logs(layout)
    assert [(r["stage"], r["shard"]) for r in merged] == [
        ("dedup/hashes", "00000"),
        ("images", "00000"),
        ("images", "00001"),
    ]
    images = {r["shard"]: r for r in read_logs(layout, "images")}
    assert images["00000"]["samples_per_s"] == 2.0 and images["00000"]["failures"] == {"decode_error": 1}
    assert images["00001"]["attempt"] == 2 and images["00001"]["seconds"] == 1.0  # the latest
    assert merged[0]["samples_per_s"] is None  # no time measured: no rate rather than a division by zero
    history = read_logs(layout, "images", every_attempt=True)
    assert [(r["shard"], r["run"], r["seconds"]) for r in history] == [
        ("00000", first, 2.0),
        ("00001", first, 2.0),
        ("00001", second, 1.0),
    ]
    assert [r["stage"] for r in read_logs(layout, "dedup")] == []  # a pass is named whole: dedup is not dedup/hashes
    json.dumps(merged)  # plain JSON all the way down


def test_logs_of_the_older_layout_still_read_as_the_oldest_attempts(tmp_path):
    layout = Layout(str(tmp_path / "out"))
    old = tmp_path / "out" / "logs" / "images" / "00000.json"  # one record per shard, overwritten by each run
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps(shard_record("images", DoneMarker("00000", rows=5, seconds=94.0))) + "\n")
    (record,) = read_logs(layout)
    assert (record["shard"], record["seconds"]) == ("00000", 94.0)
    write_shard_log(layout, "images", DoneMarker("00000", rows=5, seconds=0.4))
    assert [r["seconds"] for r in read_logs(layout, every_attempt=True)] == [94.0, 0.4]
    assert [r["seconds"] for r in read_logs(layout)] == [0.4]
