"""Keras 2 files: the in-memory fix-ups of Keras 2 model configs that Keras 3 mis-reads, and Keras 2 HDF5 weight
files (``<layer>/<layer>/kernel:0``) read and assigned by layer name."""
from __future__ import annotations

import copy

import h5py
import numpy as np

from ..errors import BadpruneError, short
from .safety import MODEL_CLASSES
from .files import check_file, check_h5_storage, is_keras3_weights


def fix_legacy_config(cfg) -> tuple[dict, bool]:
    """Rewrite what Keras 3 mis-reads in Keras 2 configs. Returns (config, changed)."""
    cfg = copy.deepcopy(cfg)
    changed = False

    def fix_model(mc):
        nonlocal changed
        inner = mc.get("config")
        if isinstance(inner, list):  # Keras 2.0-2.2 Sequential: config is the list of layers
            mc["config"] = inner = {"name": "sequential", "layers": inner}
            changed = True
        if not isinstance(inner, dict) or not isinstance(inner.get("layers"), list):
            return
        layers = inner["layers"]
        if mc.get("class_name") == "Sequential" and layers:
            first = layers[0]
            fc = first.get("config", {})
            if first.get("class_name") != "InputLayer" and isinstance(fc, dict) and "batch_input_shape" in fc:
                # Keras 3 turns the first layer's batch_input_shape into input_shape and adds a second batch axis
                shape = fc.pop("batch_input_shape")
                dtype = fc.get("dtype") if isinstance(fc.get("dtype"), str) else "float32"
                layers.insert(0, {"class_name": "InputLayer",
                                  "config": {"batch_shape": shape, "dtype": dtype,
                                             "name": f"{fc.get('name', 'layer')}_input"}})
                changed = True
        for lc in layers:
            c = lc.get("config")
            if not isinstance(c, dict):
                continue
            if lc.get("class_name") == "InputLayer":
                if "batch_input_shape" in c:
                    c["batch_shape"] = c.pop("batch_input_shape")
                    changed = True
            elif "batch_input_shape" in c and lc.get("class_name") not in MODEL_CLASSES:
                c.pop("batch_input_shape")
                changed = True
            ax = c.get("axis")
            if lc.get("class_name") in ("BatchNormalization", "LayerNormalization") and isinstance(ax, list) \
                    and len(ax) == 1:
                c["axis"] = int(ax[0])
                changed = True
            if isinstance(c.get("layers"), list):
                fix_model(lc)

    fix_model(cfg)
    return cfg, changed



def _decode(v):
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def read_weight_file(path, fit=None) -> dict:
    """Read a Keras 2 HDF5 weights file (``<layer>/<layer>/kernel:0``) into {layer: {weight_name: array}}.

    Also accepts a full Keras 2 model file (weights under ``model_weights``). Weight names are the base names
    ('kernel', 'bias', ...), in the file's order. Links to other files, external storage and virtual datasets are
    refused (:func:`~badprune.models.files.check_h5_storage`); ``fit``, if given, is called with the same mapping
    of unread h5py datasets (their shapes and types) and may refuse them before any value is read.
    """
    path = check_file(path, "weights file")
    if not h5py.is_hdf5(path):
        raise BadpruneError("not an HDF5 weights file", path, "pass a Keras .h5 weights file")
    found = {}
    try:
        with h5py.File(path, "r") as f:
            check_h5_storage(f, path)
            g = f["model_weights"] if "model_weights" in f and isinstance(f["model_weights"], h5py.Group) else f
            if "layer_names" in g.attrs:
                names = [_decode(n) for n in g.attrs["layer_names"]]
            elif is_keras3_weights(g):
                raise BadpruneError("this is a Keras 3 weights file (.weights.h5)", path,
                                    "load it with --model on a saved .keras model, or save Keras 2 style weights")
            else:
                names = [k for k in g.keys() if isinstance(g[k], h5py.Group)]
            for lname in names:
                if lname not in g:
                    raise BadpruneError(f"layer '{lname}' is listed but missing", path, "the file is damaged")
                lg = g[lname]
                wnames = [_decode(n) for n in lg.attrs.get("weight_names", [])]
                if not wnames:
                    items = []
                    lg.visititems(lambda n, o: items.append(n) if isinstance(o, h5py.Dataset) else None)
                    wnames = items
                ws = {}
                for wn in wnames:
                    if wn not in lg or not isinstance(lg[wn], h5py.Dataset):
                        raise BadpruneError(f"weight '{wn}' of layer '{lname}' is missing", path,
                                            "the file is damaged")
                    ws[wn.rsplit("/", 1)[-1].split(":", 1)[0]] = lg[wn]
                if ws:
                    found[lname] = ws
            if not found:
                raise BadpruneError("the weights file holds no weights", path, "pass a Keras .h5 weights file")
            if fit is not None:
                fit(found)
            return {lname: {k: np.asarray(ds[()]) for k, ds in ws.items()} for lname, ws in found.items()}
    except BadpruneError:
        raise
    except Exception as e:
        raise BadpruneError(f"cannot read the weights ({short(e)})", path, "check the file is complete") from None


