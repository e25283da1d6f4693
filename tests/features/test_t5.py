import numpy as np
import pytest
import torch

from curation.features.t5 import T5Features, TextFeatureConfig, clean_caption
from curation.tiny.t5 import build_tiny_t5

TEXTS = [
    "a dog",
    "a close-up photograph of a red apple on a wooden table next to a glass of water and a knife",
    "",
    "The CAT <b>sleeps</b> on a sofa https://example.com/cat.jpg",
    "two women sit on a bench in a park",
]


@pytest.fixture(scope="module")
def t5_path(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5"))


def _features(path, **kw) -> T5Features:
    f = T5Features(TextFeatureConfig(str(path), **kw))
    f.setup()
    return f


def test_clean_caption_lowercases_and_strips_urls_and_html():
    assert clean_caption("A <b>Red</b> Car") == "a red car"
    assert clean_caption("see https://x.com/a?b=1 and www.foo.org now") == "see and now"
    assert clean_caption("Tom &amp; Jerry &lt;i&gt;cartoon&lt;/i&gt;") == "tom & jerry cartoon"
    assert clean_caption("<PERSON> at the beach on example.com") == "person at the beach on"
    assert clean_caption("  many\n spaces\t") == "many spaces"


def test_encode_shapes_mask_and_zero_padding(t5_path):
    f = _features(t5_path, max_length=16, batch_size=2)
    feats, mask = f.encode(TEXTS)
    assert feats.shape == (5, 16, f.dim) and feats.dtype == np.float32
    assert mask.shape == (5, 16) and mask.dtype == np.int64 and set(np.unique(mask)) <= {0, 1}
    lengths = mask.sum(1)
    for row, n in zip(mask, lengths, strict=True):
        assert row[:n].all() and not row[n:].any()  # padding after the real tokens
    assert lengths[2] == 1  # an empty text is just EOS
    assert lengths[1] == 16  # truncated to max_length, EOS kept as the last real token
    assert np.all(feats[mask == 0] == 0) and np.all(np.abs(feats[mask == 1]).sum(-1) > 0)
    counts = f.token_counts(TEXTS)
    assert counts[1] > 16 and np.array_equal(np.minimum(counts, 16), lengths)
    half, _ = f.encode(TEXTS, dtype=np.float16)
    assert half.dtype == np.float16 and np.allclose(half, feats, atol=2e-3, rtol=2e-3)


def test_sorted_prefix_batches_equal_an_unsorted_full_length_run(t5_path):
    f = _features(t5_path, max_length=24, batch_size=2)
    feats, mask = f.encode(TEXTS)
    tok = f.tokenizer(f.prepare(TEXTS), max_length=24, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = f.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state.numpy()
    assert np.array_equal(mask, tok.attention_mask.numpy())
    real = mask == 1
    np.testing.assert_allclose(feats[real], ref[real], atol=1e-5, rtol=1e-4)
    # The batch size (hence the prefix each text is run with) does not change the result.
    other, _ = _features(t5_path, max_length=24, batch_size=5).encode(TEXTS)
    np.testing.assert_allclose(other, feats, atol=1e-5, rtol=1e-4)


def test_cleaning_is_configurable(t5_path):
    raw = _features(t5_path, max_length=16, clean_caption=False)
    assert raw.prepare(["A <b>B</b>"]) == ["A <b>B</b>"]
    assert _features(t5_path, max_length=16).prepare(["A <b>B</b>"]) == ["a b"]


def test_no_texts_and_unloaded_model(t5_path):
    f = T5Features(TextFeatureConfig(str(t5_path)))
    with pytest.raises(RuntimeError, match="setup"):
        f.encode(["x"])
    f.setup()
    feats, mask = f.encode([])
    assert feats.shape == (0, 120, f.dim) and mask.shape == (0, 120)
    assert f.token_counts([]).shape == (0,)


def test_a_megabyte_caption_is_tokenised_on_its_first_characters(t5_path):
    """What T5 sees of a caption is its first MAX_CAPTION_CHARS characters: a 1 MB caption costs an ordinary one."""
    from curation.records import MAX_CAPTION_CHARS

    f = _features(t5_path, max_length=16)
    huge = "a red apple on a table " * 50_000
    assert f.prepare([huge]) == f.prepare([huge[:MAX_CAPTION_CHARS]])
    feats, mask = f.encode([huge, huge[:200]])
    assert np.array_equal(mask[0], mask[1]) and np.allclose(feats[0], feats[1], atol=1e-5)
