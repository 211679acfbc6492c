"""Compiling the head (the graph after the prune layer) into an op list, one lowering per Keras layer class.

:func:`compile_head` runs four named stages: trace the layer calls from the prune layer's output to the model
output (:func:`badprune.models.graph.trace`), lower each call through :data:`LOWERINGS` (a Dense or Conv2D with an
activation becomes a linear op plus an activation op, so the pre-activation is a tensor of its own), fall back to
TensorFlow over the cached features when any layer has no lowering, then drop a final softmax (it does not change
the argmax) and find the linear consumers of the prune layer's output that the sweep updates per channel.
"""
from __future__ import annotations

import numpy as np

from ..errors import BadpruneError
from ..models import IDENTITY_AT_INFERENCE
from .ops import Op, activation_op, same_pad

_MERGE = {"Add": np.add, "Subtract": np.subtract, "Multiply": np.multiply, "Maximum": np.maximum,
          "Minimum": np.minimum}


class _Lowering:
    """What a lowering needs besides its layer: tensor shapes and fresh tensor ids."""

    def __init__(self, shapes: dict, next_id: int):
        self.shapes = shapes
        self._next = next_id

    def tid(self, shape) -> int:
        """A new tensor id (for a pre-activation) of per-sample ``shape``."""
        self._next += 1
        self.shapes[self._next - 1] = shape
        return self._next - 1


def _with_activation(lin: Op, c, cfg, out, shape):
    a = activation_op(lin.name, cfg.get("activation"), lin.out, out, shape)
    return None if a is None else [lin, a]


def _dense(c, layer, cfg, w, ins, out, shape):
    if cfg.get("lora_rank"):
        return None
    kernel = np.ascontiguousarray(w[0])
    bias = np.ascontiguousarray(w[1]) if cfg.get("use_bias", True) else np.zeros(kernel.shape[1], np.float32)
    return _with_activation(Op("dense", layer.name, ins, c.tid(shape), shape, {"W": kernel, "b": bias}),
                            c, cfg, out, shape)


def _conv(c, layer, cfg, w, ins, out, shape):
    if cfg.get("groups", 1) != 1:
        return None
    kernel = np.ascontiguousarray(w[0])
    bias = np.ascontiguousarray(w[1]) if cfg.get("use_bias", True) else np.zeros(kernel.shape[3], np.float32)
    kh, kw = kernel.shape[:2]
    sh, sw = cfg["strides"]
    dh, dw = cfg.get("dilation_rate", (1, 1))
    H, W, _ = c.shapes[ins[0]]
    if cfg["padding"] == "same":
        _, pt = same_pad(H, kh, sh, dh)
        _, pl = same_pad(W, kw, sw, dw)
    elif cfg["padding"] == "valid":
        pt = pl = 0
    else:
        return None
    op = Op("conv", layer.name, ins, c.tid(shape), shape, {"K": kernel, "b": bias, "geom": (sh, sw, pt, pl, dh, dw)})
    return _with_activation(op, c, cfg, out, shape)


def _reshape(c, layer, cfg, w, ins, out, shape):
    return [Op("reshape", layer.name, ins, out, shape)]


def _merge(c, layer, cfg, w, ins, out, shape):
    return [Op("merge", layer.name, ins, out, shape, {"fn": _MERGE[type(layer).__name__]})]


def _average(c, layer, cfg, w, ins, out, shape):
    return [Op("average", layer.name, ins, out, shape)]


def _concat(c, layer, cfg, w, ins, out, shape):
    axis = cfg.get("axis", -1)
    axis = axis + 1 if axis >= 0 else len(shape) + 1 + axis
    return [Op("concat", layer.name, ins, out, shape, {"axis": axis})]


def _activation(c, layer, cfg, w, ins, out, shape):
    a = activation_op(layer.name, cfg.get("activation"), ins[0], out, shape)
    return None if a is None else [a]


