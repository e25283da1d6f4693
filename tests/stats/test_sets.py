import dataclasses
import json

from curation.records import Sample, samples_to_table
from curation.shards import DoneMarker, ShardWriter, StageDir
from curation.stats.nouns import NounStats, reference_nouns
from curation.stats.stage import StatsConfig, run_stats
from tests.conftest import SHARED

CORPUS = SHARED / "data" / "captions" / "coco_val2017_5005.jsonl"


def _set_shards(out, folder: str, captions: list[dict], per_shard: int, original: bool) -> None:
    """Shards of one caption set as the caption stage writes them (text and records), and the images shards of
    the same samples as ingest writes them (with the first word as "alt-text" when `original`)."""
    for start in range(0, len(captions), per_shard):
        samples, shard = [], f"{start // per_shard:05d}"
        with ShardWriter(StageDir(f"{out}/{folder}"), shard) as writer:
            for c in captions[start : start + per_shard]:
                s = Sample(key=c["key"], source="folder", source_id=c["key"], ext="jpg", caption=c["caption"])
                s.original_caption = c["caption"].split(" ")[0] if original else None
                s.set_size(480, 640)
                samples.append(s)
                writer.add(s.key, {"txt": c["caption"].encode(), "json": s.to_json()})
            writer.commit(samples_to_table(samples), DoneMarker(shard, stage=folder))
        with ShardWriter(StageDir(f"{out}/images"), shard) as images:
            ingested = [dataclasses.replace(s, caption=None) for s in samples]
            for s in ingested:
                images.add(s.key, {"jpg": b"", "json": s.to_json()})
            images.commit(samples_to_table(ingested), DoneMarker(shard, stage="images", lineage=f"images-{shard}"))


def _reference(texts: list[str]) -> NounStats:
    stats = NounStats()
    for text in texts:
        stats.add_nouns(reference_nouns(text))  # the plain NLTK rule, the oracle
    return stats


def test_one_row_per_caption_set_by_the_reference_rule(tmp_path, ray_local):
    lines = [json.loads(line) for line in CORPUS.read_text().splitlines()[:300]]
    # Three "sets" of the same 100 images: COCO's first, second and third human caption of each image.
    first, second, third = lines[0:100], lines[100:200], lines[200:300]
    keys = [f"img{i:03d}" for i in range(100)]
    out = tmp_path / "run"
    for folder, chosen in (("captions", first), ("captions-second", second), ("captions-third", third)):
        captions = [{"key": k, "caption": c["caption"]} for k, c in zip(keys, chosen, strict=True)]
        _set_shards(out, folder, captions, per_shard=40, original=False)  # no alt-text at all
    run_stats(str(out), StatsConfig(), progress=False)
    rows = {r["name"]: r for r in json.loads((out / "report" / "table1.json").read_text())}
    # Originals are empty everywhere: no row, rather than 0/0.
    assert list(rows) == ["run (generated captions)", "run (second captions)", "run (third captions)"]
    for name, chosen in zip(rows, (first, second, third), strict=True):
        assert rows[name] == _reference([c["caption"] for c in chosen]).table1_row(name)
    assert "run (third captions)" in (out / "report" / "table1.md").read_text()

    # Another output and a caption corpus in the same table, after this output's rows.
    other = tmp_path / "laion"
    laion = [{"key": k, "caption": c["caption"]} for k, c in zip(keys, third, strict=True)]
    _set_shards(other, "captions", laion, per_shard=50, original=True)
    run_stats(str(other), StatsConfig(), progress=False)
    corpus = tmp_path / "coco_first.jsonl"
    corpus.write_text("".join(json.dumps({"caption": c["caption"]}) + "\n" for c in first))
    again, _ = run_stats(str(out), StatsConfig(compare=(str(other), str(corpus))), progress=False)
    assert again.shards_run == 0  # every set's partials were kept
    table = [r["name"] for r in json.loads((out / "report" / "table1.json").read_text())]
    assert table == [*rows, "laion (original captions)", "laion (generated captions)", "coco_first"]
    compared = {r["name"]: r for r in json.loads((out / "report" / "table1.json").read_text())}
    assert compared["coco_first"] == _reference([c["caption"] for c in first]).table1_row("coco_first")
    assert compared["laion (generated captions)"]["total_nouns"] == rows["run (third captions)"]["total_nouns"]
