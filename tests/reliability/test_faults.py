"""Workers and nodes dying mid-shard: the shard runs again elsewhere and the output equals an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from curation.caption.model import CaptionConfig
from curation.caption.stage import CaptionStageConfig, run_caption
from curation.ingest import IngestConfig, IngestWriter, run_ingest
from curation.layout import Layout
from curation.runner import read_logs, run_pass
from curation.shards import ShardWriter, StageDir
from curation.sources import local_map, plan_source
from curation.sources.listing import read_listing
from curation.stage import Pass, Resources, no_progress
from tests.conftest import REPO
from tests.layouts import make_folder
from tests.outputs import index_rows as rows
from tests.reliability import assert_only_done_shards


class PausingIngest(IngestWriter):
    """The real ingest worker, except that its first attempt at `target` stops halfway through writing the shard,
    leaves its pid in `signals/` and waits there to be killed."""

    def __init__(self, output: str, config: IngestConfig, target: str, signals: Path) -> None:
        super().__init__(Layout(output), config)
        self.target, self.signals = target, signals

    def process(self, shard: str, part: tuple[str, int, int, str], rows_done=no_progress):
        marker = self.signals / f"{shard}.pid"
        if shard == self.target and not marker.exists():
            items = read_listing(*part[:3])
            with ShardWriter(self.stage_dir, shard) as writer:
                for item in items[: len(items) // 2]:
                    writer.add(item.key, {"jpg": b"half a shard"})
                marker.write_text(str(os.getpid()))
                time.sleep(300)
        return super().process(shard, part, rows_done)


def _kill_when_paused(marker: Path, images: Path, seen: dict) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists():
        time.sleep(0.05)
    time.sleep(0.2)  # the pid is written; let the marker's writer reach its sleep
    pid = int(marker.read_text())
    seen["pid"] = pid
    seen["temporaries"] = [p.name for p in images.iterdir() if p.name.startswith(".tmp-")]
    seen["done_before"] = set(StageDir(str(images)).done_shards())
    os.kill(pid, signal.SIGKILL)


def test_actor_sigkilled_mid_shard_is_retried_and_output_matches(tmp_path, coco_files, ray_local):
    src = make_folder(tmp_path / "in", coco_files[:16])
    config = IngestConfig("folder", str(src), shard_size=4)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_ingest(ref, config, progress=False)

    tasks = plan_source("folder", str(src), Layout(str(tmp_path)).listings, local_map, config.shard_size).shards()
    target = [shard for shard, _ in tasks if shard.startswith("root-")][1]
    signals = tmp_path / "signals"
    signals.mkdir()
    seen: dict = {}
    watcher = threading.Thread(target=_kill_when_paused, args=(signals / f"{target}.pid", Path(out) / "images", seen))
    watcher.start()
    # The actor pool (not stateless tasks): its own requeue of a shard whose worker died is what is tested.
    ingest = Pass(
        label="images",
        folder=Layout(out).images,
        make_worker=lambda: PausingIngest(out, config, target, signals),
        tasks=tasks,
        semantics=config.semantics(),
        resources=Resources(num_cpus=1),
    )
    summary = run_pass(Layout(out), ingest, progress=False)
    watcher.join()

    assert seen["pid"] != os.getpid(), "the SIGKILL must hit a Ray worker, not the driver"
    assert any(n.endswith(f"-{target}.tar") for n in seen["temporaries"]), "the kill must land mid-write"
    assert target not in seen["done_before"], "a half-written shard must never be listed as done"
    assert summary.retried == 1 and summary.shards_run == len(tasks)
    # Same keys, same bytes as the uninterrupted run; the dead attempt's temporary is gone.
    assert set(rows(out, "images")) == set(rows(ref, "images"))
    for name in (f"{target}.tar", f"{target}.parquet"):
        assert (Path(out) / "images" / name).read_bytes() == (Path(ref) / "images" / name).read_bytes()
    assert_only_done_shards(Path(out) / "images")
    # The lost attempt has its own log record beside the one that wrote the shard.
    attempts = [r for r in read_logs(Layout(out), "images", every_attempt=True) if r["shard"] == target]
    rows_in_target = next(stop - start for shard, (_, start, stop, _) in tasks if shard == target)
    assert [(r["attempt"], r["rows"]) for r in attempts] == [(1, 0), (2, rows_in_target)]
    assert attempts[0]["error"].startswith("worker lost") and "error" not in attempts[1]


@pytest.fixture()
def ray_cluster(monkeypatch):
    """A 3-node Ray cluster on this machine, all on 127.0.0.1: a head and two workers, one CPU each, own temp dir."""
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    # Ray records "the latest cluster" under $RAY_TMPDIR/ray; a plain ray.init() elsewhere on this machine would
    # otherwise join this cluster while it lives.
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    os.makedirs(os.path.join(temp_dir, "ray"))
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "temp_dir": temp_dir, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "resources": {"head": 1}})
    try:
        workers = [cluster.add_node(**node, resources={f"worker{i}": 1}) for i in (1, 2)]
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_node_removed_mid_caption_job_finishes_with_exact_keys(tmp_path, coco_files, tiny_models, ray_local,
                                                               ray_cluster):  # fmt: skip
    cluster, workers = ray_cluster
    src = make_folder(tmp_path / "in", coco_files[:18])
    ref, out = tmp_path / "ref", tmp_path / "out"
    for o in (ref, out):
        run_ingest(str(o), IngestConfig("folder", str(src), shard_size=2), progress=False)
    model = CaptionConfig(model=str(tiny_models["llava"]), max_new_tokens=16, min_new_tokens=16, batch_size=1)
    run_caption(str(ref), CaptionStageConfig(model=model, decode_threads=1), progress=False)

    # The driver is the CLI, connected to the cluster as a user would. Ray rewrites a 127.0.0.1 address to the
    # machine's routable IP unless told this is a loopback-only cluster.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    args = ["caption", "--model", str(tiny_models["llava"]), "--max-new-tokens", "16", "--min-new-tokens", "16",
            "--batch-size", "1", "--decode-threads", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", *args, "--output", str(out), "--ray-address", cluster.address],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(list((out / "captions").glob("*.done.json"))) < 2:
            time.sleep(0.05)
        done_at_removal = len(list((out / "captions").glob("*.done.json")))
        cluster.remove_node(workers[0])  # its raylet and workers die: the actor there, mid-shard, with them
        stdout, stderr = proc.communicate(timeout=240)  # the runner before this test's fix waited here forever
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, stderr[-3000:]
    assert 2 <= done_at_removal < 7, "the node must go mid-job"
    assert "lost with their worker and run again" in stdout, stdout
    ref_rows, out_rows = rows(ref, "captions"), rows(out, "captions")
    assert set(out_rows) == set(ref_rows) and len(out_rows) == 18
    assert {k: r["caption"] for k, r in out_rows.items()} == {k: r["caption"] for k, r in ref_rows.items()}
    assert_only_done_shards(out / "captions")
