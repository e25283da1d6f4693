"""What a user meets when a stage cannot work: stages run out of order, models that cannot load, JourneyDB as people
unpack it. Each is one line naming the fix, exit 2, and nothing left behind in a folder the run did not find."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from curation.cli import main
from tests.layouts import make_folder, make_journeydb
from tests.outputs import index_rows
from tests.reliability import cli, one_error_line


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"curation {argv[0]}: error: "), err
    return err[0].split(": error: ", 1)[1]


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# -- stages out of order ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["caption"],
        ["dedup"],
        ["size-filter"],
        ["stats"],
        ["features"],
        ["export-pixart", "--to", "EXPORT"],
        ["export-sana", "--to", "EXPORT"],
    ],  # fmt: skip
)
def test_a_stage_before_its_input_names_the_stage_to_run_first_and_creates_nothing(tmp_path, capsys, argv):
    out = tmp_path / "out"
    argv = [a.replace("EXPORT", str(tmp_path / "InternData")) for a in argv]
    message = _refused(capsys, [*argv, "--output", str(out)])
    assert message == f"no images in {out}: run curation ingest first"
    assert not out.exists()  # no output folder, lock file or run record
    out.mkdir()  # an existing empty output: still nothing written into it
    assert _refused(capsys, [*argv, "--output", str(out)]) == message
    assert _tree(out) == []
    assert not (tmp_path / "InternData").exists()


def test_later_stages_before_their_inputs_name_the_stage_and_touch_nothing(tmp_path, capsys, coco_files, ray_local):
    out = tmp_path / "out"
    src = make_folder(tmp_path / "in", coco_files[:3], nested=False)
    assert main(["ingest", "--source", "folder", "--input", str(src), "--output", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    refusals = {
        ("stats", "--field", "caption"): f"no caption set in {out}: run curation caption --name NAME first",
        ("features",): f"no caption set 'default' in {out}: run curation caption --name default first",
        ("export-pixart", "--to", str(tmp_path / "InternData")): "run `curation features` with resolution 512 first",
    }
    for argv, expected in refusals.items():
        assert _refused(capsys, [*argv, "--output", str(out)]).endswith(expected), argv
    message = _refused(capsys, ["caption", "--output", str(out), "--model", "/nonexistent/llava"])
    assert message.startswith("--model /nonexistent/llava: no such folder")  # with its input there, the model
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # no run record, log or folder written
    assert set(json.loads((out / "run_config.json").read_text())["stages"]) == {"images"}
    assert not (tmp_path / "InternData").exists()


def test_a_refused_first_ingest_leaves_no_output_folder(tmp_path, capsys, ray_local):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no image here")
    out = tmp_path / "out"
    argv = ["ingest", "--source", "folder", "--input", str(tmp_path / "in"), "--output", str(out), "--no-progress"]
    message = _refused(capsys, argv)
    assert message.startswith("no images found for source 'folder'")
    assert not out.exists()  # the lock had created it, and the listing written into it: all removed


# -- models checked on the driver, before any worker starts -----------------------------------------------------
def test_a_model_that_cannot_load_is_one_line_before_any_stage_starts(tmp_path, capsys, monkeypatch, coco_files):
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llava").mkdir(parents=True)
    run = ["run", "--source", "folder", "--input", str(make_folder(tmp_path / "in", coco_files[:2])), "--output",
           str(out), "--no-progress"]  # fmt: skip
    cases = {
        "/nonexistent/llava": "--model /nonexistent/llava: no such folder (/nonexistent/llava); check the path",
        "models/lava": f"--model models/lava: no such folder ({tmp_path}/models/lava); check the path",  # a typo
        "models/llava": "--model models/llava: the folder has no config.json, so it is not a saved model",
    }
    for model, expected in cases.items():
        assert _refused(capsys, [*run, "--model", model]).startswith(expected), model
    (tmp_path / "models" / "llava" / "config.json").write_text("{}")
    models = ["--model", "models/llava", "--t5", str(tmp_path), "--vae", "./vae"]
    t5 = _refused(capsys, [*run, *models])
    assert t5.startswith(f"--t5 {tmp_path}: the folder has no config.json")
    (tmp_path / "config.json").write_text("{}")
    assert _refused(capsys, [*run, *models]).startswith(f"--vae ./vae: no such folder ({tmp_path}/vae)")
    assert not out.exists()  # refused before ingest, the first stage, started


def test_a_hub_id_not_cached_is_one_line_in_seconds_offline_and_unreachable(tmp_path):
    hub = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}  # an empty cache
    out = str(tmp_path / "out")
    (tmp_path / "config.json").write_text("{}")  # tmp_path: a model folder the checks accept
    run = ["run", "--source", "folder", "--input", str(tmp_path), "--output", out]
    started = time.monotonic()
    offline = one_error_line(cli(*run, "--model", "org/not-cached", env={**hub, "HF_HUB_OFFLINE": "1"}), "run")
    assert "--model org/not-cached is not in the Hugging Face cache" in offline and "HF_HUB_OFFLINE=1" in offline
    assert "hf download org/not-cached" in offline and "or pass a local model folder" in offline
    # Online, but nothing answers at the Hub's address (a closed port on loopback): refused, not retried.
    closed = {**hub, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    unreachable = one_error_line(cli(*run, "--model", str(tmp_path), "--t5", "org/not-cached-t5", env=closed), "run")
    assert "--t5 org/not-cached-t5 is not in the Hugging Face cache and the Hub cannot be reached" in unreachable
    assert time.monotonic() - started < 60  # two fresh processes; the loaders' retries took 35-45 s for one
    assert not Path(out).exists()


# -- JourneyDB as people unpack it ------------------------------------------------------------------------------
def _ingest(capsys, source: str, src: Path, out: Path) -> tuple[int, str]:
    code = main(["ingest", "--source", source, "--input", str(src), "--output", str(out), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out if code == 0 else captured.err


def test_journeydb_annotations_extracted_beside_their_archive_are_read_once(tmp_path, capsys, coco_files, ray_local):
    shipped = make_journeydb(tmp_path / "shipped", coco_files[:3], missing=0, annotations="jsonl.tgz")
    both = make_journeydb(tmp_path / "both", coco_files[:3], missing=0, annotations="both")
    assert _ingest(capsys, "journeydb", shipped, tmp_path / "out1")[0] == 0
    code, printed = _ingest(capsys, "journeydb", both, tmp_path / "out2")
    assert code == 0, printed
    assert (
        "[images] annotations: read annotation.jsonl, extracted beside annotation.jsonl.tgz with the same lines"
        in printed
    )
    one, two = index_rows(tmp_path / "out1", "images"), index_rows(tmp_path / "out2", "images")
    assert len(two) == 3 and {k: r["original_caption"] for k, r in two.items()} == {
        k: r["original_caption"] for k, r in one.items()
    }

    extracted = both / "annotation.jsonl"
    extracted.write_text(extracted.read_text().replace("photo number 1 ", "photo number one "))
    code, err = _ingest(capsys, "journeydb", both, tmp_path / "out3")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"the annotation files {extracted} and {both / 'annotation.jsonl.tgz'} differ at line 2" in err
    assert "remove the one that is out of date" in err
    assert not (tmp_path / "out3").exists()


@pytest.mark.parametrize("extracted_images", [False, True], ids=["archives", "extracted"])
def test_folder_source_on_journeydb_is_refused_naming_journeydb(tmp_path, capsys, coco_files, ray_local,
                                                                 extracted_images):  # fmt: skip
    src = make_journeydb(tmp_path / "in", coco_files[:2], missing=0, extracted_images=extracted_images)
    assert (src / "imgs" / "000").is_dir() == extracted_images
    code, err = _ingest(capsys, "folder", src, tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith(": use --source journeydb")
    assert "img2dataset" not in err and "sa1b" not in err
    assert not (tmp_path / "out").exists()
    shutil.rmtree(src / "imgs")
    make_folder(src / "imgs", coco_files[:2])  # plain images beside a .jsonl (say, metadata.jsonl): still a folder
    assert _ingest(capsys, "folder", src, tmp_path / "out")[0] == 0
