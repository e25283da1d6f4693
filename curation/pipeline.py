"""`curation run`: every stage of `curation.registry` marked for it, in registry order, on one Ray session under
one output lock. Each stage skips the shards it already finished, so rerunning after a crash resumes. An opt-in
stage (quality) runs only when asked for, and a stage may run a second time later in the run (`Stage.again_after`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from curation.layout import Layout
from curation.registry import stage_classes
from curation.runner import StageRun, output_lock, ray_session, run
from curation.stage import Stage


class StageResult(NamedTuple):
    stage: Stage  # its `outputs()` say where the results are
    run: StageRun  # its `lines()` summarise the run


def run_pipeline(
    output: str,
    configs: dict[str, Any],
    *,
    ray_address: str | None = None,
    force: bool = False,
    progress: bool = True,
    skip: Iterable[str] = (),
    on_stage: Callable[[Stage, StageRun], None] | None = None,
) -> list[StageResult]:
    """Run the in-run stages in order: `configs` by stage name (a stage not given runs with its config's defaults,
    but an opt-in stage runs only when given), `skip` names stages to leave out; `on_stage` sees each stage's result
    as soon as it finishes (a stage run twice, once per run)."""
    classes = stage_classes(pipeline_only=True)
    names = {cls.name for cls in classes}
    skip = set(skip)
    unknown = sorted((set(configs) | skip) - names)
    if unknown:
        raise ValueError(f"not stages of `curation run`: {', '.join(unknown)} (its stages: {', '.join(names)})")
    layout = Layout(output)
    wanted = [cls for cls in classes if cls.name not in skip and (cls.name in configs or not cls.opt_in)]
    stages = [cls(layout, configs[cls.name] if cls.name in configs else cls.config_type()) for cls in wanted]
    if not stages:
        return []
    for stage in stages:  # a model that cannot load is refused before any stage starts
        stage.preflight()
    stages[0].check()  # a missing input is refused before the output is created and Ray started
    results = []
    with output_lock(output), ray_session(ray_address):  # one lock, one cluster (or embedded Ray) for every stage
        for stage in run_order(stages):
            result = run(stage, ray_address=ray_address, force=force, progress=progress)
            results.append(StageResult(stage, result))
            if on_stage is not None:
                on_stage(stage, result)
    return results


def run_order(stages: list[Stage]) -> list[Stage]:
    """The stages in the order they run: a stage whose `again_after` is among them runs first as its
    `before_again()` and once more right after that stage."""
    names = {s.name for s in stages}
    again = {s.again_after: s for s in stages if s.again_after in names}
    order: list[Stage] = []
    for stage in stages:
        order.append(stage.before_again() if stage in again.values() else stage)
        if stage.name in again:
            order.append(again[stage.name])
    return order
