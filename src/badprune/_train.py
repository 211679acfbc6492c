"""Keras/TensorFlow training for :mod:`badprune.repair`: the head as its own Keras model, B's logits, the
distillation loss, and the two ways of running the recipe.

* :class:`HeadTrainer` (head mode): the head over cached prune-layer activations, trained by one traced
  ``tf.function`` loop (the step XLA-compiled) with a Keras optimizer. It is built once per (lr, weight decay) and
  reused for every threshold X: each run starts again from B's head weights and a fresh optimizer state, on the
  same fixed-shape inputs (only the mask of zeroed channels differs), so tracing is paid once per sweep.
* :func:`fit` (full mode): ``model.fit`` over images, with per-batch callbacks.

Both use the recipe's loss ``(1 - d) * CE(label, z) + d * T^2 * CE(softmax(z_B / T), softmax(z / T))`` and AdamW
(plain Adam when the weight decay is 0) with a one-cycle learning rate (cosine warm-up from lr/25 over ``warmup`` of the
steps, then cosine decay to 0).
"""
from __future__ import annotations

import contextlib

import numpy as np


def keras_():
    from . import _tf  # noqa: F401
    import keras

    return keras


@contextlib.contextmanager
def as_logits(model):
    """``model`` with its output as logits for the block: a final Dense's softmax is switched to linear (and back
    afterwards); a final Softmax / softmax Activation layer is cut off. Yields the logits model (its layers are
    ``model``'s)."""
    keras = keras_()
    out_layer = model.outputs[0]._keras_history[0]
    act = getattr(out_layer, "activation", None)
    if type(out_layer).__name__ in ("Softmax", "Activation") and \
            (type(out_layer).__name__ == "Softmax" or getattr(act, "__name__", "") == "softmax"):
        yield keras.Model(model.inputs, out_layer.input)
        return
    if getattr(act, "__name__", "") != "softmax":
        yield model
        return
    out_layer.activation = keras.activations.linear
    try:
        yield model
    finally:
        out_layer.activation = act


def head_model(model, layer: str):
    """The layers after ``layer`` as their own Keras model over prune-layer activations (on a clone: ``model`` is
    not touched), with the layer names of ``model``."""
    keras = keras_()
    from .models import prune_output, replay, surgery, trace

    c = surgery.clone(model)
    start = prune_output(c, layer)
    x = keras.Input(shape=tuple(int(v) for v in start.shape[1:]), name=f"{layer}_activations")
    memo = replay(trace(c.outputs[0], start, layer), start, x)
    return keras.Model(x, memo[id(c.outputs[0])], name="head")


def predict_logits(model, X, batch_size=1024):
    with as_logits(model) as m:
        return m.predict(X, batch_size=batch_size, verbose=0)


def _optimizer(p, steps):
    keras = keras_()
    warm = max(1, int(round(p["warmup"] * steps)))
    lr = keras.optimizers.schedules.CosineDecay(p["lr"] / 25.0, decay_steps=max(1, steps - warm),
                                                warmup_target=p["lr"], warmup_steps=warm)
    if p["weight_decay"]:
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=p["weight_decay"])
    return keras.optimizers.Adam(learning_rate=lr)


def _loss(p):
    """The recipe's per-example loss of logits ``z`` given integer labels and the teacher's soft targets at T."""
    keras = keras_()
    T, d = float(p["temperature"]), float(p["distill"])

    def loss(y, q, z):
        ce = keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True)
        if not d:
            return ce
        kd = keras.losses.categorical_crossentropy(q, z / T, from_logits=True) * (T * T)
        return (1.0 - d) * ce + d * kd

    return loss


