"""Models: safe loading (.h5, .keras, weights + built-in architecture), the DeepID architecture, prune-layer
discovery and channel zeroing (the pruned model B').

Loading never runs code from a model file: the architecture JSON is read and checked first (only built-in Keras
layer and model classes, no ``Lambda``) and Keras' ``safe_mode`` stays on, unless the caller passes ``trust=True``.
"""
from __future__ import annotations

from . import _tf  # noqa: F401  (quiet TensorFlow before keras is imported)

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile

import h5py
import keras
import numpy as np

from .errors import BadpruneError

#: architectures that ``--arch`` can build
ARCHS = ("deepid",)

#: layer classes refused even though Keras ships them: they run code or load files named in the config
_UNSAFE_LAYERS = {"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "Layer", "Wrapper",
                  # text lookups read a vocabulary file named in the config (no image classifier needs them)
                  "TextVectorization", "StringLookup", "IntegerLookup"}
#: model classes accepted (Keras 2 files say 'Model', Keras 3 'Functional')
_MODEL_CLASSES = {"Model", "Functional", "Sequential"}
#: 2-D pooling layers that can be the prune layer by default
_POOL_2D = ("MaxPooling2D", "AveragePooling2D", "MaxPool2D", "AvgPool2D")
#: activations f with f(0) == 0 exactly (zeroing a conv channel's kernel and bias zeroes its output)
_ZERO_KEEPING_ACTIVATIONS = {"linear", "relu", "relu6", "elu", "selu", "tanh", "gelu", "silu", "swish",
                             "leaky_relu", "softsign", "mish", "hard_silu", "hard_swish", "celu"}

#: a .keras file's config.json larger than this is refused before it is read (zip bombs)
_MAX_CONFIG_BYTES = 64 << 20

_TRUST_FIX = "pass --trust-model to run code from the model file (only for files you trust)"


def build_deepid(num_classes: int = 1283, input_shape=(55, 47, 3)) -> keras.Model:
    """The NYU CSAW-HackML lab's DeepID network, with the lab's layer names (so Keras-2 weight files load by name)."""
    L = keras.layers
    x = keras.Input(shape=input_shape, name="input")
    h = L.Conv2D(20, (4, 4), activation="relu", name="conv_1")(x)
    h = L.MaxPooling2D((2, 2), name="pool_1")(h)
    h = L.Conv2D(40, (3, 3), activation="relu", name="conv_2")(h)
    h = L.MaxPooling2D((2, 2), name="pool_2")(h)
    h = L.Conv2D(60, (3, 3), activation="relu", name="conv_3")(h)
    p3 = L.MaxPooling2D((2, 2), name="pool_3")(h)
    f1 = L.Flatten(name="flatten_1")(p3)
    fc1 = L.Dense(160, name="fc_1")(f1)
    c4 = L.Conv2D(80, (2, 2), activation="relu", name="conv_4")(p3)
    f2 = L.Flatten(name="flatten_2")(c4)
    fc2 = L.Dense(160, name="fc_2")(f2)
    add = L.Add(name="add_1")([fc1, fc2])
    act = L.Activation("relu", name="activation_1")(add)
    y = L.Dense(num_classes, activation="softmax", name="output")(act)
    return keras.Model(inputs=x, outputs=y, name="deepid")


_BUILDERS = {"deepid": build_deepid}


# --------------------------------------------------------------------------------------------------------------
# names and small helpers


