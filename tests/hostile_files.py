"""Small builders of hostile inputs for tests/test_hostile.py (the honest tiny model and its sets are the
conftest fixtures ``tiny_model`` and ``write_lab_sets``)."""
from __future__ import annotations

import json
import zipfile

import h5py
import numpy as np

from badprune import _tf  # noqa: F401  (quiet TensorFlow)
import keras

from badprune.data import write_lab_h5  # noqa: F401  (test_hostile uses hf.write_lab_h5)

L = keras.layers
SHAPE = (16, 12, 3)
CLASSES = 5


def bypass_model():
    """A model whose pooling layer is bypassed by a second path (so it does not cut the model in two)."""
    x = keras.Input(SHAPE)
    h = L.Conv2D(6, 3, activation="relu", name="conv_a")(x)
    p = L.MaxPooling2D(2, name="pool_a")(h)
    a = L.Dense(CLASSES, name="d1")(L.Flatten(name="f1")(p))
    g = L.Dense(CLASSES, name="d2")(L.GlobalAveragePooling2D(name="gap")(h))
    y = L.Activation("softmax", name="soft")(L.Add(name="add")([a, g]))
    return keras.Model(x, y, name="bypass")


def raw_h5(path, **datasets):
    """An h5 file holding exactly the given datasets (arrays) and nothing else."""
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return str(path)


def damage(src, dst, offset, length=256, seed=0):
    """A copy of ``src`` with ``length`` bytes at ``offset`` (negative: from the middle) replaced by random bytes."""
    b = bytearray(open(src, "rb").read())
    if offset < 0:
        offset = len(b) // 2
    r = np.random.default_rng(seed)
    b[offset:offset + length] = r.integers(0, 256, min(length, len(b) - offset), dtype=np.uint8).tobytes()
    with open(dst, "wb") as f:
        f.write(bytes(b))
    return str(dst)


def truncate(src, dst, fraction=0.5):
    b = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(b[: int(len(b) * fraction)])
    return str(dst)


def evil_lambda_model(marker_path, name="evil"):
    """A model whose Lambda layer writes ``marker_path`` when it runs (the code is stored in the saved file)."""
    fn = eval(f"lambda t: (open({str(marker_path)!r}, 'w').write('pwned'), t)[1]")  # noqa: S307 - test payload
    x = keras.Input(SHAPE)
    h = L.Conv2D(4, 3, activation="relu", name="conv_a")(x)
    h = L.MaxPooling2D(2, name="pool_a")(h)
    h = L.Lambda(fn, output_shape=(7, 5, 4), name=name)(h)
    y = L.Dense(CLASSES, activation="softmax", name="out")(L.Flatten(name="flat")(h))
    return keras.Model(x, y, name="evil")


def rewrite_keras_config(src, dst, edit):
    """A copy of the .keras zip ``src`` whose config.json is ``edit(config)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "config.json":
                data = json.dumps(edit(json.loads(data))).encode()
            zout.writestr(item, data)
    return str(dst)


def rewrite_h5_config(src, dst, edit):
    """A copy of the legacy .h5 model ``src`` whose model_config attribute is ``edit(config)``."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(fi.read())
    with h5py.File(dst, "r+") as f:
        raw = f.attrs["model_config"]
        cfg = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        f.attrs["model_config"] = json.dumps(edit(cfg)).encode()
    return str(dst)


def layer_cfg(cfg, name):
    """The layer config named ``name`` in a model config (Keras 3 or legacy)."""
    for lc in cfg["config"]["layers"]:
        if lc.get("name") == name or lc.get("config", {}).get("name") == name:
            return lc
    raise KeyError(name)


# ------------------------------------------------------------------ weight arrays that reach outside their file
def secret_file(folder, nbytes=4096):
    """A file standing for a secret on the machine (any bytes a hostile weight file could point at)."""
    p = f"{folder}/secret.bin"
    with open(p, "wb") as f:
        f.write(np.random.default_rng(7).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return p


def _swap_dataset(f, name, make):
    """Replace the dataset ``name`` of an open h5 file by ``make(group, base name, old dataset's shape, dtype)``."""
    group, base = name.rsplit("/", 1)
    g = f[group]
    shape, dtype = g[base].shape, g[base].dtype
    del g[base]
    make(g, base, shape, dtype)


def h5_with(src, dst, name, make):
    """A copy of the HDF5 file ``src`` whose dataset ``name`` is rebuilt by ``make`` (see :func:`_swap_dataset`)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(fi.read())
    with h5py.File(dst, "r+") as f:
        _swap_dataset(f, name, make)
    return str(dst)


def keras_with(src, dst, name, make):
    """A copy of the .keras zip ``src`` whose weights file's dataset ``name`` is rebuilt by ``make``."""
    import io

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "model.weights.h5":
                buf = io.BytesIO(data)
                with h5py.File(buf, "r+") as f:
                    _swap_dataset(f, name, make)
                data = buf.getvalue()
            zout.writestr(item, data)
    return str(dst)


def external_raw(secret):
    """``make``: the array's bytes are read from ``secret`` (HDF5 external raw storage)."""
    return lambda g, base, shape, dtype: g.create_dataset(base, shape=shape, dtype=dtype,
                                                          external=[(secret, 0, h5py.h5f.UNLIMITED)])


def external_link(other_h5):
    """``make``: the array is a link to dataset ``/x`` of another HDF5 file (written next to it)."""
    def make(g, base, shape, dtype):
        with h5py.File(other_h5, "w") as o:
            o["x"] = np.ones(shape, dtype)
        g[base] = h5py.ExternalLink(other_h5, "/x")
    return make


def virtual(other_h5):
    """``make``: a virtual dataset mapping dataset ``/x`` of another HDF5 file."""
    def make(g, base, shape, dtype):
        with h5py.File(other_h5, "w") as o:
            o["x"] = np.ones(shape, dtype)
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(other_h5, "x", shape=shape)
        g.create_virtual_dataset(base, layout)
    return make


def declared_huge(shape=(1 << 16, 1 << 10)):
    """``make``: an array declared of ``shape`` (256 MB of float32 by default), compressed, never written: a few
    hundred bytes on disk."""
    return lambda g, base, _shape, dtype: g.create_dataset(base, shape=shape, dtype=dtype, chunks=(1024, 1024),
                                                           compression="gzip")


def one_chunk_written(path, n, image=(3, 16, 12)):
    """A lab file declaring ``n`` images in chunks of one image, of which only the first is written (a few kB on
    disk); its labels are all there (compressed zeros)."""
    with h5py.File(path, "w") as f:
        d = f.create_dataset("data", shape=(n,) + image, dtype="f4", chunks=(1,) + image, compression="gzip")
        d[0] = np.ones(image, "f4")
        f.create_dataset("label", data=np.zeros(n), chunks=(min(n, 1 << 16),), compression="gzip")
    return str(path)