def soft_targets(Z, temperature: float) -> np.ndarray:
    """The teacher's soft targets softmax(Z / T), float32 (computed once: B's logits are fixed)."""
    z = np.asarray(Z, np.float64) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class HeadTrainer:
    """The recipe ``p`` (lr, weight decay, batch size, epochs, distillation, warm-up) on a head of ``model`` after
    ``layer``, over ``n`` training rows; :meth:`train` runs it from B's head weights.

    Every epoch is a seeded permutation of the rows cut into ``n // batch_size`` full batches (the remainder,
    different each epoch, is left out of that epoch), so all shapes are fixed and one trace serves every run.
    """

    def __init__(self, model, layer: str, n: int, p: dict):
        keras_()  # badprune._tf first: TensorFlow quiet and configured
        import tensorflow as tf

        self.net = head_model(model, layer)
        self._stack = contextlib.ExitStack()   # the private head stays in logits mode for the trainer's life
        m = self._stack.enter_context(as_logits(self.net))
        self.start = [v.numpy() for v in self.net.variables]  # weights and any random layer's seed state
        self.bs = int(min(p["batch_size"], n))
        self.per = n // self.bs
        self.epochs = int(p["epochs"])
        self.opt = _optimizer(p, self.per * self.epochs)
        self.opt.build(m.trainable_variables)
        loss_fn, tv = _loss(p), m.trainable_variables

        @tf.function(jit_compile=True)
        def step(X, Y, Q, b, D, j, u):
            x, y, q = tf.gather(X, b), tf.gather(Y, b), tf.gather(Q, b)
            # unlearning: rows with u > 0 get u times the shift D[j], kept at their own label and soft target
            x = tf.where(tf.reshape(u > 0, (-1,) + (1,) * (len(x.shape) - 1)),
                         tf.nn.relu(x + tf.reshape(u, (-1,) + (1,) * (len(x.shape) - 1)) * tf.gather(D, j)), x)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(y, q, m(x, training=True)))
            self.opt.apply_gradients(zip(tape.gradient(loss, tv), tv))
            return loss

        @tf.function
        def epoch(X, Y, Q, idx, D, J, U):
            total = tf.constant(0.0)
            for i in tf.range(tf.shape(idx)[0]):
                total += step(X, Y, Q, idx[i], D, J[i], U[i])
            return total / tf.cast(tf.shape(idx)[0], tf.float32)

        self._epoch = epoch

    def train(self, X, y, Q, seed: int, shifts=None, share: float = 0.5, scale: float = 1.5):
        """Train from B's head weights on inputs ``X``, labels ``y`` and soft targets ``Q`` (same rows); returns
        the per-epoch mean losses. The trained weights are in ``self.net`` (its layers have B's names).

        ``shifts`` (S, *X.shape[1:]), or a function of (epoch, the head being trained) returning them: activation
        shifts to unlearn. In every batch a seeded ``share`` of the rows
        gets one of them (drawn at random) times a factor drawn from U(0, ``scale``), clipped at 0, and keeps its
        own label and soft target: the head learns to answer the same with or without the shift."""
        import tensorflow as tf

        for v, w in zip(self.net.variables, self.start):
            v.assign(w)
        for v in self.opt.variables:
            v.assign(tf.zeros_like(v))
        rng = np.random.default_rng([int(seed), 11])
        X, Y = tf.constant(X, tf.float32), tf.constant(np.asarray(y, np.int32))
        Q = tf.constant(Q if Q is not None else np.zeros((len(y), 1), np.float32))
        srng = np.random.default_rng([int(seed), 13])
        none = np.zeros((1,) + tuple(X.shape[1:]), np.float32)
        losses = []
        for e in range(self.epochs):
            idx = rng.permutation(len(y))[:self.per * self.bs].reshape(self.per, self.bs).astype(np.int32)
            S = shifts(e, self.net) if callable(shifts) else shifts
            D = tf.constant(none if S is None or not len(S) else np.asarray(S, np.float32))
            J = srng.integers(0, D.shape[0], idx.shape).astype(np.int32)
            U = np.zeros(idx.shape, np.float32)
            if S is not None and len(S):
                on = srng.random(idx.shape) < share
                U[on] = srng.uniform(0, scale, int(on.sum()))
            losses.append(round(float(self._epoch(X, Y, Q, tf.constant(idx), D, tf.constant(J), tf.constant(U))),
                                5))
        return losses


def fit(net, X, y, Z, p, callbacks=()):
    """Train ``net`` on inputs ``X``, labels ``y`` and teacher logits ``Z`` by the recipe ``p`` with
    ``model.fit`` (its output switched to logits while training). Returns the per-epoch losses."""
    import tensorflow as tf

    K = int(net.outputs[0].shape[-1])
    d = float(p["distill"])
    loss_fn = _loss(p)
    targets = np.empty((len(y), 1 + (K if d else 0)), np.float32)
    targets[:, 0] = y
    if d:
        targets[:, 1:] = soft_targets(Z, p["temperature"])

    def loss(t, z):
        return loss_fn(tf.cast(t[:, 0], tf.int32), t[:, 1:], z)

    steps = -(-len(X) // p["batch_size"]) * p["epochs"]
    ds = tf.data.Dataset.from_tensor_slices((X, targets))
    ds = ds.shuffle(len(X), seed=p["seed"], reshuffle_each_iteration=True).batch(p["batch_size"]).prefetch(2)
    with as_logits(net) as train:
        train.compile(optimizer=_optimizer(p, steps), loss=loss)
        h = train.fit(ds, epochs=p["epochs"], verbose=0, shuffle=False, callbacks=list(callbacks))
    return [round(float(v), 5) for v in h.history.get("loss", [])]