def model_name(path) -> str:
    """A short name for a model file, for default output folders: 'bd_net' for 'models/bd_net.h5'."""
    base = os.path.basename(os.path.normpath(str(path)))
    for ext in (".weights.h5", ".keras", ".h5", ".hdf5", ".hd5"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    else:
        base = os.path.splitext(base)[0]
    return base or "model"


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


def _short(e: BaseException, limit: int = 200) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _check_file(path, what="model file"):
    path = str(path)
    if not os.path.exists(path):
        raise BadpruneError(f"{what} not found", path, "check the path")
    if os.path.isdir(path):
        raise BadpruneError(f"expected a {what}, got a folder (TensorFlow SavedModel folders are not supported)",
                            path, "save the model as .keras or .h5")
    if not os.path.isfile(path):
        raise BadpruneError(f"the {what} is not a regular file", path, "pass a .keras or .h5 file")
    return path


# --------------------------------------------------------------------------------------------------------------
# safety check of a model config (before anything is deserialized)


def _builtin_layer_classes() -> set:
    names = set()
    for n in dir(keras.layers):
        obj = getattr(keras.layers, n)
        if isinstance(obj, type) and issubclass(obj, keras.layers.Layer):
            names.add(n)
    return names - _UNSAFE_LAYERS


def _iter_layers(cfg):
    """Yield every layer config (dict with class_name) in a model config, nested models and wrappers included."""
    if not isinstance(cfg, dict):
        return
    yield cfg
    inner = cfg.get("config")
    if not isinstance(inner, dict):
        return
    subs = []
    if isinstance(inner.get("layers"), list):
        subs.extend(inner["layers"])
    for key in ("layer", "forward_layer", "backward_layer", "cell"):
        if isinstance(inner.get(key), dict):
            subs.append(inner[key])
    if isinstance(inner.get("cells"), list):
        subs.extend(inner["cells"])
    for s in subs:
        yield from _iter_layers(s)


def _layer_label(cfg) -> str:
    name = cfg.get("name")
    if name is None and isinstance(cfg.get("config"), dict):
        name = cfg["config"].get("name")
    return f"'{name}'" if name else "(unnamed)"


def check_config(config, path=None, trust: bool = False) -> None:
    """Refuse a model config that would run code when deserialized (Lambda, custom or non-Keras classes).

    ``config`` is the parsed model config ({'class_name': ..., 'config': ...}). Does nothing when ``trust``.
    """
    if trust:
        return
    if not isinstance(config, dict) or "class_name" not in config:
        raise BadpruneError("the model file's architecture is not a Keras model config", path,
                            "save the model with model.save('model.keras') or Keras 2 model.save('model.h5')")
    builtin = _builtin_layer_classes()

    # 1. anything anywhere that carries code or points outside Keras
    def scan(obj, owner):
        if isinstance(obj, dict):
            cls = obj.get("class_name")
            if cls and (obj.get("name") or (isinstance(obj.get("config"), dict) and obj["config"].get("name"))):
                owner = _layer_label(obj)
            if cls == "Lambda":
                raise BadpruneError(f"the model has a Lambda layer {_layer_label(obj)}, which runs Python code "
                                    "stored in the file", path, _TRUST_FIX)
            if cls == "__lambda__":
                raise BadpruneError(f"layer {owner} holds a Python lambda (Python code stored in the file)", path,
                                    _TRUST_FIX)
            mod = obj.get("module")
            if isinstance(mod, str) and "class_name" in obj:
                top = mod.split(".", 1)[0]
                if top not in ("keras", "builtins"):
                    raise BadpruneError(f"the model uses {cls} from module '{mod}' (layer {owner}), not part of "
                                        "Keras", path, _TRUST_FIX)
            reg = obj.get("registered_name")
            if isinstance(reg, str) and ">" in reg:
                raise BadpruneError(f"the model uses the custom object '{reg}' (layer {owner})", path, _TRUST_FIX)
            if obj.get("function_type") in ("lambda", "function") and "function" in obj:
                raise BadpruneError(f"layer {owner} stores a Python function", path, _TRUST_FIX)
            for v in obj.values():
                scan(v, owner)
        elif isinstance(obj, list):
            for v in obj:
                scan(v, owner)

    try:
        scan(config, _layer_label(config))
    except RecursionError:
        raise BadpruneError("the model config is nested too deeply to check", path,
                            "save the model with model.save() from Keras") from None

    # 2. every layer must be a built-in Keras layer (or a plain Functional/Sequential model)
    for i, lc in enumerate(_iter_layers(config)):
        cls = lc.get("class_name")
        ok = cls in _MODEL_CLASSES or (i > 0 and cls in builtin)
        if ok:
            continue
        if i == 0:
            raise BadpruneError(f"the model is of class '{cls}', not a built-in Keras model class (custom code)",
                                path, _TRUST_FIX)
        if cls in _UNSAFE_LAYERS:
            raise BadpruneError(f"the model has a layer {_layer_label(lc)} of class '{cls}', which runs code or "
                                "reads files named in the model file", path, _TRUST_FIX)
        raise BadpruneError(f"the model has a layer {_layer_label(lc)} of class '{cls}', which is not a built-in "
                            "Keras class (custom code)", path, _TRUST_FIX)


# --------------------------------------------------------------------------------------------------------------
# legacy (Keras 2) config fix-ups, done in memory on the JSON


def _fix_legacy_config(cfg) -> tuple[dict, bool]:
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
            elif "batch_input_shape" in c and lc.get("class_name") not in _MODEL_CLASSES:
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


# --------------------------------------------------------------------------------------------------------------
# loading


def _read_model_config(path) -> tuple[str, dict]:
    """Return ('keras' | 'h5', config) for a model file, without deserializing anything."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                if "config.json" not in z.namelist():
                    raise BadpruneError("zip file without config.json: not a .keras model", path,
                                        "save the model with model.save('model.keras')")
                if z.getinfo("config.json").file_size > _MAX_CONFIG_BYTES:
                    raise BadpruneError(f"the .keras file's config.json is over {_MAX_CONFIG_BYTES >> 20} MB", path,
                                        "re-save the model with model.save('model.keras')")
                raw = z.read("config.json")
            return "keras", json.loads(raw)
        except BadpruneError:
            raise
        except Exception as e:
            raise BadpruneError(f"cannot read the .keras file ({_short(e)})", path,
                                "re-save the model with model.save('model.keras')") from None
    if not h5py.is_hdf5(path):
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head == b"PK\x03\x04":
            raise BadpruneError("damaged or incomplete .keras file (a zip without its directory)", path,
                                "copy the file again, or re-save it with model.save('model.keras')")
        raise BadpruneError("not a Keras model file (neither .keras zip nor HDF5)", path,
                            "pass a .keras or .h5 model saved with model.save()")
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            looks_weights = raw is None and ("layer_names" in f.attrs or "layers" in f)
            keras3_weights = raw is None and _is_keras3_weights(f)
    except Exception as e:
        raise BadpruneError(f"cannot read the HDF5 file ({_short(e)})", path, "check the file is complete") from None
    if raw is None:
        if keras3_weights:
            raise BadpruneError("this file holds only Keras 3 weights, no architecture", path,
                                "pass the .keras model file saved with model.save('model.keras')")
        if looks_weights:
            raise BadpruneError("this file holds only weights, no architecture", path,
                                "pass it as --weights with --arch deepid")
        raise BadpruneError("HDF5 file without a model config: not a Keras model", path,
                            "pass a model saved with model.save()")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        return "h5", json.loads(str(raw))
    except Exception as e:
        raise BadpruneError(f"the model config is not valid JSON ({_short(e)})", path) from None


def _load_full_model(path, trust: bool):
    kind, config = _read_model_config(path)
    check_config(config, path, trust)
    tmpdir = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "keras":
                load_path = path
                if not path.endswith(".keras"):  # Keras insists on the extension
                    tmpdir = tempfile.mkdtemp(prefix="badprune-")
                    load_path = os.path.join(tmpdir, "model.keras")
                    os.symlink(os.path.abspath(path), load_path)
                return keras.saving.load_model(load_path, compile=False, safe_mode=not trust)
            fixed, changed = _fix_legacy_config(config)
            load_path = path
            if changed or not path.lower().endswith((".h5", ".hdf5")):
                tmpdir = tempfile.mkdtemp(prefix="badprune-")
                load_path = os.path.join(tmpdir, "model.h5")
                if changed:
                    shutil.copyfile(path, load_path)
                    with h5py.File(load_path, "r+") as f:
                        f.attrs["model_config"] = json.dumps(fixed).encode("utf-8")
                else:
                    os.symlink(os.path.abspath(path), load_path)
            return keras.saving.load_model(load_path, compile=False, safe_mode=not trust)
    except BadpruneError:
        raise
    except Exception as e:
        raise BadpruneError(f"cannot load the Keras model ({_short(e)})", path,
                            "check the file was saved with model.save() by Keras 2.x or 3.x") from None
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _is_keras3_weights(g) -> bool:
    """A Keras 3 ``.weights.h5`` file: groups ``layers/<name>/vars`` and no Keras 2 ``layer_names``."""
    return "layer_names" not in g.attrs and isinstance(g.get("layers"), h5py.Group) \
        and ("vars" in g or any(isinstance(v, h5py.Group) and "vars" in v for v in g["layers"].values()))


def _decode(v):
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def read_weight_file(path) -> dict:
    """Read a Keras 2 HDF5 weights file (``<layer>/<layer>/kernel:0``) into {layer: {weight_name: array}}.

    Also accepts a full Keras 2 model file (weights under ``model_weights``). Weight names are the base names
    ('kernel', 'bias', ...), in the file's order.
    """
    path = _check_file(path, "weights file")
    if not h5py.is_hdf5(path):
        raise BadpruneError("not an HDF5 weights file", path, "pass a Keras .h5 weights file")
    out = {}
    try:
        with h5py.File(path, "r") as f:
            g = f["model_weights"] if "model_weights" in f and isinstance(f["model_weights"], h5py.Group) else f
            if "layer_names" in g.attrs:
                names = [_decode(n) for n in g.attrs["layer_names"]]
            elif _is_keras3_weights(g):
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
                    found = []
                    lg.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
                    wnames = found
                ws = {}
                for wn in wnames:
                    if wn not in lg:
                        raise BadpruneError(f"weight '{wn}' of layer '{lname}' is missing", path,
                                            "the file is damaged")
                    arr = np.asarray(lg[wn][()])
                    base = wn.rsplit("/", 1)[-1].split(":", 1)[0]
                    ws[base] = arr
                if ws:
                    out[lname] = ws
    except BadpruneError:
        raise
    except Exception as e:
        raise BadpruneError(f"cannot read the weights ({_short(e)})", path, "check the file is complete") from None
    if not out:
        raise BadpruneError("the weights file holds no weights", path, "pass a Keras .h5 weights file")
    return out


#: Keras 2 weight names for layers whose Keras 3 variables are in the same order
_WEIGHT_ORDER = {
    "Conv2D": ("kernel", "bias"), "Dense": ("kernel", "bias"), "DepthwiseConv2D": ("depthwise_kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}


def _assign_weights(model, weights: dict, path, arch=None):
    """Set each layer's weights from ``weights`` (by layer name); shapes must match exactly."""
    what = f"the {arch} architecture" if arch else "the model"
    fix = "pass the weights made for this architecture" if arch else "pass weights saved from this model"
    model_layers = {l.name: l for l in model.layers if l.weights}
    extra = sorted(set(weights) - set(model_layers))
    if extra:
        raise BadpruneError(f"weights file does not fit {what}: it has layer(s) {', '.join(extra[:5])} "
                            "that the architecture lacks", path, fix)
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
            if v.dtype.kind != "f" or not np.isfinite(v).all():
                raise BadpruneError(f"layer '{name}' has non-finite or non-float weights", path, fix)
        layer.set_weights([np.asarray(v, dtype=var.dtype) for v, var in zip(vals, layer.weights)])


def _load_arch_weights(weights_path, arch):
    arch = (arch or "deepid").lower()
    if arch not in _BUILDERS:
        raise BadpruneError(f"unknown architecture '{arch}'", fix=f"use one of: {', '.join(ARCHS)}")
    ws = read_weight_file(weights_path)
    if "output" not in ws or "bias" not in ws["output"] or ws["output"]["bias"].ndim != 1:
        raise BadpruneError(f"weights file does not fit the {arch} architecture (no 'output' layer bias)",
                            weights_path, "pass the weights made for this architecture")
    n = int(ws["output"]["bias"].shape[0])
    if n < 2:
        raise BadpruneError(f"the 'output' layer has {n} class(es)", weights_path)
    model = _BUILDERS[arch](n)
    _assign_weights(model, ws, weights_path, arch)
    return model


def load_model(model=None, weights=None, arch=None, trust: bool = False) -> keras.Model:
    """Load the network to defend.

    * ``model=PATH``: a full Keras model (.keras, or HDF5 .h5 from Keras 2.x/3.x). Its config is checked before
      anything is deserialized; Lambda layers and non-built-in classes are refused unless ``trust``.
    * ``weights=PATH`` (with ``arch``, default 'deepid'): build the architecture, with the number of classes read
      from the weights file, and load the weights by layer name.
    * both ``model`` and ``weights``: load the model, then overwrite its weights by layer name.

    Always uncompiled. Every failure raises :class:`BadpruneError`.
    """
    if model is None and weights is None:
        raise BadpruneError("no model given", fix="pass --model FILE, or --weights FILE --arch deepid")
    if model is not None and arch is not None:
        raise BadpruneError("--arch goes with --weights, not with --model", fix="pass either --model or --arch")
    if model is None:
        return _load_arch_weights(weights, arch)
    path = _check_file(model, "model file")
    m = _load_full_model(path, trust)
    if not isinstance(m, keras.Model):
        raise BadpruneError("the file does not hold a Keras model", path)
    if weights is not None:
        _assign_weights(m, read_weight_file(weights), weights)
    return m


# --------------------------------------------------------------------------------------------------------------
# graph analysis (from the model config, public API only)


def _history_names(obj, out):
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            hist = obj.get("config", {}).get("keras_history")
            if hist:
                out.append(hist[0])
            return
        for v in obj.values():
            _history_names(v, out)
    elif isinstance(obj, (list, tuple)):
        # legacy node format: [layer_name, node_index, tensor_index, kwargs]
        if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int) and isinstance(obj[2], int):
            out.append(obj[0])
            return
        for v in obj:
            _history_names(v, out)


