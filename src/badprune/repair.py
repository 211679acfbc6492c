"""Fine-pruning (Liu, Dolan-Gavitt, Garg, RAID 2018) with a clean-range reset: repair each B'_X into R_X using clean
data only.

Two modes:

* ``head`` (default): the trunk up to the prune layer is frozen and never re-run. The head (the layers after the
  prune layer) is a Keras model over the cached prune-layer activations, trained with the pruned channels zeroed
  at its input. R_X is B'_X (the pruned channels' producing convolution zeroed) with the trained head's weights.
* ``full``: the whole network is trained on the clean validation images (the paper's method), batched; the pruned
  channels' kernel and bias are re-zeroed after every batch, so they stay exactly zero.

The recipe (:data:`DEFAULTS`; how it was chosen is in the README):

1. **Distillation from B**: the loss is ``(1 - d) * CE(label, z) + d * T^2 * CE(softmax(z_B / T), softmax(z / T))``
   with z_B the unpruned B's logits on the same clean input (d = 0.5, T = 4): the pruned head re-learns the clean
   task from B's clean behaviour while the backdoor, which clean inputs never show, is not taught back.
2. **AdamW** (decoupled weight decay 1.0) with a **one-cycle** learning rate: a cosine warm-up from lr/25 to lr over
   the first 30 % of the steps, then cosine decay to 0; batch 64, seeded shuffles; the last epoch is kept. With
   fewer training images per class than the recipe was tuned at (:data:`TUNED_PER_CLASS`), the default lr and
   weight decay are scaled down (decided from the split's size and the class count, before any training).
3. **Clean-range reset** (frozen, inserted right after the prune layer): a prune-layer feature (h, w, c) above
   its largest value on the clean training split is replaced by its clean mean. Trigger activations overshoot
   the clean range at the trigger's place, several-fold; clean inputs almost never do (the share of held-out
   clean features it touches is recorded). In R_X it is two ``keras.ops`` nodes (``greater``, ``where``) with
   constant arrays and an ``Identity`` layer named ``<layer>_reset``; plain Keras loads it with ``safe_mode`` on.

``unlearn`` (the recommended mode) is ``head`` plus two steps when the scan (:mod:`badprune.scan`) suspects a
class: the universal shift toward it (:mod:`badprune.invert`) is unlearned while training, and a direction toward it
is then removed from R_X's input where the held-out clean split allows it (:func:`_remove_direction`). What R_X
computes between the prune layer and its head (the reset, the removal) is its :class:`~badprune.filters.Filters`.

The training itself is in :mod:`badprune._train` (head mode: one traced loop per setting, shared by all X).

No peeking: the defender has only clean data. A seeded, class-stratified part of the clean validation set
(:data:`HOLDOUT`) is held out; training and the reset's statistics use the rest. The held-out split decides the
backoff, whether unlearning is kept and whether a direction removal is kept; its accuracy and the reset rate are
reported. The poisoned set is never seen here: it only measures the attack success rate afterwards.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import BadpruneError
from .filters import Filters
from .invert import HOLDOUT, holdout_split  # noqa: F401  (the clean split, shared with the scan)

from .options import FINE_TUNE_MODES as MODES  # noqa: E402,F401  (the fine-tuning modes)
#: the recommended mode: what ``--fine-tune`` with no value, ``badprune-fast repair`` and the demo's default run use
#: (how it was chosen: the README's Repair section)
RECOMMENDED = "unlearn"
#: the recipe per mode: epochs, peak learning rate, batch size, AdamW weight decay, distillation weight and
#: temperature, warm-up share, and the clean-range reset
DEFAULTS = {
    "head": {"epochs": None, "steps": 450, "lr": 3e-3, "batch_size": 64, "weight_decay": 1.0, "distill": 0.5,
             "temperature": 4.0, "warmup": 0.3, "reset": True},
    "full": {"epochs": None, "steps": 450, "lr": 1e-3, "batch_size": 64, "weight_decay": 0.1, "distill": 0.5,
             "temperature": 4.0, "warmup": 0.3, "reset": True},
}
#: ``unlearn``: the head mode, plus, when the scan finds a backdoor, its shift toward the suspected target unlearned
#: (half of every batch shifted by U(0, 1.5) times it, at its own label), the shift inverted again against the head
#: being trained every ``every`` epochs within a budget of ``unlearn_eps`` times the activations' mean norm
DEFAULTS["unlearn"] = dict(DEFAULTS["head"], unlearn=True, unlearn_eps=0.2, every=1)
#: with the default learning rate: gentler (lr, weight decay) settings tried in turn while the held-out clean
#: accuracy of R_X is more than :data:`TOLERANCE` points below B'_X's
BACKOFF = ((1e-3, 0.0), (3e-4, 0.0))
TOLERANCE = 2.0
#: training images per class the default was tuned at (the demo's 2,880 / 40). With fewer (many classes, few
#: images each: every class's output weights get a gradient in a few steps only, while Adam moves and the decay
#: shrinks all of them every step), r = images per class / this scales the default lr by sqrt(r) and the weight
#: decay by r; at r >= 1 the recipe is unchanged
TUNED_PER_CLASS = 72.0
#: epochs when ``epochs`` is not given: the step budget over the training split, within these bounds
EPOCH_RANGE = (1, 30)
#: unlearn mode: a suspected trigger direction is removed from R_X's input (:class:`Filters`) only when, on the
#: held-out clean split, R_X with it keeps this share of the suspected class's accuracy and loses at most
#: PROJECT_TOLERANCE points overall (a direction that is the class's own evidence cannot be removed)
PROJECT_KEEP = 0.6
PROJECT_TOLERANCE = 1.0
#: the (head, direction) tries of the direction removal, in order (:func:`_remove_direction`)
PROJECT_TRIES = (("unlearn", "shift"), ("head", "shift"), ("unlearn", "off-class-mean"), ("head", "off-class-mean"))


@dataclass
class Repaired:
    """R_X for one threshold X: the network, its metrics (percent, as the sweep's columns) and how it was made."""

    x: float
    mode: str
    step: int                      # B'_X's step (channels pruned)
    channels: list                 # the pruned channels (exactly zero in R_X)
    row: dict                      # valid_acc, test_acc, asr, goodnet_* (GoodNet of B and R_X)
    info: dict = field(default_factory=dict)   # settings, held-out accuracy, reset rate, seconds
    model: object = None           # R_X, a plain Keras model
    filters: Filters | None = None  # what R_X computes between the prune layer and its head


def check_args(mode, epochs=None, lr=None, seed=0, reset=True) -> dict:
    """The fine-tuning settings, checked (:func:`badprune.options.check_fine_tune`): :func:`recipe`."""
    from .options import check_fine_tune

    return recipe(**check_fine_tune(mode, epochs, lr, seed), reset=reset)


def recipe(mode, epochs=None, lr=None, seed=0, reset=True) -> dict:
    """The fine-tuning settings: the recipe of ``mode`` (:data:`DEFAULTS`) with ``epochs``, ``lr``, ``seed`` and
    ``reset`` applied; the values as :func:`badprune.options.check_fine_tune` checked them."""
    p = dict(DEFAULTS[mode], mode=mode, reset=bool(reset))
    if epochs is not None:
        p["epochs"] = epochs
    p["backoff"] = lr is None
    if lr is not None:
        p["lr"] = lr
    p["seed"] = seed
    return p


def _epochs(p, n: int) -> int:
    """The epochs to run over ``n`` training images: as given, else the step budget ``p['steps']`` (which the
    recipe was tuned for) in whole epochs, within :data:`EPOCH_RANGE`."""
    if p.get("epochs"):
        return int(p["epochs"])
    per = -(-n // p["batch_size"])
    return int(min(max(round(p["steps"] / per), EPOCH_RANGE[0]), EPOCH_RANGE[1]))


def _attempts(p, n: int, classes: int):
    """The (lr, weight decay) settings to try in turn over ``n`` training images of ``classes`` classes: the
    recipe's, scaled for few images per class when lr is the default (:data:`TUNED_PER_CLASS`), then the gentler
    ones of :data:`BACKOFF`."""
    if not p.get("backoff"):
        return [(p["lr"], p["weight_decay"])]
    r = min(1.0, n / max(1, classes) / TUNED_PER_CLASS)
    first = (float(f"{p['lr'] * r ** 0.5:.3g}"), float(f"{p['weight_decay'] * r:.3g}"))
    return [first] + [a for a in BACKOFF if a[0] < first[0]]


def _reset_stats(F_train):
    """(cap, mean) per prune-layer feature of the clean training activations (pruned channels already zero)."""
    return F_train.max(axis=0), F_train.mean(axis=0, dtype=np.float64).astype(np.float32)


def _accuracy(labels, truth) -> float | None:
    """Percent of ``labels`` equal to ``truth`` (None when there are none)."""
    return 100.0 * float(np.mean(labels == truth)) if len(truth) else None


def _info(p, tried, F_hold, stats, t0):
    """What the repair did: the recipe, each (lr, weight decay) tried with its held-out accuracy, the one kept."""
    info = {k: p[k] for k in ("epochs", "lr", "batch_size", "weight_decay", "distill", "temperature", "warmup",
                              "reset", "seed")}
    info.update(tried=tried, loss=tried[-1]["loss"], holdout=tried[-1]["holdout"],
                holdout_best=tried[-1]["holdout_acc"], holdout_b_prime=tried[-1]["holdout_b_prime"],
                seconds=round(time.perf_counter() - t0, 3))
    if stats is not None and len(F_hold):
        info["holdout_reset_rate"] = 100.0 * float(np.mean(F_hold > stats[0]))
    return info


def _unlearn_shifts(model, layer, F_b, y_b, F_tr, y_tr, keep, p, shared):
    """The activation shifts R_X unlearns, or None: when the scan (:mod:`badprune.scan`, on B's clean validation
    activations ``F_b`` (labels ``y_b``), as ``sweep --scan`` runs it, once per sweep: kept in ``shared``) finds a backdoor, the universal shift toward its most
    suspicious class, inverted again within ``keep``'s channels (B'_X's) at the budget ``p['unlearn_eps']``.
    Returns ``(shifts, what they are)`` or None."""
    from ._train import head_model
    from .invert import invert_shifts, mean_norm
    from .scan import scan_model

    if "net" not in shared:
        shared.update(net=head_model(model, layer), norm=mean_norm(F_tr))
    if "scan" not in shared:
        shared["scan"] = scan_model(model, layer, F_b, y_b, seed=p["seed"], net=shared["net"])
    sc = shared["scan"]
    if not sc.backdoored:
        return None
    cls = np.array([sc.targets[0]["class"]])
    D = invert_shifts(shared["net"], F_tr, y_tr, cls, p["unlearn_eps"] * shared["norm"], seed=p["seed"],
                      keep=keep, init=sc.shifts[:1])
    return D, {"classes": [int(c) for c in cls], "scan_score": round(sc.score, 4)}


def _rounds(first, F_tr, y_tr, keep, p, shared):
    """The shifts to unlearn at each epoch: ``first`` (found on B'_X), re-inverted against the head being trained
    every ``p['every']`` epochs (from the previous ones), so that the head also unlearns the next-easiest
    shifts toward the same classes."""
    from .invert import invert_shifts

    D, info = first
    cls = np.asarray(info["classes"])
    state = {"D": D}

    def shifts(epoch, net):
        if epoch and p.get("every") and epoch % p["every"] == 0:
            state["D"] = invert_shifts(net, F_tr, y_tr, cls, p["unlearn_eps"] * shared["norm"], seed=p["seed"] + epoch,
                                       keep=keep, init=state["D"])
        return state["D"]

    return shifts


def repair_head(model, layer: str, channels, F_valid, y_valid, params: dict, shared: dict | None = None):
    """R_X by the head mode: the head trained over the clean validation activations ``F_valid`` with ``channels``
    zeroed. Returns ``(R_X, info, its Filters)``.

    With the default learning rate, a setting that leaves R_X's held-out clean accuracy more than
    :data:`TOLERANCE` points below B'_X's is replaced by the next, gentler one of :data:`BACKOFF` (clean data
    only decides). ``shared``: a dict kept across the thresholds of one sweep (same ``F_valid``), holding B's soft
    targets and the traced trainers, which do not depend on X.
    """
    from ._train import head_model, predict_logits, soft_targets
    from .head import compile_head
    from .models import channel_mask

    t0 = time.perf_counter()
    shared = {} if shared is None else shared
    y_valid = np.asarray(y_valid, np.int64)
    keep = channel_mask(F_valid.shape[-1], channels).astype(bool)
    tr, ho = holdout_split(y_valid, params["seed"])
    Xm = np.array(F_valid, np.float32)
    Xm[..., ~keep] = 0
    p = dict(params, epochs=_epochs(params, len(tr)))
    K = int(model.outputs[0].shape[-1])
    if "soft" not in shared:
        z = predict_logits(head_model(model, layer), np.asarray(F_valid[tr], np.float32)) if p["distill"] \
            else None
        shared["soft"] = soft_targets(z, p["temperature"]) if z is not None else None
    filters = Filters(reset=_reset_stats(Xm[tr]) if p["reset"] else None)
    shifts = _unlearn_shifts(model, layer, F_valid, y_valid, Xm[tr], y_valid[tr], keep, p,
                             shared) if p.get("unlearn") else None
    Fh, yh = Xm[ho], y_valid[ho]
    b_prime = _accuracy(compile_head(model, layer).labels(Fh), yh)
    settings = _attempts(p, len(tr), K)

    def fit(unlearn_shifts):
        """Train by each (lr, weight decay) in turn until R_X's held-out accuracy is within TOLERANCE of B'_X's:
        (R_X, it without the filters, what was tried, whether one was within)."""
        tried = []
        for lr, wd in settings:
            p.update(lr=lr, weight_decay=wd)
            rounds = None if unlearn_shifts is None else _rounds(unlearn_shifts, Xm[tr], y_valid[tr], keep, p, shared)
            trainer, losses = _train_head(model, layer, Xm[tr], y_valid[tr], p, shared, rounds)
            plain = _trained(model, layer, channels, trainer)
            R = filters.insert(plain, layer)
            acc = _accuracy(compile_head(R, filters.last(layer)).labels(filters.apply(Fh)), yh)
            tried.append({"lr": lr, "weight_decay": wd, "loss": losses, "holdout": int(len(yh)), "holdout_acc": acc,
                          "holdout_b_prime": b_prime})
            if acc is None or b_prime is None or acc >= b_prime - TOLERANCE:
                return R, plain, tried, True
        return R, plain, tried, False

    fits = {}

    def fitted(kind):
        """The head trained with unlearning ("unlearn") or without ("head"), once: (R_X, it without the filters,
        what was tried, whether one setting was within TOLERANCE, the settings it ended with)."""
        if kind not in fits:
            fits[kind] = fit(shifts if kind == "unlearn" else None) + (dict(p),)
        return fits[kind]

    first = "unlearn" if shifts is not None and fitted("unlearn")[3] else "head"
    R, _, tried, _, pk = fitted(first)
    kept = first
    record = None
    if shifts is not None:
        R, filters, record = _remove_direction(layer, lambda kind: fitted(kind)[:2], first, filters, Xm, y_valid,
                                               tr, ho, keep, p, shared)
        kept = record["kept"] or first
        _, _, tried, _, pk = fitted(kept)
    info = _info(pk, tried, Fh, filters.reset, t0)
    if p.get("unlearn"):
        sc = shared["scan"]
        info["unlearn"] = {"scan_backdoored": bool(sc.backdoored), "scan_score": round(sc.score, 4),
                           "class": shifts[1]["classes"][0] if shifts is not None else None,
                           "eps_share": p["unlearn_eps"], "every": p.get("every")}
        if shifts is not None:
            # unlearning is kept when one setting comes within TOLERANCE of B'_X on the held-out split; otherwise
            # R_X starts from the head mode's training (what unlearning did stays in the record)
            info["unlearn"].update(unlearned=kept == "unlearn", project=record)
            if first == "head":
                info["unlearn"]["rejected"] = fitted("unlearn")[2]
            if record["kept"]:
                info["holdout_best"] = record["kept_holdout"]
        info["seconds"] = round(time.perf_counter() - t0, 3)
    return R, info, filters


def _train_head(model, layer, X, y, p, shared, shifts=None):
    """The head trained by the recipe ``p`` (its trainer kept in ``shared`` per (lr, weight decay)) from B's
    weights; returns (trainer, per-epoch losses)."""
    from ._tf import seed_all
    from ._train import HeadTrainer

    seed_all(p["seed"])
    key = (p["lr"], p["weight_decay"])
    if key not in shared:
        shared[key] = HeadTrainer(model, layer, len(y), p)
    return shared[key], shared[key].train(X, y, shared["soft"], p["seed"], shifts=shifts)


def _trained(model, layer, channels, trainer):
    """B'_X (``channels`` of ``layer`` pruned) with the head weights of ``trainer``."""
    from .models import prune_model

    R = prune_model(model, layer, channels)
    for lay in trainer.net.layers:
        if lay.weights:
            R.get_layer(lay.name).set_weights(lay.get_weights())
    return R


def _remove_direction(layer, fitted, first, filters, Xm, y, tr, ho, keep, p, shared):
    """Unlearn mode, when the scan found a suspect class t: a direction toward t that is still easy in R_X is
    removed from R_X's input (:class:`Filters`: the excess over its clean mean along it), when the held-out clean
    split allows it (:data:`PROJECT_KEEP`, :data:`PROJECT_TOLERANCE`).

    The direction is the shift toward t inverted against a trained head (:func:`badprune.invert.invert_shifts`,
    budget ``p['unlearn_eps']``), as it is ("shift") or without its component along the class's mean evidence (the
    mean of t's clean training rows minus the mean of all: "off-class-mean", which the class's own images need
    less). The heads (``fitted(kind)`` -> (R_X with ``filters``, it without them)) are the one trained with
    unlearning and the one trained without (a trigger that unlearning folded into the class's evidence can still be
    separable there); when unlearning was not kept (``first`` is "head"), only the latter's tries are made.
    :data:`PROJECT_TRIES` orders the four tries; the first that passes is kept. Returns ``(R_X, its filters, what
    was tried)``; when none passes, R_X is ``first``'s head unchanged."""
    from ._train import head_model
    from .head import compile_head
    from .invert import invert_shifts

    t = int(shared["scan"].targets[0]["class"])
    Ftr, Fh, yh = Xm[tr], Xm[ho], y[ho]
    flat = Ftr.reshape(len(Ftr), -1)
    own = flat[y[tr] == t]
    c = own.mean(axis=0) - flat.mean(axis=0) if len(own) else np.zeros(flat.shape[1], np.float32)
    c = c / (np.linalg.norm(c) or 1.0)
    heads = {}

    def head_of(base):
        if base not in heads:
            R, pl = fitted(base)
            D = invert_shifts(head_model(R, layer), Ftr, y[tr], np.array([t]), p["unlearn_eps"] * shared["norm"],
                              seed=p["seed"], keep=keep)[0].ravel()
            head = compile_head(R, filters.last(layer))
            heads[base] = (pl, D, head, head.labels(filters.apply(Fh)))
        return heads[base]

    tried, pick = [], None
    for base, kind in PROJECT_TRIES if (yh == t).any() else ():
        if base == "unlearn" and first == "head":
            continue
        pl, D, head, before = head_of(base)
        v = D if kind == "shift" else D - (D @ c) * c
        norm = float(np.linalg.norm(v))
        rec = {"base": base, "direction": kind, "kept": False}
        tried.append(rec)
        if not norm:
            continue
        u = (v / norm).astype(np.float32)
        cand = Filters(filters.reset, (u, float((flat @ u).mean())))
        after = head.labels(cand.apply(Fh))
        rec.update(holdout=[round(_accuracy(before, yh), 3), round(_accuracy(after, yh), 3)],
                   class_holdout=[round(_accuracy(w[yh == t], yh[yh == t]), 3) for w in (before, after)])
        rec["kept"] = bool(rec["class_holdout"][1] >= PROJECT_KEEP * rec["class_holdout"][0]
                           and rec["holdout"][1] >= rec["holdout"][0] - PROJECT_TOLERANCE)
        if rec["kept"]:
            pick = (cand.insert(pl, layer), cand, base, kind, rec["holdout"][1])
            break
    out = {"class": t, "tried": tried, "kept": pick[2] if pick else None, "direction": pick[3] if pick else None,
           "kept_holdout": pick[4] if pick else None}
    return (fitted(first)[0], filters, out) if pick is None else (pick[0], pick[1], out)


def repair_full(model, layer: str, channels, X_valid, y_valid, params: dict, progress=None):
    """R_X by the full mode: all of B'_X trained on the clean validation images ``X_valid`` (scaled float32
    NHWC); the pruned channels' producing convolution is re-zeroed after every batch. Returns ``(R_X, info, its
    Filters)``."""
    from ._tf import seed_all
    from ._train import fit, keras_, predict_logits
    from .features import trunk
    from .models import conv_producer, prune_model

    keras = keras_()
    t0 = time.perf_counter()
    seed_all(params["seed"])
    conv = conv_producer(model, layer)
    if conv is None:
        raise BadpruneError(f"--fine-tune full needs a convolution producing '{layer}' (to keep its pruned channels "
                            "zero)", fix="use --fine-tune head")
    R = prune_model(model, layer, channels)
    y_valid = np.asarray(y_valid, np.int64)
    tr, ho = holdout_split(y_valid, params["seed"])
    p = dict(params, epochs=_epochs(params, len(tr)))
    p["lr"], p["weight_decay"] = _attempts(p, len(tr), int(model.outputs[0].shape[-1]))[0]
    teacher = predict_logits(model, X_valid[tr], 512) if p["distill"] else None
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

    b_prime = _accuracy(R.predict(X_valid[ho], batch_size=512, verbose=0).argmax(axis=1), y_valid[ho])
    losses = fit(R, X_valid[tr], y_valid[tr], teacher, p, callbacks=[Rezero()])
    trained, R = R, prune_model(model, layer, channels)  # an uncompiled copy holding the trained weights
    R.set_weights(trained.get_weights())
    filters = Filters(reset=_reset_stats(trunk(R, layer).predict(X_valid[tr], batch_size=512, verbose=0))
                      if p["reset"] else None)
    R = filters.insert(R, layer)
    Fh = trunk(R, layer).predict(X_valid[ho], batch_size=512, verbose=0)
    acc = _accuracy(R.predict(X_valid[ho], batch_size=512, verbose=0).argmax(axis=1), y_valid[ho])
    tried = [{"lr": p["lr"], "weight_decay": p["weight_decay"], "loss": losses, "holdout": int(len(ho)),
              "holdout_acc": acc, "holdout_b_prime": b_prime}]
    return R, _info(p, tried, Fh, filters.reset, t0), filters


def repaired_labels(R, layer: str, channels, F, filters=None, chunk: int = 4096) -> np.ndarray:
    """R_X's labels over prune-layer activations ``F`` of its own trunk, evaluated by prune_ext: the pruned
    channels zeroed, R_X's :class:`Filters` applied as its graph does, then R_X's head after them compiled and run.
    Equal to TensorFlow running R_X (tested)."""
    from .head import compile_head
    from .models import channel_mask

    filters = filters or Filters()
    head = compile_head(R, filters.last(layer))
    keep = channel_mask(F.shape[-1], channels).astype(bool)
    out = np.empty(len(F), np.int64)
    for lo in range(0, len(F), chunk):
        out[lo:lo + chunk] = head.labels(filters.apply(F[lo:lo + chunk], keep))
    return out


def repair_thresholds(result, F, bounds: dict, datasets: dict, params: dict, cache_dir=None, log=None,
                      scan=None) -> list:
    """R_X for every reached threshold of a sweep result, with its metrics. ``F``: the activations of all sets
    (``bounds``: set -> rows, 'valid' first); ``datasets``: {set: Dataset} (images for the full mode); ``scan``:
    the scan of B on the same clean validation activations with the same seed, when the caller ran it already
    (the unlearn mode then does not run it again).

    The evaluations (B's labels, then each R_X's, by prune_ext, which releases the GIL) run in one worker thread
    while the next R_X trains; the results do not depend on that overlap."""
    from concurrent.futures import ThreadPoolExecutor

    from . import features
    from .head import compile_head
    from .result import step_metrics

    say = log or (lambda m: None)
    B, layer = result.model, result.layer  # loaded: a repair never follows a warm sweep
    scale = result.config.get("scale_value", 1.0)
    truth = {k: d.labels for k, d in datasets.items()}
    X_valid = datasets["valid"].read(scale) if params["mode"] == "full" else None

    def evaluate(R, channels, filters):
        t0 = time.perf_counter()
        if params["mode"] != "full":
            lab = repaired_labels(R, layer, channels, F, filters)
        else:
            lab = np.empty(len(F), np.int64)
            for k, dset in datasets.items():
                Fr = features.extract(R, layer, dset, scale, cache_dir=cache_dir, progress=False)
                lab[bounds[k]] = repaired_labels(R, layer, channels, Fr, filters)
        return lab, time.perf_counter() - t0

    pending, shared = [], ({} if scan is None else {"scan": scan})
    with ThreadPoolExecutor(max_workers=1) as pool:
        base_all = pool.submit(compile_head(B, layer).labels, F)
        for t in result.thresholds:
            if not t.reached:
                continue
            if params["mode"] != "full":
                R, info, filters = repair_head(B, layer, t.channels, F[bounds["valid"]], truth["valid"], params,
                                               shared)
            else:
                R, info, filters = repair_full(B, layer, t.channels, X_valid, truth["valid"], params, progress=say)
            pending.append((t, R, info, filters, pool.submit(evaluate, R, t.channels, filters)))
            if params["mode"] == "full":  # the trunk pass of the evaluation uses TensorFlow: no overlap
                pending[-1][-1].result()
        base = {k: base_all.result()[s] for k, s in bounds.items()}
        out = []
        for t, R, info, filters, fut in pending:
            lab, secs = fut.result()
            row = step_metrics({k: lab[s] for k, s in bounds.items()}, base, truth, result.num_classes)
            info["total_seconds"] = round(info["seconds"] + secs, 3)   # training + this R_X's evaluation
            rep = Repaired(float(t.x), params["mode"], int(t.step), list(t.channels), row, info, R, filters)
            say(f"R_{t.x:g} ({params['mode']}): valid {row['valid_acc']:.2f}%"
                + (f", test {row['test_acc']:.2f}%" if "test_acc" in row else "")
                + (f", ASR {row['asr']:.2f}%" if "asr" in row else "") + f" ({info['total_seconds']:.1f} s)")
            out.append(rep)
    return out


def repair_run(run_dir, mode: str = "head", epochs=None, lr=None, seed: int = 0, log=None):
    """Fine-prune an existing run (the ``--out`` folder of a sweep) in place: its B'_X are repaired from its cached
    activations (no trunk pass in head mode), and the run folder is rewritten whole with the R_X rows, tables,
    plot and models. Returns the :class:`~badprune.result.SweepResult` with ``repaired`` set.

    Raises :class:`BadpruneError` when the run's activations are no longer in the cache (a sweep run with
    ``--no-cache``, or a cleared cache): re-run the sweep with ``--fine-tune`` instead.
    """
    from . import cache, data
    from .models import load_model
    from .report import write_outputs
    from .runfolder import TFLITE_DIR, read_run
    from .result import SweepResult

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
    result = SweepResult.from_run(run, B)
    in_shape = tuple(int(v) for v in B.input_shape[1:])
    ds = {k: data.open_dataset(cfg[k], input_shape=in_shape, num_classes=result.num_classes) for k in sets}
    F = bounds = None
    for k in sets:
        a = cache.load_cached(acts[k])
        if a is None or len(a) != ds[k].n:
            raise BadpruneError(f"the run's cached activations of its {k} set are gone or changed", acts[k],
                                "re-run the sweep with --fine-tune instead")
        if F is None:
            F, bounds = cache.stacked({s: ds[s].n for s in sets}, a.shape[1:])
        F[bounds[k]] = a
        del a
    t = time.perf_counter()
    result.config["fine_tune"] = dict(params)
    cache_dir = os.path.dirname(acts["valid"])
    result.repaired = repair_thresholds(result, F, bounds, ds, params, cache_dir, say)
    result.timings["repair"] = time.perf_counter() - t
    write_outputs(result, run_dir, force=True, keep=(TFLITE_DIR,))
    return result
