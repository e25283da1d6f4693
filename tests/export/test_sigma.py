"""The Σ export against a re-implementation of PixArt-Σ's InternalDataSigma / InternalDataMSSigma path logic, written
from the trainer contract doc (../shared/reference/pixart_trainer_contract.md)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from curation.export.pixart import export_pixart
from curation.features.npy import read_npy
from curation.features.stage import FeaturesConfig
from curation.tiny.t5 import build_tiny_t5
from curation.tiny.vae import build_tiny_sdxl_vae
from tests.features import make_caption_shards, make_named_set, write_features
from tests.outputs import export_entries, index_rows, tar_members

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
ASPECT_RATIOS = json.loads((SHARED / "reference" / "pixart_aspect_ratios.json").read_text())
L, RESOLUTION = 300, 256


def sigma_entries(root: str, multiscale: bool):
    """Σ's datasets: (entry, image, prompt npz, sharegpt4v npz, VAE npy, expected h x w) for each kept entry."""
    meta = export_entries(os.path.join(root, "data_info_sigma_ms" if multiscale else "data_info_sigma"))
    for item in [m for m in meta if m["ratio"] <= 4.5]:
        if multiscale:  # '_'.join(path.rsplit('/', 1)) with the image extension replaced (replace_img_ext)
            k = os.path.splitext("_".join(item["path"].rsplit("/", 1)))[0]
            ratios = ASPECT_RATIOS[str(RESOLUTION)]
            closest = min(ratios, key=lambda r: abs(float(r) - item["height"] / item["width"]))
            size = tuple(int(x) for x in ratios[closest])
            vae = f"img_sdxl_vae_features_{RESOLUTION}resolution_ms_new"
        else:  # the basename with .png replaced
            k = os.path.basename(item["path"]).replace(".png", "")
            size = (RESOLUTION, RESOLUTION)
            vae = f"img_sdxl_vae_features_{RESOLUTION}resolution_new"
        yield (
            item,
            os.path.join(root.replace("InternData", "InternImgs"), item["path"]),
            os.path.join(root, "caption_features_new", f"{k}.npz"),
            os.path.join(root, "sharegpt4v_caption_features_new", f"{k}.npz"),
            os.path.join(root, vae, f"{k}.npy"),
            size,
        )


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigma")
    t5, vae = build_tiny_t5(root / "t5"), build_tiny_sdxl_vae(root / "sdxl")
    out = root / "out"
    outcomes = make_caption_shards(out, n_ok=3, per_shard=4)
    ok = sorted(k for k, o in outcomes.items() if o == "ok")
    make_named_set(out, "dense", no_original=frozenset(ok[:1]))
    for field, multiscale in (("original", False), ("default", False), ("dense", False), ("original", True)):
        config = FeaturesConfig(
            str(t5), str(vae), max_length=L, resolutions=(RESOLUTION,), multiscale=multiscale, field=field,
            vae_tag="sdxl",
        )  # fmt: skip
        write_features(out, config)
    return out, outcomes


@pytest.mark.parametrize("multiscale", [False, True])
def test_every_sigma_entry_resolves_to_files_of_the_exact_shapes(tmp_path, output, multiscale, ray_local):
    out, outcomes = output
    root = tmp_path / "pixart" / "InternData"
    counts = export_pixart(str(out), root, RESOLUTION, multiscale, format="sigma", vae_tag="sdxl")
    ok = sorted(k for k, o in outcomes.items() if o == "ok")
    # zz_nocaption has an original but no default-set caption: its sharegpt4v takes the original's text.
    assert counts == {
        "entries": len(ok) + 1,
        "left_out_ratio": 1,  # zz_tall: h/w 5 > 4.5
        "failed": 2,  # failed upstream, corrupt
        "skipped_duplicate": 0,
        "prompt_fallback": 0,
        "sharegpt4v_fallback": 1,
        "shards": 2,
        "shards_without_features": 0,
    }
    entries = list(sigma_entries(str(root), multiscale))
    assert len(entries) == counts["entries"] == len(export_entries(root / ("data_info_sigma" + "_ms" * multiscale)))
    originals = {k: r["original_caption"] for k, r in index_rows(out, "captions").items()}
    captions = {k: r["caption"] for k, r in index_rows(out, "captions").items()}
    default_t5 = tar_members(out, "features/t5-default-300")
    for item, image, prompt_npz, sg4v_npz, npy, (h, w) in entries:
        key = item["path"].removesuffix(".png")
        assert set(item) == {"path", "prompt", "sharegpt4v", "height", "width", "ratio"}
        assert item["ratio"] == item["height"] / item["width"] <= 4.5 and os.path.isfile(image)
        assert item["prompt"] == originals[key]
        assert item["sharegpt4v"] == (captions[key] or originals[key])  # the fallback: the other field's text
        for npz in (prompt_npz, sg4v_npz):
            with np.load(npz, allow_pickle=False) as z:
                feat, mask = z["caption_feature"], z["attention_mask"]
            assert feat.shape == (1, L, 32) and feat.dtype == np.float16
            assert mask.shape == (1, L) and mask.dtype == np.int16 and set(np.unique(mask)) <= {0, 1}
            n = int(mask.sum())
            assert n >= 1 and mask[0, :n].all() and not mask[0, n:].any()
        if captions[key]:  # sharegpt4v's features are the default set's T5 features
            with np.load(sg4v_npz) as z:
                expected = read_npy(default_t5[key]["t5.npy"])
                np.testing.assert_array_equal(z["caption_feature"][0], expected.astype(np.float16))
        latent = np.load(npy, allow_pickle=False)
        assert latent.shape == (8, h // 8, w // 8) and latent.dtype == np.float32


def test_a_named_set_as_prompt_falls_back_when_it_is_empty(tmp_path, output, ray_local):
    out, outcomes = output
    root = tmp_path / "InternData"
    counts = export_pixart(str(out), root, RESOLUTION, False, format="sigma", vae_tag="sdxl", prompt_field="dense")
    assert counts["prompt_fallback"] == 1  # the ok photo the dense set failed (no_original)
    dense = {k: r for k, r in index_rows(out, "captions-dense").items()}
    captions = {k: r["caption"] for k, r in index_rows(out, "captions").items()}
    for item, _, prompt_npz, sg4v_npz, _, _ in sigma_entries(str(root), False):
        key = item["path"].removesuffix(".png")
        if dense[key]["status"] == "ok":
            assert item["prompt"] == dense[key]["caption"]
        else:  # the prompt takes the sharegpt4v's text and features
            assert item["prompt"] == item["sharegpt4v"] == captions[key]
            assert Path(prompt_npz).read_bytes() == Path(sg4v_npz).read_bytes()
