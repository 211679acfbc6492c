"""A model's identity for cache keys: a digest of its architecture and weights."""
from __future__ import annotations

import hashlib
import json

import numpy as np


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
