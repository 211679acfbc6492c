"""The head: the part of the Keras graph after the prune layer, compiled to a small op list that ``prune_ext``
evaluates over cached prune-layer activations, with channels masked.

``compile_head(model, layer)`` walks the graph from the model output back to the prune layer's output tensor and
turns each layer into ops (a Dense or Conv2D with an activation becomes a linear op plus an activation op, so the
pre-activation is a tensor of its own). Layers outside the supported set make the whole head fall back to
TensorFlow over the cached features (the trunk is still not re-run).

``masked_steps(head, F, order)`` is the pruning sweep's engine: it yields the head's labels after masking each
channel in turn, exploiting that each step masks one more channel:

* a sample whose activations in that channel are all zero cannot change, so only the others are re-evaluated;
* linear consumers of the masked tensor (a Dense on its flattening, a Conv2D on it) keep their pre-activations
  for every sample and subtract the masked channel's contribution instead of recomputing;
* only the changed samples run the rest of the head.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import prune_ext

from .errors import BadpruneError

#: Keras layer classes evaluated by prune_ext (anything else: TensorFlow fallback)
SUPPORTED = ("Dense", "Conv2D", "Flatten", "Reshape", "Dropout", "SpatialDropout2D", "GaussianNoise",
             "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity", "Add", "Subtract",
             "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "Activation", "ReLU", "LeakyReLU", "ELU",
             "Softmax", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
             "BatchNormalization")
_IDENTITY = {"Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
             "ActivityRegularization", "Identity"}
#: the final-layer screen stays on while it answers for at least this share of the samples it tries ...
SCREEN_MIN_SHARE = 0.2
#: ... and is tried again this many steps after it was switched off
SCREEN_RETRY = 8
_MERGE = {"Add": np.add, "Subtract": np.subtract, "Multiply": np.multiply, "Maximum": np.maximum,
          "Minimum": np.minimum}


@dataclass
class Op:
    """One step of the head: ``out := kind(inputs, params)``; shapes are per sample (no batch axis)."""

    kind: str          # dense conv pool act bn reshape merge average concat gpool
    name: str          # the Keras layer it comes from
    inputs: list       # tensor ids
    out: int           # tensor id
    shape: tuple       # output shape per sample
    params: dict = field(default_factory=dict)


def _same_pad(size, k, s, d=1):
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return out, total // 2


def _activation_op(name, act, tin, tout, shape):
    """An activation op from a Keras activation (name string or config); None if unsupported."""
    if act is None:
        act = "linear"
    if isinstance(act, dict):
        act = act.get("config", act).get("name") if isinstance(act.get("config"), dict) else act.get("class_name")
    if callable(act):
        act = getattr(act, "__name__", str(act))
    act = str(act).lower()
    if act == "linear":
        return Op("reshape", name, [tin], tout, shape)
    if act == "relu6":
        return Op("act", name, [tin], tout, shape, {"kind": "relu_general", "p": (0.0, 6.0, 0.0)})
    if act == "leaky_relu":
        return Op("act", name, [tin], tout, shape, {"kind": "relu_general", "p": (0.2, np.inf, 0.0)})
    if act == "elu":
        return Op("act", name, [tin], tout, shape, {"kind": "elu", "p": (1.0, np.inf, 0.0)})
    if act in prune_ext.ACTIVATIONS and act != "relu_general":
        return Op("act", name, [tin], tout, shape, {"kind": act, "p": (0.0, np.inf, 0.0)})
    return None


class Head:
    """The compiled head. ``forward`` evaluates it on a batch of (masked) prune-layer activations."""

    def __init__(self, model, layer):
        self.model = model
        self.layer = layer
        self.ops: list[Op] = []
        self.shapes: dict[int, tuple] = {}
        self.fallback_reason: str | None = None
        self.tf_head = None
        self._plans: dict = {}
        self._compile()

    # -- compilation ---------------------------------------------------------------------------------------------
    def _compile(self):
        model, layer = self.model, self.layer
        try:
            start = model.get_layer(layer).output
        except (ValueError, AttributeError) as e:
            raise BadpruneError(f"layer '{layer}' not usable as prune layer ({e})",
                                fix="pick a layer used once in the model with --layer") from None
        if len(model.outputs) != 1:
            raise BadpruneError("model must have exactly one output", fix="use a single-output classifier")
        shape = tuple(int(v) for v in start.shape[1:])
        if len(shape) != 3:
            raise BadpruneError(f"prune layer '{layer}' output must be a 4-D feature map, got {start.shape}",
                                fix="choose a convolution or pooling layer with --layer")
        self.input_shape = shape
        ids: dict[int, int] = {id(start): 0}
        self.shapes[0] = shape
        nodes = []          # (layer, input tensors, output tensor) in topological order
        unsupported = []

        def visit(t):
            key = id(t)
            if key in ids:
                return ids[key]
            hist = getattr(t, "_keras_history", None)
            if hist is None:
                raise BadpruneError(f"cannot trace the graph at tensor {t}")
            op, node_index, _ = hist
            if type(op).__name__ == "InputLayer" or not getattr(op, "_inbound_nodes", None):
                raise BadpruneError(f"layer '{layer}' does not separate the model: '{op.name}' reaches the head"
                                    " without passing through it", fix="choose another --layer")
            node = op._inbound_nodes[node_index]
            ins = [visit(x) for x in node.input_tensors]
            outs = node.output_tensors
            if len(outs) != 1:
                unsupported.append(f"{op.name} (multiple outputs)")
            for o in outs:
                ids[id(o)] = len(ids)
            nodes.append((op, ins, ids[id(outs[0])], tuple(int(v) for v in outs[0].shape[1:])))
            return ids[id(t)]

        out_id = visit(model.outputs[0])
        self.out_id = out_id
        self._nodes = nodes
        self._next = max(ids.values()) + 1
        for op, ins, out, oshape in nodes:
            self.shapes[out] = oshape
            if not self._add_layer(op, ins, out, oshape):
                unsupported.append(f"{op.name} ({type(op).__name__})")
        self.output_shape = self.shapes[out_id]
        if unsupported:
            self.ops = []
            self.fallback_reason = "layers outside prune_ext's op set: " + ", ".join(unsupported)
            self._build_tf_head()
        # the final softmax does not change the argmax: evaluate logits
        self.drops_softmax = bool(self.ops) and self.ops[-1].kind == "act" and self.ops[-1].params["kind"] == "softmax"
        if self.drops_softmax:
            last = self.ops.pop()
            self.out_id = last.inputs[0]
        self._consumers = {}
        for o in self.ops:
            for t in o.inputs:
                self._consumers[t] = self._consumers.get(t, 0) + 1
        self.linear = self._find_linear_consumers()

    def _tid(self):
        self._next += 1
        return self._next - 1

    def _add_layer(self, layer, ins, out, shape) -> bool:
        cls = type(layer).__name__
        if cls not in SUPPORTED:
            return False
        cfg = layer.get_config()
        name = layer.name
        if cfg.get("data_format", "channels_last") not in ("channels_last", None):
            return False
        if getattr(layer, "dtype_policy", None) is not None and "float32" not in str(layer.dtype_policy.name):
            return False
        w = [np.asarray(v, dtype=np.float32) for v in layer.get_weights()]
        add = self.ops.append
        if cls == "Dense":
            kernel = np.ascontiguousarray(w[0])
            bias = np.ascontiguousarray(w[1]) if cfg.get("use_bias", True) else np.zeros(kernel.shape[1], np.float32)
            if cfg.get("lora_rank"):
                return False
            pre = self._tid()
            self.shapes[pre] = shape
            add(Op("dense", name, ins, pre, shape, {"W": kernel, "b": bias}))
            a = _activation_op(name, cfg.get("activation"), pre, out, shape)
            if a is None:
                return False
            add(a)
        elif cls == "Conv2D":
            if cfg.get("groups", 1) != 1:
                return False
            kernel = np.ascontiguousarray(w[0])
            bias = np.ascontiguousarray(w[1]) if cfg.get("use_bias", True) else np.zeros(kernel.shape[3], np.float32)
            kh, kw = kernel.shape[:2]
            sh, sw = cfg["strides"]
            dh, dw = cfg.get("dilation_rate", (1, 1))
            H, W, _ = self.shapes[ins[0]]
            if cfg["padding"] == "same":
                _, pt = _same_pad(H, kh, sh, dh)
                _, pl = _same_pad(W, kw, sw, dw)
            elif cfg["padding"] == "valid":
                pt = pl = 0
            else:
                return False
            pre = self._tid()
            self.shapes[pre] = shape
            add(Op("conv", name, ins, pre, shape, {"K": kernel, "b": bias, "geom": (sh, sw, pt, pl, dh, dw)}))
            a = _activation_op(name, cfg.get("activation"), pre, out, shape)
            if a is None:
                return False
            add(a)
        elif cls in ("Flatten", "Reshape") or cls in _IDENTITY:
            add(Op("reshape", name, ins, out, shape))
        elif cls in _MERGE:
            add(Op("merge", name, ins, out, shape, {"fn": _MERGE[cls]}))
        elif cls == "Average":
            add(Op("average", name, ins, out, shape))
        elif cls == "Concatenate":
            axis = cfg.get("axis", -1)
            rank = len(shape)
            axis = axis + 1 if axis >= 0 else rank + 1 + axis
            add(Op("concat", name, ins, out, shape, {"axis": axis}))
        elif cls == "Activation":
            a = _activation_op(name, cfg.get("activation"), ins[0], out, shape)
            if a is None:
                return False
            add(a)
        elif cls == "ReLU":
            mv = cfg.get("max_value")
            p = (float(cfg.get("negative_slope", 0.0)), np.inf if mv is None else float(mv),
                 float(cfg.get("threshold", 0.0)))
            add(Op("act", name, ins, out, shape, {"kind": "relu_general", "p": p}))
        elif cls == "LeakyReLU":
            slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))
            add(Op("act", name, ins, out, shape, {"kind": "relu_general", "p": (float(slope), np.inf, 0.0)}))
        elif cls == "ELU":
            add(Op("act", name, ins, out, shape, {"kind": "elu", "p": (float(cfg.get("alpha", 1.0)), np.inf, 0.0)}))
        elif cls == "Softmax":
            ax = cfg.get("axis", -1)
            if ax not in (-1, len(shape)):
                return False
            add(Op("act", name, ins, out, shape, {"kind": "softmax", "p": (0.0, np.inf, 0.0)}))
        elif cls in ("MaxPooling2D", "AveragePooling2D"):
            ph, pw = cfg["pool_size"]
            sh, sw = cfg["strides"] or (ph, pw)
            H, W, _ = self.shapes[ins[0]]
            if cfg["padding"] == "same":
                _, pt = _same_pad(H, ph, sh)
                _, pl = _same_pad(W, pw, sw)
            else:
                pt = pl = 0
            add(Op("pool", name, ins, out, shape, {"geom": (ph, pw, sh, sw, pt, pl),
                                                   "average": cls == "AveragePooling2D"}))
        elif cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            add(Op("gpool", name, ins, out, shape, {"average": cls.startswith("GlobalAverage")}))
        elif cls == "BatchNormalization":
            axis = cfg.get("axis", -1)
            axis = axis[0] if isinstance(axis, (list, tuple)) else axis
            if axis not in (-1, len(self.shapes[ins[0]])):
                return False
            names = [v.path.split("/")[-1] for v in layer.weights]
            vals = dict(zip(names, w))
            C = self.shapes[ins[0]][-1]
            gamma = vals.get("gamma", np.ones(C, np.float32)).astype(np.float64)
            beta = vals.get("beta", np.zeros(C, np.float32)).astype(np.float64)
            mean = vals["moving_mean"].astype(np.float64)
            var = vals["moving_variance"].astype(np.float64)
            inv = gamma / np.sqrt(var + float(cfg.get("epsilon", 1e-3)))
            add(Op("bn", name, ins, out, shape, {"scale": inv.astype(np.float32),
                                                 "shift": (beta - mean * inv).astype(np.float32)}))
        else:  # pragma: no cover - SUPPORTED and the branches above must agree
            return False
        return True

    def _build_tf_head(self):
        """The head as its own Keras model (the original layers called on a new Input), for the fallback."""
        from . import _tf  # noqa: F401
        import keras

        x = keras.Input(shape=self.input_shape)
        tensors = {0: x}
        for op, ins, out, _ in self._nodes:
            args = [tensors[i] for i in ins]
            tensors[out] = op(args if len(args) > 1 else args[0])
        self.tf_head = keras.Model(x, tensors[self.out_id])
        self._tf_fn = None

    def _find_linear_consumers(self):
        """Ops linear in the masked tensor that can be updated per channel: {op index: 'dense'|'conv'}."""
        if not self.ops:
            return {}
        flat_of_start = {0}  # tensors that are the start tensor reshaped (same memory order)
        for o in self.ops:
            if o.kind == "reshape" and o.inputs[0] in flat_of_start:
                flat_of_start.add(o.out)
        H, W, C = self.input_shape
        found = {}
        for i, o in enumerate(self.ops):
            if not o.inputs or o.inputs[0] not in flat_of_start:
                continue
            if o.kind == "dense" and o.params["W"].shape[0] == H * W * C and len(self.shapes[o.inputs[0]]) == 1:
                found[i] = "dense"
            elif o.kind == "conv" and self.shapes[o.inputs[0]] == (H, W, C):
                found[i] = "conv"
        return found

    # -- evaluation ----------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return "tensorflow" if self.tf_head is not None else "prune_ext"

    def _plan(self, given: frozenset, target=None):
        """The ops needed to reach ``target`` (default: the output) when the tensors in ``given`` are supplied."""
        target = self.out_id if target is None else target
        key = (given, target)
        if key in self._plans:
            return self._plans[key]
        need = {target}
        plan = []
        for o in reversed(self.ops):
            if o.out in need and o.out not in given:
                plan.append(o)
                need.update(o.inputs)
        plan.reverse()
        self._plans[key] = plan
        return plan

    def forward(self, F=None, given=None, keep=(), target=None, given_owned=False):
        """Logits (pre-softmax when the model ends in softmax) for a batch.

        ``F``: float32 (M, H, W, C) prune-layer activations (already masked); ``given``: {tensor id: array} of
        tensors supplied instead of computed (e.g. updated pre-activations); ``keep``: tensor ids to return too;
        ``target``: the tensor to return instead of the logits; ``given_owned``: the ``given`` arrays are scratch
        copies that may be overwritten (saves a copy before an activation).
        Returns logits, or (logits, {id: array}) when ``keep`` is given.
        """
        given = dict(given or {})
        if self.tf_head is not None:
            out = self._tf_forward(F)
            return (out, {}) if keep else out
        if F is not None:
            given[0] = np.ascontiguousarray(F, dtype=np.float32)
        M = next(iter(given.values())).shape[0]
        target = self.out_id if target is None else target
        plan = self._plan(frozenset(given), target)
        t = dict(given)
        owned = set(given) if given_owned else set()
        keep = set(keep)
        for o in plan:
            x = [t[i] for i in o.inputs]
            k = o.kind
            if k == "dense":
                X = x[0].reshape(-1, o.params["W"].shape[0])
                y = np.empty((X.shape[0], o.params["W"].shape[1]), np.float32)
                prune_ext.dense(X, o.params["W"], o.params["b"], y)
                y = y.reshape((M,) + o.shape)
            elif k == "conv":
                y = np.empty((M,) + o.shape, np.float32)
                sh, sw, pt, pl, dh, dw = o.params["geom"]
                prune_ext.conv2d(x[0], o.params["K"], o.params["b"], sh, sw, pt, pl, dh, dw, y)
            elif k == "act":
                src = x[0]
                inplace = o.inputs[0] in owned and self._consumers.get(o.inputs[0], 0) == 1 \
                    and o.inputs[0] not in keep
                y = src if inplace else src.copy()
                last = y.shape[-1] if o.params["kind"] == "softmax" else int(np.prod(y.shape[1:]))
                prune_ext.activation(y.reshape(-1, last), prune_ext.ACTIVATIONS[o.params["kind"]], *o.params["p"])
            elif k == "reshape":
                y = x[0].reshape((M,) + o.shape)
            elif k == "pool":
                y = np.empty((M,) + o.shape, np.float32)
                ph, pw, sh, sw, pt, pl = o.params["geom"]
                prune_ext.pool2d(x[0], ph, pw, sh, sw, pt, pl, o.params["average"], y)
            elif k == "bn":
                y = x[0].copy()
                prune_ext.affine_channels(y.reshape(-1, y.shape[-1]), o.params["scale"], o.params["shift"])
            elif k == "merge":
                y = x[0]
                for z in x[1:]:
                    y = o.params["fn"](y, z)
                y = np.ascontiguousarray(y, dtype=np.float32)
            elif k == "average":
                y = (np.sum(x, axis=0) / np.float32(len(x))).astype(np.float32)
            elif k == "concat":
                y = np.ascontiguousarray(np.concatenate(x, axis=o.params["axis"]), dtype=np.float32)
            elif k == "gpool":
                y = (x[0].mean(axis=(1, 2)) if o.params["average"] else x[0].max(axis=(1, 2))).astype(np.float32)
            else:  # pragma: no cover
                raise AssertionError(k)
            t[o.out] = np.ascontiguousarray(y)
            if k != "reshape":  # reshapes are views of their input: never modified in place
                owned.add(o.out)
        out = t[target].reshape(M, -1)
        if keep:
            return out, {i: t[i] for i in keep}
        return out

    def _tf_forward(self, F):
        import tensorflow as tf

        if self._tf_fn is None:
            self._tf_fn = tf.function(lambda x: self.tf_head(x, training=False), reduce_retracing=True)
        outs = [self._tf_fn(tf.constant(F[i:i + 4096])).numpy() for i in range(0, len(F), 4096)]
        return np.concatenate(outs).reshape(len(F), -1) if outs else np.zeros((0,) + self.output_shape, np.float32)

    def labels(self, F, mask=None, batch_size=4096):
        """Predicted labels for activations F (N, H, W, C), with channels where ``mask`` is 0 zeroed."""
        out = np.empty(len(F), np.int64)
        for lo in range(0, len(F), batch_size):
            x = np.array(F[lo:lo + batch_size], dtype=np.float32)
            if mask is not None:
                x[..., ~np.asarray(mask, bool)] = 0
            out[lo:lo + batch_size] = prune_ext.argmax_rows(np.ascontiguousarray(self.forward(x), np.float32))
        return out

    def describe(self) -> str:
        if self.tf_head is not None:
            return f"TensorFlow head ({self.fallback_reason})"
        kinds = [f"{o.kind}:{o.name}" for o in self.ops if o.kind != "reshape"]
        lin = ", ".join(self.ops[i].name for i in self.linear) or "none"
        return f"prune_ext head, {len(kinds)} ops; incremental linear consumers: {lin}"


def compile_head(model, layer) -> Head:
    """Compile the graph after ``layer`` of a Keras ``model`` into a :class:`Head`."""
    return Head(model, layer)


def masked_steps(head: Head, F: np.ndarray, order, mode: str = "incremental", batch_size: int = 1024):
    """Yield ``(k, channel, labels)`` for k = 0..len(order): labels of all samples with ``order[:k]`` masked.

    ``labels`` is the same array each time (updated in place); copy it to keep a step. ``mode='full'`` re-evaluates
    every sample's whole head at each step (the reference, without the shortcuts).

    In incremental mode a head that ends in a Dense layer (logits = h.W + b) also screens that layer: when a
    sample's logits are computed exactly, its input h_ref, its top-K classes and the (K+1)-th logit (the floor)
    are kept. Later only the K candidates' logits are computed; a class outside them had a logit <= floor at h_ref
    and can have gained at most (h - h_ref).mu + ||h - h_ref|| * max_j ||W_j - mu|| (mu: the mean class vector), so
    when the best candidate beats that (plus a rounding margin) it is the argmax. Otherwise the whole layer is recomputed for that sample.
    """
    if mode not in ("incremental", "full"):
        raise ValueError(f"mode must be 'incremental' or 'full', not {mode!r}")
    incremental = mode == "incremental"
    F = np.ascontiguousarray(F, dtype=np.float32)
    N = len(F)
    H, W, C = head.input_shape
    F3 = F.reshape(N, H * W, C)
    mask = np.ones(C, bool)
    order = [int(c) for c in order]
    native = head.tf_head is None

    linear = head.linear if (incremental and native) else {}
    final = None
    if incremental and native and head.ops[-1].kind == "dense" and len(head.shapes[head.ops[-1].inputs[0]]) == 1:
        final = head.ops[-1]
    keep = tuple(head.ops[i].out for i in linear) + ((final.inputs[0],) if final is not None else ())
    state = {head.ops[i].out: np.empty((N,) + head.shapes[head.ops[i].out], np.float32) for i in linear}
    labels = np.empty(N, np.int64)
    if final is not None:
        h_ref = np.empty((N,) + head.shapes[final.inputs[0]], np.float32)
        n_out = final.params["W"].shape[1]
        K = min(16, n_out - 1)
        cand = np.empty((N, K), np.int64)
        floor = np.empty(N, np.float32)
        Wt = np.ascontiguousarray(final.params["W"].T)
        Wd = final.params["W"].astype(np.float64)
        mu = np.ascontiguousarray(Wd.mean(axis=1))
        rmax = float(np.sqrt(((Wd - mu[:, None]) ** 2).sum(axis=0)).max()) * (1 + 1e-6)
        top_logit = 0.0
    for lo in range(0, N, batch_size):
        x = F[lo:lo + batch_size]
        hi = lo + len(x)
        if keep:
            logits, kept = head.forward(x, keep=keep)
            for tid in state:
                state[tid][lo:hi] = kept[tid]
        else:
            logits = head.forward(x)
        logits = np.ascontiguousarray(logits, np.float32)
        if final is not None:
            h_ref[lo:hi] = kept[final.inputs[0]]
            labels[lo:hi] = prune_ext.argmax_rows(logits)
            if K > 0:
                prune_ext.topk_refs(logits, cand[lo:hi], floor[lo:hi])
            top_logit = max(top_logit, float(np.abs(logits).max(initial=0.0)))
        else:
            labels[lo:hi] = prune_ext.argmax_rows(logits)
    yield 0, -1, labels

    if final is not None:
        tol = 1e-4 * max(1.0, top_logit)  # float32 rounding of the stored logits, with a wide safety factor
        h_tid = final.inputs[0]
    active = prune_ext.channel_activity(F3) if incremental else None
    left = active.sum(axis=1, dtype=np.int64) if incremental else None  # unmasked active channels per sample
    needs_F = not native or any(0 in o.inputs for o in head._plan(frozenset(state), None if final is None else
                                                                   final.inputs[0]))
    stats = {"rows": 0, "exact_final": 0, "screened": 0}
    screen_ok, last_try = True, 0
    for k, c in enumerate(order, 1):
        mask[c] = False
        if incremental:
            rows = np.flatnonzero(active[:, c]).astype(np.int64)
        else:
            rows = np.arange(N, dtype=np.int64)
        if linear:
            left[rows] -= 1
            empty = rows[left[rows] == 0]  # no unmasked active channel left: the input is exactly zero
        for i, kind in linear.items():
            o = head.ops[i]
            if kind == "dense":
                prune_ext.dense_remove_channel(state[o.out].reshape(N, -1), F3, rows, o.params["W"], c)
            else:
                sh, sw, pt, pl, dh, dw = o.params["geom"]
                prune_ext.conv_remove_channel(state[o.out], F, rows, o.params["K"], c, sh, sw, pt, pl, dh, dw)
            # reset to the exact pre-activation of a zero input (the bias), dropping the subtractions' rounding,
            # so that samples whose input is gone tie exactly as in TensorFlow
            state[o.out][empty] = o.params["b"]
        stats["rows"] += len(rows)
        screening = final is not None and K > 0 and (screen_ok or k - last_try >= SCREEN_RETRY)
        if screening:
            last_try = k
        tried = answered = 0
        for lo in range(0, len(rows), batch_size):
            r = rows[lo:lo + batch_size]
            given = {tid: state[tid][r] for tid in state}  # fresh copies: the forward may overwrite them
            x = None
            if needs_F:
                x = F[r]
                x[..., ~mask] = 0
            if final is None:
                logits = head.forward(x, given=given, given_owned=True)
                labels[r] = prune_ext.argmax_rows(np.ascontiguousarray(logits, np.float32))
                continue
            h = np.ascontiguousarray(head.forward(x, given=given, target=h_tid, given_owned=True), np.float32)
            if screening:
                lab = prune_ext.screen_final(h, h_ref, r, cand, floor, Wt, final.params["b"], mu, rmax, tol)
                redo = lab < 0
                labels[r[~redo]] = lab[~redo]
                tried += len(r)
                answered += len(r) - int(redo.sum())
                hr, rr = np.ascontiguousarray(h[redo]), r[redo]
            else:
                hr, rr = h, r
            if len(rr):
                logits = np.empty((len(hr), n_out), np.float32)
                prune_ext.dense(hr, final.params["W"], final.params["b"], logits)
                if screening:  # refresh the references; the top candidate is the argmax (ties: lower class)
                    sub_cand = np.empty((len(rr), K), np.int64)
                    sub_floor = np.empty(len(rr), np.float32)
                    prune_ext.topk_refs(logits, sub_cand, sub_floor)
                    labels[rr] = sub_cand[:, 0]
                    cand[rr], floor[rr], h_ref[rr] = sub_cand, sub_floor, hr
                else:
                    labels[rr] = prune_ext.argmax_rows(logits)
                stats["exact_final"] += len(rr)
        if final is not None and screening and tried:
            screen_ok = answered >= SCREEN_MIN_SHARE * tried
            stats["screened"] += tried
        yield k, c, labels
    masked_steps.last_stats = stats
