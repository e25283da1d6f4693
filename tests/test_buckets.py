import json

import pytest

from curation.buckets import BASES, assign_bucket, bucket_size, bucket_table
from tests.conftest import SHARED

REFERENCE = json.loads((SHARED / "reference" / "pixart_aspect_ratios.json").read_text())


@pytest.mark.parametrize("base", BASES)
def test_tables_equal_pixart_reference(base):
    expected = {k: (int(h), int(w)) for k, (h, w) in REFERENCE[str(base)].items()}
    table = bucket_table(base)
    assert len(table) == 40
    assert table == expected
    assert list(table) == list(expected)  # ascending key order, which the tie rule depends on


@pytest.mark.parametrize(
    "hw, key, size",
    [
        ((1080, 1920), "0.57", (768, 1344)),
        ((1920, 1080), "1.75", (1344, 768)),
        ((1500, 2250), "0.68", (832, 1216)),
        ((2250, 1500), "1.46", (1216, 832)),
        ((3, 4), "0.72", (832, 1152)),  # exact tie between 0.72 and 0.78: the smaller key wins
        ((4, 3), "1.29", (1152, 896)),
        ((100, 1000), "0.25", (512, 2048)),
        ((1000, 100), "4.0", (2048, 512)),
    ],
)
def test_assignment_matches_reference_examples(hw, key, size):
    assert assign_bucket(*hw) == key
    assert bucket_size(key) == size


def test_other_bases_share_keys_and_scale():
    for base in (256, 512, 2048):
        for key, (h, w) in bucket_table(base).items():
            h1, w1 = bucket_table(1024)[key]
            assert (h, w) == (h1 * base // 1024, w1 * base // 1024)
        assert assign_bucket(1080, 1920, base) == "0.57"


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError):
        assign_bucket(0, 10)
    with pytest.raises(ValueError):
        bucket_table(768)


def test_fast_assignment_equals_the_plain_scan():
    import random

    def scan(h, w, base):  # PixArt's loop: first key with the strictly smallest |key - h/w|
        best, best_diff = None, float("inf")
        for key in sorted(bucket_table(base), key=float):
            if abs(float(key) - h / w) < best_diff:
                best, best_diff = key, abs(float(key) - h / w)
        return best

    rng = random.Random(0)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(3000)]
    sizes += [(h, w) for h in range(1, 60) for w in range(1, 60)]  # small integers hit exact ties
    for base in BASES:
        assert all(assign_bucket(h, w, base) == scan(h, w, base) for h, w in sizes)
