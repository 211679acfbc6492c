"""GoodNet as one Keras graph, and loading / running any of B, B'_X and G_X.

``build_goodnet(B, layer, channels)`` returns G_X as a single functional model::

    input -> B's trunk up to the prune layer (computed once)
          -> B's head                                   -> argmax -> label_B
          -> 1x1 DepthwiseConv2D 0/1 mask -> B's head   -> argmax -> label_B'
    label = label_B where label_B == label_B', else N (the number of classes: "backdoored input detected")

The mask sits right after the prune layer, so the trunk is shared. That equals B'_X (whose producing convolution
has the channels' kernel and bias zeroed, :func:`badprune.models.prune_model`): those channels reach the prune
layer through zero-keeping per-channel ops only, so they are exactly 0 there either way. Both heads use the same
layer objects (shared weights, stored once).

The model has two outputs, in this order:

* ``label``: int32 (n,), in [0, N];
* ``probs``: float32 (n, N + 1): B's class probabilities with a 0 appended where B and B'_X agree, the one-hot
  vector of class N where they differ, so ``argmax(probs) == label`` (the lab's ``eval.py`` style).

Everything in the graph is a built-in Keras layer or a ``keras.ops`` operation from :data:`GRAPH_OPS` (top_k,
squeeze, equal, where, ...; argmax is written as top_k with k=1, which LiteRT runs with builtin kernels, while
``keras.ops.argmax`` on floats is not convertible): Keras 3 stores those in ``.keras`` files, and
``keras.models.load_model`` opens them with ``safe_mode`` on and without badprune installed. :func:`load` is
badprune's safe loader for all three kinds (B, B'_X, G_X).

How a model is told apart (:func:`model_kind`): a model with a rank-1 output (a label per image) is a GoodNet;
its N is the width of its (n, K) output minus one, or must be given. A single (n, K) output is a classifier
(B or B'_X) with N = K, unless the caller says it is a GoodNet (``goodnet=True``: N = K - 1, label = argmax).
"""
from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np

from .errors import BadpruneError


def _keras():
    """Keras (and TensorFlow), imported on first use: :class:`Kind` and :func:`kind_from_shapes` serve the
    TensorFlow-free runtime too."""
    try:
        from . import _tf  # noqa: F401  (quiet TensorFlow before keras is imported)
        import keras
    except ImportError as e:
        raise BadpruneError(f"Keras models need TensorFlow, which is not installed ({e})",
                            fix="export the model to .tflite (badprune-fast export) and run that, or install "
                                "tensorflow") from None
    return keras


def _mods():
    from . import models

    return models


#: keras.ops operations a GoodNet graph may hold (besides built-in layers), with the config keys each may carry;
#: :func:`load` accepts exactly these
GRAPH_OPS = {"TopK": {"k", "sorted"}, "Squeeze": {"axis"}, "Equal": set(), "Where": set(), "Cast": {"dtype"},
             "ExpandDims": {"axis"}, "Multiply": set(), "Subtract": set()}


def fmt_x(x) -> str:
    """A threshold as text, as in file names: ``4``, ``2.5``."""
    x = float(x)
    if math.isfinite(x) and x.is_integer():
        return str(int(x))
    return repr(x)


def goodnet_filename(x, ext: str = ".keras") -> str:
    """``goodnet_X4.keras`` (or with another extension)."""
    return f"goodnet_X{fmt_x(x)}{ext}"


# --------------------------------------------------------------------------------------------------------------
# building


def _clone(model):
    """A copy with fresh layers and the same weights (building G must not add nodes to B's layers)."""
    new = _keras().models.clone_model(model)
    new.set_weights(model.get_weights())
    return new


def _replay(out_tensor, start_tensor, new_start):
    """Call again the layers between ``start_tensor`` and ``out_tensor`` (the same layer objects: shared
    weights), starting from ``new_start``; return the new output tensor."""
    memo = {id(start_tensor): new_start}

    def visit(t):
        if id(t) in memo:
            return memo[id(t)]
        hist = getattr(t, "_keras_history", None)
        if hist is None:
            raise BadpruneError(f"cannot trace the model graph at tensor {t}")
        op, node_index, _ = hist
        nodes = getattr(op, "_inbound_nodes", None)
        if type(op).__name__ == "InputLayer" or not nodes:
            raise BadpruneError(f"layer '{op.name}' reaches the output without passing through the prune layer",
                                fix="choose a prune layer every path goes through (--layer)")
        node = nodes[node_index]
        for x in node.input_tensors:
            visit(x)
        args, kwargs = node.arguments.fill_in(memo)
        outs = _keras().tree.flatten(op(*args, **kwargs))
        for old, new in zip(node.output_tensors, outs):
            memo[id(old)] = new
        return memo[id(t)]

    return visit(out_tensor)


def _ends_in_softmax(model) -> bool:
    hist = getattr(model.outputs[0], "_keras_history", None)
    if hist is None:
        return False
    op = hist[0]
    if type(op).__name__ == "Softmax":
        return True
    act = getattr(op, "activation", None)
    return getattr(act, "__name__", None) == "softmax"


