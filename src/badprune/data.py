"""Data sets: the lab's h5 files (``data`` + ``label``), layout and pixel-scale handling, chunked reads.

A lab file holds ``data`` of shape (N, 3, 55, 47) channels-first (or (N, 55, 47, 3) channels-last) in float64,
float32 or uint8, and ``label`` (N,) stored as floats. Files can be large (the lab's valid.h5 is 716 MB of float64),
so nothing here reads a whole set at once: :meth:`Dataset.batches` yields float32 NHWC batches, and
:meth:`Dataset.reader` fills a caller's buffers (the trunk pass reuses a few), converting float32 / float64 pixels
in one native pass (:mod:`prune_ext._convert`) with numpy's arithmetic.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np
from prune_ext import _convert

from . import atomic
from .errors import BadpruneError, short


def _layout_of(shape4, input_shape=None, layout=None, path=None):
    """Decide channels-first ('nchw') or channels-last ('nhwc') for a stored (N, a, b, c) array."""
    _, a, b, c = (int(v) for v in shape4)
    if min(a, b, c) < 1:
        raise BadpruneError(f"images of shape {(a, b, c)} hold no pixels", path, "store (N,3,H,W) images")
    if layout is not None and layout not in ("nchw", "nhwc"):
        raise BadpruneError(f"unknown layout '{layout}'", fix="use nchw (channels-first) or nhwc (channels-last)")
    if input_shape is not None:
        h, w, ch = (int(v) for v in input_shape)
        last = (a, b, c) == (h, w, ch)
        first = (b, c, a) == (h, w, ch)
        if layout == "nhwc" and last or layout == "nchw" and first:
            return layout
        if last and first and layout is None:
            raise BadpruneError(f"ambiguous image layout: images of shape {(a, b, c)} fit the model input "
                                f"{(h, w, ch)} both channels-first and channels-last", path,
                                "store the images so that only one reading fits (the lab stores (N,3,H,W))")
        if layout is None and last:
            return "nhwc"
        if layout is None and first:
            return "nchw"
        stored = f"{(a, b, c)}" + (f" read as {layout}" if layout else "")
        raise BadpruneError(f"images of shape {stored} do not fit the model input (H, W, C) = {(h, w, ch)}", path,
                            "use data made for this model (lab files hold (N,3,55,47) or (N,55,47,3))")
    if layout is not None:
        return layout
    first, last = a in (1, 3, 4), c in (1, 3, 4)
    if first and not last:
        return "nchw"
    if last and not first:
        return "nhwc"
    if last and first:
        raise BadpruneError(f"ambiguous image layout: images of shape {(a, b, c)}", path,
                            "give the model's input shape (or the layout) to open the file")
    raise BadpruneError(f"cannot tell the channel axis of images of shape {(a, b, c)}", path,
                        "store (N,3,H,W) or (N,H,W,3) images")


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
        """Yield (offset, float32 NHWC batch * scale) over images [start, stop), reading one batch at a time."""
        stop = self.n if stop is None else min(stop, self.n)
        batch_size = int(batch_size)
        if batch_size < 1:
            raise BadpruneError(f"batch size must be positive, got {batch_size}")
        with self.reader() as rd:
            for lo in range(start, stop, batch_size):
                hi = min(lo + batch_size, stop)
                yield lo, rd.read_into(np.empty((hi - lo,) + tuple(self.image_shape), np.float32), lo, scale)

    def reader(self) -> "Reader":
        """The file opened for :meth:`Reader.read_into` (a context manager; one thread at a time)."""
        return Reader(self)

    def _stored_shape(self) -> tuple:
        h, w, c = self.image_shape
        return (c, h, w) if self.layout == "nchw" else (h, w, c)

    def read(self, scale: float = 1.0, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Read images [start, stop) as one float32 NHWC array (for small sets and samples)."""
        stop = self.n if stop is None else min(stop, self.n)
        out = np.empty((max(stop - start, 0),) + tuple(self.image_shape), np.float32)
        with self.reader() as rd:
            for lo in range(start, stop, 4096):
                rd.read_into(out[lo - start: min(lo + 4096, stop) - start], lo, scale)
        return out


