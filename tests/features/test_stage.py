import json
import zlib

import numpy as np
import pytest
import webdataset as wds

from curation.buckets import bucket_size
from curation.errors import ConfigError, SetupError
from curation.features.npy import read_npy
from curation.features.stage import FeatureDirs, FeaturesConfig, FeaturesStage, FeaturesWorker, run_features
from curation.features.t5 import T5Features, TextFeatureConfig
from curation.features.vae import VaeFeatureConfig, VaeFeatures, cover_size
from curation.imaging import decode_image
from curation.layout import Layout
from curation.records import table_to_samples
from curation.shards import DoneMarker, StageDir, config_hash
from curation.tiny.t5 import build_tiny_t5
from curation.tiny.vae import build_tiny_vae
from tests.features import make_caption_shards, write_features


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


def _run(out, config) -> list[DoneMarker]:
    return write_features(out, config)


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
    assert [d.extra["sidecars_written"] for d in dones] == [["t5", "vae256ms"]] * 2
    rows, members = _rows(out, "t5"), _members(out, "t5")
    assert rows.keys() == outcomes.keys()  # one row per sample, failures included
    assert rows["zz_failed"]["status"] == "failed" and rows["zz_failed"]["error_reason"] == "truncated_image"
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
    assert rows["zz_corrupt"]["status"] == "failed" and rows["zz_corrupt"]["error_reason"] == "truncated_image"
    assert "zz_corrupt" in rows["zz_corrupt"]["error"]
    assert rows["zz_nocaption"]["status"] == "ok"  # the text failed, not the image
    images = StageDir(f"{out}/images")
    samples = {s.key: s for sh in images.done_shards() for s in table_to_samples(images.read_index(sh))}
    pixels = {k: m["jpg"] for sh in images.done_shards() for k, m in images.iter_samples(sh)}
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
        direct = vae.encode([decode_image(pixels[key], target_size=(cw, ch))], (h, w))[0]
        np.testing.assert_allclose(direct, latent, atol=1e-4)
        full = vae.encode([decode_image(pixels[key])], (h, w))[0]
        assert np.abs(full - latent).mean() < 0.1 * np.abs(full).mean()
    assert members["zz_tall"]["vae.npy"] and rows["zz_tall"]["bucket"] == "4.0"


def test_sidecars_keep_the_images_order_and_read_with_webdataset(made):
    out, *_ = made
    images = StageDir(f"{out}/images")
    for name in ("t5", "vae256ms"):
        for shard in images.done_shards():
            order = [r["key"] for r in images.read_index(shard).to_pylist()]
            written = [k for k, _ in StageDir(f"{out}/features/{name}").iter_samples(shard)]
            assert written == [k for k in order if k in written]
            samples = list(wds.WebDataset(f"{out}/features/{name}/{shard}.tar", shardshuffle=False))
            assert [s["__key__"] for s in samples] == written


