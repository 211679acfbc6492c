"""The model record: what a sweep needs of a model B, kept in the activation cache so that a warm sweep (every
input already cached) runs without TensorFlow or Keras (TensorFlow-free itself).

A record is keyed by :func:`source_key`: the model file's bytes (``--model``, or ``--weights`` with ``--arch``),
``--layer``, ``--trust-model``, the Keras / TensorFlow versions, the cache's format version and the badprune code
that compiles heads and writes models. Its files, in the cache folder:

* ``rec-<key>.json``, written last: B's name-free facts (:func:`badprune.models.model_digest`, which keys the
  activations and the scale decision; classes, input shape, prune layer, producing convolution), the compiled
  head's op list as JSON (its arrays in the ``.npz``), ``head.describe()``, and per kind of saved model the patch
  that makes its template one variant (:class:`badprune.models.channels.Patch`); the CRC-32 of each other file and
  of its own content;
* ``rec-<key>.npz``: the head's arrays (``np.savez``, no pickle);
* ``rec-<key>-bprime.keras`` / ``rec-<key>-goodnet.keras``: B'_X's and G_X's template ``.keras`` files, added by
  the first run that saves models (:meth:`ModelRecord.model_template`); each B'_X / G_X is written from them with
  h5py alone (:func:`badprune.models.saving.write_variants`).

A sweep (:func:`badprune.sweep.stages`) writes the record once its activations are cached; the next one
reads it (:func:`load`) and :func:`find_warm` finds the scale decision and activation entries it keys, and reads the
activations. A damaged record (any checksum or structure mismatch) is reported in one line and the sweep runs the
normal way, writing it again. Heads that fall back to TensorFlow are not recorded.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cache
from .errors import BadpruneError, warn
from .options import SCALES, fixed_scale
from ._env import versions

KINDS = ("bprime", "goodnet")
#: the modules whose code shapes a record (a change to any of them makes old records unused)
_CODE = ("record.py", "goodnet.py", "head/compiler.py", "head/ops.py", "models")


class _Unrecordable(Exception):
    """A value the record's JSON cannot hold."""


class _Damaged(Exception):
    """A record file that does not match what was written."""


