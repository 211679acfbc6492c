"""The safety check of a model config, run before anything in it is deserialized: only built-in Keras layer and
model classes, no ``Lambda``, no custom or foreign modules, no stored Python functions (unless trusted).

A GoodNet graph (:mod:`badprune.goodnet`) and a repaired R_X's filters (:class:`badprune.filters.Filters`) also hold a
few ``keras.ops`` nodes at their top level; with ``graph_ops=True`` exactly those (:data:`GRAPH_OPS`, plain arguments
only) are accepted besides layers.
"""
from __future__ import annotations

from ..errors import BadpruneError

#: layer classes refused even though Keras ships them: they run code or load files named in the config
UNSAFE_LAYERS = {"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "Layer", "Wrapper",
                  # text lookups read a vocabulary file named in the config (no image classifier needs them)
                  "TextVectorization", "StringLookup", "IntegerLookup"}
#: model classes accepted (Keras 2 files say 'Model', Keras 3 'Functional')
MODEL_CLASSES = {"Model", "Functional", "Sequential"}

TRUST_FIX = "pass --trust-model to run code from the model file (only for files you trust)"

#: keras.ops operations a GoodNet graph or R_X's filters may hold (besides built-in layers), with the config keys
#: each may carry
GRAPH_OPS = {"TopK": {"k", "sorted"}, "Squeeze": {"axis"}, "Equal": set(), "Where": set(), "Cast": {"dtype"},
             "ExpandDims": {"axis"}, "Multiply": set(), "Subtract": set(), "Greater": set(), "Relu": set(),
             "Einsum": {"subscripts"}}
#: config values an operation must have exactly (R_X's direction removal: its two einsums, and no other)
GRAPH_OP_VALUES = {"Einsum": {"subscripts": ("bhwc,hwc->b", "b,hwc->bhwc")}}


def _builtin_layer_classes() -> set:
    from .. import _tf  # noqa: F401  (quiet TensorFlow before keras is imported)
    import keras

    names = set()
    for n in dir(keras.layers):
        obj = getattr(keras.layers, n)
        if isinstance(obj, type) and issubclass(obj, keras.layers.Layer):
            names.add(n)
    return names - UNSAFE_LAYERS


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


