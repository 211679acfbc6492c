"""Data sets: the lab's h5 files (``data`` + ``label``), layout and pixel-scale handling, chunked reads.

A lab file holds ``data`` of shape (N, 3, 55, 47) channels-first (or (N, 55, 47, 3) channels-last) in float64,
float32 or uint8, and ``label`` (N,) stored as floats. Files can be large (the lab's valid.h5 is 716 MB of float64),
so nothing here reads a whole set at once: :meth:`Dataset.batches` yields float32 NHWC batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from .errors import BadpruneError

#: multiplier applied to stored pixels for each ``--scale``
SCALES = {"raw": 1.0, "unit": 1.0 / 255.0}


def _layout_of(shape4, input_shape=None, layout=None):
    """Decide channels-first ('nchw') or channels-last ('nhwc') for a stored (N, a, b, c) array."""
    _, a, b, c = shape4
    if layout in ("nchw", "nhwc"):
        return layout
    if input_shape is not None:
        h, w, ch = (int(v) for v in input_shape)
        last = (a, b, c) == (h, w, ch)
        first = (b, c, a) == (h, w, ch)
        if last and first:
            raise BadpruneError("ambiguous image layout: channels-first and channels-last both fit the model",
                                fix="pass --layout nchw or --layout nhwc")
        if last:
            return "nhwc"
        if first:
            return "nchw"
        raise BadpruneError(f"images of shape {(a, b, c)} do not fit the model input {(h, w, ch)}",
                            fix="use data made for this model (lab files hold (N,3,55,47) or (N,55,47,3))")
    first, last = a in (1, 3, 4), c in (1, 3, 4)
    if first and not last:
        return "nchw"
    if last and not first:
        return "nhwc"
    if last and first:
        raise BadpruneError("ambiguous image layout", fix="pass --layout nchw or --layout nhwc")
    raise BadpruneError(f"cannot tell the channel axis of images of shape {(a, b, c)}",
                        fix="store (N,3,H,W) or (N,H,W,3) images")


@dataclass
class Dataset:
    """A lab-format h5 data set, opened lazily; ``batches`` yields float32 NHWC arrays."""

    path: str
    n: int
    layout: str               # 'nchw' (lab files) or 'nhwc'
    image_shape: tuple        # (H, W, C)
    dtype: np.dtype
    labels: np.ndarray        # int64 (N,)
    data_key: str = "data"
    label_key: str = "label"

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    def identity(self) -> dict:
        """What identifies the file's content for caching: real path, size and modification time."""
        st = os.stat(self.path)
        return {"path": os.path.realpath(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "n": self.n, "layout": self.layout}

    def batches(self, batch_size: int = 1024, scale: float = 1.0, start: int = 0, stop: int | None = None):
        """Yield (offset, float32 NHWC batch * scale) over images [start, stop), reading one chunk at a time."""
        stop = self.n if stop is None else min(stop, self.n)
        with h5py.File(self.path, "r") as f:
            ds = f[self.data_key]
            for lo in range(start, stop, batch_size):
                hi = min(lo + batch_size, stop)
                x = np.asarray(ds[lo:hi])
                if self.layout == "nchw":
                    x = x.transpose(0, 2, 3, 1)
                x = np.ascontiguousarray(x, dtype=np.float32)
                if scale != 1.0:
                    x *= np.float32(scale)
                if not np.isfinite(x).all():
                    raise BadpruneError(f"NaN or infinite pixels in images {lo}..{hi - 1}", self.path,
                                        "clean the data set")
                yield lo, x

    def read(self, scale: float = 1.0, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Read images [start, stop) as one float32 NHWC array (for small sets and samples)."""
        parts = [x for _, x in self.batches(4096, scale, start, stop)]
        if not parts:
            return np.zeros((0,) + tuple(self.image_shape), np.float32)
        return np.concatenate(parts)


def open_dataset(path, input_shape=None, layout=None, num_classes=None) -> Dataset:
    """Open a lab h5 file, check its structure and labels, and decide the layout (against ``input_shape``)."""
    path = str(path)
    if not os.path.exists(path):
        raise BadpruneError("data file not found", path, "check the path")
    if os.path.isdir(path):
        raise BadpruneError("expected an h5 file, got a folder", path, "pass the .h5 file itself")
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # h5py raises OSError for non-HDF5 / truncated files
        raise BadpruneError(f"not a readable HDF5 file ({type(e).__name__})", path,
                            "pass a lab-format .h5 file with 'data' and 'label'") from None
    with f:
        keys = list(f.keys())
        data_key = "data" if "data" in f else ("x" if "x" in f else None)
        label_key = "label" if "label" in f else ("labels" if "labels" in f else ("y" if "y" in f else None))
        if data_key is None or label_key is None:
            raise BadpruneError(f"h5 file needs datasets 'data' and 'label', found {keys}", path,
                                "write images to 'data' (N,3,H,W) and labels to 'label' (N,)")
        ds, ls = f[data_key], f[label_key]
        if not isinstance(ds, h5py.Dataset) or not isinstance(ls, h5py.Dataset):
            raise BadpruneError("'data' and 'label' must be datasets, not groups", path)
        if ds.ndim != 4:
            raise BadpruneError(f"'data' must be 4-D (N,C,H,W) or (N,H,W,C), got shape {ds.shape}", path)
        if ds.dtype.kind not in "fiu":
            raise BadpruneError(f"'data' must be numeric, got {ds.dtype}", path)
        n = ds.shape[0]
        if n == 0:
            raise BadpruneError("the data set is empty", path)
        try:
            raw = np.asarray(ls[()]).reshape(-1)
        except Exception:
            raise BadpruneError("cannot read 'label'", path) from None
        if raw.shape[0] != n:
            raise BadpruneError(f"'data' has {n} images but 'label' has {raw.shape[0]} labels", path)
        lay = _layout_of(ds.shape, input_shape, layout)
        shape = tuple(ds.shape[1:]) if lay == "nhwc" else (ds.shape[2], ds.shape[3], ds.shape[1])
        dtype = ds.dtype
    if raw.dtype.kind not in "fiub":
        raise BadpruneError(f"labels must be numbers, got {raw.dtype}", path)
    rawf = raw.astype(np.float64)
    if not np.isfinite(rawf).all() or (rawf != np.round(rawf)).any():
        raise BadpruneError("labels must be whole numbers", path, "store class indices in 'label'")
    if (rawf < 0).any():
        raise BadpruneError("negative labels", path, "store class indices 0..N-1 in 'label'")
    labels = rawf.astype(np.int64)
    if num_classes is not None and labels.max() >= num_classes:
        raise BadpruneError(f"label {int(labels.max())} is not a class of this model (it has {num_classes})", path,
                            "use data labelled for this model")
    return Dataset(path, n, lay, tuple(int(v) for v in shape), dtype, labels, data_key, label_key)


def write_lab_h5(path, images_nhwc, labels, dtype=np.float32, chunk=1024):
    """Write images (N,H,W,C) and labels in the lab's format: ``data`` (N,C,H,W) channels-first, ``label`` float.

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    images_nhwc = np.asarray(images_nhwc)
    labels = np.asarray(labels)
    n = images_nhwc.shape[0]
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            shape = (n, images_nhwc.shape[3], images_nhwc.shape[1], images_nhwc.shape[2])
            d = f.create_dataset("data", shape=shape, dtype=dtype,
                                 chunks=(min(max(n, 1), 256),) + shape[1:] if n else None)
            for lo in range(0, n, chunk):
                d[lo:lo + chunk] = images_nhwc[lo:lo + chunk].transpose(0, 3, 1, 2).astype(dtype)
            f.create_dataset("label", data=labels.astype(np.float64))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
