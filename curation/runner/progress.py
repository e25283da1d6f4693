"""A pass's progress in samples, across its shards and inside the running ones, with an ETA; no Ray here.

Workers report (rows done, rows in the shard) as they go (`curation.stage.RowsDone`); `pool.py` carries the
reports to the driver. A shard's size is known from its first report (or its done marker); shards not started
yet count as the mean size of those known, so the ETA covers the whole pass from the first report on. On a
terminal it is one tqdm bar per pass; otherwise (a log file, CI) a plain line at most every `LINE_EVERY_S` seconds,
and when the first and the last shard finish (planning tasks: only every `LINE_EVERY_S`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

LINE_EVERY_S = 30.0  # plain lines when stderr is not a terminal
POLL_EVERY_S = 1.0  # how often the driver asks for the workers' reports


class Progress:
    """What one pass has done; `enabled=False` shows nothing."""

    def __init__(
        self,
        name: str,
        shards: int,
        *,
        unit: str = "sample",
        enabled: bool = True,
        out: IO[str] | None = None,
        terminal: bool | None = None,
        poll: Callable[[], dict[str, tuple[int, int]]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.shards, self.unit, self.enabled = name, shards, unit, enabled
        self.out = out or sys.stderr
        self.terminal = self.out.isatty() if terminal is None else terminal
        self.poll, self.clock = poll, clock
        self.started = self.last_line = self.last_poll = clock()
        self.running: dict[str, tuple[int, int]] = {}  # shard -> (rows done, rows in it)
        self.finished_rows = 0
        self.done_shards: set[str] = set()  # names only: a late report of a finished shard is dropped
        self.lines = 0
        self._bar: Any = None
        if enabled and self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=None, desc=name, unit=unit, file=self.out, dynamic_ncols=True)

    # -- what the pass reports ----------------------------------------------------------------------------------
    def report(self, shard: str, done: int, total: int) -> None:
        """A running shard's latest report."""
        self.running[shard] = (done, max(total, done))

    def finished(self, shard: str, rows: int) -> None:
        self.running.pop(shard, None)
        self.done_shards.add(shard)
        self.finished_rows += rows
        # A line for the first and the last shard; tasks (listings, key checks) only every LINE_EVERY_S.
        self.tick(line=self.unit != "task" and self.finished_shards in (1, self.shards))

    @property
    def finished_shards(self) -> int:
        return len(self.done_shards)

    def tick(self, line: bool = False) -> None:
        """Take the workers' reports (at most every `POLL_EVERY_S`) and show where the pass is."""
        if not self.enabled:
            return
        now = self.clock()
        if self.poll is not None and now - self.last_poll >= POLL_EVERY_S:
            self.last_poll = now
            for shard, (done, total) in self.poll().items():
                if shard not in self.done_shards:
                    self.report(shard, done, total)
        if self._bar is not None:
            total = self.total()
            self._bar.total = total
            self._bar.n = self.done()
            self._bar.set_postfix_str(f"{self.finished_shards}/{self.shards} shards", refresh=False)
            self._bar.refresh()
        elif line or now - self.last_line >= LINE_EVERY_S:
            self.last_line = now
            self.lines += 1
            print(self.line(), file=self.out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    # -- the numbers ----------------------------------------------------------------------------------------------
    def done(self) -> int:
        return self.finished_rows + sum(d for d, _ in self.running.values())

    def total(self) -> int | None:
        """Rows of the whole pass: known sizes, plus the mean of them for each shard not started (None: none known)."""
        known = self.finished_shards + len(self.running)
        if not known:
            return None
        sized = self.finished_rows + sum(t for _, t in self.running.values())
        return round(sized + (self.shards - known) * sized / known)

    def eta_s(self) -> float | None:
        total, done = self.total(), self.done()
        elapsed = self.clock() - self.started
        if total is None or not done or elapsed <= 0:
            return None
        return max(total - done, 0) / (done / elapsed)

    def line(self) -> str:
        total, done = self.total(), self.done()
        elapsed = self.clock() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        of = f"{done}/{total} {self.unit}s ({100 * done / total:.0f}%)" if total else f"{done} {self.unit}s"
        eta = self.eta_s()
        shards = f", {self.finished_shards}/{self.shards} shards" if self.unit != "task" else ""
        return (
            f"[{self.name}] {of}{shards}, {rate:.1f} {self.unit}s/s, ETA {_duration(eta) if eta is not None else '?'}"
        )


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