_SEQ_INPUT = "\0input"  # the (unlisted) input of a Sequential model


class _Graph:
    """Layer connectivity of a Functional or Sequential model (top level; nested models count as one layer)."""

    def __init__(self, model):
        self.model = model
        self.layers = {l.name: l for l in model.layers}
        self.parents: dict[str, list[str]] = {}
        self.n_nodes: dict[str, int] = {}
        if isinstance(model, keras.Sequential):
            names = [_SEQ_INPUT] + [l.name for l in model.layers]
            for i, n in enumerate(names):
                self.parents[n] = [names[i - 1]] if i else []
                self.n_nodes[n] = 1
            self.outputs = [names[-1]]
            self.inputs = [_SEQ_INPUT]
        else:
            cfg = model.get_config()
            for lc in cfg["layers"]:
                name = lc.get("name") or lc["config"]["name"]
                nodes = lc.get("inbound_nodes") or []
                ps = []
                _history_names(nodes, ps)
                self.parents[name] = list(dict.fromkeys(ps))
                self.n_nodes[name] = max(len(nodes), 1)
            self.outputs = self._names(cfg.get("output_layers"))
            self.inputs = self._names(cfg.get("input_layers"))
        self.children: dict[str, list[str]] = {n: [] for n in self.parents}
        self.uses: dict[str, int] = {n: 0 for n in self.parents}
        if not isinstance(model, keras.Sequential):
            for lc in model.get_config()["layers"]:
                name = lc.get("name") or lc["config"]["name"]
                refs = []
                _history_names(lc.get("inbound_nodes") or [], refs)
                for p in refs:
                    self.uses[p] = self.uses.get(p, 0) + 1
                for p in dict.fromkeys(refs):
                    self.children.setdefault(p, []).append(name)
        else:
            for n, ps in self.parents.items():
                for p in ps:
                    self.children[p].append(n)
                    self.uses[p] += 1
        for o in self.outputs:
            self.uses[o] = self.uses.get(o, 0) + 1
        self.order = [n for n in self._topo() if n in self.layers]

    @staticmethod
    def _names(spec):
        if not spec:
            return []
        if isinstance(spec[0], str):
            return [spec[0]]
        return [s[0] for s in spec]

    def _topo(self):
        order, seen = [], set()
        pos = {n: i for i, n in enumerate(self.parents)}

        def visit(n):
            if n in seen:
                return
            seen.add(n)
            for p in sorted(self.parents.get(n, []), key=lambda q: pos.get(q, 0)):
                visit(p)
            order.append(n)

        for n in self.parents:
            visit(n)
        return order

    def ancestors(self, names) -> set:
        out, stack = set(), list(names)
        while stack:
            n = stack.pop()
            for p in self.parents.get(n, []):
                if p not in out:
                    out.add(p)
                    stack.append(p)
        return out

    def feeds_output(self, name) -> bool:
        return name in self.outputs or name in self.ancestors(self.outputs)

    def separates(self, name) -> bool:
        """True when every path from the inputs to the outputs passes through ``name``."""
        reach, stack = set(), [i for i in self.inputs if i != name]
        while stack:
            n = stack.pop()
            if n in reach:
                continue
            reach.add(n)
            stack.extend(c for c in self.children.get(n, []) if c != name)
        return not any(o in reach for o in self.outputs)


