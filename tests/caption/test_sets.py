import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from curation.caption.model import CaptionConfig, Captioner
from curation.caption.stage import CaptionStageConfig, run_caption
from curation.dedup.stage import DedupConfig, run_dedup
from curation.errors import ConfigError
from curation.imaging import decode_image
from curation.ingest import IngestConfig, run_ingest
from curation.layout import Layout
from curation.runner import SetupError
from tests.conftest import REPO
from tests.layouts import make_folder
from tests.outputs import index_rows, tar_members

TEMPLATE = "Rewrite this caption as a detailed description: {original}"


def _config(tiny_models, name: str, prompt: str) -> CaptionStageConfig:
    model = CaptionConfig(model=str(tiny_models["llava"]), max_new_tokens=8, batch_size=4, prompt=prompt)
    return CaptionStageConfig(model=model, decode_threads=2, name=name)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory, coco_files, tiny_models, ray_local):
    """12 COCO photos, 9 with an original caption, and a copy of the first that dedup removes; the default set and
    a set templated with the original."""
    tmp = tmp_path_factory.mktemp("sets")
    (tmp / "copy").mkdir()
    copy = shutil.copy(coco_files[0], tmp / "copy" / "zz_copy.jpg")
    files = [*coco_files[:12], Path(copy)]
    originals = {p.name: f"a photo, number {i}" for i, p in enumerate(files[:9])} | {"zz_copy.jpg": "a copy"}
    out = tmp / "out"
    run_ingest(str(out), IngestConfig("folder", str(make_folder(tmp / "in", files, originals)), 6), progress=False)
    run_dedup(str(out), DedupConfig(), progress=False)
    run_caption(str(out), _config(tiny_models, "default", "Describe briefly."), progress=False)
    summary = run_caption(str(out), _config(tiny_models, "dense", TEMPLATE), progress=False)
    return out, summary


def test_two_sets_hold_their_own_captions_and_provenance(two_sets, tiny_models):
    out, summary = two_sets
    default, dense = index_rows(out, "captions"), index_rows(out, "captions-dense")
    assert set(default) == set(dense) == set(index_rows(out, "images")) and len(dense) == 13
    # Both sets skip the member of the duplicate pair that dedup removes.
    skipped = {k for k, r in dense.items() if r["status"] == "skipped"}
    assert len(skipped) == 1 and dense[skipped.pop()]["error_reason"] == "duplicate"
    assert {k for k, r in default.items() if r["status"] != "ok"} == {
        k for k, r in dense.items() if r["status"] == "skipped"
    }
    # The templated set: samples without an original are rows with reason no_original, counted, not captioned.
    no_original = {k for k, r in dense.items() if r["error_reason"] == "no_original"}
    assert len(no_original) == 3 and all(dense[k]["status"] == "failed" for k in no_original)
    assert summary.by_status == {"ok": 9, "failed": 3, "skipped": 1} and summary.by_reason == {"no_original": 3}
    members = tar_members(out, "captions-dense")
    assert set(members) == {k for k, r in dense.items() if r["status"] == "ok"}
    for key, m in members.items():
        assert set(m) == {"txt", "json"}  # no image bytes: they are in images/
        record = json.loads(m["json"])
        assert m["txt"].decode() == record["caption"] == dense[key]["caption"]
        assert record["provenance"]["prompt"] == TEMPLATE
    assert not any("jpg" in m for m in tar_members(out, "captions").values())  # every set is text only
    first = json.loads(next(iter(tar_members(out, "captions").values()))["json"])
    assert first["provenance"]["prompt"] == "Describe briefly."
    # The templated set's caption is the model's answer to the prompt with the sample's original filled in.
    captioner = Captioner(_config(tiny_models, "dense", TEMPLATE).model)
    captioner.setup()
    images = tar_members(out, "images")
    key = min(members)
    image = decode_image(images[key]["jpg"], target_size=captioner.input_size)
    prompt = TEMPLATE.format(original=dense[key]["original_caption"])
    assert captioner.caption([image], [prompt])[0].text == dense[key]["caption"]
    assert Layout(str(out)).caption_sets() == ["default", "dense"]


def test_sets_resume_and_refuse_a_changed_config_independently(two_sets, tiny_models):
    out, _ = two_sets
    shards = Layout(str(out)).images.done_shards()
    again = run_caption(str(out), _config(tiny_models, "dense", TEMPLATE), progress=False)
    assert again.shards_run == 0 and again.shards_skipped == len(shards) > 1
    # A shard removed from one set is redone there only.
    Layout(str(out)).captions("dense").remove_shard(shards[-1])
    before = {p.name: p.stat().st_mtime_ns for p in (out / "captions").iterdir()}
    redo = run_caption(str(out), _config(tiny_models, "dense", TEMPLATE), progress=False)
    assert redo.shards_run == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "captions").iterdir()} == before
    with pytest.raises(SetupError):  # a changed prompt in either set is refused, whatever the other holds
        run_caption(str(out), _config(tiny_models, "dense", "Describe briefly."), progress=False)
    with pytest.raises(SetupError):
        run_caption(str(out), _config(tiny_models, "default", TEMPLATE), progress=False)


def test_set_names_and_templates_are_checked(tmp_path):
    assert Layout.captions_folder("default") == "captions"
    assert Layout.captions_folder("llava_next2") == "captions-llava_next2"
    for bad in ("original", "images", "features", "Dense", "a-b", ""):
        with pytest.raises(ConfigError):
            Layout.captions_folder(bad)
        with pytest.raises(ConfigError):
            CaptionStageConfig(name=bad)
    with pytest.raises(ConfigError, match="only"):
        CaptionStageConfig(model=CaptionConfig(model="m", prompt="Describe {subject}"))
    # Text-only sets keep the config hash of earlier outputs; self-contained ones are another configuration.
    plain = CaptionStageConfig(model=CaptionConfig(model="m"))
    assert "self_contained" not in plain.semantics()
    assert CaptionStageConfig(model=CaptionConfig(model="m"), self_contained=True).semantics()["self_contained"]
    cli = [sys.executable, "-m", "curation.cli", "caption", "--output", str(tmp_path), "--model", "m"]
    for args in (["--name", "report"], ["--prompt", "Describe {"]):
        done = subprocess.run([*cli, *args], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
