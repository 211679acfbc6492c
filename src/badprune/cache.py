"""The activation cache's files: keys, checked reads and atomic writes (TensorFlow-free).

An entry is ``act-<key>.npy`` plus a JSON completion marker ``act-<key>.json`` written after it, holding the key,
shape, size and the array's CRC-32. :func:`read_entry` returns the array only when all of them agree (a changed
value is reported in one line, its marker removed and the entry rebuilt by the caller); :func:`write_entry` writes
both atomically. A scale decision (:func:`badprune.features.detect_scale`) is one JSON file, ``scale-<key>.json``.
The keys (:func:`cache_key`, :func:`scale_key`) need only the model's digest, so a warm sweep finds its entries
without loading the model (:mod:`badprune.record` keeps the digest).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zlib

import numpy as np

from . import atomic
from ._console import progress as stage_progress
from .errors import BadpruneError, warn
from .options import SCALES, scale_value

#: bump when the cache layout or the meaning of its content changes
FORMAT_VERSION = 2
#: the trunk engine a sweep's activations are computed with (:data:`badprune.features.ENGINES`)
DEFAULT_ENGINE = "tf"
#: the number of validation images :func:`badprune.features.detect_scale` decides on by default
SCALE_SAMPLE = 1000


#: the temporaries a killed run can leave in the cache
CACHE_TEMPORARIES = (".*.tmp-*", "*.tmp[0-9]*", ".template-*.keras")


def secure_dir(path) -> str:
    """The cache folder ``path``, created 0700 when missing; refused (:class:`BadpruneError`) when it is not the
    user's own or other users may write to it (they could plant activations or model records in it). A folder
    that cannot be created is left to the writes' own warnings."""
    path = str(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError:
        return path
    fix = "use a cache folder of your own (--cache-dir or BADPRUNE_CACHE), or chmod go-w it"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise BadpruneError(f"the cache folder belongs to another user (uid {st.st_uid})", path, fix)
    if st.st_mode & 0o022:
        raise BadpruneError(f"the cache folder is writable by other users (mode {st.st_mode & 0o777:o})", path, fix)
    atomic.remove_stale(path, CACHE_TEMPORARIES)
    return path


def data_identity(dataset) -> dict:
    st = os.stat(dataset.path)
    ident = dict(dataset.identity())
    ident.update(ino=st.st_ino, ctime_ns=st.st_ctime_ns)
    return ident


def key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(dict(payload, version=FORMAT_VERSION), sort_keys=True,
                                     default=str).encode()).hexdigest()


def cache_key(digest: str, layer, dataset, scale, engine: str) -> str:
    """sha256 of what determines the activations: the model's digest (weights + architecture), layer, data file,
    scale, engine and cache format version."""
    return key({"model": digest, "layer": layer, "data": data_identity(dataset), "scale": repr(scale_value(scale)),
                "engine": engine})


def entry_paths(cache_dir, key: str) -> tuple:
    """``(npy, marker)``: the files of the activation entry ``key`` in ``cache_dir``."""
    stem = os.path.join(str(cache_dir), f"act-{key[:40]}")
    return stem + ".npy", stem + ".json"


def scale_key(digest: str, dataset, n: int, engine: str) -> str:
    """The key of a scale decision: the model's digest, the data file, the number of images and the engine."""
    return key({"model": digest, "data": data_identity(dataset), "n": n, "engine": engine,
                "scales": {k: repr(float(v)) for k, v in SCALES.items()}, "what": "scale"})


def scale_path(cache_dir, key: str) -> str:
    return os.path.join(str(cache_dir), f"scale-{key[:40]}.json")


def _npy_size(shape, dtype=np.float32) -> int:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize


def read_entry(npy, marker, key, shape, out=None):
    """The entry's array when its marker, size, header and checksum agree, else None. With ``out`` (C-contiguous
    float32 of ``shape``) the values are read straight into it (no second copy); on None it holds garbage."""
    try:
        with open(marker) as f:
            m = json.load(f)
        if m.get("key") != key or tuple(m.get("shape", ())) != tuple(shape) or m.get("dtype") != "float32":
            return None
        if "crc32" not in m:  # written by an older badprune: not checkable, so not used
            return None
        size = os.path.getsize(npy)
        if size != m.get("bytes") or size != _npy_size(shape):
            return None
        arr = np.empty(shape, np.float32) if out is None else out
        with open(npy, "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                return None
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            hshape, fortran, dtype = read_header(f)
            if tuple(hshape) != tuple(shape) or fortran or dtype != np.dtype("<f4") \
                    or f.tell() + arr.nbytes != size:
                return None
            if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
                return None
        if m["crc32"] != checksum(arr):
            warn(f"cached activations changed on disk since they were written (checksum mismatch): discarding "
                 f"{os.path.basename(npy)} and recomputing")
            _remove(marker)
            return None
        return arr
    except (OSError, ValueError, json.JSONDecodeError):
        return None


def _remove(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def has_entry(npy, marker, key, shape) -> bool:
    """Whether a complete entry ``key`` of ``shape`` is there, by its marker and file size (the values are checked
    when :func:`read_entry` reads them)."""
    try:
        with open(marker) as f:
            m = json.load(f)
        return m.get("key") == key and tuple(m.get("shape", ())) == tuple(shape) and "crc32" in m \
            and m.get("dtype") == "float32" and os.path.getsize(npy) == m.get("bytes") == _npy_size(shape)
    except (OSError, ValueError, TypeError, json.JSONDecodeError):
        return False


def show_hit(n: int, desc: str, progress: bool = True) -> None:
    """The stage line (or bar) of ``n`` images' activations read from the cache."""
    with stage_progress(n, desc, "img", enabled=progress, rate=False, how="from the cache") as bar:
        bar.update(n)


def read_cached(npy, marker, key, shape, out=None, progress=True, desc="features", engine=DEFAULT_ENGINE, t0=None):
    """:func:`read_entry`, shown as a stage read from the cache: ``(array, info)`` as
    :func:`badprune.features.extract` returns them for a hit (``seconds`` since ``t0``, default now), or None."""
    t0 = time.perf_counter() if t0 is None else t0
    arr = read_entry(npy, marker, key, shape, out)
    if arr is None:
        return None
    show_hit(shape[0], desc, progress)
    return arr, hit_info(shape[0], time.perf_counter() - t0, engine, npy)


def hit_info(n: int, seconds: float, engine: str, npy) -> dict:
    """What :func:`badprune.features.extract` tells of ``n`` images' activations read from the cache."""
    return {"cached": True, "seconds": seconds, "img_per_s": n / max(seconds, 1e-9), "engine": engine, "path": npy}


def checksum(arr: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C order): the cache's check that an entry is what was written."""
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")) & 0xFFFFFFFF


def load_cached(npy) -> np.ndarray | None:
    """A cache entry by its ``.npy`` path (as a sweep records it), checked against its completion marker; None when
    it is gone, incomplete or does not match."""
    marker = npy[:-len(".npy")] + ".json" if str(npy).endswith(".npy") else None
    if marker is None:
        return None
    try:
        with open(marker) as f:
            m = json.load(f)
        return read_entry(npy, marker, m["key"], tuple(m["shape"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_entry(npy, marker, key, arr, meta):
    try:
        if os.path.exists(marker):
            os.remove(marker)
        with atomic.replacing(npy) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
        info = dict(meta, key=key, shape=list(arr.shape), dtype="float32", bytes=os.path.getsize(npy),
                    crc32=checksum(arr), version=FORMAT_VERSION, created=time.time())
        write_json(marker, info, fsync=True)  # the marker vouches for the array (checked on read: size, CRC-32)
        return True
    except OSError as e:
        warn(f"cannot write the activation cache ({e.strerror or e}); continuing without it")
        return False


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (:func:`badprune.atomic.write_bytes`); raises OSError."""
    atomic.write_bytes(path, data)


def write_json(path, obj, fsync: bool = False):
    """Write ``obj`` as the cache's JSON to ``path`` whole (:func:`badprune.atomic.write_json`); raises OSError."""
    atomic.write_json(path, obj, fsync=fsync, indent=1, default=str)


def stacked(sizes: dict, row_shape) -> tuple:
    """One float32 array for the activations of several sets, evaluated together (filled set by set in place, no
    concatenation copy): ``(F, {set: slice of its rows})`` for ``sizes`` {set: rows}, in their order. Raises
    MemoryError when it does not fit."""
    bounds, lo = {}, 0
    for k, n in sizes.items():
        bounds[k] = slice(lo, lo + int(n))
        lo += int(n)
    return np.empty((lo,) + tuple(row_shape), np.float32), bounds


def best_scale(accs: dict) -> str:
    names = list(SCALES)
    return max(accs, key=lambda k: (accs[k], -names.index(k)))


def read_scale(path, key):
    """A stored scale decision ``(name, accuracies)`` when it is for ``key`` and consistent, else None."""
    try:
        with open(path) as f:
            m = json.load(f)
        accs = m["accuracy"]
        if m.get("key") != key or not isinstance(accs, dict) or set(accs) != set(SCALES):
            return None
        accs = {k: float(accs[k]) for k in SCALES}
        if not all(0.0 <= v <= 1.0 for v in accs.values()) or m.get("scale") != best_scale(accs):
            return None
        return m["scale"], accs
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
