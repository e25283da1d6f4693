import dataclasses
import json

import pytest

from curation.errors import SetupError
from curation.layout import Layout
from curation.records import Sample, samples_to_table
from curation.shards import DoneMarker, ShardWriter, StageDir, config_hash
from curation.stats.nouns import NounStats, count_captions, reference_nouns
from curation.stats.stage import StatsConfig, run_corpus_stats, run_stats
from tests.conftest import SHARED

CORPUS = SHARED / "data" / "captions" / "coco_val2017_5005.jsonl"


def _caption_shards(out, captions: list[dict], per_shard: int) -> None:
    """Images shards as ingest writes them, with a deliberately poor "alt-text" (the first word), and caption
    shards as the caption stage writes them, with COCO's human captions as the 'generated' text."""
    for start in range(0, len(captions), per_shard):
        samples = []
        shard = f"{start // per_shard:05d}"
        with (
            ShardWriter(StageDir(f"{out}/images"), shard) as images,
            ShardWriter(StageDir(f"{out}/captions"), shard) as writer,
        ):
            for c in captions[start : start + per_shard]:
                s = Sample(key=c["key"], source="folder", source_id=c["key"], ext="jpg")
                s.original_caption = c["caption"].split(" ")[0]
                s.set_size(480, 640)
                images.add(s.key, {"jpg": b"", "json": s.to_json()})
                s = dataclasses.replace(s, caption=c["caption"])
                samples.append(s)
                writer.add(s.key, {"txt": c["caption"].encode(), "json": s.to_json()})
            ingested = [dataclasses.replace(s, caption=None) for s in samples]
            images.commit(samples_to_table(ingested), DoneMarker(shard, stage="images", lineage=f"images-{shard}"))
            writer.commit(samples_to_table(samples), DoneMarker(shard, stage="captions"))


def test_shards_on_ray_merge_to_the_single_process_totals(tmp_path, ray_local):
    captions = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    out = tmp_path / "run"
    _caption_shards(out, captions, per_shard=20)  # 251 shards
    summary, html = run_stats(str(out), StatsConfig(), progress=False)
    assert summary.shards_run == 251 and summary.samples == len(captions)
    rows = {r["name"]: r for r in json.loads((out / "report" / "table1.json").read_text())}
    single = count_captions(c["caption"] for c in captions).table1_row("run (generated captions)")
    assert rows["run (generated captions)"] == single
    assert rows["run (original captions)"]["images"] == len(captions)
    assert (out / "report" / "aspect_buckets.png").stat().st_size > 0 and html.endswith("index.html")
    # A rerun counts nothing again and reports the same numbers.
    again, _ = run_stats(str(out), StatsConfig(), progress=False)
    assert again.shards_run == 0
    assert json.loads((out / "report" / "table1.json").read_text()) == list(rows.values())


def test_invalid_utf8_in_a_shard_is_counted_not_fatal(tmp_path, ray_local):
    out = tmp_path / "run"
    _caption_shards(out, [{"key": "a", "caption": "A dog on a beach."}, {"key": "b", "caption": "x"}], 2)
    # Rewrite shard 00000 with a caption holding invalid UTF-8 bytes, as a foreign tool might.
    s = Sample(key="bad", source="folder", source_id="bad", ext="jpg", caption="?")
    s.set_size(10, 10)
    with ShardWriter(StageDir(f"{out}/captions"), "00000") as writer:
        writer.add("bad", {"jpg": b"", "txt": b"A cat \xff\xfe on a mat.", "json": s.to_json()})
        writer.commit(samples_to_table([s]), DoneMarker(writer.shard, stage="captions"))
    summary, _ = run_stats(str(out), StatsConfig(field="caption"), progress=False)
    assert summary.counts["by_caption_bytes"] == {"invalid_utf8": 1}
    row = json.loads((out / "report" / "table1.json").read_text())[0]
    assert row["images"] == 1 and row["total_nouns"] >= 2  # cat, mat


def test_corpus_report_matches_the_reference_counts(tmp_path):
    html = run_corpus_stats(str(CORPUS), "COCO", str(tmp_path))
    row = json.loads((tmp_path / "report" / "table1.json").read_text())[0]
    reference = NounStats()
    for line in CORPUS.read_text().splitlines():
        reference.add_nouns(reference_nouns(json.loads(line)["caption"]))  # the plain NLTK rule, the oracle
    assert row == reference.table1_row("COCO")
    assert row["images"] == 5005 and 2 < row["nouns_per_image"] < 6
    assert "COCO" in (tmp_path / "report" / "table1.md").read_text() and html.endswith("index.html")


