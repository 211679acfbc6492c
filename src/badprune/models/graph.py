"""The model graph, walked once: layer connectivity from the config (prune-layer discovery, the convolution that
produces a channel) and the tensor-level trace between two tensors (the head after the prune layer), which the head
compiler and the model surgery both use.
"""
from __future__ import annotations

from .. import _tf  # noqa: F401  (quiet TensorFlow before keras is imported)

from dataclasses import dataclass

import keras

from ..errors import BadpruneError

#: 2-D pooling layers that can be the prune layer by default
POOL_2D = ("MaxPooling2D", "AveragePooling2D", "MaxPool2D", "AvgPool2D")
#: activations f with f(0) == 0 exactly (zeroing a conv channel's kernel and bias zeroes its output)
ZERO_KEEPING_ACTIVATIONS = {"linear", "relu", "relu6", "elu", "selu", "tanh", "gelu", "silu", "swish",
                            "leaky_relu", "softsign", "mish", "hard_silu", "hard_swish", "celu"}


# ----------------------------------------------------------------------------------- layer connectivity (config)

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


class Graph:
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
            for lc in cfg["layers"]:
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
    g = Graph(model)
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
    pools = [n for n in g.order if type(g.layers[n]).__name__ in POOL_2D]
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


def keeps_zero(layer) -> bool:
    """True for per-channel layers that map a channel that is all zero to all zero (in inference)."""
    cls = type(layer).__name__
    if cls in POOL_2D:
        return layer.data_format == "channels_last"
    if cls in ("Dropout", "SpatialDropout2D", "GaussianDropout", "GaussianNoise", "AlphaDropout", "Identity",
               "ZeroPadding2D", "Cropping2D", "ActivityRegularization"):
        return True
    if cls == "Activation":
        return _activation_name(layer) in ZERO_KEEPING_ACTIVATIONS
    if cls == "ReLU":
        return float(layer.negative_slope) == 0.0 or float(layer.threshold) == 0.0
    if cls in ("LeakyReLU", "ELU"):
        return True
    return False


def conv_producer(model, layer: str) -> str | None:
    """The Conv2D layer whose output channel c becomes channel c of ``layer`` through zero-keeping per-channel ops,
    so zeroing its kernel[..., c] and bias[c] makes that channel exactly 0. None when there is none."""
    g = Graph(model)
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
            if _activation_name(lay) not in ZERO_KEEPING_ACTIVATIONS:
                return None
            return cur
        if not keeps_zero(lay):
            return None
        ps = g.parents.get(cur, [])
        if len(ps) != 1:
            return None
        cur = ps[0]
    return None


# ---------------------------------------------------------------------------------------- tensor-level trace
def prune_output(model, layer: str):
    """The output tensor of the prune layer ``layer``: one 4-D (batch, H, W, C) feature map, or a
    :class:`BadpruneError` naming the layer."""
    try:
        start = model.get_layer(layer).output
    except (ValueError, AttributeError) as e:
        raise BadpruneError(f"layer '{layer}' not usable as prune layer ({e})",
                            fix="pick a layer used once in the model with --layer") from None
    if len(start.shape) != 4:
        raise BadpruneError(f"prune layer '{layer}' output must be a 4-D feature map, got {tuple(start.shape)}",
                            fix="choose a convolution or pooling layer with --layer")
    return start


@dataclass
class TracedNode:
    """One call of a layer between the start and the end tensor: ``layer`` called as ``node`` (a Keras Node with
    ``input_tensors``, ``output_tensors`` and ``arguments``)."""

    layer: object
    node: object


def trace(out_tensor, start_tensor, layer: str | None = None) -> list:
    """The layer calls from ``start_tensor`` (exclusive) to ``out_tensor``, inputs before their users.

    Raises :class:`BadpruneError` when a path reaches ``out_tensor`` without passing through ``start_tensor`` (the
    output of ``layer``, named in the message), or when a tensor carries no Keras history.
    """
    seen = {id(start_tensor)}
    nodes = []

    def visit(t):
        if id(t) in seen:
            return
        hist = getattr(t, "_keras_history", None)
        if hist is None:
            raise BadpruneError(f"cannot trace the graph at tensor {t}")
        op, node_index, _ = hist
        inbound = getattr(op, "_inbound_nodes", None)
        if type(op).__name__ == "InputLayer" or not inbound:
            raise BadpruneError(f"layer '{layer}' does not separate the model: '{op.name}' reaches the head"
                                " without passing through it", fix="choose another --layer")
        node = inbound[node_index]
        for x in node.input_tensors:
            visit(x)
        seen.update(id(o) for o in node.output_tensors)
        nodes.append(TracedNode(op, node))

    visit(out_tensor)
    return nodes
