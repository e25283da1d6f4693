import numpy as np
import pytest

from curation.features.npy import read_npy
from curation.features.stage import FeaturesConfig, run_features, t5_sidecar, vae_sidecar
from curation.features.t5 import T5Features, TextFeatureConfig
from curation.runner import SetupError
from curation.shards import StageDir
from curation.tiny.t5 import build_tiny_t5
from curation.tiny.vae import build_tiny_vae
from tests.features import make_caption_shards, make_named_set
from tests.outputs import index_rows, tar_members


def test_sidecar_names_keep_todays_and_suffix_the_rest():
    assert t5_sidecar("caption", 120) == t5_sidecar("original", 16) == "t5"
    assert t5_sidecar("caption", 300) == "t5-default-300" and t5_sidecar("original", 300) == "t5-original-300"
    assert t5_sidecar("dense", 120) == "t5-dense-120"
    assert vae_sidecar(512, False) == "vae512" and vae_sidecar(1024, True, "sdxl") == "vae1024ms-sdxl"
    assert FeaturesConfig(t5="t", vae="v", field="default").field == "caption"  # the default set, today's hash
    for bad in ("images", "Dense", "a-b"):
        with pytest.raises(ValueError):
            FeaturesConfig(t5="t", vae="v", field=bad)


def test_features_of_a_named_set_at_sigma_length_beside_the_default(tmp_path, ray_local):
    t5, vae = str(build_tiny_t5(tmp_path / "t5")), str(build_tiny_vae(tmp_path / "vae"))
    out = tmp_path / "out"
    make_caption_shards(out, n_ok=4, per_shard=4)
    common = dict(t5=t5, vae=vae, resolutions=(256,), t5_batch_size=4, vae_batch_size=4, decode_threads=2)
    with pytest.raises(SetupError, match="caption --name dense"):  # the set is not captioned yet
        run_features(str(out), FeaturesConfig(**common, field="dense", max_length=300), progress=False)
    texts = make_named_set(out, "dense", no_original=frozenset({"zz_tall"}))
    run_features(str(out), FeaturesConfig(**common, max_length=16), progress=False)
    vae_before = {p.name: p.stat().st_mtime_ns for p in (out / "features" / "vae256").iterdir()}
    summary = run_features(str(out), FeaturesConfig(**common, field="dense", max_length=300), progress=False)
    assert summary.shards_run == len(StageDir(f"{out}/captions").done_shards())
    # The VAE sidecar is shared (already current): not rewritten.
    assert {p.name: p.stat().st_mtime_ns for p in (out / "features" / "vae256").iterdir()} == vae_before
    rows, members = index_rows(out, "features/t5-dense-300"), tar_members(out, "features/t5-dense-300")
    assert set(members) == set(texts) and {k for k, r in rows.items() if r["status"] == "ok"} == set(texts)
    assert rows["zz_tall"]["error_reason"] == "no_original"  # failed in the set: failed in its sidecar
    encoder = T5Features(TextFeatureConfig(t5, max_length=300))
    encoder.setup()
    keys = sorted(texts)
    expected, mask = encoder.encode([texts[k] for k in keys], dtype=np.float16)
    for i, key in enumerate(keys):
        assert rows[key]["text"] == texts[key]
        feature, got_mask = read_npy(members[key]["t5.npy"]), read_npy(members[key]["t5mask.npy"])
        assert feature.shape == (300, encoder.dim) and got_mask.shape == (300,)
        np.testing.assert_array_equal(got_mask, mask[i])
        np.testing.assert_allclose(feature.astype(np.float32), expected[i].astype(np.float32), atol=2e-3)
    # The default set's 16-token sidecar is untouched beside it; a rerun of the named set does nothing.
    assert read_npy(tar_members(out, "features/t5")[keys[0]]["t5.npy"]).shape == (16, encoder.dim)
    again = run_features(str(out), FeaturesConfig(**common, field="dense", max_length=300), progress=False)
    assert again.shards_run == 0
    # Recaptioning the set (a new lineage) redoes its sidecar.
    make_named_set(out, "dense")
    redo = run_features(str(out), FeaturesConfig(**common, field="dense", max_length=300), progress=False)
    assert (
        redo.shards_run == again.shards_skipped
        and index_rows(out, "features/t5-dense-300")["zz_tall"]["status"] == "ok"
    )
