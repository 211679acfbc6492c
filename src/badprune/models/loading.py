"""Loading a model safely: a full model file (.keras or Keras 2/3 .h5) whose config passed the safety check, or a
built-in architecture with a Keras 2 weight file; and the two facts every caller asks of it (name, classes)."""
from __future__ import annotations

from .. import _tf  # noqa: F401  (quiet TensorFlow before keras is imported)

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
import warnings
import zipfile

import h5py
import keras
import numpy as np

from ..errors import BadpruneError, short
from .archs import ARCHS, BUILDERS
from .files import check_file, check_h5_storage, read_model_config
from .keras2 import assign_weights, fit_weights, fix_legacy_config, read_weight_file
from .safety import check_config


#: a weight file declaring more classes than this is refused before its architecture is built
MAX_CLASSES = 1 << 20


def num_classes(model) -> int:
    """Number of classes: the last axis of the model's (single) output."""
    outs = model.outputs
    if len(outs) != 1:
        raise BadpruneError(f"the model has {len(outs)} outputs", fix="use a classifier with a single output")
    n = outs[0].shape[-1]
    if n is None or len(outs[0].shape) != 2:
        raise BadpruneError(f"the model output has shape {tuple(outs[0].shape)}, not (batch, classes)",
                            fix="use a classifier whose output is (batch, classes)")
    return int(n)


def _stored_weights(kind, copy, path) -> dict:
    """{dataset path: (shape, dtype)} of a model file's weights (read from ``copy``, errors naming ``path``), after
    the storage checks (nothing read)."""
    def scan(f):
        return {k: (tuple(d.shape), d.dtype) for k, d in check_h5_storage(f, path).items()}

    if kind == "h5":
        with h5py.File(copy, "r") as f:
            return scan(f)
    with zipfile.ZipFile(copy) as z:
        names = [n for n in z.namelist() if n.endswith(".h5")]
        out = {}
        for n in names:
            with z.open(n) as fh, h5py.File(fh, "r") as f:
                out.update({f"{n}:{k}": v for k, v in scan(f).items()})
        return out


#: a model config asking for more weights than this (float values, all layers) is refused while Keras builds it,
#: before each weight is allocated (a few bytes of JSON can ask for a Dense layer of billions of weights)
MAX_PARAMS = 1 << 28
#: an input of more values than this per image (and a side longer than MAX_INPUT_SIDE) is refused
MAX_INPUT_VALUES = 1 << 24
MAX_INPUT_SIDE = 1 << 15


def _check_input_sizes(config, path) -> None:
    """Every declared input shape (``batch_shape`` / ``batch_input_shape``) is a sane image size."""
    def walk(obj):
        if isinstance(obj, dict):
            for k in ("batch_shape", "batch_input_shape"):
                shape = obj.get(k)
                if isinstance(shape, list):
                    dims = [d for d in shape[1:] if d is not None]
                    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_INPUT_SIDE
                               for d in dims) or math.prod(dims) > MAX_INPUT_VALUES:
                        raise BadpruneError(f"the model declares an input of shape {shape[1:]}, beyond what "
                                            f"badprune handles ({MAX_INPUT_VALUES:,} values, sides up to "
                                            f"{MAX_INPUT_SIDE:,})", path, "the file is damaged or hostile")
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(config)


@contextlib.contextmanager
def _bounded_weights(path):
    """While Keras builds a model: refuse (:class:`BadpruneError`) the weight that brings the total over
    :data:`MAX_PARAMS`, before it is allocated."""
    from keras.src.layers.layer import Layer

    orig, total, refused = Layer.add_weight, [0], []

    def add_weight(self, shape=None, *args, **kwargs):
        dims = [int(d) for d in (shape or ()) if d is not None]
        total[0] += math.prod(dims)
        if total[0] > MAX_PARAMS:
            refused.append(BadpruneError(f"the model's architecture asks for over {MAX_PARAMS:,} weights (layer "
                                         f"'{self.name}' adds {math.prod(dims):,})", path,
                                         "the file is damaged or hostile"))
            raise refused[-1]
        return orig(self, shape, *args, **kwargs)

    Layer.add_weight = add_weight
    try:
        yield
    except Exception:
        if refused:  # Keras may have wrapped it
            raise refused[0] from None
        raise
    finally:
        Layer.add_weight = orig


def _build_architecture(kind, config, trust):
    """The model of ``config`` with fresh weights, built the way Keras's loader builds it (no weight read)."""
    if kind == "keras":
        from keras.src.saving import saving_lib

        return saving_lib._model_from_config(json.dumps(config), None, False, not trust)
    from keras.src.legacy.saving import saving_options, saving_utils
    from keras.src.saving import serialization_lib

    with saving_options.keras_option_scope(use_legacy_config=True), serialization_lib.SafeModeScope(not trust):
        return saving_utils.model_from_config(copy.deepcopy(config), custom_objects={})


def _compare_with_architecture(kind, config, stored, path, trust):
    """Every weight array the file declares must have the shape and kind of one of the architecture's variables
    (scalars aside: optimizer counters): a tiny compressed file cannot make Keras read a huge array."""
    _check_input_sizes(config, path)
    with _bounded_weights(path):
        model = _build_architecture(kind, config, trust)
    fits = {(tuple(int(d) for d in v.shape), np.dtype(v.dtype).kind) for v in model.variables}
    for name, (shape, dtype) in stored.items():
        if shape and (shape, dtype.kind) not in fits:
            raise BadpruneError(f"the weight array '{name}' of shape {shape} ({dtype}) fits no weight of the "
                                "model's architecture", path, "the file is damaged or hostile: re-save the model")