def test_the_field_chooses_rows_and_an_earlier_releases_partials_are_kept(tmp_path, ray_local):
    captions = [json.loads(line) for line in CORPUS.read_text().splitlines()[:40]]
    out = tmp_path / "run"
    _caption_shards(out, captions, per_shard=20)
    first, _ = run_stats(str(out), StatsConfig(field="both"), progress=False)
    assert first.shards_run == 2
    names = [r["name"] for r in json.loads((out / "report" / "table1.json").read_text())]
    assert names == ["run (original captions)", "run (generated captions)"]
    stats = Layout(str(out)).stats()
    raw = json.loads((out / "stats" / "00000.done.json").read_text())
    assert set(raw) == {"stage", "shard", "rows", "config_hash", "input_lineage", "lineage", "by_caption_bytes",
                        "by_skipped", "started", "seconds", "files"}  # fmt: skip
    assert raw["stage"] == "stats" and raw["rows"] == 20 and raw["by_skipped"] == raw["by_caption_bytes"] == {}
    assert raw["files"]["00000.json"]["size"] == (out / "stats" / "00000.json").stat().st_size
    # The originals come from the ingest records, in their own partials.
    assert Layout(str(out)).stats_original.done_shards() == ["00000", "00001"]
    # The field chooses the rows: every set's partials hold its captions only, so nothing is counted again.
    again, _ = run_stats(str(out), StatsConfig(field="caption"), progress=False)
    assert again.shards_run == 0
    rows = json.loads((out / "report" / "table1.json").read_text())
    assert [r["name"] for r in rows] == ["run (generated captions)"]
    assert rows[0] == count_captions(c["caption"] for c in captions).table1_row("run (generated captions)")
    # Partials of an earlier release (the default set's, counting the originals too) are kept, not refused.
    legacy = config_hash({"fields": ["caption", "original"]})
    for shard in stats.done_shards():
        marker = json.loads((out / "stats" / f"{shard}.done.json").read_text())
        (out / "stats" / f"{shard}.done.json").write_text(json.dumps(marker | {"config_hash": legacy}))
    kept, _ = run_stats(str(out), StatsConfig(), progress=False)
    assert kept.shards_run == 0 and {stats.read_done(s).config_hash for s in stats.done_shards()} == {legacy}


def test_config_keeps_its_hash():
    assert StatsConfig().semantics() == {"fields": ["caption", "original"]}
    assert config_hash(StatsConfig().semantics()) == "89885bbf69b55403"
    assert StatsConfig(field="original").fields == ("original",)
    assert dataclasses.replace(StatsConfig(), field="caption").fields == ("caption",)
    for field in dataclasses.fields(StatsConfig):
        assert field.metadata.get("help"), field.name
    assert dataclasses.fields(StatsConfig)[0].metadata["choices"] == ["caption", "original", "both"]


def test_missing_inputs_and_empty_comparisons_are_one_line_errors(tmp_path):
    with pytest.raises(SetupError, match="does not exist"):
        run_corpus_stats(str(tmp_path / "nope.jsonl"), "x", str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SetupError, match="has no caption statistics"):
        run_corpus_stats(str(CORPUS), "COCO", str(tmp_path / "out"), compare=(str(tmp_path / "empty"),))


def test_a_megabyte_caption_costs_what_its_first_characters_do(tmp_path):
    """A 1 MB caption without spaces (and one of 200k words) is counted on its first MAX_CAPTION_CHARS characters,
    by the production path and the oracle alike, and its noun is drawn in the plots with a short label."""
    from curation.records import MAX_CAPTION_CHARS

    corpus = tmp_path / "captions.jsonl"
    huge = ["b" * 1_000_000, "a dog on a beach. " * 60_000]
    lines = [{"caption": c} for c in [*huge, "A cat sleeps on a sofa."]]
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_corpus_stats(str(corpus), "HUGE", str(tmp_path / "out"))
    row = json.loads((tmp_path / "out" / "report" / "table1.json").read_text())[0]
    reference = NounStats()
    for x in lines:
        reference.add_nouns(reference_nouns(x["caption"]))
    assert row == reference.table1_row("HUGE")
    words = reference_nouns(huge[1])
    assert words == reference_nouns(huge[1][:MAX_CAPTION_CHARS]) and 400 < len(words) < 600
    assert row["images"] == 3 and row["total_nouns"] == 1 + len(words) + 2  # "b"*4096, dog/beach, cat/sofa
    assert (tmp_path / "out" / "report" / "top_nouns.png").stat().st_size > 0
