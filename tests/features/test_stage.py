import json

import numpy as np
import pytest
import webdataset as wds

from curation.buckets import bucket_size
from curation.features.npy import read_npy
from curation.features.stage import FeatureDirs, FeaturesConfig, FeaturesStage, run_features
from curation.features.t5 import T5Features, TextFeatureConfig
from curation.features.vae import VaeFeatureConfig, VaeFeatures, cover_size
from curation.imaging import decode_image
from curation.records import table_to_samples
from curation.shards import StageDir
from curation.tiny.t5 import build_tiny_t5
from curation.tiny.vae import build_tiny_vae
from tests.features import make_caption_shards


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return str(build_tiny_t5(root / "t5")), str(build_tiny_vae(root / "vae"))


def _config(models, **kw) -> FeaturesConfig:
    base = dict(
        t5=models[0],
        vae=models[1],
        max_length=16,
        resolutions=(256,),
        multiscale=True,
        t5_batch_size=3,
        vae_batch_size=2,
        decode_threads=2,
    )
    return FeaturesConfig(**{**base, **kw})


def _run(out, config) -> list[dict]:
    stage = FeaturesStage(str(out), config)
    stage.setup()
    return [stage.process(shard) for shard in StageDir(f"{out}/captions").done_shards()]


@pytest.fixture(scope="module")
def made(tmp_path_factory, models):
    out = tmp_path_factory.mktemp("out")
    outcomes = make_caption_shards(out, n_ok=4, per_shard=4)
    config = _config(models)
    return out, outcomes, config, _run(out, config)


def _members(out, name) -> dict[str, dict[str, bytes]]:
    stage = StageDir(f"{out}/features/{name}")
    return {k: m for shard in stage.done_shards() for k, m in stage.iter_samples(shard)}


def _rows(out, name) -> dict[str, dict]:
    stage = StageDir(f"{out}/features/{name}")
    return {r["key"]: r for shard in stage.done_shards() for r in stage.read_index(shard).to_pylist()}


def test_t5_sidecar_holds_features_masks_and_failure_rows(made, models):
    out, outcomes, config, dones = made
    assert [d["sidecars_written"] for d in dones] == [["t5", "vae256ms"]] * 2
    rows, members = _rows(out, "t5"), _members(out, "t5")
    assert rows.keys() == outcomes.keys()  # one row per sample, failures included
    assert rows["zz_failed"]["status"] == "failed" and rows["zz_failed"]["error_reason"] == "truncated"
    assert rows["zz_nocaption"]["error_reason"] == "no_text"
    ok = [k for k, r in rows.items() if r["status"] == "ok"]
    assert set(ok) == {k for k, o in outcomes.items() if o in ("ok", "tall", "corrupt")} == members.keys()
    t5 = T5Features(TextFeatureConfig(models[0], max_length=16))
    t5.setup()
    expected, mask = t5.encode([rows[k]["text"] for k in ok], dtype=np.float16)
    for i, key in enumerate(ok):
        feat, m = read_npy(members[key]["t5.npy"]), read_npy(members[key]["t5mask.npy"])
        assert feat.shape == (16, t5.dim) and feat.dtype == np.float16
        assert m.shape == (16,) and m.dtype == np.uint8 and np.array_equal(m, mask[i])
        np.testing.assert_allclose(feat, expected[i], atol=1e-3)
        assert rows[key]["tokens"] >= m.sum()