def test_rerun_writes_nothing_and_a_new_resolution_writes_only_its_sidecar(made, models):
    out, _, config, _ = made
    before = {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*") if p.is_file()}
    assert [d.extra["sidecars_written"] for d in _run(out, config)] == [[], []]
    single = _config(models, multiscale=False)
    assert [d.extra["sidecars_written"] for d in _run(out, single)] == [["vae256"]] * 2
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert {k: read_npy(m["vae.npy"]).shape for k, m in _members(out, "vae256").items()}["zz_tall"] == (
        8,
        32,
        32,
    )
    layout = Layout(str(out))
    dirs = FeatureDirs(layout, single, FeaturesStage(layout, single).input_view(layout.images))
    assert dirs.done_shards() == ["00000", "00001"]
    summary = dirs.read_done("00001")
    assert summary.rows == 4 and summary.counts["by_status"] == {"ok": 1, "failed": 3}
    assert summary.counts["by_reason"] == {"truncated_image": 2, "no_text": 1}
    assert summary.complete and dirs.read_dones(["00000", "00001"])["00001"] == summary


def test_config_is_validated(models):
    with pytest.raises(ConfigError, match="dtype"):
        _config(models, dtype="bfloat16")
    with pytest.raises(ConfigError, match="resolutions"):
        _config(models, resolutions=(300,))
    with pytest.raises(ConfigError, match="field"):
        _config(models, field="prompt")
    with pytest.raises(ConfigError, match="vae_tag"):
        _config(models, vae_tag="sd-xl")


def test_run_features_on_ray_resumes_and_refuses_a_changed_config(tmp_path, models, ray_local):
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


def test_sidecar_done_markers_keep_their_keys_and_values(made):
    out, *_ = made
    for name, extra in (("t5", {"dim"}), ("vae256ms", set())):
        marker = json.loads((out / "features" / name / "00000.done.json").read_text())
        assert set(marker) == {
            "stage", "config_hash", "input_lineage", "lineage", "semantics", "by_status", "by_reason", "shard", "rows",
            "members", "seconds", "files",
        } | extra  # fmt: skip
        assert marker["stage"] == f"features/{name}" and marker["shard"] == "00000" and marker["rows"] == 4
        # Made from the images shard; the default set's T5 from its captions shard too.
        images = StageDir(f"{out}/images").read_done("00000").upstream
        expected = config_hash({"input": images, "set": "captions-00000"}) if name == "t5" else images
        assert marker["input_lineage"] == expected
        tar = out / "features" / name / "00000.tar"
        assert marker["files"]["00000.tar"] == {"size": tar.stat().st_size, "crc32": zlib.crc32(tar.read_bytes())}
    t5 = json.loads((out / "features" / "t5" / "00000.done.json").read_text())
    assert t5["semantics"] == {"t5": t5["semantics"]["t5"], "max_length": 16, "dtype": "float16", "field": "caption",
                               "clean_caption": True}  # fmt: skip
    assert t5["dim"] == 32


def test_config_hashes_and_sidecar_names_are_unchanged():
    """Hashes of the configs before the stage contract: an output made then is current now, not 'changed'."""
    from curation.shards import config_hash

    expected = [
        ({}, "1ca6013668c88181", {"t5": "6b9bbf1ebcc8451c", "vae256": "7fac080b3fb368cc",
                                  "vae512": "21730194f22c5aff", "vae1024": "190e43298d76fc20"}),
        (dict(field="dense", max_length=300, vae_tag="sdxl", multiscale=True, resolutions=(1024,)), "103d4d9ca047b0e4",
         {"t5-dense-300": "16b561379f20281c", "vae1024ms-sdxl": "8cc4ff7b68fff25a"}),
        (dict(field="original", dtype="float32", clean_caption=False), "57d87f3a41130f4f",
         {"t5": "84c3396b0ea84aa4", "vae256": "7fac080b3fb368cc", "vae512": "21730194f22c5aff",
          "vae1024": "190e43298d76fc20"}),
    ]  # fmt: skip
    for kw, chash, sidecars in expected:
        config = FeaturesConfig(**kw)  # the defaults: DeepFloyd/t5-v1_1-xxl, stabilityai/sd-vae-ft-ema
        assert config_hash(config.semantics()) == chash
        assert {name: config_hash(sem) for name, sem in config.sidecars().items()} == sidecars
        assert list(config.sidecars()) == list(sidecars)  # T5 first, then the resolutions in order


def test_the_stage_declares_one_pass_over_the_images_shards(made):
    import dataclasses

    from curation.features.stage import KINDS
    from curation.stage import InputView, Resources, ShardFolder, Stage

    out, _, config, _ = made
    assert issubclass(FeaturesStage, Stage) and FeaturesStage.name == "features"
    assert FeaturesStage.config_type is FeaturesConfig
    fields = {f.name: f for f in dataclasses.fields(FeaturesConfig)}
    assert all(f.metadata.get("help") for f in fields.values())
    assert fields["device"].metadata["aliases"] == ["--feature-device"]
    assert [k.__name__ for k in KINDS] == ["TextFeatures", "ImageLatents"]
    stage = FeaturesStage(Layout(str(out)), config)
    stage.check()
    (p,) = list(stage.passes(ctx=None))
    assert p.label == "features" and [t for t, _ in p.tasks] == ["00000", "00001"]
    assert isinstance(p.folder, FeatureDirs) and isinstance(p.upstream, InputView)
    for method in ("done_shards", "read_dones", "remove_shard", "remove_stale_temporaries"):
        assert callable(getattr(p.folder, method))
    folder: ShardFolder = p.folder
    assert folder.url == f"{out}/features" and p.semantics == config.semantics()
    assert p.resources == Resources(num_gpus=1, gpu_optional=True, models=True)
    assert isinstance(p.make_worker(), FeaturesWorker)
    assert stage.outputs() == [f"features: {out}/features/"]


def test_a_new_kind_is_its_class_and_one_line_in_kinds(tmp_path, monkeypatch):
    """A kind the stage has never heard of: its sidecar is planned, written, hashed and summarised like the others."""
    import pyarrow as pa

    import curation.features.stage as features_stage
    from curation.features.sidecar import FeatureKind, row

    class Sizes(FeatureKind):
        def sidecars(self):
            return {"sizes": {"sizes": 1}}

        def setup(self):
            self.loaded = True

        def write(self, job, sidecars):
            rows = [row(s, pixels=(s.height or 0) * (s.width or 0)) for s in job.samples]
            with job.writer("sizes") as writer:
                for r in rows:
                    if r["status"] == "ok":
                        writer.add(r["key"], {"txt": str(r["pixels"]).encode()})
                writer.commit(pa.Table.from_pylist(rows), job.done("sizes", rows))

    monkeypatch.setattr(features_stage, "KINDS", [Sizes])
    out = tmp_path / "out"
    make_caption_shards(out, n_ok=2, per_shard=3)
    config = FeaturesConfig()
    assert list(config.sidecars()) == ["sizes"]
    dones = _run(out, config)
    assert [d.extra["sidecars_written"] for d in dones] == [["sizes"]] * 2 and all(d.complete for d in dones)
    marker = StageDir(f"{out}/features/sizes").read_done("00000")
    assert marker.stage == "features/sizes" and marker.extra["semantics"] == {"sizes": 1}
    assert [d.extra["sidecars_written"] for d in _run(out, config)] == [[], []]