class Reader:
    """An open lab file that writes images [lo, lo + len(dst)) into a caller's float32 NHWC buffer, times a scale.

    float32 and float64 pixels are read straight into a reused buffer of the stored type and converted, transposed,
    scaled and checked (finite) in one native pass (:func:`prune_ext._convert.to_nhwc`, numpy's arithmetic); other
    types (integers, float16) go through numpy. Every read error is a :class:`BadpruneError`.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        path = dataset.path
        try:
            self._file = h5py.File(path, "r")
        except Exception as e:
            raise BadpruneError(f"cannot open the data file again ({short(e, 160)})", path,
                                "the file changed or vanished while in use") from None
        try:
            self._ds = self._file[dataset.data_key]
            stored = tuple(self._ds.shape[1:])
            dtype = self._ds.dtype
        except Exception as e:
            self._file.close()
            raise BadpruneError(f"cannot read '{dataset.data_key}' ({short(e, 160)})", path,
                                "the file is damaged") from None
        if stored != dataset._stored_shape():
            self._file.close()
            raise BadpruneError(f"images have shape {stored}, expected {dataset._stored_shape()}", path,
                                "the file changed while in use")
        # float32 / float64 in either byte order: read as native floats (HDF5 swaps bytes exactly)
        self._native = np.dtype(dtype.char) if dtype.kind == "f" and dtype.char in "fd" else None
        self._raw = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._file.close()

    def read_into(self, dst: np.ndarray, lo: int, scale: float = 1.0) -> np.ndarray:
        """Fill ``dst`` (C-contiguous float32 (n, H, W, C)) with images [lo, lo + n) times ``scale``; returns it."""
        n = len(dst)
        hi = lo + n
        ds, path = self._ds, self.dataset.path
        if n == 0:
            return dst
        try:
            if self._native is not None:
                if self._raw is None or len(self._raw) < n:
                    self._raw = np.empty((n,) + tuple(ds.shape[1:]), self._native)
                raw = self._raw[:n]
                ds.read_direct(raw, np.s_[lo:hi], np.s_[0:n])
            else:
                raw = np.asarray(ds[lo:hi])
        except Exception as e:  # damaged chunks, failing filters, I/O errors
            raise BadpruneError(f"cannot read images {lo}..{hi - 1} ({short(e, 160)})", path,
                                "the file is damaged or incomplete: copy it again") from None
        if raw.shape != (n,) + self.dataset._stored_shape():
            raise BadpruneError(f"images {lo}..{hi - 1} have shape {raw.shape[1:]}, expected "
                                f"{self.dataset._stored_shape()}", path, "the file changed while in use")
        if self._native is not None:
            bad = _convert.to_nhwc(raw, dst, float(scale), self.dataset.layout == "nchw")
        else:
            bad = _convert_numpy(raw, dst, scale, self.dataset.layout)
        if bad >= 0:
            raise BadpruneError(f"NaN, infinite or out-of-range pixels (beyond float32), first in image "
                                f"{lo + bad}", path, "clean the data set")
        return dst


def _convert_numpy(raw, dst, scale, layout) -> int:
    """:func:`prune_ext._convert.to_nhwc` for any numeric type (integers, float16): the first non-finite image."""
    x = raw.transpose(0, 2, 3, 1) if layout == "nchw" else raw
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(dst, x, casting="unsafe")
        if scale != 1.0:
            dst *= np.float32(scale)
    ok = np.isfinite(dst.reshape(len(dst), -1)).all(axis=1)
    return -1 if ok.all() else int(np.flatnonzero(~ok)[0])


#: more images than this in one file is refused (a tiny hostile file can declare billions of unwritten rows)
MAX_IMAGES = 50_000_000
#: largest label value accepted when the class count is not known
MAX_LABEL = 2 ** 31 - 1


def _check_dataset(f, key, what, path):
    """The h5py Dataset ``key`` of ``f``, refusing links to other files and data stored outside the file."""
    link = f.get(key, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise BadpruneError(f"'{key}' is a link to another file ({link.filename})", path,
                            f"store the {what} in the file itself")
    obj = f[key]
    if obj.file.filename != f.filename:  # reached through a soft link to an external link
        raise BadpruneError(f"'{key}' leads to another file ({obj.file.filename})", path,
                            f"store the {what} in the file itself")
    if not isinstance(obj, h5py.Dataset):
        raise BadpruneError(f"'{key}' must be a dataset, not a {type(obj).__name__.lower()}", path,
                            f"store the {what} as an array in '{key}'")
    if obj.external:
        raise BadpruneError(f"'{key}' is stored in external raw files, not in the h5 file", path,
                            f"store the {what} in the file itself (h5repack)")
    if obj.is_virtual:
        raise BadpruneError(f"'{key}' is a virtual dataset that maps other files", path,
                            f"store the {what} in the file itself (h5repack)")
    return obj


def _check_stored(ds, key, path) -> None:
    """The declared size of ``ds`` bounded by what is stored: every chunk of a chunked dataset allocated (a tiny
    file can declare millions of images and write one chunk), a contiguous one's bytes all there."""
    fix = "the file is incomplete or forged: write it again"
    if ds.chunks is not None:
        total = 1
        for dim, c in zip(ds.shape, ds.chunks):
            total *= -(-int(dim) // int(c))
        stored = ds.id.get_num_chunks()
        if stored < total:
            raise BadpruneError(f"only {stored:,} of the {total:,} chunks of '{key}' were written (it declares "
                                f"{ds.shape[0]:,} rows)", path, fix)
    elif ds.id.get_storage_size() < ds.size * ds.dtype.itemsize and ds.id.get_create_plist().get_layout() \
            == h5py.h5d.CONTIGUOUS:
        raise BadpruneError(f"'{key}' declares {ds.size * ds.dtype.itemsize:,} bytes but stores "
                            f"{ds.id.get_storage_size():,}", path, fix)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse (:class:`BadpruneError`) an allocation of ``nbytes`` larger than the memory available (an array
    that is allocated but cannot be filled ends in the kernel's OOM killer, not in an error line)."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise BadpruneError(f"not enough memory for {what} ({nbytes / 1e9:.1f} GB needed, "
                            f"{avail / 1e9:.1f} GB available)", fix=fix)


def _inspect(f, path, input_shape, layout):
    """(n, layout, image shape, dtype, raw labels, data key, label key) of an open lab h5 file."""
    keys = list(f.keys())
    data_key = "data" if "data" in f else ("x" if "x" in f else None)
    label_key = "label" if "label" in f else ("labels" if "labels" in f else ("y" if "y" in f else None))
    if data_key is None or label_key is None:
        shown = ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "")
        raise BadpruneError(f"h5 file needs datasets 'data' and 'label', found [{shown}]", path,
                            "write images to 'data' (N,3,H,W) and labels to 'label' (N,)")
    ds = _check_dataset(f, data_key, "images", path)
    ls = _check_dataset(f, label_key, "labels", path)
    if ds.ndim != 4:
        raise BadpruneError(f"'{data_key}' must be 4-D (N,C,H,W) or (N,H,W,C), got shape {ds.shape}", path,
                            "store images as (N,3,H,W)")
    if ds.dtype.kind not in "fiu":
        raise BadpruneError(f"'{data_key}' must hold numbers (float or integer pixels), got {ds.dtype}", path,
                            "store pixels as float32, float64 or uint8")
    n = int(ds.shape[0])
    if n == 0:
        raise BadpruneError("the data set is empty", path, "pass a file with at least one image")
    if n > MAX_IMAGES:
        raise BadpruneError(f"the file declares {n:,} images, more than badprune handles ({MAX_IMAGES:,})", path,
                            "split the data set")
    if ls.dtype.kind not in "fiub":
        raise BadpruneError(f"labels must be numbers, got {ls.dtype}", path, "store class indices in 'label'")
    if ls.size != n:
        raise BadpruneError(f"'{data_key}' has {n} images but '{label_key}' has {ls.size} labels", path,
                            "store one label per image")
    for key, obj in ((data_key, ds), (label_key, ls)):
        if obj.id.get_storage_size() == 0:
            raise BadpruneError(f"'{key}' was declared but never written (no stored values)", path,
                                "the file is incomplete: write it again")
        _check_stored(obj, key, path)
    lay = _layout_of(ds.shape, input_shape, layout, path)
    try:
        raw = np.asarray(ls[()]).reshape(-1)
    except Exception as e:
        raise BadpruneError(f"cannot read '{label_key}' ({short(e, 160)})", path, "the file is damaged") from None
    shape = tuple(ds.shape[1:]) if lay == "nhwc" else (ds.shape[2], ds.shape[3], ds.shape[1])
    return n, lay, shape, ds.dtype, raw, data_key, label_key


