"""What a pass did: counts, timing, and the tallies of its done markers."""

from __future__ import annotations

from dataclasses import dataclass, field

from curation.shards import DoneMarker


@dataclass
class RunSummary:
    stage: str
    shards_total: int
    shards_skipped: int
    shards_run: int = 0
    samples_run: int = 0
    samples: int = 0  # all shards of the pass, skipped ones included
    seconds: float = 0.0
    retried: int = 0  # shard attempts lost with their worker (killed, out of memory, node lost) and run again
    damaged: dict[str, list[str]] = field(default_factory=dict)  # shards redone for missing or changed files
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # every `by_*` tally of the done markers

    @property
    def by_status(self) -> dict[str, int]:
        return self.counts.get("by_status", {})

    @property
    def by_reason(self) -> dict[str, int]:
        return self.counts.get("by_reason", {})

    def add(self, done: DoneMarker, *, ran: bool = False) -> None:
        self.samples += done.rows
        if ran:
            self.samples_run += done.rows
            self.shards_run += 1
        self.tally(done.counts)

    def tally(self, counts: dict[str, dict[str, int]]) -> None:
        for name, tally in counts.items():
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
        if self.damaged:
            problems = [p for found in self.damaged.values() for p in found]
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            out.append(
                f"[{self.stage}] redone: {len(self.damaged)} shard(s) whose files were missing or changed: {shown}"
            )
        if self.retried:
            out.append(f"[{self.stage}] {self.retried} shard attempt(s) lost with their worker and run again")
        for name, tally in sorted((n, t) for n, t in self.counts.items() if t):
            label = "failures by reason" if name == "by_reason" else name.removeprefix("by_").replace("_", " ")
            items = sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))
            out.append(f"[{self.stage}] {label}: " + ", ".join(f"{k}={v}" for k, v in items))
        return out


@dataclass
class StageRun:
    """One stage's run: the summary of each pass, and the stage's own closing lines (reports, totals)."""

    stage: str
    summaries: list[RunSummary]
    notes: list[str] = field(default_factory=list)
    result: object = None  # what the stage's `finish` computed (dedup's groups), for callers that want it

    def lines(self) -> list[str]:
        return [line for s in self.summaries for line in s.lines()] + self.notes

    def __getattr__(self, name: str):
        # The common one-pass case reads like its summary: `run.by_status`, `run.shards_run`.
        if name.startswith("_") or not self.summaries:
            raise AttributeError(name)
        return getattr(self.summaries[-1], name)
