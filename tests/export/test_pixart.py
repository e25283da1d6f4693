"""The export against a re-implementation of PixArt-alpha's reader, written from the trainer contract doc."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.errors import SetupError
from curation.export.pixart import export_pixart
from curation.features.stage import FeaturesConfig
from curation.layout import Layout
from curation.tiny.t5 import build_tiny_t5
from curation.tiny.vae import build_tiny_vae
from tests.features import make_caption_shards, write_features
from tests.outputs import export_entries

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
ASPECT_RATIOS = json.loads((SHARED / "reference" / "pixart_aspect_ratios.json").read_text())
MAX_LENGTH = 16


def pixart_entries(root: str, resolution: int, multiscale: bool):
    """PixArt's InternalData / InternalDataMS path logic: (entry, image, T5 npz, VAE npy, expected h x w)."""
    meta = export_entries(os.path.join(root, "partition_filter" if multiscale else "partition"))
    vae_dir = (
        f"img_vae_fatures_{resolution}_multiscale/ms"
        if multiscale
        else f"img_vae_features_{resolution}resolution/noflip"
    )
    for item in [m for m in meta if m["ratio"] <= 4]:
        k = "_".join(item["path"].rsplit("/", 1))
        if multiscale:  # get_closest_ratio over the published table, from the JSON height/width
            ratios = ASPECT_RATIOS[str(resolution)]
            closest = min(ratios, key=lambda r: abs(float(r) - item["height"] / item["width"]))
            size = tuple(int(x) for x in ratios[closest])
        else:
            size = (resolution, resolution)
        yield (
            item,
            os.path.join(root.replace("InternData", "InternImgs"), item["path"]),
            os.path.join(root, "caption_feature_wmask", k.replace(".png", ".npz")),
            os.path.join(root, vae_dir, k.replace(".png", ".npy")),
            size,
        )


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    t5, vae = build_tiny_t5(root / "t5"), build_tiny_vae(root / "vae")
    out = root / "out"
    outcomes = make_caption_shards(out, n_ok=3, per_shard=4)
    for multiscale in (True, False):
        config = FeaturesConfig(str(t5), str(vae), max_length=MAX_LENGTH, resolutions=(256,), multiscale=multiscale)
        write_features(out, config)
    return out, outcomes


