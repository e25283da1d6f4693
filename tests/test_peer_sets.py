"""Caption sets as peers, through the CLI: COCO photos with `.txt` alt-text, two named sets (`dense`, `short`) and no
default set. Stats, features of each set and both PixArt exports work; images/ is the only copy of the bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curation.cli import main
from curation.stats.nouns import count_captions
from tests.layouts import make_folder
from tests.outputs import export_entries, index_rows, tar_members

N = 8
# One output built through the CLI by nine model-loading commands: minutes on a machine shared by many test runs.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def peers(tmp_path_factory, coco_files, tiny_models, ray_local):
    """One output for the module: ingest, the sets `dense` and `short`, stats, T5 of each set, VAE latents."""
    tmp = tmp_path_factory.mktemp("peers")
    files = coco_files[:N]
    alt = {p.name: f"a photo of a scene, number {i}, with a dog and a tree" for i, p in enumerate(files)}
    src = make_folder(tmp / "in", files, alt, nested=False)
    out = tmp / "out"
    common = ["--output", str(out), "--no-progress"]
    llava = ["--model", str(tiny_models["llava"]), "--max-new-tokens", "8", "--batch-size", "4"]
    models = ["--t5", str(tiny_models["t5"]), "--vae", str(tiny_models["vae"]), "--resolutions", "256"]
    steps = [
        ["ingest", "--source", "folder", "--input", str(src), "--shard-size", "4"],
        ["caption", "--name", "dense", *llava],
        ["caption", "--name", "short", *llava, "--prompt", "Describe briefly: {original}"],
        ["stats"],
        ["features", "--field", "original", *models],  # `t5`: the alpha export's prompt, and vae256
        ["features", "--field", "short", *models],  # t5-short-120 (vae256 is current: not recomputed)
        # Sigma's 300 tokens: t5-dense-300 and t5-original-300, latents under another tag (vae256-sdxl)
        ["features", "--field", "dense", *models, "--max-length", "300", "--vae-tag", "sdxl"],
        ["features", "--field", "original", *models, "--max-length", "300", "--vae-tag", "sdxl"],
    ]
    for step in steps:
        assert main([*step, *common]) == 0, step
    return out, alt


def test_stats_has_the_originals_row_and_one_row_per_set(peers):
    out, alt = peers
    rows = {r["name"]: r for r in json.loads((out / "report" / "table1.json").read_text())}
    assert list(rows) == ["out (original captions)", "out (dense captions)", "out (short captions)"]
    assert rows["out (original captions)"] == count_captions(alt.values()).table1_row("out (original captions)")
    for name in ("dense", "short"):
        texts = [r["caption"] for r in index_rows(out, f"captions-{name}").values() if r["status"] == "ok"]
        assert rows[f"out ({name} captions)"] == count_captions(texts).table1_row(f"out ({name} captions)")
    assert not (out / "captions").exists()


def test_images_is_the_one_copy_of_the_bytes(peers):
    out, _ = peers
    images = tar_members(out, "images")
    assert len(images) == N and all("jpg" in m for m in images.values())
    for name in ("dense", "short"):
        members = tar_members(out, f"captions-{name}")
        assert members and all(set(m) == {"txt", "json"} for m in members.values())


def test_features_of_each_set_read_the_images_from_images(peers):
    out, _ = peers
    for name, length in (("dense", 300), ("short", 120)):
        rows = index_rows(out, f"features/t5-{name}-{length}")
        captions = index_rows(out, f"captions-{name}")
        assert set(rows) == set(captions)
        assert all(rows[k]["text"] == captions[k]["caption"] for k in rows if rows[k]["status"] == "ok")
    vae = index_rows(out, "features/vae256")
    assert len(vae) == N and all(r["status"] == "ok" for r in vae.values())


def test_a_missing_set_is_refused_in_one_line(peers, capsys):
    out, _ = peers
    assert main(["features", "--output", str(out), "--field", "default", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"curation features: error: no caption set 'default' in {out}: run curation caption --name default first"
    ]


@pytest.mark.parametrize("format", ["alpha", "sigma"])
def test_both_pixart_exports_work_without_a_default_set(peers, tmp_path, format):
    out, alt = peers
    to = tmp_path / format / "InternData"
    flags = ["--format", format, "--resolution", "256"]
    if format == "sigma":
        flags += ["--sharegpt4v-field", "dense", "--vae-tag", "sdxl"]
    assert main(["export-pixart", "--output", str(out), "--to", str(to), *flags, "--no-progress"]) == 0
    entries = export_entries(to / ("data_info_sigma" if format == "sigma" else "partition"))
    assert len(entries) == N
    dense = index_rows(out, "captions-dense")
    for e in entries:
        key = e["path"].removesuffix(".png")
        assert e["prompt"] == alt[f"{index_rows(out, 'images')[key]['source_id']}"]
        if format == "sigma":
            assert e["sharegpt4v"] == dense[key]["caption"]
        latent = np.load(to / ("img_sdxl_vae_features_256resolution_new" if format == "sigma" else
                               "img_vae_features_256resolution/noflip") / f"{key}.npy")  # fmt: skip
        assert latent.shape == (8, 32, 32)
        assert (to.parent / "InternImgs" / f"{key}.png").read_bytes() == tar_members(out, "images")[key]["jpg"]
