"""Fuzzing the loaders of untrusted files (issue 6): the h5 data loader (``data.open_dataset`` + reading every
batch) and the image loader (``runtime.load_images``) get random shapes, dtypes (numbers, bools, strings,
compound, enum, variable-length), groups and links, attributes, filters and byte damage. Every case must end in a
:class:`BadpruneError` (one printable line) or a valid load; any other exception fails the test.

Deterministic by default (``derandomize``); ``BADPRUNE_FUZZ_RANDOM=1`` draws new cases and
``BADPRUNE_FUZZ_EXAMPLES=N`` sets the number of cases per test. ``-s`` prints how many cases ended how.
"""
from __future__ import annotations

import atexit
import collections
import io
import os
import shutil
import tempfile
import warnings

import h5py
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badprune import data
from badprune.errors import BadpruneError

EXAMPLES = int(os.environ.get("BADPRUNE_FUZZ_EXAMPLES", "0")) or None
SETTINGS = dict(deadline=None, derandomize=not os.environ.get("BADPRUNE_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
OUTCOMES: dict = collections.defaultdict(collections.Counter)

_TMP = tempfile.mkdtemp(prefix="badprune-fuzz-")
atexit.register(shutil.rmtree, _TMP, True)

# ------------------------------------------------------------------------------------------------ h5 files
DTYPES = ["u1", "i1", "u2", "i4", "i8", "u8", "f2", "f4", "f8", "<f8", ">f4", "?", "c8", "S3", "vlen-str",
          "compound", "enum", "array", "vlen-f4"]
KEYS = ["data", "label", "x", "y", "labels", "data", "label", "extra"]


def _dtype(name):
    if name == "vlen-str":
        return h5py.string_dtype()
    if name == "compound":
        return np.dtype([("a", "f4"), ("b", "i2")])
    if name == "enum":
        return h5py.enum_dtype({"cat": 0, "dog": 1, "fox": 7}, basetype="i1")
    if name == "array":
        return np.dtype(("f4", (2,)))
    if name == "vlen-f4":
        return h5py.vlen_dtype(np.float32)
    return np.dtype(name)


def _values(rng, shape, name, special, nonneg=False):
    """An array of ``shape`` for dtype ``name``, with some special values for numbers."""
    n = int(np.prod(shape)) if shape else 1
    if name == "vlen-str":
        return np.array(["é" * int(k) for k in rng.integers(0, 4, n)], dtype=object).reshape(shape)
    if name == "vlen-f4":
        arr = np.empty(n, dtype=object)
        for i in range(n):
            arr[i] = rng.standard_normal(int(rng.integers(0, 3))).astype(np.float32)
        return arr.reshape(shape)
    dt = _dtype(name)
    if name == "compound":
        a = np.zeros(n, dt)
        a["a"] = rng.standard_normal(n)
        return a.reshape(shape)
    if name == "enum":
        return rng.choice(np.array([0, 1, 7], np.int8), n).reshape(shape)
    if name == "array":
        return rng.standard_normal((n, 2)).astype(np.float32).reshape(tuple(shape) + (2,))
    if dt.kind == "S":
        return rng.choice(np.array([b"", b"ab", b"xyz"]), n).reshape(shape)
    if dt.kind == "b":
        return (rng.random(n) < 0.5).reshape(shape)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        lo, hi = max(info.min, 0 if nonneg else -3), min(info.max, 299 if nonneg else 300)
        return rng.integers(lo, hi, n, endpoint=True).astype(dt).reshape(shape)
    a = rng.uniform(-1, 6, n)
    if dt.kind == "f" and special and n:
        a[rng.integers(0, n, min(n, 2))] = rng.choice([np.nan, np.inf, -np.inf, 1e300, 0.5, -7.0, 3e38], 2)[: min(n, 2)]
    if dt.kind == "f":
        a = np.round(a) if rng.random() < 0.6 else a
    if nonneg:
        a = np.abs(np.round(a))
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(dt).reshape(shape)


@st.composite
def h5_specs(draw):
    """A description of an h5 file: a plausible lab file (often) or anything, then damage."""
    spec = {"seed": draw(st.integers(0, 2 ** 32 - 1)), "entries": [], "attrs": draw(st.integers(0, 3))}
    if draw(st.integers(0, 3)) == 0:  # a valid lab file, only its options drawn: should load
        n = draw(st.integers(1, 12))
        first = draw(st.booleans())
        spec["entries"] = [("data", "dataset", [n, 3, 6, 5] if first else [n, 6, 5, 3],
                            draw(st.sampled_from(["u1", "f4", "f8", "f2", "i2", ">f8"])),
                            draw(st.sampled_from([None, "gzip", "lzf", "shuffle"]))),
                           ("label", "dataset", [n], draw(st.sampled_from(["f8", "f4", "i8", "u1", "?"])), None)]
        spec.update(special=False, damage="none", where=0.0, length=1, valid=True,
                    input_shape=draw(st.sampled_from([None, (6, 5, 3)])),
                    layout=draw(st.sampled_from([None, "nchw" if first else "nhwc"])),
                    num_classes=draw(st.sampled_from([None, 300])), batch=draw(st.integers(1, 5)),
                    scale=draw(st.sampled_from([1.0, 1 / 255])))
        return spec
    spec["valid"] = False
    if draw(st.booleans()):  # plausible: data (n, 3, 4, 5) or (n, 4, 5, 3) and n labels
        n = draw(st.integers(0, 6))
        first = draw(st.booleans())
        dshape = [n, 3, 6, 5] if first else [n, 6, 5, 3]
        if draw(st.integers(0, 4)) == 0:  # sometimes a wrong dimension
            dshape[draw(st.integers(0, 3))] = draw(st.integers(0, 6))
        lshape = [n] if draw(st.integers(0, 4)) else draw(st.lists(st.integers(0, 7), max_size=2))
        spec["entries"].append(("data", "dataset", dshape, draw(st.sampled_from(["u1", "f4", "f8", "f2", "i2"]
                                                                                 + DTYPES)),
                                draw(st.sampled_from([None, "gzip", "lzf", "shuffle"]))))
        spec["entries"].append(("label", "dataset", lshape, draw(st.sampled_from(["f8", "f4", "i8", "u1", "?"]
                                                                                 + DTYPES)), None))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(KEYS))
        kind = draw(st.sampled_from(["dataset", "dataset", "dataset", "group", "softlink", "extlink", "empty"]))
        shape = draw(st.lists(st.integers(0, 5), max_size=5))
        spec["entries"].append((key, kind, shape, draw(st.sampled_from(DTYPES)),
                                draw(st.sampled_from([None, "gzip"]))))
    spec["special"] = draw(st.booleans())
    spec["damage"] = draw(st.sampled_from(["none", "none", "truncate", "bytes", "bytes", "zero-tail"]))
    spec["where"] = draw(st.floats(0, 1))
    spec["length"] = draw(st.integers(1, 512))
    spec["input_shape"] = draw(st.sampled_from([None, (6, 5, 3), (4, 5, 3), (5, 3, 4), (3, 3, 3), (4, 5, 1)]))
    spec["layout"] = draw(st.sampled_from([None, None, "nchw", "nhwc", "NCHW"]))
    spec["num_classes"] = draw(st.sampled_from([None, 1, 5, 300]))
    spec["batch"] = draw(st.integers(1, 5))
    spec["scale"] = draw(st.sampled_from([1.0, 1 / 255, 1e30]))
    return spec


def _write_h5(path, spec):
    rng = np.random.default_rng(spec["seed"])
    with h5py.File(path, "w") as f:
        for i in range(spec["attrs"]):
            f.attrs[f"a{i}"] = [np.float64(rng.standard_normal()), "text", np.arange(3), b"\xff\x00"][i % 4]
        for key, kind, shape, dtname, comp in spec["entries"]:
            if key in f:
                del f[key]
            if kind == "group":
                f.create_group(key).attrs["x"] = 1
            elif kind == "softlink":
                f[key] = h5py.SoftLink(rng.choice(["/data", "/label", "/nowhere"]))
            elif kind == "extlink":
                f[key] = h5py.ExternalLink(rng.choice([path, "/nonexistent.h5"]), "/data")
            elif kind == "empty":
                f.create_dataset(key, data=h5py.Empty("f4"))
            else:
                kw = {}
                if comp and shape and all(shape) and _dtype(dtname).kind not in "OV":
                    kw = {"chunks": True, "compression": "gzip"} if comp == "gzip" else (
                        {"chunks": True, "compression": "lzf"} if comp == "lzf" else {"chunks": True, "shuffle": True})
                vals = _values(rng, shape, dtname, spec["special"], nonneg=spec["valid"])
                try:
                    ds = f.create_dataset(key, data=vals, dtype=_dtype(dtname) if dtname != "array" else None, **kw)
                except (TypeError, ValueError):  # a combination h5py cannot store: store without filters
                    ds = f.create_dataset(key, data=vals)
                if rng.random() < 0.3:
                    ds.attrs["unit"] = "px"
    if spec["damage"] != "none":
        b = bytearray(open(path, "rb").read())
        at = int(spec["where"] * len(b))
        if spec["damage"] == "truncate":
            b = b[:at]
        elif spec["damage"] == "bytes":
            b[at:at + spec["length"]] = rng.integers(0, 256, len(b[at:at + spec["length"]]), dtype=np.uint8).tobytes()
        else:
            b[at:] = bytes(len(b) - at)
        with open(path, "wb") as fh:
            fh.write(bytes(b))


def _load_all(path, spec):
    """Open and read the whole file as the sweep does; check the invariants of a successful load."""
    ds = data.open_dataset(path, input_shape=spec["input_shape"], layout=spec["layout"],
                           num_classes=spec["num_classes"])
    assert ds.n >= 1 and ds.labels.shape == (ds.n,) and ds.labels.dtype == np.int64
    assert (ds.labels >= 0).all()
    if spec["num_classes"] is not None:
        assert ds.labels.max() < spec["num_classes"]
    if spec["input_shape"] is not None:
        assert tuple(ds.image_shape) == spec["input_shape"]
    seen = 0
    for lo, x in ds.batches(spec["batch"], spec["scale"]):
        assert lo == seen and x.dtype == np.float32 and x.flags.c_contiguous
        assert x.shape[1:] == tuple(ds.image_shape) and 1 <= len(x) <= spec["batch"]
        assert np.isfinite(x).all()
        seen += len(x)
    assert seen == ds.n
    assert ds.read(spec["scale"]).shape == (ds.n,) + tuple(ds.image_shape)


def _both_outcomes(kind, fuzz):
    """Run the hypothesis ``fuzz`` and check it saw both outcomes (a loaded input and a one-line refusal), so its
    generator covers both sides of the contract; prints the counts (run with -s)."""
    OUTCOMES[kind].clear()
    fuzz()
    c = OUTCOMES[kind]
    print(f"\nfuzz {kind}: {sum(c.values())} cases: {dict(c)}")
    assert c["loaded"] > 0 and c["BadpruneError"] > 0, dict(c)


@settings(max_examples=EXAMPLES or 1500, **SETTINGS)
@given(spec=h5_specs())
def _fuzz_h5_loader(spec):
    path = os.path.join(_TMP, "fuzz.h5")
    if os.path.exists(path):
        os.remove(path)
    _write_h5(path, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. overflow in a cast must not slip through
        try:
            _load_all(path, spec)
            OUTCOMES["h5"]["loaded"] += 1
        except BadpruneError as e:
            assert not spec["valid"], f"a valid file was refused: {e.line()}"
            assert e.line() and "\n" not in e.line()
            OUTCOMES["h5"]["BadpruneError"] += 1


def test_fuzz_h5_loader():
    _both_outcomes("h5", _fuzz_h5_loader)


# ------------------------------------------------------------------------------------------------- images
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "I;16", "I", "F", "CMYK", "YCbCr", "LAB", "HSV"]
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO", "TGA", "PCX", "raw-bytes"]


@st.composite
def image_specs(draw):
    return {"seed": draw(st.integers(0, 2 ** 32 - 1)), "mode": draw(st.sampled_from(MODES)),
            "format": draw(st.sampled_from(FORMATS)), "w": draw(st.integers(1, 40)), "h": draw(st.integers(1, 40)),
            "damage": draw(st.sampled_from(["none", "none", "truncate", "bytes", "header"])),
            "where": draw(st.floats(0, 1)), "length": draw(st.integers(1, 64)),
            "ext": draw(st.sampled_from([".png", ".jpg", ".h5", ""])),
            "size": draw(st.sampled_from([(8, 6), (55, 47)]))}


def _image_bytes(spec):
    rng = np.random.default_rng(spec["seed"])
    if spec["format"] == "raw-bytes":
        return rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
    from PIL import Image

    a = rng.integers(0, 256, (spec["h"], spec["w"], 4), dtype=np.uint8)
    im = Image.fromarray(a, "RGBA")
    try:
        if spec["mode"] in ("I;16", "I", "F"):
            im = Image.fromarray((a[..., 0].astype(np.int32) * 257).astype(np.uint16 if spec["mode"] == "I;16"
                                                                            else np.int32))
            if spec["mode"] == "F":
                im = im.convert("F")
        else:
            im = im.convert(spec["mode"])
        buf = io.BytesIO()
        im.save(buf, format=spec["format"])
        return buf.getvalue()
    except (OSError, ValueError, KeyError, TypeError):  # a mode the format cannot store: PNG of RGB instead
        buf = io.BytesIO()
        Image.fromarray(a[..., :3], "RGB").save(buf, format="PNG")
        return buf.getvalue()


@settings(max_examples=EXAMPLES or 800, **SETTINGS)
@given(spec=image_specs())
def _fuzz_image_loader(spec):
    from badprune import runtime

    b = bytearray(_image_bytes(spec))
    rng = np.random.default_rng(spec["seed"] + 1)
    at = int(spec["where"] * len(b))
    if spec["damage"] == "truncate":
        b = b[:at]
    elif spec["damage"] == "bytes":
        b[at:at + spec["length"]] = rng.integers(0, 256, len(b[at:at + spec["length"]]), dtype=np.uint8).tobytes()
    elif spec["damage"] == "header" and len(b) > 8:
        k = int(rng.integers(8, min(len(b), 40)))  # after the signature: sizes, modes, counts
        b[k] = int(rng.integers(0, 256))
    path = os.path.join(_TMP, "img" + spec["ext"])
    with open(path, "wb") as fh:
        fh.write(bytes(b))
    warned = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own warnings (e.g. truncated / bomb): not the contract here
        try:
            x = runtime.load_images([path], size=spec["size"], warn=warned.append)
        except BadpruneError as e:
            assert e.line() and "\n" not in e.line()
            OUTCOMES["image"]["BadpruneError"] += 1
            return
    h, w = spec["size"]
    assert x.shape == (1, h, w, 3) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 255
    OUTCOMES["image"]["loaded"] += 1


def test_fuzz_image_loader():
    _both_outcomes("image", _fuzz_image_loader)