def test_vae_sidecar_latents_are_at_the_bucket_size(made, models):
    out, outcomes, config, _ = made
    rows, members = _rows(out, "vae256ms"), _members(out, "vae256ms")
    assert rows["zz_corrupt"]["status"] == "failed" and rows["zz_corrupt"]["error_reason"] == "truncated"
    assert "zz_corrupt" in rows["zz_corrupt"]["error"]
    assert rows["zz_nocaption"]["status"] == "ok"  # the text failed, not the image
    captions = StageDir(f"{out}/captions")
    samples = {s.key: s for sh in captions.done_shards() for s in table_to_samples(captions.read_index(sh))}
    images = {k: m["jpg"] for sh in captions.done_shards() for k, m in captions.iter_samples(sh)}
    vae = VaeFeatures(VaeFeatureConfig(models[1]))
    vae.setup()
    for key, m in members.items():
        s, meta, latent = samples[key], json.loads(m["json"]), read_npy(m["vae.npy"])
        h, w = bucket_size(s.bucket_256, 256)
        assert latent.shape == (8, h // 8, w // 8) and latent.dtype == np.float32
        assert meta == {
            "key": key,
            "bucket": s.bucket_256,
            "height": h,
            "width": w,
            "resolution": 256,
            "multiscale": True,
            "orig_height": s.height,
            "orig_width": s.width,
        }
        assert (rows[key]["height"], rows[key]["width"]) == (h, w)
        # Equal to encoding the image directly; JPEGs are decoded DCT-scaled to just cover the bucket.
        ch, cw = cover_size(s.height, s.width, (h, w))
        direct = vae.encode([decode_image(images[key], target_size=(cw, ch))], (h, w))[0]
        np.testing.assert_allclose(direct, latent, atol=1e-4)
        full = vae.encode([decode_image(images[key])], (h, w))[0]
        assert np.abs(full - latent).mean() < 0.1 * np.abs(full).mean()
    assert members["zz_tall"]["vae.npy"] and rows["zz_tall"]["bucket"] == "4.0"


def test_sidecars_keep_the_captions_order_and_read_with_webdataset(made):
    out, *_ = made
    captions = StageDir(f"{out}/captions")
    for name in ("t5", "vae256ms"):
        for shard in captions.done_shards():
            order = [r["key"] for r in captions.read_index(shard).to_pylist()]
            written = [k for k, _ in StageDir(f"{out}/features/{name}").iter_samples(shard)]
            assert written == [k for k in order if k in written]
            samples = list(wds.WebDataset(f"{out}/features/{name}/{shard}.tar", shardshuffle=False))
            assert [s["__key__"] for s in samples] == written


def test_rerun_writes_nothing_and_a_new_resolution_writes_only_its_sidecar(made, models):
    out, _, config, _ = made
    before = {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*") if p.is_file()}
    assert [d["sidecars_written"] for d in _run(out, config)] == [[], []]
    single = _config(models, multiscale=False)
    assert [d["sidecars_written"] for d in _run(out, single)] == [["vae256"]] * 2
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert {k: read_npy(m["vae.npy"]).shape for k, m in _members(out, "vae256").items()}["zz_tall"] == (
        8,
        32,
        32,
    )
    dirs = FeatureDirs(str(out), single)
    assert dirs.done_shards() == ["00000", "00001"]
    summary = dirs.read_done("00001")
    assert summary["rows"] == 4 and summary["by_status"] == {"ok": 1, "failed": 3}
    assert summary["by_reason"] == {"truncated": 2, "no_text": 1}


def test_config_is_validated(models):
    with pytest.raises(ValueError, match="dtype"):
        _config(models, dtype="bfloat16")
    with pytest.raises(ValueError, match="resolutions"):
        _config(models, resolutions=(300,))
    with pytest.raises(ValueError, match="field"):
        _config(models, field="prompt")


def test_run_features_on_ray_resumes_and_refuses_a_changed_config(tmp_path, models, ray_local):
    from curation.runner import SetupError

    out = tmp_path / "out"
    make_caption_shards(out, n_ok=2, per_shard=3)
    config = _config(models, field="original", multiscale=False)
    summary = run_features(str(out), config, progress=False)
    assert summary.shards_run == 2 and summary.samples == 6
    assert summary.by_status == {"ok": 4, "failed": 2}
    assert _rows(out, "t5")["zz_nocaption"]["status"] == "ok"  # the "original" field has no caption to miss
    again = run_features(str(out), config, progress=False)
    assert again.shards_run == 0 and again.shards_skipped == 2 and again.by_status == summary.by_status
    changed = _config(models, field="original", multiscale=False, dtype="float32")
    with pytest.raises(SetupError, match="different configuration"):
        run_features(str(out), changed, progress=False)
    vae_before = {p: p.stat().st_mtime_ns for p in (out / "features" / "vae256").iterdir()}
    forced = run_features(str(out), changed, force=True, progress=False)
    assert forced.shards_run == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "features" / "vae256").iterdir()} == vae_before
    assert all(read_npy(m["t5.npy"]).dtype == np.float32 for m in _members(out, "t5").values())