def check_config(config, path=None, trust: bool = False, graph_ops: bool = False, keras_free: bool = False) -> bool:
    """Refuse a model config that would run code when deserialized (Lambda, custom or non-Keras classes).

    Parameters
    ----------
    config : dict
        The parsed model config (``{'class_name': ..., 'config': ...}``).
    path : str, optional
        The file, named in the error.
    trust : bool
        Accept anything (nothing is checked).
    graph_ops : bool
        Also accept the top-level ``keras.ops`` nodes of :data:`GRAPH_OPS` (a GoodNet graph, R_X's filters), with
        the values of :data:`GRAPH_OP_VALUES`.
    keras_free : bool
        Without importing Keras (a warm run's cached templates, Keras 3 configs): a layer must name the module
        ``keras.layers`` and a class not in :data:`UNSAFE_LAYERS`, instead of being one of Keras's layer classes.

    Returns
    -------
    bool
        True when the config holds such ``keras.ops`` nodes (only with ``graph_ops``).

    Raises
    ------
    BadpruneError
        Naming the offending layer or class.
    """
    if trust:
        return False
    if graph_ops:
        config, had_ops = _without_graph_ops(config)
    else:
        had_ops = False
    if not isinstance(config, dict) or "class_name" not in config:
        raise BadpruneError("the model file's architecture is not a Keras model config", path,
                            "save the model with model.save('model.keras') or Keras 2 model.save('model.h5')")
    builtin = None if keras_free else _builtin_layer_classes()

    # 1. anything anywhere that carries code or points outside Keras
    def scan(obj, owner):
        if isinstance(obj, dict):
            cls = obj.get("class_name")
            if cls and (obj.get("name") or (isinstance(obj.get("config"), dict) and obj["config"].get("name"))):
                owner = _layer_label(obj)
            if cls == "Lambda":
                raise BadpruneError(f"the model has a Lambda layer {_layer_label(obj)}, which runs Python code "
                                    "stored in the file", path, TRUST_FIX)
            if cls == "__lambda__":
                raise BadpruneError(f"layer {owner} holds a Python lambda (Python code stored in the file)", path,
                                    TRUST_FIX)
            mod = obj.get("module")
            if isinstance(mod, str) and "class_name" in obj:
                top = mod.split(".", 1)[0]
                if top not in ("keras", "builtins"):
                    raise BadpruneError(f"the model uses {cls} from module '{mod}' (layer {owner}), not part of "
                                        "Keras", path, TRUST_FIX)
            reg = obj.get("registered_name")
            if isinstance(reg, str) and ">" in reg:
                raise BadpruneError(f"the model uses the custom object '{reg}' (layer {owner})", path, TRUST_FIX)
            if obj.get("function_type") in ("lambda", "function") and "function" in obj:
                raise BadpruneError(f"layer {owner} stores a Python function", path, TRUST_FIX)
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
        if builtin is None:
            ok = cls in MODEL_CLASSES or (i > 0 and lc.get("module") == "keras.layers" and cls not in UNSAFE_LAYERS)
        else:
            ok = cls in MODEL_CLASSES or (i > 0 and cls in builtin)
        if ok:
            continue
        if i == 0:
            raise BadpruneError(f"the model is of class '{cls}', not a built-in Keras model class (custom code)",
                                path, TRUST_FIX)
        if cls in UNSAFE_LAYERS:
            raise BadpruneError(f"the model has a layer {_layer_label(lc)} of class '{cls}', which runs code or "
                                "reads files named in the model file", path, TRUST_FIX)
        raise BadpruneError(f"the model has a layer {_layer_label(lc)} of class '{cls}', which is not a built-in "
                            "Keras class (custom code)", path, TRUST_FIX)
    return had_ops


def _without_graph_ops(config) -> tuple:
    """(config without its top-level :data:`GRAPH_OPS` nodes, whether it had any)."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        return config, False
    inner = config["config"]
    layers = inner.get("layers")
    if not isinstance(layers, list):
        return config, False
    kept = [lc for lc in layers if not _is_graph_op(lc)]
    return dict(config, config=dict(inner, layers=kept)), len(kept) != len(layers)


def _is_graph_op(lc) -> bool:
    """A top-level functional node that is one of the allowed ``keras.ops`` operations (nothing else in it)."""
    if not isinstance(lc, dict):
        return False
    mod = lc.get("module")
    cls = lc.get("class_name")
    cfg = lc.get("config")
    return (isinstance(mod, str) and mod.startswith("keras.src.ops.") and cls in GRAPH_OPS
            and lc.get("registered_name") in (None, cls) and isinstance(cfg, dict)
            and set(cfg) <= {"name", "dtype"} | GRAPH_OPS[cls]
            and all(isinstance(v, (str, int, float, bool, type(None))) for v in cfg.values())
            and all(cfg.get(k) in allowed for k, allowed in GRAPH_OP_VALUES.get(cls, {}).items())
            and _plain(lc.get("inbound_nodes")) and set(lc) <= {"module", "class_name", "config", "registered_name",
                                                                "name", "inbound_nodes", "build_config"})


def _plain(obj) -> bool:
    """Node arguments made only of tensor references, constant arrays and plain values (no serialized objects)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    if isinstance(obj, dict):
        if "class_name" in obj:
            cfg = obj.get("config")
            if obj["class_name"] == "__numpy__":  # a constant array: numbers and a dtype name only
                return isinstance(cfg, dict) and set(cfg) <= {"value", "dtype"} and _numbers(cfg.get("value")) \
                    and isinstance(cfg.get("dtype"), str)
            return obj["class_name"] == "__keras_tensor__" and _plain(cfg)
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    return False


def _numbers(obj) -> bool:
    if isinstance(obj, (list, tuple)):
        return all(_numbers(v) for v in obj)
    return isinstance(obj, (int, float)) and not isinstance(obj, bool)