def _argmax(t):
    """argmax over the last axis as top_k(k=1) (the lowest index wins ties, like numpy). ``keras.ops.argmax`` on
    floats adds a negative-zero fix (a bitwise AND) that LiteRT has no builtin kernel for."""
    ops = _keras().ops
    _, idx = ops.top_k(t, k=1)
    return ops.squeeze(idx, axis=-1)


def build_goodnet(model, layer: str, channels, name: str | None = None):
    """G(B, B') as one graph: B's trunk once, B's head and B's head after a 0/1 channel mask, outputs
    ``[label, probs]`` (see the module docstring). ``model`` (B) is not modified."""
    if len(model.inputs) != 1:
        raise BadpruneError(f"the model has {len(model.inputs)} inputs", fix="use a model with one image input")
    keras = _keras()
    models = _mods()
    n_classes = models.num_classes(model)
    Bc = _clone(model)
    try:
        start = Bc.get_layer(layer).output
    except (ValueError, AttributeError) as e:
        raise BadpruneError(f"layer '{layer}' cannot be the prune layer ({e})",
                            fix="pick a layer used once in the model") from None
    if len(start.shape) != 4:
        raise BadpruneError(f"prune layer '{layer}' outputs shape {tuple(start.shape)}, not (batch, H, W, C)")
    C = int(start.shape[-1])
    chans = sorted({int(c) for c in np.asarray(list(channels), dtype=np.int64).reshape(-1)})
    bad = [c for c in chans if not 0 <= c < C]
    if bad:
        raise BadpruneError(f"channel {bad[0]} is out of range for layer '{layer}' ({C} channels)")
    mask = np.ones(C, np.float32)
    mask[chans] = 0
    existing = {l.name for l in Bc.layers}

    def unique(name):
        new, k = name, 1
        while new in existing:
            k += 1
            new = f"{name}_{k}"
        existing.add(new)
        return new

    mask_layer = keras.layers.DepthwiseConv2D(1, use_bias=False, name=unique(f"{layer}_prune_mask"))
    masked = mask_layer(start)
    mask_layer.set_weights([mask.reshape(1, 1, C, 1)])

    ops = keras.ops
    p_b = Bc.outputs[0]
    p_p = _replay(p_b, start, masked)
    l_b = _argmax(p_b)
    l_p = _argmax(p_p)
    agree = ops.equal(l_b, l_p)
    label = keras.layers.Identity(name=unique("label"))(ops.where(agree, l_b, n_classes))
    probs = p_b if _ends_in_softmax(Bc) else keras.layers.Softmax(name=unique("goodnet_softmax"))(p_b)
    a = ops.cast(ops.expand_dims(agree, -1), probs.dtype)
    probs = keras.layers.Concatenate(axis=-1, name=unique("probs"))([ops.multiply(probs, a), ops.subtract(1.0, a)])
    return keras.Model(Bc.inputs, [label, probs], name=name or "goodnet")


def from_sweep(result, x):
    """G_X of a :class:`badprune.sweep.SweepResult` (B = ``result.model``; channels of the threshold X)."""
    t = result.threshold(x)
    if not t.reached:
        raise BadpruneError(f"threshold {fmt_x(x)} was never reached: there is no G_{fmt_x(x)}")
    if result.model is None:
        raise BadpruneError("the sweep result holds no model")
    return build_goodnet(result.model, result.layer, t.channels, name=f"goodnet_X{fmt_x(x)}")


# --------------------------------------------------------------------------------------------------------------
# kinds of models


@dataclass
class Kind:
    """What a model's outputs mean. ``goodnet``: labels in [0, N] with N = backdoor detected.
    ``label_output`` / ``score_output``: indices of the (n,) label and (n, K) score outputs (None if absent)."""

    goodnet: bool
    num_classes: int | None          # N (a GoodNet answers 0..N; a classifier 0..N-1)
    label_output: int | None
    score_output: int | None

    @property
    def name(self) -> str:
        return "GoodNet" if self.goodnet else "classifier"


def kind_from_shapes(shapes, goodnet: bool = False, num_classes: int | None = None, what: str = "model") -> Kind:
    """Decide the kind from output shapes (each a tuple, batch axis first). See the module docstring."""
    rank1 = [i for i, s in enumerate(shapes) if len(s) == 1]
    rank2 = [i for i, s in enumerate(shapes) if len(s) == 2]
    if len(rank1) + len(rank2) != len(shapes) or len(rank1) > 1 or len(rank2) > 1 or not shapes:
        raise BadpruneError(f"the {what} has outputs of shapes {[tuple(s) for s in shapes]}",
                            fix="use a classifier with one (batch, classes) output, or a badprune GoodNet")
    if rank1:
        n = None
        if rank2 and shapes[rank2[0]][-1] is not None:
            n = int(shapes[rank2[0]][-1]) - 1
        if num_classes is not None:
            if n is not None and n != num_classes:
                raise BadpruneError(f"--num-classes {num_classes} does not fit the GoodNet's {n + 1}-wide output")
            n = int(num_classes)
        if n is None:
            raise BadpruneError(f"the {what} outputs labels but no scores, so its N is unknown",
                                fix="pass --num-classes N")
        return Kind(True, n, rank1[0], rank2[0] if rank2 else None)
    k = shapes[rank2[0]][-1]
    if k is None:
        raise BadpruneError(f"the {what}'s output has no fixed number of classes")
    k = int(k)
    if goodnet:
        return Kind(True, k - 1, None, rank2[0])
    if num_classes is not None and num_classes != k:
        raise BadpruneError(f"--num-classes {num_classes} does not fit the model's {k} classes",
                            fix="pass --goodnet if the last class means 'backdoor detected'")
    return Kind(False, k, None, rank2[0])