def _relu(c, layer, cfg, w, ins, out, shape):
    mv = cfg.get("max_value")
    p = (float(cfg.get("negative_slope", 0.0)), np.inf if mv is None else float(mv), float(cfg.get("threshold", 0.0)))
    return [Op("act", layer.name, ins, out, shape, {"kind": "relu_general", "p": p})]


def _leaky_relu(c, layer, cfg, w, ins, out, shape):
    slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))
    return [Op("act", layer.name, ins, out, shape, {"kind": "relu_general", "p": (float(slope), np.inf, 0.0)})]


def _elu(c, layer, cfg, w, ins, out, shape):
    return [Op("act", layer.name, ins, out, shape, {"kind": "elu", "p": (float(cfg.get("alpha", 1.0)), np.inf, 0.0)})]


def _softmax(c, layer, cfg, w, ins, out, shape):
    if cfg.get("axis", -1) not in (-1, len(shape)):
        return None
    return [Op("act", layer.name, ins, out, shape, {"kind": "softmax", "p": (0.0, np.inf, 0.0)})]


def _pool(c, layer, cfg, w, ins, out, shape):
    ph, pw = cfg["pool_size"]
    sh, sw = cfg["strides"] or (ph, pw)
    H, W, _ = c.shapes[ins[0]]
    if cfg["padding"] == "same":
        _, pt = same_pad(H, ph, sh)
        _, pl = same_pad(W, pw, sw)
    else:
        pt = pl = 0
    return [Op("pool", layer.name, ins, out, shape, {"geom": (ph, pw, sh, sw, pt, pl),
                                                     "average": type(layer).__name__ == "AveragePooling2D"})]


def _gpool(c, layer, cfg, w, ins, out, shape):
    return [Op("gpool", layer.name, ins, out, shape, {"average": type(layer).__name__.startswith("GlobalAverage")})]


def _batchnorm(c, layer, cfg, w, ins, out, shape):
    axis = cfg.get("axis", -1)
    axis = axis[0] if isinstance(axis, (list, tuple)) else axis
    if axis not in (-1, len(c.shapes[ins[0]])):
        return None
    vals = dict(zip([v.path.split("/")[-1] for v in layer.weights], w))
    C = c.shapes[ins[0]][-1]
    gamma = vals.get("gamma", np.ones(C, np.float32)).astype(np.float64)
    beta = vals.get("beta", np.zeros(C, np.float32)).astype(np.float64)
    mean = vals["moving_mean"].astype(np.float64)
    var = vals["moving_variance"].astype(np.float64)
    inv = gamma / np.sqrt(var + float(cfg.get("epsilon", 1e-3)))
    return [Op("bn", layer.name, ins, out, shape, {"scale": inv.astype(np.float32),
                                                   "shift": (beta - mean * inv).astype(np.float32)})]


#: Keras layer class -> lowering(context, layer, config, float32 weights, input ids, output id, shape) -> [Op] or
#: None (not lowerable as configured). A class not listed makes the head fall back to TensorFlow.
LOWERINGS = {
    "Dense": _dense, "Conv2D": _conv, "Flatten": _reshape, "Reshape": _reshape,
    **{cls: _reshape for cls in IDENTITY_AT_INFERENCE},
    **{cls: _merge for cls in _MERGE}, "Average": _average, "Concatenate": _concat,
    "Activation": _activation, "ReLU": _relu, "LeakyReLU": _leaky_relu, "ELU": _elu, "Softmax": _softmax,
    "MaxPooling2D": _pool, "AveragePooling2D": _pool, "GlobalAveragePooling2D": _gpool,
    "GlobalMaxPooling2D": _gpool, "BatchNormalization": _batchnorm,
}
#: Keras layer classes evaluated by prune_ext (anything else: TensorFlow fallback)
SUPPORTED = tuple(LOWERINGS)


