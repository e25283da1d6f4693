import io

import numpy as np
import pytest

from curation.features.npy import npy_bytes, read_npy


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8", "int64", ">f4"])
def test_bytes_equal_np_save_and_round_trip(dtype):
    arr = (np.random.default_rng(0).random((120, 64)) * 100).astype(dtype)
    ref = io.BytesIO()
    np.save(ref, arr)
    data = npy_bytes(arr)
    assert data == ref.getvalue()
    back = read_npy(data)
    assert back.dtype == arr.dtype and back.shape == arr.shape and np.array_equal(back, arr)


def test_non_contiguous_empty_and_scalar_arrays():
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T
    assert np.array_equal(read_npy(npy_bytes(a)), a)
    assert read_npy(npy_bytes(np.zeros((0, 8), np.float16))).shape == (0, 8)
    assert read_npy(npy_bytes(np.array(2.5, np.float32))) == 2.5


def test_pickled_content_is_refused_both_ways():
    with pytest.raises(ValueError, match="pickle"):
        npy_bytes(np.array([{"a": 1}], dtype=object))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        read_npy(buf.getvalue())