def _output_shape(layer):
    try:
        return tuple(layer.output.shape)
    except Exception:
        return None


def _is_channels_last_4d(layer) -> bool:
    shape = _output_shape(layer)
    if shape is None or len(shape) != 4:
        return False
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def find_prune_layer(model, name: str | None = None) -> str:
    """The layer whose channels are pruned: by default the last 2-D pooling layer whose 4-D channels-last output
    feeds the model output and separates it from the input (DeepID: 'pool_3'); or the named layer, checked."""
    g = _Graph(model)
    if name is not None:
        if name not in g.layers:
            choices = ", ".join(n for n in g.order if _is_channels_last_4d(g.layers[n]) and n not in g.inputs
                                and type(g.layers[n]).__name__ != "InputLayer")
            raise BadpruneError(f"the model has no layer '{name}'", fix=f"pick one of: {choices}")
        layer = g.layers[name]
        shape = _output_shape(layer)
        if shape is None or len(shape) != 4:
            raise BadpruneError(f"layer '{name}' outputs shape {shape}, not 4-D images (batch, H, W, channels)",
                                fix="pick a convolution or pooling layer")
        if not _is_channels_last_4d(layer):
            raise BadpruneError(f"layer '{name}' is channels-first", fix="pick a channels-last layer")
        if name in g.inputs or type(layer).__name__ == "InputLayer":
            raise BadpruneError(f"layer '{name}' is the model's input", fix="pick a convolution or pooling layer")
        if not g.feeds_output(name):
            raise BadpruneError(f"layer '{name}' does not feed the model output", fix="pick a layer on the path to "
                                "the output")
        if not g.separates(name):
            raise BadpruneError(f"layer '{name}' does not cut the model in two (another path bypasses it)",
                                fix="pick a layer every path from input to output goes through")
        return name
    pools = [n for n in g.order if type(g.layers[n]).__name__ in _POOL_2D]
    if not pools:
        raise BadpruneError("the model has no 2-D pooling layer to prune", fix="name the layer with --layer")
    for n in reversed(pools):
        if _is_channels_last_4d(g.layers[n]) and g.feeds_output(n) and g.separates(n):
            return n
    raise BadpruneError("no pooling layer feeds the output on its own (channels-last, no bypass)",
                        fix="name the layer with --layer")


