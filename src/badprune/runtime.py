"""TensorFlow-free inference: run exported LiteRT (``.tflite``) models of B, B'_X and G_X, and load images.

Needs only numpy, Pillow (for images) and one LiteRT interpreter, tried in this order:

1. ``ai_edge_litert`` (``pip install ai-edge-litert``, the current LiteRT package),
2. ``tflite_runtime`` (the older stand-alone package),
3. ``tensorflow.lite`` (only when TensorFlow happens to be installed).

Nothing here imports TensorFlow unless the third is the only one present (or a ``.keras`` / ``.h5`` file is given
to :func:`open_model`, which then uses Keras). ``import badprune.runtime`` itself imports numpy and
badprune's TF-free modules only (:mod:`~badprune.errors`, :mod:`~badprune.options`, :mod:`~badprune.runfolder`,
:mod:`~badprune.models.kinds`).

A model's outputs are told apart by rank, as :func:`badprune.models.kinds.kind_from_shapes` does: a rank-1 int output
is a GoodNet's label (in [0, N], N = "backdoored input detected"), a rank-2 output holds scores (probabilities).

Example (on a device with numpy, Pillow and ai-edge-litert only)::

    from badprune.runtime import LiteModel, load_images
    g = LiteModel("goodnet_X4.tflite", threads=2)
    labels = g.labels(load_images(["face.png"]) * 1.0)   # lab3 models want raw 0..255 pixels
"""
from __future__ import annotations

import os
import struct
import warnings

import numpy as np

from ._console import quiet_fds
from . import errors
from .errors import BadpruneError
from .options import check_batch_size, check_source, scale_value
from .models.kinds import Kind, kind_from_shapes, labels_from_outputs
from .runfolder import exported_kind, find_run

#: the lab's input size (height, width)
INPUT_SIZE = (55, 47)
#: images with more pixels are refused before they are decoded (a 12-megapixel photo is fine)
MAX_IMAGE_PIXELS = 25_000_000
#: image file extensions :func:`load_images` reads (anything Pillow opens works; these are what we test)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")

_LITERT_FIX = "pip install ai-edge-litert (or tflite-runtime)"


# ------------------------------------------------------------------------------------------------------ helpers
def interpreter_class(prefer: str | None = None):
    """``(Interpreter class, backend name)``: ai_edge_litert, else tflite_runtime, else tf.lite.

    ``prefer`` ('ai_edge_litert' | 'tflite_runtime' | 'tensorflow') forces one.
    """
    order = ("ai_edge_litert", "tflite_runtime", "tensorflow")
    if prefer is not None:
        if prefer not in order:
            raise BadpruneError(f"unknown LiteRT backend '{prefer}'", fix=f"use one of: {', '.join(order)}")
        order = (prefer,)
    for name in order:
        try:
            if name == "ai_edge_litert":
                from ai_edge_litert.interpreter import Interpreter
            elif name == "tflite_runtime":
                from tflite_runtime.interpreter import Interpreter
            else:
                from . import _tf  # noqa: F401
                import tensorflow as tf

                Interpreter = tf.lite.Interpreter
            return Interpreter, name
        except ImportError:
            continue
    raise BadpruneError("no LiteRT interpreter is installed", fix=_LITERT_FIX)


