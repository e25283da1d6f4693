"""The filter contract: a filter reaches only the stages after the one that made it, `--include` (and the older
`--include-duplicates`) leaves it out, a keep-flag shard goes stale with any folder it read, and `include` stays out
of every config hash. One output, made once: 8 photos (a byte copy: a duplicate; a thumbnail: too small), size
filter, dedup, tiny-LLaVA captions, and a keep-flag stage of this file registered after caption."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from curation import registry
from curation.caption.model import CaptionConfig
from curation.caption.stage import CaptionStage, CaptionStageConfig, run_caption
from curation.cli import build_parser, configs_from_args, main
from curation.dedup.filter import DuplicateFilter
from curation.dedup.stage import DedupConfig, DedupStage, run_dedup
from curation.errors import ConfigError
from curation.export.pixart import ExportConfig, ExportPlan
from curation.features.stage import FeaturesConfig
from curation.ingest import IngestConfig, run_ingest
from curation.layout import Layout
from curation.records import OK
from curation.runner import run
from curation.shards import DoneMarker, StageDir, config_hash, lineage
from curation.sizefilter import SizeFilter, SizeFilterConfig, SizeFilterStage
from curation.stage import KeepFlags, Pass, Resources, Stage, keep_flags_extra, no_progress
from curation.stats.stage import StatsConfig, StatsStage
from tests.outputs import index_rows

FLAGGED = "flagged"  # the test filter's reason
NAME = "caption-flags"


# -- a keep-flag stage after caption: removes each captions shard's first captioned key ---------------------------
@dataclasses.dataclass(frozen=True)
class CaptionFlagsConfig:
    pass


class CaptionFlags(KeepFlags):
    reasons = (FLAGGED,)
    applies_after = "caption"

    def folder(self) -> StageDir:
        return self.layout.stage_folder(NAME)


class CaptionFlagsWorker:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def setup(self) -> None:
        pass

    def process(self, shard: str, _payload: None = None, rows_done=no_progress) -> DoneMarker:
        rows = self.layout.captions().read_index(shard).select(["key", "status"]).to_pylist()
        first = min((r["key"] for r in rows if r["status"] == OK), default=None)
        flags = [
            {"key": r["key"], "keep": r["key"] != first, "reason": None, "detail": None}
            | ({"reason": FLAGGED, "detail": "the shard's first caption"} if r["key"] == first else {})
            for r in rows
        ]
        folder = self.layout.stage_folder(NAME)
        index = folder.write_index(shard, pa.Table.from_pylist(flags))
        extra = keep_flags_extra(self.layout, shard, ["images", "captions"], [first] if first else [])
        done = DoneMarker(
            shard,
            stage=NAME,
            rows=len(flags),
            **lineage(config_hash({}), extra["reads"]["captions"]),
            files={f"{shard}.parquet": index},
            extra=extra,
        )
        return folder.write_done(done)


class _Captions:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def lineages(self, shards: list[str]) -> dict[str, str]:
        return {s: m.upstream for s, m in self.layout.captions().read_dones(shards).items()}


class CaptionFlagsStage(Stage):
    name = NAME
    help = "a test filter made after caption"
    config_type = CaptionFlagsConfig
    sample_filters = (CaptionFlags,)

    def passes(self, ctx) -> Iterator[Pass]:
        yield Pass(
            label=NAME,
            folder=self.layout.stage_folder(NAME),
            make_worker=functools.partial(CaptionFlagsWorker, self.layout),
            tasks=[(s, None) for s in self.layout.captions().done_shards()],
            semantics={},
            resources=Resources(stateless=True),
            upstream=_Captions(self.layout),
        )


class ProbeStage(Stage):
    """Where the quality stage's image scores sit: between dedup and caption."""

    name = "probe"
    help = "a stage between dedup and caption"
    config_type = CaptionFlagsConfig

    def passes(self, ctx) -> Iterator[Pass]:
        return iter(())


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The two test stages in the registry, for this module (our own code: no library is mocked)."""
    names = [path for path, _ in registry.STAGES]
    stages = list(registry.STAGES)
    stages.insert(names.index("curation.dedup.stage:DedupStage") + 1, (f"{__name__}:ProbeStage", False))
    stages.insert(names.index("curation.caption.stage:CaptionStage") + 2, (f"{__name__}:CaptionFlagsStage", False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "STAGES", stages)
        yield


@pytest.fixture(scope="module")
def made(coco_files, tmp_path_factory, tiny_models, ray_local) -> dict:
    src = tmp_path_factory.mktemp("filters-in")
    for f in coco_files[:6]:
        shutil.copy(f, src / f.name)
        (src / f"{f.stem}.txt").write_text("a dog and a cat on a table near a window")
    shutil.copy(coco_files[0], src / "copy.jpg")  # a duplicate of the first photo
    with Image.open(coco_files[10]) as im:  # a photo not in the set: no near-duplicate of any
        im.resize((160, 120)).save(src / "thumb.jpg")  # too small at --min-side 200
    out = str(tmp_path_factory.mktemp("filters-out") / "out")
    run_ingest(out, IngestConfig("folder", str(src), shard_size=4), progress=False)
    run(SizeFilterStage(Layout(out), SizeFilterConfig(min_side=200)), progress=False)
    run_dedup(out, DedupConfig(), progress=False)
    caption = CaptionStageConfig(model=CaptionConfig(model=str(tiny_models["llava"]), max_new_tokens=4))
    run_caption(out, caption, progress=False)
    run(CaptionFlagsStage(Layout(out), CaptionFlagsConfig()), progress=False)
    dedup = index_rows(out, "dedup")
    flagged = {k for k, r in index_rows(out, NAME).items() if not r["keep"]}
    return {
        "out": out,
        "caption": caption,
        "duplicate": {k for k, r in dedup.items() if not r["keep"]},
        "flagged": flagged,
    }


def _filters(stage: type[Stage], layout: Layout, config=CaptionFlagsConfig()) -> list[type]:
    return [type(f) for f in stage(layout, config).input_view(layout.images).filters]


def test_a_filter_reaches_only_the_stages_after_the_one_that_made_it(made):
    out, layout = made["out"], Layout(made["out"])
    flagged, captions = made["flagged"], layout.captions()
    captioned = [s for s in captions.done_shards() if OK in captions.read_index(s)["status"].to_pylist()]
    assert made["duplicate"] == {"copy"} and len(flagged) == len(captioned) > 1  # one a shard with captions
    assert _filters(SizeFilterStage, layout, SizeFilterConfig()) == []
    assert _filters(DedupStage, layout, DedupConfig()) == [SizeFilter]
    assert _filters(ProbeStage, layout) == [SizeFilter, DuplicateFilter]  # the quality stage's place
    assert _filters(CaptionStage, layout, made["caption"]) == [SizeFilter, DuplicateFilter]
    assert _filters(StatsStage, layout, StatsConfig()) == [SizeFilter, DuplicateFilter, CaptionFlags]

    # Caption does not see the flags made after it: its captions stand, and a rerun has nothing to do.
    captions = index_rows(out, "captions")
    assert {captions[k]["status"] for k in flagged} == {OK}
    assert captions["thumb"]["error_reason"] == "too_small" and captions["copy"]["error_reason"] == "duplicate"
    assert run_caption(out, made["caption"], progress=False).shards_run == 0

    # Stats does: the flagged captions are skipped rows of its tally and no noun of theirs is counted.
    assert main(["stats", "--output", out, "--field", "caption", "--no-progress"]) == 0
    stats = StageDir(f"{out}/stats")
    markers = stats.read_dones(stats.done_shards())
    skipped: dict[str, int] = {}
    for m in markers.values():
        for reason, n in m.counts["by_skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"too_small": 1, "duplicate": 1, FLAGGED: len(flagged)}
    assert set(index_rows(out, "stats")) == {k for k, r in captions.items() if r["status"] == OK} - flagged
    assert sum(m.rows for m in markers.values()) == 6 - len(flagged)


def test_include_and_its_older_alias_give_the_same_run(made, tmp_path):
    out = made["out"]
    given = {"--include duplicate": ["--include", "duplicate"], "--include-duplicates": ["--include-duplicates"]}
    for command in ("caption", "stats", "features", "export-pixart", "export-sana"):
        to = [] if command in ("caption", "stats", "features") else ["--to", str(tmp_path / "InternData")]
        configs = [
            configs_from_args(build_parser().parse_args([command, "--output", out, *to, *flags]))[command]
            for flags in given.values()
        ]
        assert configs[0] == configs[1] and configs[0].include == ("duplicate",), command
    both = build_parser().parse_args(["stats", "--output", out, "--include-duplicates", "--include", f"{FLAGGED}"])
    assert configs_from_args(both)["stats"].include == ("duplicate", FLAGGED)  # the flags add up, in any order
    with pytest.raises(ConfigError, match="^--include nope: no filter removes samples for this reason; one of"):
        StatsConfig(include=("nope",))
    run_args = ["run", "--source", "folder", "--input", "x", "--output", out]
    for stage in ("caption", "stats", "features"):
        old = configs_from_args(build_parser().parse_args([*run_args, f"--{stage}-include-duplicates"]))
        assert old[stage].include == ("duplicate",), stage

    # The same run: the originals' partials count the duplicate, and the alias has nothing left to redo.
    originals = StageDir(f"{out}/stats-original")

    def counted() -> int:
        return sum(m.rows for m in originals.read_dones(originals.done_shards()).values())

    assert main(["stats", "--output", out, "--field", "original", "--no-progress"]) == 0
    flagged = len(made["flagged"])
    assert counted() == 8 - 2 - flagged  # the thumbnail, the copy and the flagged samples left out
    # A new include is no new configuration (no --force): the shards whose removals change are redone.
    assert main(["stats", "--output", out, "--field", "original", "--include", "duplicate", "--no-progress"]) == 0
    assert counted() == 8 - 1 - flagged
    files = {p.name: p.read_bytes() for p in Path(originals.url).glob("*.json") if ".done." not in p.name}
    lineages = {s: m.lineage for s, m in originals.read_dones(originals.done_shards()).items()}
    assert main(["stats", "--output", out, "--field", "original", "--include-duplicates", "--no-progress"]) == 0
    assert {s: m.lineage for s, m in originals.read_dones(originals.done_shards()).items()} == lineages
    assert {p.name: p.read_bytes() for p in Path(originals.url).glob("*.json") if ".done." not in p.name} == files


def test_include_is_in_no_config_hash(made, tmp_path):
    for config in (made["caption"], StatsConfig(), FeaturesConfig()):
        included = dataclasses.replace(config, include=("duplicate", "too_small"))
        assert config_hash(included.semantics()) == config_hash(config.semantics()), type(config).__name__
    layout, to = Layout(made["out"]), str(tmp_path / "InternData")
    export = [ExportPlan(layout, ExportConfig(to=to, include=include), to).semantics for include in ((), (FLAGGED,))]
    assert export[0] == export[1]


def test_a_flag_shard_goes_stale_with_any_folder_it_read(made, tmp_path, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(made["out"], out)
    flags = StageDir(f"{out}/{NAME}")
    shard = flags.done_shards()[0]
    marker = json.loads(Path(out, NAME, f"{shard}.done.json").read_text())
    images, captions = (json.loads(Path(out, f, f"{shard}.done.json").read_text()) for f in ("images", "captions"))
    assert marker["reads"] == {"images": images["lineage"], "captions": captions["lineage"]}

    # Older markers, with `images_lineage` alone, still read.
    dedup = Path(out, "dedup", f"{shard}.done.json")
    dedup.write_text(json.dumps({k: v for k, v in json.loads(dedup.read_text()).items() if k != "reads"}))
    assert DuplicateFilter(Layout(out)).removed(shard) == DuplicateFilter(Layout(made["out"])).removed(shard)

    # Captions made again (as a rerun of caption would leave them): the flags are refused, in one line.
    done = Path(out, "captions", f"{shard}.done.json")
    done.write_text(json.dumps(json.loads(done.read_text()) | {"lineage": "redone"}))
    assert main(["stats", "--output", out, "--field", "caption", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"curation stats: error: {NAME} is out of date for shard {shard} (captions made again since): run "
        f"`curation {NAME}` again, or pass --include {FLAGGED}"
    ]
    assert main(["stats", "--output", out, "--field", "caption", "--include", FLAGGED, "--no-progress"]) == 0
    capsys.readouterr()
    # Images ingested again: dedup's flags are stale too (the oldest marker form checks its `images_lineage`).
    images_done = Path(out, "images", f"{shard}.done.json")
    images_done.write_text(json.dumps(json.loads(images_done.read_text()) | {"lineage": "redone"}))
    assert main(["stats", "--output", out, "--field", "original", "--include", FLAGGED, "--no-progress"]) == 2
    assert "size-filter is out of date" in capsys.readouterr().err  # the first filter in registry order