def _activation_name(layer) -> str | None:
    act = getattr(layer, "activation", None)
    if act is None:
        return "linear"
    return getattr(act, "__name__", None)


def _keeps_zero(layer) -> bool:
    """True for per-channel layers that map a channel that is all zero to all zero (in inference)."""
    cls = type(layer).__name__
    if cls in _POOL_2D:
        return layer.data_format == "channels_last"
    if cls in ("Dropout", "SpatialDropout2D", "GaussianDropout", "GaussianNoise", "AlphaDropout", "Identity",
               "ZeroPadding2D", "Cropping2D", "ActivityRegularization"):
        return True
    if cls == "Activation":
        return _activation_name(layer) in _ZERO_KEEPING_ACTIVATIONS
    if cls == "ReLU":
        return float(layer.negative_slope) == 0.0 or float(layer.threshold) == 0.0
    if cls in ("LeakyReLU", "ELU"):
        return True
    return False


def conv_producer(model, layer: str) -> str | None:
    """The Conv2D layer whose output channel c becomes channel c of ``layer`` through zero-keeping per-channel ops,
    so zeroing its kernel[..., c] and bias[c] makes that channel exactly 0. None when there is none."""
    g = _Graph(model)
    if layer not in g.layers:
        raise BadpruneError(f"the model has no layer '{layer}'")
    cur = layer
    while cur in g.layers:
        lay = g.layers[cur]
        if g.n_nodes.get(cur, 1) != 1:
            return None  # a shared layer: zeroing it would change its other calls too
        if cur != layer and g.uses.get(cur, 0) != 1:
            return None  # its output is used elsewhere too
        cls = type(lay).__name__
        if cls in ("Conv2D", "Convolution2D"):
            if lay.data_format != "channels_last":
                return None
            if _activation_name(lay) not in _ZERO_KEEPING_ACTIVATIONS:
                return None
            return cur
        if not _keeps_zero(lay):
            return None
        ps = g.parents.get(cur, [])
        if len(ps) != 1:
            return None
        cur = ps[0]
    return None