def _lower(c: _Lowering, layer, ins, out, shape):
    """The ops of one layer call, or None when it has no lowering."""
    fn = LOWERINGS.get(type(layer).__name__)
    if fn is None:
        return None
    cfg = layer.get_config()
    if cfg.get("data_format", "channels_last") not in ("channels_last", None):
        return None
    if getattr(layer, "dtype_policy", None) is not None and "float32" not in str(layer.dtype_policy.name):
        return None
    return fn(c, layer, cfg, [np.asarray(v, dtype=np.float32) for v in layer.get_weights()], ins, out, shape)


class Head:
    """The compiled head (built by :func:`compile_head`). ``forward`` / ``labels`` evaluate it on a batch of
    (masked) prune-layer activations (:mod:`badprune.head.evaluate`).

    Attributes: ``ops`` (list of :class:`~badprune.head.ops.Op`), ``shapes`` (tensor id -> per-sample shape;
    tensor 0 is the prune layer's output), ``input_shape``, ``output_shape``, ``out_id`` (the logits tensor),
    ``drops_softmax``, ``linear`` ({op index: 'dense' | 'conv'}: linear consumers of tensor 0), ``relu_fed``
    (output ids of the Dense ops whose input is a ReLU's output, mostly zeros), ``tf_head`` (a
    Keras model of the head when it falls back to TensorFlow, else None) and ``fallback_reason``.
    """

    def __init__(self, model, layer, ops, shapes, input_shape, out_id, nodes, unsupported):
        self.model = model
        self.layer = layer
        self.ops = ops
        self.shapes = shapes
        self.input_shape = input_shape
        self.out_id = out_id
        self.output_shape = shapes[out_id]
        self.fallback_reason = None
        self.tf_head = None
        self._tf_fn = None
        self._plans: dict = {}
        if unsupported:
            self.ops = []
            self.fallback_reason = "layers outside prune_ext's op set: " + ", ".join(unsupported)
            self.tf_head = _tf_head(model, layer, nodes, input_shape)
        # the final softmax does not change the argmax: evaluate logits
        last = self.ops[-1] if self.ops else None
        self.drops_softmax = last is not None and last.kind == "act" and last.params["kind"] == "softmax"
        if self.drops_softmax:
            self.ops.pop()
            self.out_id = last.inputs[0]
        self.consumers = {}
        for o in self.ops:
            for t in o.inputs:
                self.consumers[t] = self.consumers.get(t, 0) + 1
        self.linear = _linear_consumers(self)
        self.relu_fed = _relu_fed(self)
        self._sparse_w: dict = {}  # op output id -> 64-byte aligned W for prune_ext.sparse_dense

    @property
    def backend(self) -> str:
        return "tensorflow" if self.tf_head is not None else "prune_ext"

    def forward(self, F=None, given=None, keep=(), target=None, given_owned=False, sparse=False):
        """Logits for a batch: see :func:`badprune.head.evaluate.forward`."""
        from .evaluate import forward

        return forward(self, F, given, keep, target, given_owned, sparse)

    def labels(self, F, mask=None, batch_size=4096):
        """Labels for activations F (N, H, W, C), channels where ``mask`` is 0 zeroed: see
        :func:`badprune.head.evaluate.labels`."""
        from .evaluate import labels

        return labels(self, F, mask, batch_size)

    def describe(self) -> str:
        if self.tf_head is not None:
            return f"TensorFlow head ({self.fallback_reason})"
        kinds = [f"{o.kind}:{o.name}" for o in self.ops if o.kind != "reshape"]
        lin = ", ".join(self.ops[i].name for i in self.linear) or "none"
        return f"prune_ext head, {len(kinds)} ops; incremental linear consumers: {lin}"


def _tf_head(model, layer, nodes, input_shape):
    """The head as its own Keras model (the original layers called on a new Input), for the fallback."""
    from .. import _tf  # noqa: F401
    import keras

    from ..models import replay

    x = keras.Input(shape=input_shape)
    memo = replay(nodes, model.get_layer(layer).output, x)
    return keras.Model(x, memo[id(model.outputs[0])])