def model_kind(model, goodnet: bool = False, num_classes: int | None = None) -> Kind:
    """The :class:`Kind` of a Keras model."""
    return kind_from_shapes([tuple(o.shape) for o in model.outputs], goodnet, num_classes)


def labels_from_outputs(outs, kind: Kind) -> np.ndarray:
    """int64 labels from a model's outputs (a list in output order): the label output, else argmax of scores."""
    if kind.label_output is not None:
        return np.asarray(outs[kind.label_output]).reshape(-1).astype(np.int64)
    return np.asarray(outs[kind.score_output]).argmax(axis=-1).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# loading


def _keras_zip_config(path):
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read("config.json"))
    except Exception:
        return None


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
            and _plain(lc.get("inbound_nodes")) and set(lc) <= {"module", "class_name", "config", "registered_name",
                                                                "name", "inbound_nodes", "build_config"})


def _plain(obj) -> bool:
    """Node arguments made only of tensor references and plain values (no serialized objects)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    if isinstance(obj, dict):
        if "class_name" in obj:
            return obj["class_name"] == "__keras_tensor__" and _plain(obj.get("config"))
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    return False


def check_graph_config(config, path=None) -> bool:
    """Check a .keras model config like :func:`badprune.models.check_config`, also accepting the ``keras.ops``
    nodes of :data:`GRAPH_OPS` at the top level. Returns True when it holds such nodes."""
    check = _mods().check_config
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        check(config, path)
        return False
    inner = config["config"]
    layers = inner.get("layers")
    if not isinstance(layers, list):
        check(config, path)
        return False
    kept = [lc for lc in layers if not _is_graph_op(lc)]
    stripped = dict(config, config=dict(inner, layers=kept))
    check(stripped, path)
    return len(kept) != len(layers)


def load(path, trust: bool = False, weights=None, arch=None):
    """Load B, B'_X or G_X safely: a .keras file with the GoodNet's ``keras.ops`` nodes is checked with
    :func:`check_graph_config` and opened with ``safe_mode``; anything else goes to
    :func:`badprune.models.load_model` (``weights`` + ``arch`` build the lab's architecture)."""
    models = _mods()
    if path is None:
        return models.load_model(weights=weights, arch=arch, trust=trust)
    path = str(path)
    if not os.path.exists(path):
        raise BadpruneError("model file not found", path, "check the path")
    if weights is None and not trust and zipfile.is_zipfile(path):
        cfg = _keras_zip_config(path)
        if cfg is not None and check_graph_config(cfg, path):
            if not path.endswith(".keras"):
                raise BadpruneError("a .keras model file must end in .keras", path, "rename it")
            try:
                keras = _keras()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return keras.saving.load_model(path, compile=False, safe_mode=True)
            except Exception as e:
                msg = " ".join(str(e).split())[:200]
                raise BadpruneError(f"cannot load the Keras model ({type(e).__name__}: {msg})", path,
                                    "check the file was saved by Keras 3") from None
    return models.load_model(model=path, weights=weights, trust=trust)


# --------------------------------------------------------------------------------------------------------------
# running


def predict_fn(model):
    """A traced function running ``model`` on a float32 NHWC batch (returns a list of tensors)."""
    _keras()
    import tensorflow as tf

    shape = (None,) + tuple(int(s) for s in model.inputs[0].shape[1:])
    return tf.function(lambda x: model(x, training=False),
                       input_signature=[tf.TensorSpec(shape, tf.float32)]).get_concrete_function()


def predict(model, X, batch_size: int = 256, fn=None):
    """Run a Keras model on float32 NHWC images; returns the list of outputs (numpy), in output order.
    ``fn``: a :func:`predict_fn` of the model, to trace it once over many calls."""
    X = np.asarray(X, np.float32)
    if not len(X):
        return [np.zeros((0,) + tuple(int(s) for s in o.shape[1:]), o.dtype) for o in model.outputs]
    fn = fn or predict_fn(model)
    parts = [[] for _ in model.outputs]
    for lo in range(0, len(X), batch_size):
        outs = fn(X[lo:lo + batch_size])
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for i, o in enumerate(outs):
            parts[i].append(o.numpy())
    return [np.concatenate(p) for p in parts]


def predict_labels(model, X, kind: Kind | None = None, batch_size: int = 256, fn=None) -> np.ndarray:
    """Labels (int64) of a Keras model: a GoodNet's label output, or a classifier's argmax."""
    kind = kind or model_kind(model)
    return labels_from_outputs(predict(model, X, batch_size, fn), kind)