def _check_channels(model, layer, channels) -> list:
    n = int(model.get_layer(layer).output.shape[-1])
    chans = [int(c) for c in np.asarray(list(channels), dtype=np.int64).reshape(-1)]
    bad = [c for c in chans if not 0 <= c < n]
    if bad:
        raise BadpruneError(f"channel {bad[0]} is out of range for layer '{layer}' ({n} channels)")
    return sorted(set(chans))


def _clone(model):
    new = keras.models.clone_model(model)
    new.set_weights(model.get_weights())
    return new


def prune_model(model, layer: str, channels) -> keras.Model:
    """A copy of ``model`` with ``channels`` of ``layer`` pruned (the original is not touched).

    Zeroes the producing convolution's kernel[..., c] and bias[c] when there is one (:func:`conv_producer`);
    otherwise inserts after ``layer`` a 1x1 DepthwiseConv2D named '<layer>_prune_mask' whose weights are the 0/1
    channel mask. Either way the result is a plain Keras model with the original layer names.
    """
    chans = _check_channels(model, layer, channels)
    conv = conv_producer(model, layer)
    if conv is not None:
        new = _clone(model)
        cl = new.get_layer(conv)
        ws = [np.array(w) for w in cl.get_weights()]
        ws[0][..., chans] = 0
        if cl.use_bias:
            ws[1][chans] = 0
        cl.set_weights(ws)
        return new

    n = int(model.get_layer(layer).output.shape[-1])
    mask = np.ones(n, np.float32)
    mask[chans] = 0
    existing = {l.name for l in model.layers}
    mname = f"{layer}_prune_mask"
    k = 1
    while mname in existing:
        k += 1
        mname = f"{layer}_prune_mask_{k}"

    def make_mask():
        return keras.layers.DepthwiseConv2D(1, use_bias=False, name=mname)

    if isinstance(model, keras.Sequential):
        new_layers = []
        mask_layer = None
        for l in model.layers:
            new_layers.append(l.__class__.from_config(l.get_config()))
            if l.name == layer:
                mask_layer = make_mask()
                new_layers.append(mask_layer)
        hist = getattr(model.inputs[0], "_keras_history", None)
        inp = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype,
                          name=hist[0].name if hist else None)
        new = keras.Sequential([inp] + new_layers, name=model.name)
    else:
        holder = {}

        def call_function(lay, *args, **kwargs):
            out = lay(*args, **kwargs)
            if lay.name == layer:
                holder["mask"] = make_mask()
                out = holder["mask"](out)
            return out

        new = keras.models.clone_model(model, call_function=call_function)
        mask_layer = holder["mask"]
    for l in model.layers:
        if l.weights:
            new.get_layer(l.name).set_weights(l.get_weights())
    mask_layer.set_weights([mask.reshape(1, 1, n, 1)])
    return new


