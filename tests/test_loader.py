import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from curation.buckets import bucket_size
from curation.features.npy import read_npy
from curation.features.stage import FeaturesConfig, FeaturesWorker
from curation.layout import Layout
from curation.loader import AspectRatioBatchSampler, FeatureDataset
from curation.shards import StageDir
from curation.tiny.t5 import build_tiny_t5
from curation.tiny.vae import build_tiny_vae
from tests.features import make_caption_shards, write_features


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    t5, vae = build_tiny_t5(root / "t5"), build_tiny_vae(root / "vae")
    out = root / "out"
    make_caption_shards(out, n_ok=6, per_shard=5)
    write_features(out, FeaturesConfig(str(t5), str(vae), max_length=16, resolutions=(256,), multiscale=True))
    return out


def test_items_match_the_shards_and_draw_fresh_noise(out):
    ds = FeatureDataset(out / "features", "vae256ms", captions=out / "captions")
    # ok in both sidecars, tall (h/w 5 > 4) left out: the six photos
    assert len(ds) == 6 and all(k.startswith("coco_") for k in ds.keys)
    item = ds[0]
    moments = read_npy(dict(StageDir(f"{out}/features/vae256ms").iter_samples("00000"))[item["key"]]["vae.npy"])
    h, w = bucket_size(ds.meta[0]["bucket"], 256)
    assert item["latent"].shape == (4, h // 8, w // 8) and item["latent"].dtype == torch.float32
    assert item["t5"].shape == (16, 32) and item["t5"].dtype == torch.float32
    assert item["mask"].shape == (16,) and item["mask"].dtype == torch.int64
    assert item["data_info"]["img_hw"].tolist() == [ds.meta[0]["orig_height"], ds.meta[0]["orig_width"]]
    assert item["data_info"]["aspect_ratio"].item() == pytest.approx(float(ds.meta[0]["bucket"]))
    assert isinstance(item["caption"], str) and item["caption"]
    # mean + std * eps: a fresh eps each read, centred on the stored mean
    draws = torch.stack([ds[0]["latent"] for _ in range(200)])
    assert not torch.equal(draws[0], draws[1])
    mean, std = moments[:4], moments[4:]
    assert np.abs(draws.mean(0).numpy() - mean).max() < 5 * std.max() / np.sqrt(200)
    assert ds.buckets[0] == ds.meta[0]["bucket"]
    assert len(FeatureDataset(out / "features", "vae256ms", max_ratio=None)) == 7
    # The same dataset from the output folder, its paths through curation's Layout.
    same = FeatureDataset.from_output(out, "vae256ms", caption_set="default")
    assert same.keys == ds.keys and same.members == ds.members and same[0]["caption"] == item["caption"]


def test_batches_hold_one_bucket_and_cover_every_item_once(out):
    ds = FeatureDataset(out / "features", "vae256ms")
    sampler = AspectRatioBatchSampler(ds.buckets, batch_size=2, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler)
    seen = []
    for batch in loader:
        assert len(set(batch["data_info"]["aspect_ratio"].tolist())) == 1
        b = len(batch["key"])
        assert batch["latent"].shape[0] == batch["t5"].shape[0] == batch["mask"].shape[0] == b <= 2
        seen += batch["key"]
    assert sorted(seen) == sorted(ds.keys) and len(list(sampler)) == len(sampler)
    # Reproducible per epoch, different across epochs; drop_last keeps full batches only.
    assert list(sampler) == list(sampler)
    orders = set()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        orders.add(tuple(map(tuple, sampler)))
    assert len(orders) > 1
    full = AspectRatioBatchSampler(ds.buckets, batch_size=2, drop_last=True)
    assert all(len(b) == 2 for b in full) and len(list(full)) == len(full)


def test_any_caption_set_and_the_sigma_ratio_draw(out):
    import random

    from tests.features import make_named_set

    texts = make_named_set(out, "dense")
    t5, vae = str(out.parent / "t5"), str(out.parent / "vae")  # the fixture's models
    config = FeaturesConfig(t5, vae, max_length=16, resolutions=(256,), multiscale=True, field="dense")
    worker = FeaturesWorker(Layout(str(out)), config)
    worker.setup()
    for shard in StageDir(f"{out}/captions").done_shards():
        assert worker.process(shard).extra["sidecars_written"] == ["t5-dense-16"]  # the VAE sidecar is current
    dense = {k: m for shard in StageDir(f"{out}/features/t5-dense-16").done_shards()
             for k, m in StageDir(f"{out}/features/t5-dense-16").iter_samples(shard)}  # fmt: skip
    only = FeatureDataset(out / "features", "vae256ms", t5="t5-dense-16")
    default = FeatureDataset(out / "features", "vae256ms")
    # The set captions zz_nocaption too, which the default set left without a caption.
    assert set(only.keys) == set(default.keys) | {"zz_nocaption"} and set(only.keys) <= set(texts)
    for i, key in enumerate(only.keys):
        np.testing.assert_array_equal(only[i]["t5"].numpy(), read_npy(dense[key]["t5.npy"]).astype(np.float32))
    drawn = FeatureDataset(out / "features", "vae256ms", second_t5="t5-dense-16", real_prompt_ratio=0.25)
    random.seed(0)
    sources = []
    for i in range(400):
        item = drawn[i % len(drawn)]
        sources.append(item["text_source"])
        chosen = default if item["text_source"] == "t5" else only
        expected = chosen[chosen.keys.index(item["key"])]
        assert torch.equal(item["t5"], expected["t5"]) and torch.equal(item["mask"], expected["mask"])
    assert set(sources) == {"t5", "t5-dense-16"} and 0.18 < sources.count("t5") / 400 < 0.32
    always = FeatureDataset(out / "features", "vae256ms", second_t5="t5-dense-16", real_prompt_ratio=1.0)
    assert len(drawn) == len(always) == len(default) and {always[i]["text_source"] for i in range(6)} == {"t5"}