def load_images(paths, size=INPUT_SIZE, warn=None) -> np.ndarray:
    """Read image files into a float32 (n, H, W, 3) array of raw 0..255 pixels (no scaling).

    PNG, JPEG and whatever else Pillow reads; grayscale, palette, RGBA / LA (alpha dropped) and 16-bit images become
    RGB. Damaged files and images over :data:`MAX_IMAGE_PIXELS` raise :class:`BadpruneError` (checked on the header,
    before decoding). An image whose size is not ``size`` (height, width) is resized (bilinear) with a warning
    through ``warn`` (default: :func:`badprune.errors.warn`, a :class:`~badprune.errors.BadpruneWarning`).
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise BadpruneError("reading images needs Pillow", fix="pip install pillow") from None
    if warn is None:
        warn = errors.warn
    h, w = (int(v) for v in size)
    out = np.empty((len(paths), h, w, 3), np.float32)
    for i, p in enumerate(paths):
        p = str(p)
        if not os.path.exists(p):
            raise BadpruneError("image file not found", p, "check the path")
        if os.path.isdir(p):
            raise BadpruneError("expected an image file, got a folder", p)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: our own limit is lower
                with Image.open(p) as im:
                    iw, ih = im.size
                    if iw * ih > MAX_IMAGE_PIXELS:  # checked on the header, before anything is decoded
                        raise BadpruneError(f"image is too large ({iw}x{ih} pixels; at most "
                                            f"{MAX_IMAGE_PIXELS:,})", p, "pass the face crops (55x47)")
                    im.load()
                    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                        a = np.asarray(im, np.float64)
                        im = Image.fromarray(np.clip(a / (257.0 if a.max() > 255 else 1.0), 0, 255)
                                             .astype(np.uint8))
                    if im.mode in ("P", "PA"):
                        im = im.convert("RGBA")
                    rgb = im.convert("RGB")
        except BadpruneError:
            raise
        except Image.DecompressionBombError:
            raise BadpruneError("image is too large (a decompression bomb)", p, "pass the face crops (55x47)") \
                from None
        except MemoryError:
            raise BadpruneError("image is too large to decode in memory", p, "pass the face crops (55x47)") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                KeyError, struct.error, ZeroDivisionError, OverflowError, RuntimeError) as e:
            # Pillow's decoders raise all of these on damaged files
            raise BadpruneError(f"not a readable image ({type(e).__name__})", p,
                                "pass PNG or JPEG files") from None
        if rgb.size != (w, h):
            warn(f"{p}: image is {rgb.size[0]}x{rgb.size[1]} (width x height), resized to {w}x{h}")
            rgb = rgb.resize((w, h), Image.BILINEAR)
        out[i] = np.asarray(rgb, np.float32)
    return out


def resolve_scale(model_path, scale=None) -> tuple[float, str]:
    """The pixel scale to feed a model: ``scale`` if given, else the run's 'scale_value' (sweep.json next to the
    model or one folder up), else raw. Returns ``(value, where it came from)``."""
    if scale is not None:
        return scale_value(scale), f"--scale {scale}"
    if model_path is None:
        return 1.0, "raw (default)"
    run = find_run(model_path)
    if run is not None and run.scale_value is not None:
        return scale_value(run.scale_value), f"scale_value {run.scale_value:.6g} from {run.path}"
    return 1.0, "raw (default; no sweep.json next to the model)"


# ------------------------------------------------------------------------------------------------------ models
class _Model:
    """What LiteModel and KerasModel share: labels and scores from ``run``'s outputs, read through ``kind``."""

    kind: Kind

    @property
    def num_classes(self) -> int:
        return self.kind.num_classes

    def predict(self, X) -> dict:
        """``{'label': int64 (n,), 'scores': float32 (n, K) or None}`` for scaled float32 NHWC images."""
        outs = self.run(X)
        k = self.kind
        return {"label": labels_from_outputs(outs, k),
                "scores": outs[k.score_output] if k.score_output is not None else None}

    def labels(self, X) -> np.ndarray:
        """int64 labels: a GoodNet's label output (in [0, N]), or a classifier's argmax."""
        return self.predict(X)["label"]

    def _check(self, X) -> np.ndarray:
        X = np.asarray(X, np.float32)
        if X.ndim != 4 or tuple(X.shape[1:]) != self.input_shape:
            raise BadpruneError(f"images of shape {tuple(X.shape[1:])} do not fit the model input "
                                f"{self.input_shape}", self.path)
        return X


class LiteModel(_Model):
    """An exported ``.tflite`` model of B, B'_X or G_X, run in batches.

    ``threads``: interpreter threads (default: all cores); ``batch_size``: images per invoke (the input tensor is
    resized to it and the last batch padded); ``goodnet`` / ``num_classes`` as in
    :func:`badprune.models.kinds.kind_from_shapes`; ``backend``: force one interpreter (see :func:`interpreter_class`).
    """

    def __init__(self, path, threads: int | None = None, batch_size: int = 256, goodnet: bool = False,
                 num_classes: int | None = None, backend: str | None = None):
        path = str(path)
        if not os.path.exists(path):
            raise BadpruneError("model file not found", path, "check the path")
        if os.path.isdir(path):
            raise BadpruneError("expected a .tflite file, got a folder", path)
        Interpreter, self.backend = interpreter_class(backend)
        self.path = path
        self.threads = int(threads) if threads else (os.cpu_count() or 1)
        self.batch_size = check_batch_size(batch_size)
        try:
            with quiet_fds(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice (the last fallback)
                self._it = Interpreter(model_path=path, num_threads=self.threads)
        except Exception as e:
            msg = " ".join(str(e).split())[:120]
            raise BadpruneError(f"not a LiteRT model ({type(e).__name__}{': ' + msg if msg else ''})", path,
                                "pass a .tflite file written by badprune-fast export") from None
        ins = self._it.get_input_details()
        if len(ins) != 1 or len(ins[0]["shape"]) != 4:
            raise BadpruneError(f"the model needs {len(ins)} input(s) of shape "
                                f"{[tuple(i['shape']) for i in ins]}", path, "use a model with one image input")
        self._in = ins[0]
        self.input_shape = tuple(int(v) for v in self._in["shape"][1:])
        outs = self._it.get_output_details()
        self._outs = outs
        shapes = [tuple(int(v) for v in o.get("shape_signature", o["shape"])) for o in outs]
        shapes = [(None,) + s[1:] for s in shapes]
        goodnet = goodnet or exported_kind(path) in ("goodnet", "goodnet_repaired")
        self.kind: Kind = kind_from_shapes(shapes, goodnet, num_classes, what=f"model {os.path.basename(path)}")
        self._n = None

    def _resize(self, n):
        if self._n != n:
            self._it.resize_tensor_input(self._in["index"], [n] + list(self.input_shape))
            with quiet_fds():
                self._it.allocate_tensors()
            self._n = n

    def _quantize_input(self, x):
        dt = np.dtype(self._in["dtype"])
        if dt == np.float32:
            return x
        scale, zp = self._in.get("quantization", (0.0, 0))
        if dt.kind in "iu" and scale:
            info = np.iinfo(dt)
            return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dt)
        return x.astype(dt)

    def _output(self, o, n):
        a = self._it.get_tensor(o["index"])[:n]
        dt = np.dtype(o["dtype"])
        scale, zp = o.get("quantization", (0.0, 0))
        if a.ndim == 2 and dt.kind in "iu" and scale:
            a = (a.astype(np.float32) - zp) * np.float32(scale)
        return a.copy()

    def run(self, X) -> list:
        """All outputs for float32 NHWC images (already scaled), in the interpreter's output order."""
        X = self._check(X)
        n = len(X)
        if n == 0:
            return [np.zeros((0,) + tuple(int(v) for v in o["shape"][1:]), o["dtype"]) for o in self._outs]
        bs = min(self.batch_size, n)
        self._resize(bs)
        parts = [[] for _ in self._outs]
        first = True
        for lo in range(0, n, bs):
            xb = X[lo:lo + bs]
            m = len(xb)
            if m < bs:  # pad the last batch: keep the allocated size
                xb = np.concatenate([xb, np.zeros((bs - m,) + xb.shape[1:], np.float32)])
            self._it.set_tensor(self._in["index"], self._quantize_input(np.ascontiguousarray(xb)))
            if first:  # the delegate announces itself on the first invoke
                with quiet_fds():
                    self._it.invoke()
                first = False
            else:
                self._it.invoke()
            for i, o in enumerate(self._outs):
                parts[i].append(self._output(o, m))
        return [np.concatenate(p) for p in parts]