# --------------------------------------------------------------------------------------------------------------
# identity


_NO_EFFECT_KEYS = ("_initializer", "_regularizer", "_constraint")


def _arch_only(obj):
    """The config without what cannot change the model's outputs (initializers, regularizers, constraints,
    trainable flags, object ids), and with input/output layer lists in one form."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in ("shared_object_id", "trainable") or k.endswith(_NO_EFFECT_KEYS):
                continue
            if k in ("input_layers", "output_layers") and isinstance(v, (list, tuple)) and v \
                    and isinstance(v[0], str):
                v = [v]
            out[k] = _arch_only(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_arch_only(v) for v in obj]
    return obj


def model_digest(model) -> str:
    """sha256 over the architecture (config JSON without the model's own name) and every weight (dtype, shape,
    bytes), for cache keys."""
    h = hashlib.sha256()
    try:
        cfg = _arch_only(model.get_config())
        if isinstance(cfg, dict):
            cfg = {k: v for k, v in cfg.items() if k != "name"}
        h.update(json.dumps({"class": type(model).__name__, "config": cfg}, sort_keys=True, default=str).encode())
    except Exception:  # pragma: no cover - models without a config: weights only, plus the layer list
        h.update(json.dumps([(l.name, type(l).__name__) for l in model.layers]).encode())
    for w in model.weights:
        a = np.ascontiguousarray(np.asarray(w.numpy() if hasattr(w, "numpy") else w))
        h.update(f"{w.path if hasattr(w, 'path') else ''}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()
