import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import webdataset as wds

from curation.caption.model import DEFAULT_PROMPT, CaptionConfig
from curation.caption.stage import DEFAULT_MODEL, CaptionStage, CaptionStageConfig, CaptionWorker, run_caption
from curation.ingest import IngestConfig, run_ingest
from curation.layout import Layout
from curation.shards import config_hash
from tests.conftest import EDGE_CASES, REPO
from tests.layouts import make_folder
from tests.outputs import index_rows


def _config(tiny_models, **kw) -> CaptionStageConfig:
    model = CaptionConfig(model=str(tiny_models["llava"]), max_new_tokens=16, batch_size=4, **kw)
    return CaptionStageConfig(model=model, decode_threads=2)


def test_caption_coco_shards(tmp_path, coco_files, tiny_models, ray_local):
    out = tmp_path / "out"
    run_ingest(str(out), IngestConfig("folder", str(make_folder(tmp_path / "in", coco_files)), 20), progress=False)
    summary = run_caption(str(out), _config(tiny_models), progress=False)
    images, captions = index_rows(out, "images"), index_rows(out, "captions")
    assert set(images) == set(captions) and len(captions) == len(coco_files)
    assert summary.by_status == {"ok": len(coco_files)}
    statuses = summary.counts["by_caption_status"]
    assert sum(statuses.values()) == len(coco_files) and set(statuses) <= {"ok", "empty", "truncated", "repetitive"}
    for shard in Layout(str(out)).captions().done_shards():
        done = Layout(str(out)).captions().read_done(shard)
        seen = list(wds.WebDataset(f"{out}/captions/{shard}.tar", shardshuffle=False, empty_check=False))
        assert done.stage == "captions"
        raw = json.loads((out / "captions" / f"{shard}.done.json").read_text())
        assert set(raw) == {"shard", "stage", "rows", "config_hash", "input_lineage", "lineage", "seconds", "members",
                            "files", "by_status", "by_reason", "by_caption_status", "provenance"}  # fmt: skip
        assert len(seen) == done.extra["members"] == done.counts["by_status"]["ok"]
        for s in seen:
            record = json.loads(s["json"])
            assert s["txt"].decode() == record["caption"] == captions[s["__key__"]]["caption"]
            assert record["caption_status"] == captions[s["__key__"]]["caption_status"]
            assert record["provenance"]["model"] == str(tiny_models["llava"])
            assert record["provenance"]["prompt"] == "Describe this image and its style in a very detailed manner"
            assert {"max_new_tokens", "do_sample", "num_beams"} <= set(record["provenance"]["generation"])
            assert "transformers" in record["provenance"]["versions"]
            assert "jpg" not in s  # the bytes stay in images/, the one copy
    # The stage plans one pass over every images shard; its worker, run by hand, rewrites a shard byte for byte.
    layout = Layout(str(out))
    stage = CaptionStage(layout, _config(tiny_models))
    (plan,) = list(stage.passes(None))
    assert plan.label == "captions" and plan.folder == layout.captions()
    assert [t for t, _ in plan.tasks] == layout.images.done_shards()
    assert stage.outputs() == [f"captions: {out}/captions/"]
    shard = layout.captions().done_shards()[0]
    tar, index = (out / "captions" / f"{shard}.tar").read_bytes(), (out / "captions" / f"{shard}.parquet").read_bytes()
    worker = CaptionWorker(layout, _config(tiny_models))
    worker.setup()
    redone = worker.process(shard, None)
    assert (out / "captions" / f"{shard}.tar").read_bytes() == tar
    assert (out / "captions" / f"{shard}.parquet").read_bytes() == index
    assert redone.to_json() | {"seconds": 0} == layout.captions().read_done(shard).to_json() | {"seconds": 0}
    # A changed prompt is another configuration: refused on the same output.
    from curation.runner import SetupError

    with pytest.raises(SetupError):
        run_caption(str(out), _config(tiny_models, prompt="Describe briefly."), progress=False)


def test_config_hash_ignores_what_resolves_per_device():
    default = CaptionStageConfig()
    assert config_hash(default.semantics()) == "3e126d5fd5420a2e"  # as before batch size and cache became "auto"
    for volatile in ({"batch_size": 192}, {"cache_implementation": "static"}, {"device": "cuda"}):
        changed = CaptionStageConfig(model=dataclasses.replace(default.model, **volatile))
        assert config_hash(changed.semantics()) == config_hash(default.semantics()), volatile
    other = CaptionStageConfig(model=dataclasses.replace(default.model, max_new_tokens=64))
    assert config_hash(other.semantics()) != config_hash(default.semantics())


def test_config_fields_describe_their_flags():
    for kind in (CaptionStageConfig, CaptionConfig):
        for field in dataclasses.fields(kind):
            assert field.metadata.get("help"), f"{kind.__name__}.{field.name}"
    device = next(f for f in dataclasses.fields(CaptionConfig) if f.name == "device")
    assert device.metadata["choices"] == ["auto", "cuda", "cpu"]
    default = CaptionStageConfig()
    assert default.model == CaptionConfig(model=DEFAULT_MODEL, prompt=DEFAULT_PROMPT) and default.folder == "captions"
    assert CaptionStageConfig(name="dense").folder == "captions-dense"


def test_edge_cases_end_captioned_or_failed_with_reason(tmp_path, tiny_models, ray_local):
    out = tmp_path / "out"
    run_ingest(str(out), IngestConfig("folder", str(EDGE_CASES), 16), progress=False)
    # The static cache: batches that lost images to decode errors are padded to the batch shape.
    run_caption(str(out), _config(tiny_models, cache_implementation="static"), progress=False)
    rows = index_rows(out, "captions")
    assert set(rows) == set(index_rows(out, "images"))
    for key, row in rows.items():
        if row["status"] == "ok":
            assert row["caption_status"] in {"ok", "empty", "truncated", "repetitive"}, key
        else:
            assert row["error_reason"] and row["error"], key
    failed = {k for k, r in rows.items() if r["status"] == "failed"}
    assert any("truncated" in k for k in failed) and any("decompression_bomb" in k for k in failed)
    assert len(failed) < len(rows) - 20  # the sound majority is captioned


@pytest.mark.slow
def test_sigkill_mid_caption_then_rerun_gives_same_keys_and_captions(tmp_path, coco_files, tiny_models):
    src = make_folder(tmp_path / "in", coco_files[:24])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "curation.cli"]
    cap = ["caption", "--model", str(tiny_models["llava"]), "--max-new-tokens", "12", "--batch-size", "2",
           "--no-progress", "--workers", "1"]  # fmt: skip
    ingest = [
        "ingest",
        "--source",
        "folder",
        "--input",
        str(src),
        "--shard-size",
        "2",
        "--output",
        str(tmp_path / "ref"),
    ]
    subprocess.run([*cli, *ingest, "--no-progress"], check=True, env=env, capture_output=True)
    shutil.copytree(tmp_path / "ref", tmp_path / "out")
    subprocess.run([*cli, *cap, "--output", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen([*cli, *cap, "--output", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and len(list((out / "captions").glob("*.done.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list((out / "captions").glob("*.done.json"))) < 12, "the kill must land mid-run"
    subprocess.run([*cli, *cap, "--output", str(out)], check=True, env=env, capture_output=True)
    ref_rows, out_rows = index_rows(tmp_path / "ref", "captions"), index_rows(out, "captions")
    assert set(ref_rows) == set(out_rows)
    assert {k: r["caption"] for k, r in ref_rows.items()} == {k: r["caption"] for k, r in out_rows.items()}
    assert not [p for p in (out / "captions").iterdir() if p.name.startswith(".")]
