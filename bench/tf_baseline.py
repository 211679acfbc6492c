"""The best plain-TensorFlow pruning sweep, written plainly (the second baseline): run the trunk once over the three
sets (a traced ``tf.function``, batches of 1024), keep the prune layer's activations, and at every step run the
head (a ``keras.Model`` from the prune layer's output to the model output, the original layers called again on a
new Input) over all cached activations with the pruned channels masked (multiplied by a 0/1 vector inside the
traced function), then argmax and the accuracies.

Every step costs the same (the whole head over every sample), so the benchmark measures a few steps and
extrapolates: trunk once + (C+1) x time per step.
"""
from __future__ import annotations

import numpy as np

BATCH = 1024
HEAD_BATCH = 4096


def head_model(model, layer: str):
    """The layers after ``layer``, called again (same objects, shared weights) on a new Input."""
    import keras

    start = model.get_layer(layer).output
    x = keras.Input(shape=tuple(start.shape[1:]))
    memo = {id(start): x}

    def visit(t):
        if id(t) in memo:
            return memo[id(t)]
        op, node_index, _ = t._keras_history
        node = op._inbound_nodes[node_index]
        for a in node.input_tensors:
            visit(a)
        args, kwargs = node.arguments.fill_in(memo)
        outs = keras.tree.flatten(op(*args, **kwargs))
        for old, new in zip(node.output_tensors, outs):
            memo[id(old)] = new
        return memo[id(t)]

    return keras.Model(x, visit(model.outputs[0]), name=f"head_{layer}")


def trunk_features(model, layer: str, xs: dict):
    """Prune-layer activations of every set (one array, sets in order) and each set's slice."""
    import keras
    import tensorflow as tf

    trunk = keras.Model(model.inputs, model.get_layer(layer).output)
    fn = tf.function(lambda t: trunk(t, training=False),
                     input_signature=[tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)])
    parts, bounds, lo = [], {}, 0
    for name, x in xs.items():
        for i in range(0, len(x), BATCH):
            parts.append(fn(x[i:i + BATCH]).numpy())
        bounds[name] = slice(lo, lo + len(x))
        lo += len(x)
    return np.concatenate(parts), bounds


class TFSweep:
    """The per-step work: masked head over all cached activations, argmax, accuracies."""

    def __init__(self, model, layer: str, F: np.ndarray, bounds: dict, ys: dict, order):
        import tensorflow as tf

        self.head = head_model(model, layer)
        self.F = tf.constant(F)
        self.bounds, self.ys = bounds, ys
        self.order = [int(c) for c in order]
        C = F.shape[-1]
        self.mask = np.ones(C, np.float32)
        self.k = 0
        head = self.head
        self._fn = tf.function(lambda f, m: tf.argmax(head(f * m, training=False), axis=-1),
                               input_signature=[tf.TensorSpec((None,) + tuple(F.shape[1:]), tf.float32),
                                                tf.TensorSpec((C,), tf.float32)])

    @property
    def evaluations(self) -> int:
        return len(self.order) + 1

    def evaluate(self) -> dict:
        m = self.mask
        n = int(self.F.shape[0])
        lab = np.concatenate([self._fn(self.F[i:i + HEAD_BATCH], m).numpy() for i in range(0, n, HEAD_BATCH)])
        return {k: float(np.mean(lab[s] == self.ys[k]) * 100) for k, s in self.bounds.items()}

    def step(self) -> dict:
        self.mask[self.order[self.k % len(self.order)]] = 0
        self.k += 1
        return self.evaluate()