class KerasModel(_Model):
    """The same interface over a Keras model (.keras / .h5, or B from ``weights`` + ``arch``); imports Keras."""

    def __init__(self, path=None, goodnet: bool = False, num_classes: int | None = None, trust: bool = False,
                 batch_size: int = 256, weights=None, arch=None, model=None):
        from . import goodnet as gn

        self.batch_size = check_batch_size(batch_size)
        gn.import_keras()  # a clear error when TensorFlow is missing
        self.path = str(path) if path is not None else (str(weights) if weights is not None else "model")
        self.backend = "keras"
        self.model = model if model is not None else gn.load(path, trust=trust, weights=weights, arch=arch)
        if len(self.model.inputs) != 1:
            raise BadpruneError(f"the model has {len(self.model.inputs)} inputs", self.path,
                                "use a model with one image input")
        self.input_shape = tuple(int(v) for v in self.model.inputs[0].shape[1:])
        self.kind: Kind = gn.model_kind(self.model, goodnet, num_classes)
        self._fn = None

    def run(self, X) -> list:
        """All outputs for float32 NHWC images (already scaled), in the model's output order."""
        from . import goodnet as gn

        X = self._check(X)
        if self._fn is None:
            self._fn = gn.predict_fn(self.model)
        return gn.predict(self.model, X, self.batch_size, self._fn)

def open_model(path=None, threads: int | None = None, batch_size: int = 256, goodnet: bool = False,
               num_classes: int | None = None, trust: bool = False, weights=None, arch=None):
    """A :class:`LiteModel` for a ``.tflite`` file (no TensorFlow), else a :class:`KerasModel` (B, B'_X or G_X
    from ``path``, or B from ``weights`` + ``arch``)."""
    check_source(path, weights, arch, missing_fix='pass {model="goodnet_X4.tflite"} (or .keras / .h5)')
    if path is not None and str(path).lower().endswith((".tflite", ".lite")):
        return LiteModel(path, threads=threads, batch_size=batch_size, goodnet=goodnet, num_classes=num_classes)
    if path is not None and not os.path.exists(str(path)):
        raise BadpruneError("model file not found", path, "check the path")
    return KerasModel(path, goodnet=goodnet, num_classes=num_classes, trust=trust, batch_size=batch_size,
                      weights=weights, arch=arch)


def rates(labels, truth, kind: Kind) -> dict:
    """Share (percent) of ``labels`` equal to ``truth`` ('match': accuracy on clean data, ASR on poisoned data)
    and, for a GoodNet, answered N ('flagged')."""
    labels = np.asarray(labels)
    truth = np.asarray(truth)
    n = len(labels)
    out = {"n": int(n), "match": 100.0 * float(np.mean(labels == truth)) if n else float("nan")}
    if kind.goodnet:
        out["flagged"] = 100.0 * float(np.mean(labels == kind.num_classes)) if n else float("nan")
    return out