def open_dataset(path, input_shape=None, layout=None, num_classes=None) -> Dataset:
    """Open a lab h5 file, check its structure and labels, and decide the layout (against ``input_shape``).

    Every problem raises :class:`BadpruneError`: missing, unreadable or damaged files, missing or malformed
    ``data`` / ``label``, links to other files, counts that differ, images that do not fit ``input_shape``,
    labels that are not class indices (< ``num_classes``). Pixels are checked (finite) as they are read.
    """
    path = str(path)
    if not os.path.exists(path):
        raise BadpruneError("data file not found", path, "check the path")
    if os.path.isdir(path):
        raise BadpruneError("expected an h5 file, got a folder", path, "pass the .h5 file itself")
    if not os.path.isfile(path):
        raise BadpruneError("not a regular file", path, "pass a lab-format .h5 file")
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # h5py raises OSError for non-HDF5 / truncated files
        if not _has_hdf5_signature(path):
            raise BadpruneError("not an HDF5 file", path, "pass a lab-format .h5 file with 'data' and 'label'") \
                from None
        raise BadpruneError(f"damaged or incomplete HDF5 file ({short(e, 120)})", path,
                            "copy the file again (a lab-format .h5 file with 'data' and 'label')") from None
    try:
        with f:
            n, lay, shape, dtype, raw, data_key, label_key = _inspect(f, path, input_shape, layout)
    except BadpruneError:
        raise
    except Exception as e:  # damaged metadata: h5py raises OSError, KeyError, RuntimeError, ValueError, ...
        raise BadpruneError(f"cannot read the HDF5 file's structure ({short(e, 160)})", path,
                            "the file is damaged or incomplete: copy it again") from None
    rawf = raw.astype(np.float64)
    if not np.isfinite(rawf).all() or (rawf != np.round(rawf)).any():
        i = int(np.flatnonzero(~np.isfinite(rawf) | (rawf != np.round(rawf)))[0])
        raise BadpruneError(f"labels must be whole numbers (image {i} has label {rawf[i]:g})", path,
                            "store class indices in 'label'")
    if (rawf < 0).any():
        i = int(np.flatnonzero(rawf < 0)[0])
        raise BadpruneError(f"negative label ({rawf[i]:g} for image {i})", path,
                            "store class indices 0..N-1 in 'label'")
    top = float(rawf.max())
    if num_classes is not None and top >= num_classes:
        i = int(np.argmax(rawf))
        raise BadpruneError(f"label {top:g} (image {i}) is not a class of this model (it has {num_classes})", path,
                            "use data labelled for this model")
    if top > MAX_LABEL:
        raise BadpruneError(f"label {top:g} is too large to be a class index", path, "store class indices in 'label'")
    labels = rawf.astype(np.int64)
    return Dataset(path, n, lay, tuple(int(v) for v in shape), dtype, labels, data_key, label_key)