def _load_full_model(path, trust: bool, graph_ops: bool = False):
    """The model file read once, into a private temporary folder: its config, its weights and Keras all read
    that copy, so what is loaded is what was checked (the file may be replaced meanwhile). Errors name ``path``."""
    tmpdir = tempfile.mkdtemp(prefix="badprune-")
    copy = os.path.join(tmpdir, "model")
    try:
        try:
            shutil.copyfile(path, copy)
        except OSError as e:
            raise BadpruneError(f"cannot read the model file ({e.strerror or e})", path,
                                "check the file and its permissions") from None
        try:
            return _load_copy(path, copy, trust, graph_ops)
        except BadpruneError as e:
            if e.file == copy:
                e.file = str(path)
            raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _load_copy(path, copy, trust: bool, graph_ops: bool):
    kind, config = read_model_config(copy)
    check_config(config, path, trust, graph_ops)
    try:
        stored = _stored_weights(kind, copy, path)
    except BadpruneError:
        raise
    except Exception as e:
        raise BadpruneError(f"cannot load the Keras model's weights ({short(e)})", path,
                            "check the file was saved with model.save() by Keras 2.x or 3.x") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "keras":
                _compare_with_architecture(kind, config, stored, path, trust)
                load_path = copy + ".keras"  # Keras insists on the extension
            else:
                fixed, changed = fix_legacy_config(config)
                _compare_with_architecture(kind, fixed, stored, path, trust)
                load_path = copy + ".h5"
                if changed:
                    with h5py.File(copy, "r+") as f:
                        f.attrs["model_config"] = json.dumps(fixed).encode("utf-8")
            os.rename(copy, load_path)
            return keras.saving.load_model(load_path, compile=False, safe_mode=not trust)
    except BadpruneError:
        raise
    except Exception as e:
        raise BadpruneError(f"cannot load the Keras model ({short(e)})", path,
                            "check the file was saved with model.save() by Keras 2.x or 3.x") from None


def _load_arch_weights(weights_path, arch):
    arch = (arch or "deepid").lower()
    if arch not in BUILDERS:
        raise BadpruneError(f"unknown architecture '{arch}'", fix=f"use one of: {', '.join(ARCHS)}")
    built = []

    def fit(ws):  # the architecture built for the file's class count, checked before any value is read
        if "output" not in ws or "bias" not in ws["output"] or len(ws["output"]["bias"].shape) != 1:
            raise BadpruneError(f"weights file does not fit the {arch} architecture (no 'output' layer bias)",
                                weights_path, "pass the weights made for this architecture")
        n = int(ws["output"]["bias"].shape[0])
        if n < 2:
            raise BadpruneError(f"the 'output' layer has {n} class(es)", weights_path)
        if n > MAX_CLASSES:
            raise BadpruneError(f"the 'output' layer declares {n:,} classes, more than badprune handles "
                                f"({MAX_CLASSES:,})", weights_path, "pass the weights made for this architecture")
        built.append(BUILDERS[arch](n))
        fit_weights(built[0], ws, weights_path, arch)

    ws = read_weight_file(weights_path, fit)
    assign_weights(built[0], ws, weights_path, arch)
    return built[0]


def load_model(model=None, weights=None, arch=None, trust: bool = False, graph_ops: bool = False) -> keras.Model:
    """Load a network safely: the model to defend, or any model badprune wrote.

    Parameters
    ----------
    model : str or path, optional
        A full Keras model (.keras, or HDF5 .h5 from Keras 2.x/3.x). Its config is checked before anything is
        deserialized; Lambda layers and non-built-in classes are refused unless ``trust``.
    weights : str or path, optional
        Without ``model``: a Keras 2 weight file for the architecture ``arch`` (default 'deepid'), whose number of
        classes is read from the file; the weights are loaded by layer name. With ``model``: weights that
        overwrite the model's, by layer name.
    arch : str, optional
        A name of :data:`badprune.models.ARCHS`; only with ``weights``.
    trust : bool
        Allow code from the model file (Lambda layers, custom classes).
    graph_ops : bool
        Also accept the ``keras.ops`` nodes of a GoodNet graph or of R_X's filters
        (:data:`badprune.models.safety.GRAPH_OPS`).

    Returns
    -------
    keras.Model
        Uncompiled.

    Raises
    ------
    BadpruneError
        For every failure (missing, damaged or unsafe files, weights that do not fit).
    """
    if model is None and weights is None:
        raise BadpruneError("no model given", fix="pass --model FILE, or --weights FILE --arch deepid")
    if model is not None and arch is not None:
        raise BadpruneError("--arch goes with --weights, not with --model", fix="pass either --model or --arch")
    if model is None:
        return _load_arch_weights(weights, arch)
    path = check_file(model, "model file")
    m = _load_full_model(path, trust, graph_ops)
    if not isinstance(m, keras.Model):
        raise BadpruneError("the file does not hold a Keras model", path)
    if weights is not None:
        assign_weights(m, read_weight_file(weights, lambda ws: fit_weights(m, ws, weights)), weights)
    else:
        _check_finite(m, path)
    return m


def _check_finite(model, path) -> None:
    """A model file's float weights must be finite (NaN logits make every table meaningless), as --weights'."""
    for layer in model.layers:
        for w in layer.weights:
            v = np.asarray(w.numpy())
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise BadpruneError(f"layer '{layer.name}' has non-finite weights ({w.name})", path,
                                    "pass a model whose weights are finite numbers")
