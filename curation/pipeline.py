"""`curation run`: ingest -> dedup -> caption -> stats -> features on one Ray session, each stage resumable."""

from __future__ import annotations

from curation.caption.stage import CaptionStageConfig, run_caption
from curation.dedup.stage import DedupConfig, run_dedup
from curation.features.stage import FeaturesConfig, run_features
from curation.ingest import IngestConfig, run_ingest
from curation.runner import RunSummary, ray_session
from curation.stats.stage import StatsConfig, run_stats

DEFAULT_DEDUP = DedupConfig()


def run_pipeline(
    output: str,
    ingest: IngestConfig,
    caption: CaptionStageConfig,
    stats: StatsConfig,
    features: FeaturesConfig,
    *,
    ray_address: str | None = None,
    force: bool = False,
    progress: bool = True,
    dedup: DedupConfig | None = DEFAULT_DEDUP,  # None: no dedup pass (`--no-dedup`)
) -> tuple[list[RunSummary], str]:
    """Run every stage in order; returns the stage summaries and the report's path.

    Each stage skips the shards it already finished, so rerunning after a crash resumes where it stopped.
    """
    kw = {"ray_address": ray_address, "progress": progress}
    with ray_session(ray_address):  # one cluster (or one embedded Ray) for all stages
        summaries = [run_ingest(output, ingest, force=force, **kw)]
        if dedup is not None:  # before caption: removed duplicates are never captioned
            summaries.append(run_dedup(output, dedup, force=force, **kw))
        summaries.append(run_caption(output, caption, force=force, **kw))
        stats_summary, report = run_stats(output, stats, **kw)
        summaries.append(stats_summary)
        summaries.append(run_features(output, features, force=force, **kw))
    return summaries, report
