"""GoodNet G_X of a sweep's result, and loading / running any of B, B'_X and G_X.

The graph itself is built in :mod:`badprune.models.goodnet` (below the cache, which keeps its template):
``build_goodnet(B, layer, channels)`` returns G_X as a single functional model::

    input -> B's trunk up to the prune layer (computed once)
          -> B's head                                   -> argmax -> label_B
          -> 1x1 DepthwiseConv2D 0/1 mask -> B's head   -> argmax -> label_B'
    scores = [B's probabilities, 0] where label_B == label_B', else the one-hot vector of N
    label = argmax(scores) = label_B where they agree, else N (the number of classes: "backdoored input detected")

The mask sits right after the prune layer, so the trunk is shared. That equals B'_X (whose producing convolution
has the channels' kernel and bias zeroed, :func:`badprune.models.prune_model`): those channels reach the prune
layer through zero-keeping per-channel ops only, so they are exactly 0 there either way. Both heads use the same
layer objects (shared weights, stored once).

The model has one output, named ``goodnet_scores`` (:data:`badprune.models.kinds.GOODNET_OUTPUT`): float32
(n, N + 1), B's class probabilities with a 0 appended where B and B'_X agree, the one-hot vector of class N where
they differ. Its argmax is the GoodNet's label in [0, N], so the lab's ``eval.py``
(``np.argmax(model.predict(x), axis=1)``) runs on the file unchanged and gets G_X's labels.

Everything in the graph is a built-in Keras layer or a ``keras.ops`` operation from
:data:`badprune.models.GRAPH_OPS` (top_k,
squeeze, equal, where, ...; argmax is written as top_k with k=1, which LiteRT runs with builtin kernels, while
``keras.ops.argmax`` on floats is not convertible): Keras 3 stores those in ``.keras`` files, and
``keras.models.load_model`` opens them with ``safe_mode`` on and without badprune installed. :func:`load` is
badprune's safe loader for all three kinds (B, B'_X, G_X).

How a model is told apart (:func:`model_kind`, :func:`badprune.models.kinds.kind_from_shapes`): an output named
``goodnet_scores...`` is a GoodNet's, with N = its width - 1 (older two-output GoodNets: a rank-1 label output). Any
other single (n, K) output is a classifier (B or B'_X) with N = K, unless the caller says it is a GoodNet
(``goodnet=True``: N = K - 1, label = argmax).
"""
from __future__ import annotations

import os

import numpy as np

from .errors import BadpruneError
from .models.goodnet import build_goodnet, import_keras, sweep_template  # noqa: F401  (the graph: models/goodnet.py)
from .models.kinds import Kind, kind_from_shapes, labels_from_outputs  # noqa: F401  (the vocabulary of model kinds)
from .runfolder import fmt_x, goodnet_filename, model_stem


# --------------------------------------------------------------------------------------------------------------
# building


def from_sweep(result, x):
    """G_X of a :class:`badprune.result.SweepResult` (B = ``result.model``; channels of the threshold X)."""
    t = result.threshold(x)
    if not t.reached:
        raise BadpruneError(f"threshold {fmt_x(x)} was never reached: there is no G_{fmt_x(x)}")
    if result.get_model() is None:
        raise BadpruneError("the sweep result holds no model")
    return build_goodnet(result.model, result.layer, t.channels, name=goodnet_filename(x, ""))


def sweep_variants(result, xs) -> tuple:
    """G_X for each threshold X of ``xs`` (all reached) as one graph and what differs per X:
    ``(template, [(name, {mask layer name: [mask weights]})])`` for :func:`badprune.models.save_variants`. The
    graph is built once (:func:`sweep_template`, named as the first G_X): G_X differ only in their 0/1 mask (and
    name)."""
    if result.get_model() is None:
        raise BadpruneError("the sweep result holds no model")
    ts = [result.threshold(x) for x in xs]
    template, patch = sweep_template(result.model, result.layer, goodnet_filename(xs[0], ""))
    return template, [(goodnet_filename(t.x, ""), patch.weights(t.channels)) for t in ts]


def from_repaired(result, rep):
    """The GoodNet of B and R_X (a :class:`badprune.repair.Repaired` of ``result``): B's label where B and R_X
    agree, else N."""
    return build_goodnet(result.get_model(), result.layer, rep.channels, name=model_stem(rep.x, "goodnet_repaired"),
                         repaired=rep.model, shared_trunk=rep.mode != "full")


# --------------------------------------------------------------------------------------------------------------
# kinds of models, loading


def model_kind(model, goodnet: bool = False, num_classes: int | None = None) -> Kind:
    """The :class:`~badprune.models.kinds.Kind` of a Keras model (from its output shapes and names)."""
    return kind_from_shapes([tuple(o.shape) for o in model.outputs], goodnet, num_classes,
                            names=list(getattr(model, "output_names", None) or []))


def load(path, trust: bool = False, weights=None, arch=None):
    """Load B, B'_X or G_X safely: :func:`badprune.models.load_model`, also accepting a GoodNet's ``keras.ops``
    nodes (``weights`` + ``arch`` without ``path`` build the lab's architecture)."""
    import_keras()
    from .models import load_model

    if path is None:
        return load_model(weights=weights, arch=arch, trust=trust)
    if not os.path.exists(str(path)):
        raise BadpruneError("model file not found", path, "check the path")
    return load_model(model=str(path), weights=weights, trust=trust, graph_ops=True)


# --------------------------------------------------------------------------------------------------------------
# running


def predict_fn(model):
    """A traced function running ``model`` on a float32 NHWC batch (returns a list of tensors)."""
    import_keras()
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
