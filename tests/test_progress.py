"""Progress in samples with an ETA: the bookkeeping on a fake clock, then real runs whose stderr is not a terminal."""

from __future__ import annotations

import io
import re

from curation.runner.progress import LINE_EVERY_S, POLL_EVERY_S, Progress
from tests.layouts import make_folder
from tests.reliability import cli


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_counts_samples_inside_running_shards_and_estimates_the_rest():
    clock, out = Clock(), io.StringIO()
    reports: dict[str, tuple[int, int]] = {}

    def poll() -> dict[str, tuple[int, int]]:
        taken = dict(reports)
        reports.clear()
        return taken

    view = Progress("captions", 4, out=out, terminal=False, poll=poll, clock=clock)
    assert view.total() is None and view.eta_s() is None  # nothing known yet
    reports["a"] = (10, 40)  # a worker 10 rows into a 40-row shard
    clock.now = POLL_EVERY_S
    view.tick()
    assert out.getvalue() == ""  # no line before LINE_EVERY_S
    assert (view.done(), view.total()) == (10, 160)  # the 3 shards not started count as the known mean
    clock.now = LINE_EVERY_S
    reports["a"], reports["b"] = (30, 40), (10, 20)
    view.tick()
    assert (view.done(), view.total()) == (40, 120)  # (40 + 20) known over 2 shards: 30 each for the other 2
    assert view.eta_s() == (120 - 40) / (40 / LINE_EVERY_S)
    assert out.getvalue() == "[captions] 40/120 samples (33%), 0/4 shards, 1.3 samples/s, ETA 1:00\n"
    view.finished("a", 40)  # the first shard done: a line
    reports["a"] = (39, 40)  # a late report of a finished shard changes nothing
    clock.now += POLL_EVERY_S
    view.tick()
    assert (view.done(), view.total()) == (50, 120)
    assert out.getvalue().splitlines()[-1] == "[captions] 50/120 samples (42%), 1/4 shards, 1.7 samples/s, ETA 0:42"
    for shard, rows in (("b", 20), ("c", 25), ("d", 35)):
        view.finished(shard, rows)
    assert (view.done(), view.total(), view.eta_s()) == (120, 120, 0.0)  # the last shard done: exact, and a line
    assert out.getvalue().splitlines()[-1].startswith("[captions] 120/120 samples (100%), 4/4 shards")
    assert len(out.getvalue().splitlines()) == 3


def test_progress_on_a_terminal_is_one_bar_and_off_is_silent():
    out = io.StringIO()
    view = Progress("images", 2, out=out, terminal=True)
    view.report("a", 5, 10)
    view.tick()
    view.finished("a", 10)
    view.close()
    assert re.search(r"images: .*\| 10/20 \[.*samples?/s, 1/2 shards\]", out.getvalue()), out.getvalue()
    quiet = io.StringIO()
    view = Progress("images", 2, out=quiet, terminal=False, enabled=False)
    view.finished("a", 10)
    view.finished("b", 10)
    assert quiet.getvalue() == ""


def test_a_run_off_a_terminal_prints_plain_progress_lines_and_no_progress_prints_no_bar(
    tmp_path, coco_files, tiny_models
):
    src = make_folder(tmp_path / "in", coco_files[:4], nested=False)
    args = ["run", "--source", "folder", "--input", str(src), "--shard-size", "2", "--no-dedup", "--no-stats",
            "--no-features", "--model", str(tiny_models["llava"]), "--caption-batch-size", "2"]  # fmt: skip
    shown = cli(*args, "--output", str(tmp_path / "shown"))
    assert shown.returncode == 0, shown.stderr[-3000:]
    lines = shown.stderr.splitlines()
    for stage in ("images", "captions"):  # the first and the last shard's lines, at least
        assert f"[{stage}] 4/4 samples (100%), 2/2 shards" in shown.stderr, shown.stderr[-3000:]
        first = rf"\[{stage}\] \d+/\d+ samples \(\d+%\), 1/2 shards, .* ETA \d+:\d\d"
        assert any(re.fullmatch(first, line) for line in lines), shown.stderr[-3000:]
    assert "Loading weights" in shown.stderr  # the workers' model-loading bar, as transformers prints it

    # Another caption set of the same output: the caption workers load the model again, and nothing else runs.
    quiet = cli("caption", "--output", str(tmp_path / "shown"), "--name", "quiet", "--model", str(tiny_models["llava"]),
                "--batch-size", "2", "--no-progress")  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "[captions-quiet] shards: 2 run" in quiet.stdout
    assert "samples/s" not in quiet.stderr and "shards, " not in quiet.stderr  # no lines of ours ...
    assert "Loading weights" not in quiet.stderr and "it/s" not in quiet.stderr  # ... and no loading bar
    assert "%|" not in quiet.stderr, quiet.stderr[-3000:]
