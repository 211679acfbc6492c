"""Feature-space trigger inversion: for a class t, a universal shift of the prune layer's activations that sends
clean inputs of other classes to t, found on clean activations alone (no poisoned input is ever seen).

A backdoor with a global trigger (a blended pattern, a sinusoid, a warp) shows at the prune layer as a small, nearly
universal shift toward the target: adding the mean difference between triggered and clean activations to clean
ones sends most of them to the target, and the shift is concentrated in a few channels. A patch trigger shows as a
large local overshoot, also a shift. So for each class t we look for the shift d_t of bounded L2 norm that
maximises the share of clean inputs sent to t: ``head(relu(F + d_t))`` (the relu keeps the activations in the
range a ReLU/max-pool layer can produce; its gradient is passed straight through, so that activations that are
zero on clean inputs, where a backdoor's channels often sit, can grow). The backdoor's target needs a much smaller shift than any other class.

The search is projected gradient descent on the cross-entropy toward t, all candidate classes at once (one batch
of ``classes x batch`` rows through the head per step), each shift kept in the L2 ball of radius ``eps`` (a share
of the clean activations' mean norm). It needs only the head (the layers after the prune layer) as a Keras model
over cached activations: its cost does not depend on the trunk.

A second probe, :func:`stimulate_channels`, looks for the other form (the one a patch trigger takes): a channel
that, driven beyond its clean range, sends most clean inputs to one class (the idea of ABS, Liu et al. 2019, at the
prune layer). Each channel in turn is raised to a ladder of levels at every position; per class, the smallest
level at which one channel sends most inputs of other classes to it. A backdoor's target is reached at a
level well below every other class's.

Used by :mod:`badprune.scan` (which classes need anomalously small shifts or stimulations: the verdict and the
targets) and by :mod:`badprune.repair` (the shifts found for the suspected targets are unlearned).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

#: default number of PGD steps, rows of clean activations per class and step, and largest rows per head call
STEPS = 40
BATCH = 32
MAX_ROWS = 8192
#: the "class" of an untargeted shift
UNTARGETED = -1
#: the stimulation ladder: half-octave multiples of the clean activations' 99th percentile (1/8 to 8)
LEVELS = 0.125 * 2.0 ** (np.arange(13) / 2)
#: a class is reached by a stimulation when it receives this share of the inputs of other classes (a backdoor's
#: channel sends nearly all of them; 0.8 separated the demo models better than 0.5 or 0.3)
STIM_SHARE = 0.8
#: clean rows the stimulation probe pushes through the head per channel and level
STIM_ROWS = 400
#: share of the clean data held out (class-stratified, seeded) to measure what a shift or a repair does
HOLDOUT = 0.2


def holdout_split(y, seed: int, fraction: float = HOLDOUT) -> tuple:
    """(train, held-out) sorted index arrays over clean validation labels ``y``: per class a seeded ``fraction``
    is held out (classes with one image stay in training)."""
    y = np.asarray(y)
    rng = np.random.default_rng([int(seed), 7])
    tr, ho = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        ho.append(idx[:k])
        tr.append(idx[k:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(ho))


def mean_norm(F) -> float:
    """The mean L2 norm of activation rows (the unit of the shift budgets)."""
    F = np.asarray(F, np.float32)
    return float(np.linalg.norm(F.reshape(len(F), -1), axis=1).mean()) if len(F) else 0.0


def flip_rate(labels_fn, F, y, classes, deltas, chunk: int = 4096) -> np.ndarray:
    """Share of the rows of ``F`` whose label ``y`` is not class ``classes[i]`` that ``labels_fn`` labels
    ``classes[i]`` once shifted by ``deltas[i]`` (and clipped at 0)."""
    out = np.zeros(len(classes))
    for i, (t, d) in enumerate(zip(classes, deltas)):
        X = F[y != t]
        if not len(X):
            continue
        hits = 0
        for lo in range(0, len(X), chunk):
            x = np.maximum(X[lo:lo + chunk] + d, 0, dtype=np.float32)
            hits += int((labels_fn(x) == t).sum())
        out[i] = hits / len(X)
    return out


def invert_shifts(net, F, y, classes, eps: float, steps: int = STEPS, batch: int = BATCH, seed: int = 0,
                  keep=None, init=None) -> np.ndarray:
    """Per class of ``classes``, a shift of L2 norm at most ``eps`` that sends the clean activations ``F``
    (labels ``y``) of other classes to it through ``net`` (a Keras model over the activations whose output is the
    logits or a softmax). A class of :data:`UNTARGETED` (-1) asks instead for the shift that moves inputs away
    from their own labels the most (a universal adversarial shift, over all rows). ``keep``: a bool mask over channels (or over every activation); shifts stay zero outside it (pruned
    channels, a window).
    ``init``: starting shifts (default zero). Returns (len(classes), H, W, C) float32.

    Projected gradient descent: each step draws ``batch`` rows of other classes per class (seeded), takes a
    normalised gradient step of the cross-entropy toward the class (step size decreasing from 0.27 eps to
    0.02 eps) and projects back onto the ball.
    """
    from ._train import as_logits
    import tensorflow as tf

    F = np.asarray(F, np.float32)
    y = np.asarray(y)
    classes = np.asarray(classes, np.int64)
    k, shape = len(classes), F.shape[1:]
    if k == 0:
        return np.zeros((0,) + shape, np.float32)
    rng = np.random.default_rng([int(seed), 23])
    others = [np.flatnonzero(y != t) if t != UNTARGETED else np.arange(len(y)) for t in classes]
    mask = np.ones(shape, np.float32)
    if keep is not None:
        keep = np.asarray(keep, bool)
        if keep.shape == shape:   # a mask over every activation (e.g. a window of positions)
            mask[~keep] = 0
        else:                     # a mask over channels
            mask[..., ~keep] = 0
    per = max(1, min(batch, MAX_ROWS // k))
    sign = np.repeat(np.where(classes == UNTARGETED, -1.0, 1.0), per).astype(np.float32)
    d0 = np.zeros((k,) + shape, np.float32) if init is None else np.asarray(init, np.float32) * mask
    with as_logits(net) as m:
        delta = tf.Variable(d0)
        step = _pgd_step(net, m, k, per, shape)
        args = (delta, tf.constant(F), tf.constant(y.astype(np.int32)),
                tf.constant(np.repeat(classes, per).astype(np.int32)), tf.constant(sign), tf.constant(mask),
                tf.constant(np.float32(eps)))
        for s in range(int(steps)):
            rows = np.concatenate([o[rng.integers(0, len(o), per)] if len(o) else np.zeros(per, np.int64)
                                   for o in others]).astype(np.int32)
            step(*args, tf.constant(rows), tf.constant((0.25 * (1 - s / steps) + 0.02) * eps, tf.float32))
        return delta.numpy()


#: the traced PGD steps of the last few head models (most recent last), so that repeated inversions against one
#: head (the unlearning's rounds) trace once; bounded, so that the heads of a zoo are not all kept alive
_STEPS: OrderedDict = OrderedDict()
_STEPS_KEPT = 2


def _pgd_step(net, m, k: int, per: int, shape: tuple):
    """The traced projected-gradient step of :func:`invert_shifts` for the head ``net`` through its logits model
    ``m`` (``k`` classes of ``per`` rows of activations of ``shape``); its tensors are arguments, so one trace serves
    every call with the same head (keyed on ``net``: a head ending in a Softmax layer gets a new logits model, with
    the same layers, at every call)."""
    import tensorflow as tf

    from ._train import keras_

    keras = keras_()
    key = (id(net), k, per, tuple(shape))
    if key in _STEPS and _STEPS[key][0] is net:
        _STEPS.move_to_end(key)
        return _STEPS[key][1]

    @tf.function(reduce_retracing=True)
    def step(delta, Ft, yt, cls, sg, mk, eps, rows, size):
        tgt = tf.where(cls == UNTARGETED, tf.gather(yt, rows), cls)
        with tf.GradientTape() as tape:
            x = tf.reshape(tf.gather(Ft, rows), (k, per) + shape) + delta[:, None]
            # clipped at 0 going forward, the gradient passed straight through: a dormant (zero) activation
            # must be able to grow, which relu's zero gradient at 0 would forbid
            x = x + tf.stop_gradient(tf.nn.relu(x) - x)
            z = m(tf.reshape(x, (k * per,) + shape), training=False)
            loss = tf.reduce_sum(sg * keras.losses.sparse_categorical_crossentropy(tgt, z, from_logits=True))
        g = tape.gradient(loss, delta) * mk
        gn = tf.sqrt(tf.reduce_sum(g * g, axis=list(range(1, g.shape.rank)), keepdims=True)) + 1e-12
        new = delta - size * g / gn
        n = tf.sqrt(tf.reduce_sum(new * new, axis=list(range(1, g.shape.rank)), keepdims=True)) + 1e-12
        delta.assign(new * tf.minimum(1.0, eps / n))

    _STEPS[key] = (net, step)
    while len(_STEPS) > _STEPS_KEPT:
        _STEPS.popitem(last=False)
    return step


def level_value(level, unit: float):
    """The activation value of a (possibly fractional) ladder step ``level`` for the unit ``unit``: the ladder of
    :data:`LEVELS` extended between its rungs."""
    return unit * LEVELS[0] * 2.0 ** (np.asarray(level, np.float64) / 2)


def stimulate_channels(labels_fn, F, y, num_classes: int, keep=None, rows: int = STIM_ROWS,
                       share: float = STIM_SHARE, max_bytes: int = 64 << 20) -> tuple:
    """Per class, the smallest stimulation of one channel that sends ``share`` of the clean rows ``F`` (labels
    ``y``) of other classes to it through ``labels_fn``.

    Each channel (``keep``: a bool mask over channels; others are skipped) is raised, at every position, to at
    least ``LEVELS[i]`` times the 99th percentile of ``F`` for each level i in turn. Returns ``(level, channel,
    unit)``: per class the crossing level in ladder steps (a float: interpolated in log scale between the last
    level below ``share`` and the first at or above it, 0 when the first level already reaches it;
    ``len(LEVELS)`` when never reached), the channel that reached it first (-1 if none), and the unit (the 99th
    percentile). Only the first ``rows`` rows of ``F`` are used (pass a seeded subset); labels outside
    ``range(num_classes)`` are not counted. Channels go through the head in groups of at most ``max_bytes`` of
    activations."""
    F = np.asarray(F, np.float32)[:rows]
    y = np.asarray(y, np.int64)[:rows]
    n, shape = len(F), F.shape[1:]
    K = int(num_classes)
    C = shape[-1]
    level = np.full(K, float(len(LEVELS)))
    channel = np.full(K, -1, np.int64)
    if n == 0 or K == 0:
        return level, channel, 0.0
    unit = float(np.percentile(F, 99)) or float(F.max()) or 1.0
    chans = np.flatnonzero(np.ones(C, bool) if keep is None else np.asarray(keep, bool))
    if not len(chans):
        return level, channel, unit
    others = n - np.bincount(y[(y >= 0) & (y < K)], minlength=K)[:K]   # per class: rows of other classes
    group = max(1, int(max_bytes // max(F.nbytes, 1)))
    prev = np.zeros(K)
    for i, v in enumerate(LEVELS):
        cnt = np.zeros((len(chans), K))
        for g0 in range(0, len(chans), group):
            gc = chans[g0:g0 + group]
            X = np.repeat(F[None], len(gc), axis=0)                  # (group, rows, H, W, C)
            for j, c in enumerate(gc):
                np.maximum(X[j, ..., c], v * unit, out=X[j, ..., c])
            lab = np.asarray(labels_fn(X.reshape((-1,) + shape)), np.int64).reshape(len(gc), n)
            hit = (lab != y[None]) & (lab >= 0) & (lab < K)           # sent to another class of the head's
            np.add.at(cnt, (g0 + np.nonzero(hit)[0], lab[hit]), 1.0)
        rate = cnt / np.maximum(others, 1)[None]
        best = rate.max(axis=0)
        new = (best >= share) & (level == len(LEVELS))
        if new.any():
            frac = (share - prev[new]) / np.maximum(best[new] - prev[new], 1e-9)
            level[new] = np.maximum(i - 1 + np.clip(frac, 0.0, 1.0), 0.0)
            channel[new] = chans[rate[:, new].argmax(axis=0)]
        prev = best
        if (level < len(LEVELS)).all():
            break
    return level, channel, unit
