"""badprune.data: the chunked reader gives numpy's float32 pixels, bit for bit, in every stored layout and type."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from badprune import data
from badprune.errors import BadpruneError
from prune_ext import _convert

SHAPE = (13, 11, 3)  # (H, W, C)


def _write(path, nhwc, layout="nchw", dtype=np.float32, chunks=True):
    """A lab file holding ``nhwc`` images stored as ``layout`` in ``dtype`` (any byte order)."""
    x = nhwc.transpose(0, 3, 1, 2) if layout == "nchw" else nhwc
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=x.astype(dtype), chunks=(min(4, len(x)),) + x.shape[1:] if chunks else None)
        f.create_dataset("label", data=np.zeros(len(x)))
    return data.open_dataset(path, input_shape=SHAPE)


def _reference(nhwc, dtype, scale):
    """What the reader must give: numpy's float32 of the stored values, times float32(scale) unless 1."""
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.ascontiguousarray(nhwc.astype(dtype), dtype=np.float32)
        if scale != 1.0:
            x *= np.float32(scale)
    return x


@pytest.fixture
def pixels():
    rng = np.random.default_rng(5)
    # values that round differently in float32 (float64 fractions) and a wide range
    return rng.random((10,) + SHAPE) * 255 + rng.random((10,) + SHAPE) * 1e-9


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", ["<f4", "<f8", ">f4", ">f8", "u1", "i2", "f2"])
def test_batches_equal_numpy_bit_for_bit(tmp_path, pixels, layout, dtype):
    ds = _write(tmp_path / "s.h5", pixels, layout, dtype)
    assert ds.layout == layout
    for scale in (1.0, 1 / 255, 3.0):
        want = _reference(pixels, dtype, scale)
        for bs in (1, 3, 4, 10, 64):  # a short last batch, chunk-sized, the whole set, more than the set
            got = np.concatenate([x for _, x in ds.batches(bs, scale)])
            assert got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(ds.read(scale, 2, 9), want[2:9])


def test_reader_fills_a_callers_buffer_and_reuses_its_own(tmp_path, pixels):
    ds = _write(tmp_path / "s.h5", pixels, "nchw", np.float64, chunks=False)
    want = _reference(pixels, np.float64, 1.0)
    buf = np.full((4,) + SHAPE, np.nan, np.float32)
    with ds.reader() as rd:
        for lo in (6, 0, 3):
            n = min(4, ds.n - lo)
            assert rd.read_into(buf[:n], lo).base is buf
            np.testing.assert_array_equal(buf[:n], want[lo:lo + n])
        rd.read_into(buf[:2], 8)  # the last two: the rest of the buffer is left alone
        np.testing.assert_array_equal(buf, np.concatenate([want[8:10], want[5:7]]))
        rd.read_into(buf[:0], 10)  # nothing to read at the end
        with pytest.raises(BadpruneError, match="cannot read images 8..11"):
            rd.read_into(buf, 8)  # past the end of the set


#: (dtype, bad value): every dtype with nan and +-inf; only float64 holds a value beyond float32's range
_BAD = [(d, b) for d in (np.float32, np.float64, np.float16) for b in (np.nan, np.inf, -np.inf)] + \
    [(np.float64, 1e300)]


@pytest.mark.parametrize("dtype,bad", _BAD)
@pytest.mark.parametrize("where", [0, 5, 9])
def test_non_finite_pixels_name_the_first_bad_image(tmp_path, pixels, dtype, where, bad):
    x = pixels.copy()
    x[where, 7, 3, 2] = bad
    x[min(where + 2, 9), 0, 0, 0] = np.nan  # a later one is not the one named
    ds = _write(tmp_path / "s.h5", x, "nchw", dtype)
    for bs in (1, 4, 64):
        with pytest.raises(BadpruneError, match=f"first in image {where}\\b"):
            list(ds.batches(bs))


def test_scale_overflowing_float32_is_caught(tmp_path):
    ds = _write(tmp_path / "s.h5", np.full((3,) + SHAPE, 3e38), "nchw", np.float32)
    assert len(ds.read(1.0)) == 3
    with pytest.raises(BadpruneError, match="first in image 0"):
        ds.read(2.0)


def test_convert_kernel_arguments():
    src = np.zeros((2, 3, 4, 5), np.float32)
    with pytest.raises(ValueError, match="expected"):
        _convert.to_nhwc(src, np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        _convert.to_nhwc(src.astype(np.uint8), np.zeros((2, 4, 5, 3), np.float32))
    assert _convert.to_nhwc(src[:0], np.zeros((0, 4, 5, 3), np.float32)) == -1
    other = np.zeros((2, 4, 5, 6), np.float64)  # a channel count other than 3
    other[1, 2, 3, 4] = 7.0
    dst = np.zeros((2, 5, 6, 4), np.float32)
    assert _convert.to_nhwc(other, dst, 0.5) == -1 and dst[1, 3, 4, 2] == 3.5 and dst.sum() == 3.5
