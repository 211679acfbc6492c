"""Fine-pruning (Liu, Dolan-Gavitt, Garg, RAID 2018): repair each B'_X into R_X by fine-tuning on clean data only.

Two modes:

* ``head`` (default): the trunk up to the prune layer is frozen and never re-run. The head (the layers after the
  prune layer) is a Keras model over the cached prune-layer activations, trained with the pruned channels zeroed
  at its input, during and after training. R_X is B'_X (the pruned channels' producing convolution zeroed) with
  the trained head's weights.
* ``full``: the whole network is trained on the clean validation images (the paper's method), batched; the pruned
  channels' kernel and bias are re-zeroed after every batch, so they stay exactly zero.

No peeking: the defender has only clean data. A seeded part of the clean validation set (:data:`HOLDOUT`) is held
out; training uses the rest; every choice (the checkpoint kept) is made on the held-out accuracy. The poisoned set
is never seen here: it only measures the attack success rate afterwards.

The recipe (:data:`DEFAULTS`, chosen on clean data, see the README): soft targets that mix the true label with B's
own clean probabilities (distillation from B, which keeps the clean accuracy while the masked head re-learns), a
one-cycle learning rate (linear warm-up to a high peak, cosine decay), Adam, and the epoch with the best held-out
accuracy.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import BadpruneError

MODES = ("head", "full")
#: share of the clean validation set held out for choosing the checkpoint
HOLDOUT = 0.2
#: the recipe's settings per mode: epochs, peak learning rate, batch size, distillation weight
DEFAULTS = {
    "head": {"epochs": 10, "lr": 3e-3, "batch_size": 128, "distill": 0.5},
    "full": {"epochs": 5, "lr": 1e-3, "batch_size": 128, "distill": 0.5},
}


@dataclass
class Repaired:
    """R_X for one threshold X: the network, its metrics (percent, as the sweep's columns) and how it was made."""

    x: float
    mode: str
    step: int                      # B'_X's step (channels pruned)
    channels: list                 # the pruned channels (exactly zero in R_X)
    row: dict                      # valid_acc, test_acc, asr, goodnet_* (GoodNet of B and R_X)
    info: dict = field(default_factory=dict)   # epochs, lr, batch size, held-out accuracy per epoch, seconds
    model: object = None           # R_X, a plain Keras model


def check_args(mode, epochs=None, lr=None, seed=0) -> dict:
    """The fine-tuning settings, checked: ``{'mode', 'epochs', 'lr', 'batch_size', 'distill', 'seed'}``.

    Raises :class:`BadpruneError` naming the flag for an unknown mode, epochs < 1, or a learning rate that is not a
    positive number.
    """
    if mode not in MODES:
        raise BadpruneError(f"unknown fine-tuning mode '{mode}'", fix="use --fine-tune head or --fine-tune full")
    p = dict(DEFAULTS[mode], mode=mode)
    if epochs is not None:
        try:
            e = int(epochs)
        except (TypeError, ValueError):
            e = 0
        if e < 1 or e != epochs:
            raise BadpruneError(f"--fine-tune-epochs must be a whole number of at least 1, got {epochs}",
                                fix="e.g. --fine-tune-epochs 10")
        p["epochs"] = e
    if lr is not None:
        try:
            v = float(lr)
        except (TypeError, ValueError):
            v = float("nan")
        if not np.isfinite(v) or v <= 0 or v > 1:
            raise BadpruneError(f"--fine-tune-lr must be a positive learning rate (at most 1), got {lr}",
                                fix="e.g. --fine-tune-lr 3e-3")
        p["lr"] = v
    try:
        p["seed"] = int(seed)
    except (TypeError, ValueError):
        raise BadpruneError(f"--seed must be a whole number, got {seed!r}") from None
    return p


def holdout_split(n: int, seed: int, fraction: float = HOLDOUT) -> tuple:
    """(train, held-out) sorted index arrays over ``n`` clean validation images, seeded."""
    rng = np.random.default_rng([int(seed), 7])
    perm = rng.permutation(n)
    k = max(1, int(round(fraction * n))) if n > 1 else 0
    return np.sort(perm[k:]), np.sort(perm[:k])


def _keras():
    from . import _tf  # noqa: F401
    import keras

    return keras


def _seed(seed):
    keras = _keras()
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # pragma: no cover  (older TensorFlow)
        pass


def head_model(model, layer: str):
    """The layers after ``layer`` as their own Keras model over prune-layer activations (on a clone: ``model`` is
    not touched), with the layer names of ``model``."""
    keras = _keras()
    from .models import prune_output, replay, surgery, trace

    c = surgery.clone(model)
    start = prune_output(c, layer)
    x = keras.Input(shape=tuple(int(v) for v in start.shape[1:]), name=f"{layer}_activations")
    memo = replay(trace(c.outputs[0], start, layer), start, x)
    return keras.Model(x, memo[id(c.outputs[0])], name="head")


class _KeepBest:
    """Callback: held-out accuracy after each epoch; the best epoch's weights are restored at the end."""

    def __new__(cls, X, y, batch_size):
        keras = _keras()

        class KeepBest(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.history, self.best, self.best_epoch, self.weights = [], -1.0, -1, None

            def on_epoch_end(self, epoch, logs=None):
                p = self.model.predict(X, batch_size=1024, verbose=0)
                acc = 100.0 * float(np.mean(p.argmax(axis=1) == y)) if len(y) else 0.0
                self.history.append(round(acc, 4))
                if acc > self.best:
                    self.best, self.best_epoch = acc, epoch + 1
                    self.weights = [w.copy() for w in self.model.get_weights()]

            def on_train_end(self, logs=None):
                if self.weights is not None:
                    self.model.set_weights(self.weights)

        return KeepBest()


def _soft_targets(y, teacher, n_classes, distill):
    t = np.zeros((len(y), n_classes), np.float32)
    t[np.arange(len(y)), y] = 1.0 - distill
    if distill:
        t += distill * np.asarray(teacher, np.float32)
    return t


def _fit(net, X, T, X_hold, y_hold, p, callbacks=(), steps_per_execution=1):
    """Train ``net`` (outputs probabilities) on inputs ``X`` with soft targets ``T`` by the one-cycle recipe;
    keep the epoch best on the held-out set. Returns the info dict. ``steps_per_execution`` > 1 runs that many
    batches per call (much less overhead for a small head; per-batch callbacks then run once per call)."""
    keras = _keras()
    import tensorflow as tf

    steps = -(-len(X) // p["batch_size"]) * p["epochs"]
    warm = max(1, int(0.3 * steps))
    lr = keras.optimizers.schedules.CosineDecay(p["lr"] / 25.0, decay_steps=max(1, steps - warm),
                                                warmup_target=p["lr"], warmup_steps=warm)
    net.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="categorical_crossentropy",
                steps_per_execution=steps_per_execution)
    keep = _KeepBest(X_hold, y_hold, p["batch_size"])
    ds = tf.data.Dataset.from_tensor_slices((X, T)).shuffle(len(X), seed=p["seed"], reshuffle_each_iteration=True)
    net.fit(ds.batch(p["batch_size"]).prefetch(2), epochs=p["epochs"], verbose=0, shuffle=False,
            callbacks=[keep, *callbacks])
    return {"epochs": p["epochs"], "lr": p["lr"], "batch_size": p["batch_size"], "distill": p["distill"],
            "seed": p["seed"], "best_epoch": keep.best_epoch, "holdout_best": keep.best,
            "holdout_acc": keep.history, "holdout": len(y_hold), "train": len(X)}


def repair_head(model, layer: str, channels, F_valid, y_valid, params: dict):
    """R_X by the head mode: the head trained over the clean validation activations ``F_valid`` with ``channels``
    zeroed. Returns ``(R_X, info)``."""
    from .models import channel_mask, prune_model

    p = params
    _seed(p["seed"])
    F_valid = np.asarray(F_valid, np.float32)
    y_valid = np.asarray(y_valid, np.int64)
    n_classes = int(model.outputs[0].shape[-1])
    teacher = head_model(model, layer).predict(F_valid, batch_size=1024, verbose=0) if p["distill"] else None
    keep = channel_mask(F_valid.shape[-1], channels).astype(bool)
    Xm = F_valid.copy()
    Xm[..., ~keep] = 0
    tr, ho = holdout_split(len(Xm), p["seed"])
    net = head_model(model, layer)
    t0 = time.perf_counter()
    info = _fit(net, Xm[tr], _soft_targets(y_valid[tr], None if teacher is None else teacher[tr], n_classes,
                                           p["distill"]), Xm[ho], y_valid[ho], p, steps_per_execution=32)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    R = prune_model(model, layer, channels)
    for lay in net.layers:
        if lay.weights:
            R.get_layer(lay.name).set_weights(lay.get_weights())
    return R, info


def repair_full(model, layer: str, channels, X_valid, y_valid, params: dict, progress=None):
    """R_X by the full mode: all of B'_X trained on the clean validation images ``X_valid`` (scaled float32
    NHWC); the pruned channels' producing convolution is re-zeroed after every batch. Returns ``(R_X, info)``."""
    keras = _keras()
    from .models import conv_producer, prune_model

    p = params
    _seed(p["seed"])
    conv = conv_producer(model, layer)
    if conv is None:
        raise BadpruneError(f"--fine-tune full needs a convolution producing '{layer}' (to keep its pruned channels "
                            "zero)", fix="use --fine-tune head")
    R = prune_model(model, layer, channels)
    y_valid = np.asarray(y_valid, np.int64)
    n_classes = int(model.outputs[0].shape[-1])
    teacher = model.predict(X_valid, batch_size=512, verbose=0) if p["distill"] else None
    tr, ho = holdout_split(len(X_valid), p["seed"])
    chans = sorted(int(c) for c in channels)
    cl = R.get_layer(conv)

    class Rezero(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            k = cl.kernel.numpy()
            k[..., chans] = 0
            cl.kernel.assign(k)
            if cl.use_bias:
                b = cl.bias.numpy()
                b[chans] = 0
                cl.bias.assign(b)

        def on_epoch_end(self, epoch, logs=None):
            if progress is not None:
                progress(f"fine-tune full: epoch {epoch + 1}/{p['epochs']} (loss {(logs or {}).get('loss', 0):.4f})")

    t0 = time.perf_counter()
    info = _fit(R, X_valid[tr], _soft_targets(y_valid[tr], None if teacher is None else teacher[tr], n_classes,
                                              p["distill"]), X_valid[ho], y_valid[ho], p, callbacks=[Rezero()])
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return R, info


def repaired_labels(R, layer: str, channels, F, mode: str, datasets=None, scale=None, cache_dir=None,
                    bounds=None) -> np.ndarray:
    """R_X's labels over the activations ``F`` of all sets, evaluated by prune_ext (its compiled head).

    In head mode R_X's trunk is B's with the pruned channels zeroed, so its prune-layer activations are ``F`` with
    those channels zeroed. In full mode the trunk changed: its activations are extracted (and cached) anew from
    ``datasets`` ({set: Dataset}, in ``bounds`` order).
    """
    from .head import compile_head
    from .models import channel_mask

    head = compile_head(R, layer)
    keep = channel_mask(F.shape[-1], channels).astype(bool)
    if mode == "head":
        return head.labels(F, mask=keep)
    from . import features

    out = np.empty(len(F), np.int64)
    for k, d in datasets.items():
        Fr = features.extract(R, layer, d, scale, cache_dir=cache_dir, progress=False)
        out[bounds[k]] = head.labels(Fr, mask=keep)
    return out


def repair_thresholds(result, F, bounds: dict, datasets: dict, params: dict, cache_dir=None, log=None) -> list:
    """R_X for every reached threshold of a sweep result, with its metrics. ``F``: the activations of all sets
    (``bounds``: set -> rows, 'valid' first); ``datasets``: {set: Dataset} (images for the full mode)."""
    from .head import compile_head
    from .sweep import step_metrics

    say = log or (lambda m: None)
    B, layer = result.model, result.layer
    scale = result.config.get("scale_value", 1.0)
    truth = {k: d.labels for k, d in datasets.items()}
    base_all = compile_head(B, layer).labels(F)
    base = {k: base_all[s] for k, s in bounds.items()}
    X_valid = datasets["valid"].read(scale) if params["mode"] == "full" else None
    out = []
    for t in result.thresholds:
        if not t.reached:
            continue
        t0 = time.perf_counter()
        if params["mode"] == "head":
            R, info = repair_head(B, layer, t.channels, F[bounds["valid"]], truth["valid"], params)
        else:
            R, info = repair_full(B, layer, t.channels, X_valid, truth["valid"], params, progress=say)
        lab = repaired_labels(R, layer, t.channels, F, params["mode"], datasets, scale, cache_dir, bounds)
        row = step_metrics({k: lab[s] for k, s in bounds.items()}, base, truth, result.num_classes)
        info["total_seconds"] = round(time.perf_counter() - t0, 3)
        rep = Repaired(float(t.x), params["mode"], int(t.step), list(t.channels), row, info, R)
        say(f"R_{t.x:g} ({params['mode']}): valid {row['valid_acc']:.2f}%"
            + (f", test {row['test_acc']:.2f}%" if "test_acc" in row else "")
            + (f", ASR {row['asr']:.2f}%" if "asr" in row else "") + f" ({info['total_seconds']:.1f} s)")
        out.append(rep)
    return out


def repair_run(run_dir, mode: str = "head", epochs=None, lr=None, seed: int = 0, log=None):
    """Fine-prune an existing run (the ``--out`` folder of a sweep) in place: its B'_X are repaired from its cached
    activations (no trunk pass in head mode), and the run folder is rewritten whole with the R_X rows, tables,
    plot and models. Returns the :class:`~badprune.sweep.SweepResult` with ``repaired`` set.

    Raises :class:`BadpruneError` when the run's activations are no longer in the cache (a sweep run with
    ``--no-cache``, or a cleared cache): re-run the sweep with ``--fine-tune`` instead.
    """
    from . import data, features
    from .models import load_model
    from .report import write_outputs
    from .runfiles import TFLITE_DIR, read_run
    from .sweep import SweepResult

    params = check_args(mode, epochs, lr, seed)
    say = log or (lambda m: None)
    run = read_run(run_dir)
    cfg = run.config
    acts = cfg.get("activations") or {}
    sets = [k for k in ("valid", "test", "poisoned") if cfg.get(k)]
    if not run.reached:
        raise BadpruneError("no threshold was reached in this run: nothing to repair", run_dir,
                            "re-run the sweep with smaller --thresholds")
    missing = [k for k in sets if not acts.get(k)]
    if missing:
        raise BadpruneError(f"the run has no cached activations of its {missing[0]} set (swept with --no-cache?)",
                            run_dir, "re-run the sweep with --fine-tune instead")
    B = load_model(model=cfg.get("model"), weights=cfg.get("weights"),
                   arch=cfg.get("arch") if cfg.get("weights") else None)
    result = SweepResult.from_record(run.doc, B)
    in_shape = tuple(int(v) for v in B.input_shape[1:])
    ds = {k: data.open_dataset(cfg[k], input_shape=in_shape, num_classes=result.num_classes) for k in sets}
    arrays, bounds, lo = [], {}, 0
    for k in sets:
        a = features.load_cached(acts[k])
        if a is None or len(a) != ds[k].n:
            raise BadpruneError(f"the run's cached activations of its {k} set are gone or changed", acts[k],
                                "re-run the sweep with --fine-tune instead")
        arrays.append(a)
        bounds[k] = slice(lo, lo + len(a))
        lo += len(a)
    F = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    del arrays
    t = time.perf_counter()
    result.config["fine_tune"] = dict(params)
    cache_dir = os.path.dirname(acts["valid"])
    result.repaired = repair_thresholds(result, F, bounds, ds, params, cache_dir, say)
    result.timings["repair"] = time.perf_counter() - t
    write_outputs(result, run_dir, force=True, keep=(TFLITE_DIR,))
    return result