#: Keras 2 weight names for layers whose Keras 3 variables are in the same order
_WEIGHT_ORDER = {
    "Conv2D": ("kernel", "bias"), "Dense": ("kernel", "bias"), "DepthwiseConv2D": ("depthwise_kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}


def fit_weights(model, weights: dict, path, arch=None) -> list:
    """Match ``weights`` ({layer: {name: array or unread h5py dataset}}) to the model's layers by name; shapes and
    types must fit exactly. Returns [(layer, [(value, variable), ...])]; reads no values."""
    what = f"the {arch} architecture" if arch else "the model"
    fix = "pass the weights made for this architecture" if arch else "pass weights saved from this model"
    model_layers = {l.name: l for l in model.layers if l.weights}
    extra = sorted(set(weights) - set(model_layers))
    if extra:
        raise BadpruneError(f"weights file does not fit {what}: it has layer(s) {', '.join(extra[:5])} "
                            "that the architecture lacks", path, fix)
    plan = []
    for name, layer in model_layers.items():
        if name not in weights:
            raise BadpruneError(f"weights file does not fit {what}: no weights for layer '{name}'", path, fix)
        ws = weights[name]
        order = _WEIGHT_ORDER.get(type(layer).__name__)
        if order is not None and all(k in ws for k in order[: len(layer.weights)]):
            vals = [ws[k] for k in order[: len(layer.weights)]]
        else:
            vals = list(ws.values())
        if len(vals) != len(layer.weights):
            raise BadpruneError(f"weights file does not fit {what}: layer '{name}' has {len(vals)} weights, "
                                f"expected {len(layer.weights)}", path, fix)
        for v, var in zip(vals, layer.weights):
            if tuple(v.shape) != tuple(var.shape):
                raise BadpruneError(f"weights file does not fit {what}: layer '{name}' weight of shape "
                                    f"{tuple(v.shape)}, expected {tuple(var.shape)}", path, fix)
            if v.dtype.kind != "f":
                raise BadpruneError(f"layer '{name}' has non-finite or non-float weights", path, fix)
        plan.append((layer, list(zip(vals, layer.weights))))
    return plan


def assign_weights(model, weights: dict, path, arch=None):
    """Set each layer's weights from ``weights`` (by layer name); shapes must match exactly, values be finite."""
    fix = "pass the weights made for this architecture" if arch else "pass weights saved from this model"
    for layer, pairs in fit_weights(model, weights, path, arch):
        if not all(np.isfinite(v).all() for v, _ in pairs):
            raise BadpruneError(f"layer '{layer.name}' has non-finite or non-float weights", path, fix)
        layer.set_weights([np.asarray(v, dtype=var.dtype) for v, var in pairs])