def _linear_consumers(head):
    """Ops linear in the masked tensor that can be updated per channel: {op index: 'dense'|'conv'}."""
    if not head.ops:
        return {}
    flat_of_start = {0}  # tensors that are the start tensor reshaped (same memory order)
    for o in head.ops:
        if o.kind == "reshape" and o.inputs[0] in flat_of_start:
            flat_of_start.add(o.out)
    H, W, C = head.input_shape
    found = {}
    for i, o in enumerate(head.ops):
        if not o.inputs or o.inputs[0] not in flat_of_start:
            continue
        if o.kind == "dense" and o.params["W"].shape[0] == H * W * C and len(head.shapes[o.inputs[0]]) == 1:
            found[i] = "dense"
        elif o.kind == "conv" and head.shapes[o.inputs[0]] == (H, W, C):
            found[i] = "conv"
    return found


def final_dense(head):
    """The Dense op whose output is the logits (through reshapes only), or None."""
    by_out = {o.out: o for o in head.ops}
    o = by_out.get(head.out_id)
    while o is not None and o.kind == "reshape":
        o = by_out.get(o.inputs[0])
    return o if o is not None and o.kind == "dense" else None


def _relu_fed(head) -> frozenset:
    """Output ids of the Dense ops whose input is (a reshape of) a ReLU's output, zero where the ReLU cut, and whose
    weights are finite (0 * inf is NaN in a GEMM). Not the logits' Dense: its sums' order could break exact ties
    unlike the GEMM (the engine gives that one :func:`prune_ext.sparse_argmax`, with its rounding bound)."""
    relu = set()
    for o in head.ops:
        if o.kind == "act" and (o.params["kind"] == "relu"
                                or (o.params["kind"] == "relu_general" and o.params["p"][0] == 0)):
            relu.add(o.out)
        elif o.kind == "reshape" and o.inputs[0] in relu:
            relu.add(o.out)
    last = final_dense(head)
    return frozenset(o.out for o in head.ops if o.kind == "dense" and o.inputs[0] in relu and o is not last
                     and bool(np.isfinite(o.params["W"]).all()))


def compile_head(model, layer) -> Head:
    """Compile the graph after ``layer`` of a Keras ``model`` into a :class:`Head`.

    Parameters
    ----------
    model : keras.Model
        A single-output classifier.
    layer : str
        The prune layer; its output must be a 4-D feature map that every path to the output goes through.

    Returns
    -------
    Head
        Evaluated by prune_ext, or by TensorFlow when a layer has no lowering (``head.backend``).
    """
    from ..models.graph import prune_output, trace  # Keras: imported on use, so that a warm sweep needs none

    if len(model.outputs) != 1:
        raise BadpruneError("model must have exactly one output", fix="use a single-output classifier")
    start = prune_output(model, layer)
    input_shape = tuple(int(v) for v in start.shape[1:])
    nodes = trace(model.outputs[0], start, layer)
    ids = {id(start): 0}
    shapes = {0: input_shape}
    for tn in nodes:
        for o in tn.node.output_tensors:
            ids[id(o)] = len(ids)
    c = _Lowering(shapes, max(ids.values()) + 1)
    ops, unsupported = [], []
    for tn in nodes:
        outs = tn.node.output_tensors
        if len(outs) != 1:
            unsupported.append(f"{tn.layer.name} (multiple outputs)")
        out, shape = ids[id(outs[0])], tuple(int(v) for v in outs[0].shape[1:])
        shapes[out] = shape
        lowered = _lower(c, tn.layer, [ids[id(x)] for x in tn.node.input_tensors], out, shape)
        if lowered is None:
            unsupported.append(f"{tn.layer.name} ({type(tn.layer).__name__})")
        else:
            ops.extend(lowered)
    return Head(model, layer, ops, shapes, input_shape, ids[id(model.outputs[0])], nodes, unsupported)