# --------------------------------------------------------------------------------------------------------- keys
def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def _code() -> str:
    """The digest of the code a record depends on (:data:`_CODE`), computed once per process."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for name in _CODE:
        files = sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]
        for p in files:
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def source_key(model=None, weights=None, arch=None, trust=False, layer=None) -> str | None:
    """The record key of a model named by its file (``model``, or ``weights`` + ``arch``); None when the file
    cannot be read (the normal path reports that)."""
    path = model if model is not None else weights
    try:
        digest = _file_sha256(path)
    except (OSError, TypeError):
        return None
    return cache.key({"what": "model-record", "file": digest, "kind": "model" if model is not None else "weights",
                      "arch": arch, "trust": bool(trust), "layer": layer, "versions": versions(), "code": _code()})


def _stem(cache_dir, key) -> str:
    return os.path.join(str(cache_dir), f"rec-{key[:40]}")


# -------------------------------------------------------------------------------------- the head as JSON + arrays
#: the numpy ufuncs a compiled head holds (its merge layers, :mod:`badprune.head.compiler`): all a record may name
UFUNCS = frozenset({"add", "subtract", "multiply", "maximum", "minimum"})


def _enc(v, arrays: dict):
    if isinstance(v, (np.ndarray, np.generic)):
        k = f"a{len(arrays)}"
        arrays[k] = np.asarray(v)
        return {"array": [k, isinstance(v, np.generic)]}
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, tuple):
        return {"tuple": [_enc(x, arrays) for x in v]}
    if isinstance(v, list):
        return [_enc(x, arrays) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": [[k, _enc(x, arrays)] for k, x in v.items()]}
    if isinstance(v, np.ufunc) and v.__name__ in UFUNCS and getattr(np, v.__name__) is v:
        return {"ufunc": v.__name__}
    raise _Unrecordable(type(v).__name__)


def _dec(v, arrays):
    if isinstance(v, list):
        return [_dec(x, arrays) for x in v]
    if not isinstance(v, dict):
        return v
    (tag, x), = v.items()
    if tag == "array":
        a = arrays[x[0]]
        return a[()] if x[1] else a
    if tag == "float":
        return float(x)
    if tag == "tuple":
        return tuple(_dec(y, arrays) for y in x)
    if tag == "dict":
        return {k: _dec(y, arrays) for k, y in x}
    if tag == "ufunc":
        if x not in UFUNCS:  # a record names only these: never any other numpy attribute (np.load, ...)
            raise _Damaged(f"ufunc {x!r} is not one a head uses")
        return getattr(np, x)
    raise _Damaged(f"unknown tag {tag!r}")


def _same(a, b) -> bool:
    """Exactly equal, arrays by dtype, shape and value (NaN equal to NaN), containers element by element."""
    if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and \
            np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _head_doc(head, arrays) -> dict:
    ops = [{f.name: _enc(getattr(o, f.name), arrays) for f in dataclasses.fields(o)} for o in head.ops]
    return {"layer": head.layer, "ops": ops, "shapes": [[int(t), list(s)] for t, s in head.shapes.items()],
            "input_shape": list(head.input_shape), "out_id": int(head.out_id),
            "drops_softmax": bool(head.drops_softmax)}


def _head(doc, arrays):
    """The :class:`badprune.head.Head` of a record: the compiler's op list given to the Head constructor again (a
    dropped final softmax appended, so that the constructor drops it again)."""
    from .head import Head, Op

    ops = [Op(**{k: _dec(v, arrays) for k, v in o.items()}) for o in doc["ops"]]
    shapes = {int(t): tuple(s) for t, s in doc["shapes"]}
    out = int(doc["out_id"])
    if doc["drops_softmax"]:
        out_shape = shapes[out]
        out = max(shapes) + 1
        shapes[out] = out_shape
        ops.append(Op("act", "softmax", [int(doc["out_id"])], out, out_shape,
                      {"kind": "softmax", "p": (0.0, np.inf, 0.0)}))
    return Head(None, doc["layer"], ops, shapes, tuple(doc["input_shape"]), out, None, [])


def _same_head(a, b) -> bool:
    """Whether two heads evaluate the same: ops, shapes, the linear consumers and the description."""
    fields = [f.name for f in dataclasses.fields(a.ops[0])] if a.ops else []
    return len(a.ops) == len(b.ops) and all(_same(getattr(x, f), getattr(y, f)) for x, y in zip(a.ops, b.ops)
                                            for f in fields) \
        and all(_same(tuple(s), tuple(b.shapes.get(t, ()))) for t, s in a.shapes.items()) \
        and (a.input_shape, a.out_id, a.output_shape, a.drops_softmax, a.linear, a.consumers, a.describe()) == \
        (b.input_shape, b.out_id, b.output_shape, b.drops_softmax, b.linear, b.consumers, b.describe())


# --------------------------------------------------------------------------------------------------- the files
def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _doc_crc(doc: dict) -> int:
    return _crc(json.dumps({k: v for k, v in doc.items() if k != "crc32"}, sort_keys=True).encode())


def _read_checked(path, entry: dict) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != entry.get("bytes") or _crc(data) != entry.get("crc32"):
        raise _Damaged(os.path.basename(path))
    return data


class ModelRecord:
    """One record, read (:func:`load`, in ``seconds``) or just written (:func:`save`): ``digest``,
    ``num_classes``, ``layer``, ``conv_layer``, ``input_shape``, ``head`` (a :class:`badprune.head.Head` without a
    Keras model). B itself is loaded by :meth:`load_model` from the source the caller gives."""

    def __init__(self, stem: str, doc: dict, head, seconds: float = 0.0):
        self.stem, self.doc, self.head, self.seconds = stem, doc, head, seconds
        self.digest = doc["digest"]
        self.num_classes = int(doc["num_classes"])
        self.layer = doc["layer"]
        self.conv_layer = doc["conv_layer"]
        self.input_shape = tuple(int(v) for v in doc["input_shape"])

    def _store(self) -> None:
        self.doc["crc32"] = _doc_crc(self.doc)
        cache.write_json(self.stem + ".json", self.doc)

    def load_model(self, source: dict):
        """B loaded from its file (``source``: :func:`badprune.models.load_model`'s keywords; Keras), checked to be
        the model this record is about."""
        from .models import load_model, model_digest

        B = load_model(**source)
        if model_digest(B) != self.digest:
            raise BadpruneError("the model file changed since the sweep ran",
                                source.get("model") or source.get("weights"), "run the sweep again")
        return B

    def model_template(self, kind: str, get_model):
        """``(template .keras bytes, Patch)`` for B'_X (``kind`` 'bprime') or G_X ('goodnet'): from the cache, or
        made now from B (``get_model()``, Keras) and kept (again, with a warning, when the stored one is damaged).
        None when each file must be saved by Keras instead (Keras lays the archive out otherwise). A G that cannot
        be built raises its :class:`~badprune.errors.BadpruneError` (remembered, so a warm run says the same)."""
        from .models import saving
        from .models.channels import Patch

        entry, data = self.doc.setdefault("models", {}).get(kind), None
        if entry is not None and "rule" in entry:
            try:
                data = _read_checked(self.stem + f"-{kind}.keras", entry)
                _check_template(data, self.stem + f"-{kind}.keras", kind)
            except (OSError, _Damaged):
                warn(f"the cached {kind} template of {os.path.basename(self.stem)} changed on disk (checksum "
                     "mismatch): saving it again")
                entry = None
        if entry is None:
            entry, data = self._add(kind, get_model())
        if "error" in entry:
            raise BadpruneError(entry["error"])
        if data is None:
            return None
        patch = Patch(entry["layer"], entry["rule"], int(entry["n"]))
        if patch.rule == "zero":
            patch.base = saving.layer_weights(data, patch.layer)
            if patch.base is None:
                return None
        return data, patch

    def _add(self, kind, model) -> tuple:
        """Make ``kind``'s template from B with Keras and keep it: ``(entry, template bytes or None)``."""
        from .models import saving

        data = None
        try:
            if kind == "bprime":
                from .models import prune_template

                tm, patch = prune_template(model, self.layer)
            else:
                from .models.goodnet import sweep_template

                tm, patch = sweep_template(model, self.layer, "goodnet")
        except BadpruneError as e:
            entry = {"error": e.line()}
        else:
            data = saving.template(tm, os.path.dirname(self.stem))
            entry = {"layout": "unexpected"} if data is None else \
                {"layer": patch.layer, "rule": patch.rule, "n": patch.n, "bytes": len(data), "crc32": _crc(data)}
        try:
            if data is not None:
                cache.write_bytes(self.stem + f"-{kind}.keras", data)
            self.doc["models"][kind] = entry
            self._store()
        except OSError:  # used for this run only
            self.doc["models"].pop(kind, None)
        return entry, data


class UnsafeTemplate(BadpruneError):
    """A cached template that fails the safety check: someone else wrote to the cache (always fatal)."""


def _check_template(data: bytes, path, kind: str) -> None:
    """A cached template passes the safety check of any model file before it is used (its config: built-in Keras
    layers only, nothing that runs code; its weights: nothing stored outside the archive), without Keras."""
    import zipfile

    import h5py

    from .models.files import check_h5_storage
    from .models.safety import check_config

    fix = "delete it (or the whole cache folder) and run again"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            config = json.loads(z.read("config.json"))
            weights = [z.read(n) for n in z.namelist() if n.endswith(".h5")]
        for w in weights:
            with h5py.File(io.BytesIO(w), "r") as f:
                check_h5_storage(f, path)
        check_config(config, path, graph_ops=kind == "goodnet", keras_free=True)
    except BadpruneError as e:
        raise UnsafeTemplate(f"the cached {kind} template is unsafe: {e.what}", path, fix) from None
    except Exception as e:
        raise UnsafeTemplate(f"the cached {kind} template cannot be read ({type(e).__name__})", path, fix) from None


def save(cache_dir, key: str, model, layer: str, conv_layer, num_classes: int, head) -> ModelRecord | None:
    """Write the record of B (``model``, loaded; ``head`` its compiled head) under ``key`` (:func:`source_key`).
    Returns it, or None when there is nothing to record (a TensorFlow head, a head op the JSON cannot hold, a
    rebuilt head that differs) or the cache cannot be written."""
    from .models import model_digest

    if head.backend != "prune_ext" or key is None:
        return None
    arrays: dict = {}
    try:
        doc = {"key": key, "version": cache.FORMAT_VERSION, "digest": model_digest(model),
               "num_classes": int(num_classes), "layer": layer, "conv_layer": conv_layer,
               "input_shape": [int(v) for v in model.input_shape[1:]], "head": _head_doc(head, arrays),
               "models": {}, "created": time.time()}
        if not _same_head(head, _head(doc["head"], arrays)):
            return None
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        data = buf.getvalue()
        stem = _stem(cache_dir, key)
        doc["arrays"] = {"file": os.path.basename(stem) + ".npz", "bytes": len(data), "crc32": _crc(data)}
        os.makedirs(str(cache_dir), mode=0o700, exist_ok=True)
        if os.path.exists(stem + ".json"):
            os.remove(stem + ".json")
        cache.write_bytes(stem + ".npz", data)
        rec = ModelRecord(stem, doc, head)
        rec._store()
    except (_Unrecordable, OSError, ValueError, TypeError):
        return None
    return rec


def load(cache_dir, key: str) -> ModelRecord | None:
    """The record ``key`` from ``cache_dir``, checked; None when there is none, or (with a one-line warning) when
    it does not match what was written."""
    if key is None:
        return None
    t0 = time.perf_counter()
    stem = _stem(cache_dir, key)
    try:
        with open(stem + ".json") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        if os.path.exists(stem + ".json"):
            warn(f"the cached model record {os.path.basename(stem)}.json is damaged: loading the model")
        return None
    try:
        if not isinstance(doc, dict) or doc.get("crc32") != _doc_crc(doc) or doc.get("key") != key:
            raise _Damaged("json")
        data = _read_checked(stem + ".npz", doc["arrays"])
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return ModelRecord(stem, doc, _head(doc["head"], arrays), time.perf_counter() - t0)
    except (_Damaged, OSError, ValueError, KeyError, TypeError, IndexError):
        warn(f"the cached model record {os.path.basename(stem)} changed on disk since it was written (checksum "
             "mismatch): discarding it and loading the model")
        return None


# ------------------------------------------------------------------------------------------------ the warm run
@dataclass
class Warm:
    """What a warm sweep starts from (:func:`find_warm`): the record, the opened sets, the pixel scale (and the
    stored accuracies behind an 'auto' decision), the activations of all sets in one array ``F`` (``bounds``: set
    -> rows), per set what :func:`badprune.features.extract` tells of a cache hit (``info``), and the timings of
    the stages it stands for (``seconds``: load_model, scale, extract_<set>)."""

    record: ModelRecord
    sets: dict
    scale_name: str
    scale_value: float
    scale_accs: dict | None
    F: np.ndarray
    bounds: dict
    info: dict
    seconds: dict

    def announce(self, progress: bool = True) -> None:
        """The stage lines of the activations read from the cache, as the trunk pass shows a cache hit."""
        for k, dset in self.sets.items():
            cache.show_hit(dset.n, f"features {k}", progress)


def find_warm(cache_dir, rec: ModelRecord, sets: dict, scale) -> Warm | None:
    """Everything a sweep of B (its record ``rec``, :func:`load`) over ``sets`` ({name: h5 path or None}) at
    ``scale`` ('auto', a name of SCALES or a number) needs, when all of it is cached: the scale decision and every
    set's activations (read and checked). None otherwise (the normal path then loads the model)."""
    from . import data

    seconds = {"load_model": rec.seconds}
    try:
        ds = {k: data.open_dataset(p, input_shape=rec.input_shape, num_classes=rec.num_classes)
              for k, p in sets.items() if p is not None}
    except BadpruneError:
        return None
    t = time.perf_counter()
    accs = None
    if isinstance(scale, str) and scale == "auto":
        v = ds["valid"]
        skey = cache.scale_key(rec.digest, v, min(cache.SCALE_SAMPLE, v.n), cache.DEFAULT_ENGINE)
        hit = cache.read_scale(cache.scale_path(cache_dir, skey), skey)
        if hit is None:
            return None
        name, accs = hit
        value = SCALES[name]
    else:
        name, value = fixed_scale(scale)
    seconds["scale"] = time.perf_counter() - t
    entries = {}
    shape = tuple(rec.head.input_shape)
    for k, dset in ds.items():
        akey = cache.cache_key(rec.digest, rec.layer, dset, value, cache.DEFAULT_ENGINE)
        npy, marker = cache.entry_paths(cache_dir, akey)
        if not cache.has_entry(npy, marker, akey, (dset.n,) + shape):
            return None
        entries[k] = (npy, marker, akey)
    try:
        F, bounds = cache.stacked({k: dset.n for k, dset in ds.items()}, shape)
    except MemoryError:
        return None
    info = {}
    for k, (npy, marker, akey) in entries.items():
        t = time.perf_counter()
        if cache.read_entry(npy, marker, akey, (ds[k].n,) + shape, F[bounds[k]]) is None:
            return None
        dt = seconds[f"extract_{k}"] = time.perf_counter() - t
        info[k] = cache.hit_info(ds[k].n, dt, cache.DEFAULT_ENGINE, npy)
    return Warm(rec, ds, name, value, accs, F, bounds, info, seconds)