@pytest.mark.parametrize("multiscale", [False, True])
def test_every_index_entry_resolves_to_files_of_the_exact_shapes(tmp_path, output, ray_local, multiscale):
    out, outcomes = output
    root = tmp_path / "pixart" / "InternData"
    counts = export_pixart(str(out), root, 256, multiscale)
    ok = sorted(k for k, o in outcomes.items() if o == "ok")
    assert counts == {
        "entries": len(ok),
        "left_out_ratio": 1,
        "failed": 3,
        "skipped_duplicate": 0,
        "shards": 2,
        "shards_without_features": 0,
    }
    entries = list(pixart_entries(str(root), 256, multiscale))
    assert sorted(e[0]["path"] for e in entries) == [f"{k}.png" for k in ok]
    for item, image, npz, npy, (h, w) in entries:
        assert set(item) == {"path", "prompt", "height", "width", "ratio"} and item["prompt"]
        assert item["ratio"] == item["height"] / item["width"]
        assert "/" not in item["path"] and item["path"].count(".") == 1
        with Image.open(image) as im:  # the original JPEG bytes; Pillow opens by content
            assert im.size == (item["width"], item["height"])
        with np.load(npz, allow_pickle=False) as z:
            feat, mask = z["caption_feature"], z["attention_mask"]
        assert feat.shape == (1, MAX_LENGTH, 32) and feat.dtype == np.float32
        assert mask.shape == (1, MAX_LENGTH) and set(np.unique(mask)) <= {0, 1}
        n = int(mask.sum())
        assert n >= 1 and mask[0, :n].all() and (np.abs(feat[0, :n]).sum(-1) > 0).all()
        latent = np.load(npy, allow_pickle=False)
        assert latent.shape == (8, h // 8, w // 8) and latent.dtype == np.float32
    other = "partition" if multiscale else "partition_filter"
    assert not (root / other).exists()


def test_png_reencoding_and_reexport_are_clean(tmp_path, output, ray_local):
    out, _ = output
    root = tmp_path / "InternData"
    first = export_pixart(str(out), root, 256, False, reencode_png=True)
    second = export_pixart(str(out), root, 256, False, reencode_png=True)
    assert first == second
    images = sorted((tmp_path / "InternImgs").iterdir())
    assert len(images) == first["entries"] and not any(p.name.startswith(".tmp-") for p in root.rglob("*"))
    with Image.open(images[0]) as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("bad", ["pixart", "InternData/x/InternData"])
def test_the_folder_must_name_interndata_once(tmp_path, output, bad):
    with pytest.raises(ValueError, match="exactly once"):
        export_pixart(str(output[0]), tmp_path / bad, 256, False)


def test_missing_features_are_a_clear_error(tmp_path, output):
    with pytest.raises(SetupError, match="curation features"):
        export_pixart(str(output[0]), tmp_path / "InternData", 512, False)


def test_the_export_is_a_pass_of_the_runner(tmp_path, output, ray_local):
    """Done markers in the target, per-shard logs, resume (a shard without its marker is redone, alone), and a
    changed config refused without --force."""
    import dataclasses

    from curation.export.pixart import ExportConfig, ExportStage, run_export
    from curation.stage import Stage

    assert issubclass(ExportStage, Stage) and ExportStage.name == "export-pixart"
    assert all(f.metadata.get("help") for f in dataclasses.fields(ExportConfig))
    out, _ = output
    root = tmp_path / "InternData"
    config = ExportConfig(to=str(root), resolution=256, multiscale=True)
    stage = ExportStage(Layout(str(out)), config)
    assert stage.outputs() == [
        f"PixArt InternData: {root} (index: one JSON file per shard in partition_filter/, pass them all as the list)"
    ]
    run = run_export(str(out), config, progress=False)
    (summary,) = run.summaries
    markers = root / ".curation" / "export-pixart-alpha-256ms"
    shards = sorted(p.name.removesuffix(".done.json") for p in markers.glob("*.done.json"))
    assert summary.shards_run == len(shards) == 2 and run.result["shards"] == 2
    assert sorted({p.parent.name for p in (out / "logs" / "export-pixart-alpha-256ms").glob("*/*.json")}) == shards
    assert run.lines()[-1] == "[export-pixart] " + ", ".join(f"{k}={v}" for k, v in run.result.items())
    entries = export_entries(root / "partition_filter")
    again = run_export(str(out), config, progress=False)
    assert again.summaries[0].shards_run == 0 and again.result == run.result
    # A shard whose marker is missing (killed before it) is redone, and only it.
    (markers / f"{shards[0]}.done.json").unlink()
    resumed = run_export(str(out), config, progress=False)
    assert resumed.summaries[0].shards_run == 1 and resumed.result == run.result
    assert export_entries(root / "partition_filter") == entries
    with pytest.raises(SetupError, match="--force"):
        run_export(str(out), dataclasses.replace(config, reencode_png=True), progress=False)
    forced = run_export(str(out), dataclasses.replace(config, reencode_png=True), force=True, progress=False)
    assert forced.summaries[0].shards_run == 2


def test_the_export_config_is_validated(tmp_path):
    from curation.errors import ConfigError
    from curation.export.pixart import ExportConfig

    to = str(tmp_path / "InternData")
    for bad in (dict(format="beta"), dict(resolution=300), dict(prompt_field="Bad-Name"), dict(vae_tag="sd-xl")):
        with pytest.raises(ConfigError):
            ExportConfig(to=to, **bad)
    assert ExportConfig(to=to, format="sigma", prompt_field="dense", sharegpt4v_field="default").to == to