def _has_hdf5_signature(path) -> bool:
    """True when the file carries the HDF5 signature at offset 0, 512, 1024, ... (where HDF5 looks for it)."""
    sig = b"\x89HDF\r\n\x1a\n"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            off = 0
            while off + 8 <= size:
                fh.seek(off)
                if fh.read(8) == sig:
                    return True
                off = 512 if off == 0 else off * 2
    except OSError:
        return False
    return False


def write_lab_h5(path, images_nhwc, labels, dtype=np.float32, chunk=1024):
    """Write images (N,H,W,C) and labels in the lab's format: ``data`` (N,C,H,W) channels-first, ``label`` float.

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    images_nhwc = np.asarray(images_nhwc)
    labels = np.asarray(labels)
    n = images_nhwc.shape[0]
    with atomic.replacing(path) as tmp, h5py.File(tmp, "w") as f:
        shape = (n, images_nhwc.shape[3], images_nhwc.shape[1], images_nhwc.shape[2])
        d = f.create_dataset("data", shape=shape, dtype=dtype,
                             chunks=(min(max(n, 1), 256),) + shape[1:] if n else None)
        for lo in range(0, n, chunk):
            d[lo:lo + chunk] = images_nhwc[lo:lo + chunk].transpose(0, 3, 1, 2).astype(dtype)
        f.create_dataset("label", data=labels.astype(np.float64))
    return path
