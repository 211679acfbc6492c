"""The trunk (the model's input -> the prune layer) compiled for prune_ext's native kernel.

A trunk that is a plain chain of Conv2D (valid padding, stride 1, linear or ReLU) and MaxPooling2D (valid) layers,
like the lab's DeepID (conv_1 -> pool_1 -> conv_2 -> pool_2 -> conv_3 -> pool_3), runs in
:func:`prune_ext.trunk_forward`: one image at a time, every layer fused and kept in cache, each convolution output
summed in the order oneDNN's x86-64 kernels sum it (zero, then a fused multiply-add per tap and input channel,
then the bias). Where TensorFlow's kernels sum in that order, the activations are TensorFlow's to the bit; the
extraction (:mod:`badprune.features`) uses this one only after checking that on real batches, else it keeps
TensorFlow. :func:`compile_trunk` returns None for any other trunk.
"""
from __future__ import annotations

import numpy as np
import prune_ext

from .errors import BadpruneError
from .models import IDENTITY_AT_INFERENCE
from .models.graph import trace

_POOLS = ("MaxPooling2D", "MaxPool2D")


class NativeTrunk:
    """A trunk as :func:`prune_ext.trunk_forward`'s layer table: ``spec`` (layers, 8) and the Keras layers whose
    weights it reads (:meth:`sync`, at :func:`compile_trunk` and before each pass: a model's weights may change
    between passes). Calling it fills ``out`` (N, H, W, C) from images ``x`` (N, H, W, C), both float32
    C-contiguous, and returns whether it could (False where prune_ext has no FMA instance)."""

    def __init__(self, spec, layers, use_bias):
        self.spec = np.ascontiguousarray(spec, np.int32).reshape(-1, 8)
        self._layers = tuple(layers)
        self._use_bias = tuple(use_bias)
        self.layers = tuple(lay.name for lay in layers)
        self.kernels = self.biases = None

    def sync(self) -> bool:
        """Read the layers' current weights; False when a weight is not finite (the kernel's ReLU and max-pool
        then need not treat NaN as TensorFlow does: leave such a model to TensorFlow)."""
        kernels, biases = [], []
        for (kind, *_), lay, bias in zip(self.spec, self._layers, self._use_bias):
            if kind != 0:
                kernels.append(None)
                biases.append(None)
                continue
            w = lay.get_weights()
            k = np.ascontiguousarray(w[0], np.float32)
            b = np.ascontiguousarray(w[1], np.float32) if bias else np.zeros(k.shape[3], np.float32)
            if not (np.isfinite(k).all() and np.isfinite(b).all()):
                return False
            kernels.append(k)
            biases.append(b)
        self.kernels, self.biases = kernels, biases
        return True

    def __call__(self, x: np.ndarray, out: np.ndarray) -> bool:
        return bool(prune_ext.trunk_forward(x, self.spec, self.kernels, self.biases, out))


def _conv(layer, cfg):
    if (tuple(cfg.get("strides", (1, 1))) != (1, 1) or tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1)
            or cfg.get("padding") != "valid" or cfg.get("groups", 1) != 1 or cfg.get("lora_rank")
            or cfg.get("activation") not in ("linear", "relu")):
        return None
    w = layer.get_weights()
    if len(w) < 1 or w[0].ndim != 4 or w[0].dtype != np.float32 or w[0].shape[1] > prune_ext.TRUNK_MAX_KW:
        return None
    kh, kw, ci, co = w[0].shape
    return [0, kh, kw, ci, co, int(cfg["activation"] == "relu"), 0, 0], bool(cfg.get("use_bias", True))


def _pool(layer, cfg):
    if cfg.get("padding") != "valid":
        return None
    ph, pw = cfg["pool_size"]
    sh, sw = cfg.get("strides") or (ph, pw)
    return [1, ph, pw, sh, sw, 0, 0, 0], False


def compile_trunk(net) -> NativeTrunk | None:
    """``net`` (a one-input, one-output Keras model: a trunk, :func:`badprune.features.trunk`) as a
    :class:`NativeTrunk`, or None when it is not a chain of the layers the kernel runs (float32, channels-last) or
    prune_ext has no FMA instance."""
    if not prune_ext.TRUNK_VECTORIZED or len(net.inputs) != 1 or len(net.outputs) != 1:
        return None
    x = net.inputs[0]
    if len(x.shape) != 4 or str(getattr(x, "dtype", "float32")) != "float32":
        return None
    try:
        nodes = trace(net.outputs[0], x)
    except (BadpruneError, ValueError, AttributeError):
        return None
    spec, layers, use_bias = [], [], []
    prev = x
    for n in nodes:
        lay, node = n.layer, n.node
        ins, outs = list(node.input_tensors), list(node.output_tensors)
        if len(ins) != 1 or ins[0] is not prev or len(outs) != 1:
            return None
        cls = type(lay).__name__
        cfg = lay.get_config()
        policy = getattr(lay, "dtype_policy", None)
        if getattr(policy, "compute_dtype", "float32") != "float32":
            return None
        if cfg.get("data_format", "channels_last") != "channels_last":
            return None
        if cls in IDENTITY_AT_INFERENCE:  # passed over
            prev = outs[0]
            continue
        lowered = _conv(lay, cfg) if cls == "Conv2D" else _pool(lay, cfg) if cls in _POOLS else None
        if lowered is None:
            return None
        spec.append(lowered[0])
        use_bias.append(lowered[1])
        layers.append(lay)
        prev = outs[0]
    if not spec:
        return None
    t = NativeTrunk(spec, layers, use_bias)
    return t if t.sync() else None
