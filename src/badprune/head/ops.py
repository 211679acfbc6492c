"""The head's op list: what one op is, and the small lowering helpers shared by the layer lowerings."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import prune_ext

#: op kinds the evaluator knows (:data:`badprune.head.evaluate.KERNELS`)
KINDS = ("dense", "conv", "pool", "act", "bn", "reshape", "merge", "average", "concat", "gpool")


@dataclass
class Op:
    """One step of the head: ``out := kind(inputs, params)``; shapes are per sample (no batch axis)."""

    kind: str          # one of KINDS
    name: str          # the Keras layer it comes from
    inputs: list       # tensor ids
    out: int           # tensor id
    shape: tuple       # output shape per sample
    params: dict = field(default_factory=dict)


def same_pad(size, k, s, d=1):
    """(output size, padding before) of 'same' padding along one axis."""
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return out, total // 2


def activation_op(name, act, tin, tout, shape):
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
