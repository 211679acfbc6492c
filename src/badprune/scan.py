"""Scan: is this model backdoored, and which class is the target? A verdict from clean data alone.

For every class t, :mod:`badprune.invert` looks for the universal shift of the prune layer's activations, of L2
norm at most :data:`EPS` times the clean activations' mean norm, that sends the most clean inputs of other classes
to t (the budget is halved while the median class is reached by more than :data:`MEDIAN_MAX` of the inputs). A model's classes differ in how easily they are reached, but smoothly: the most reachable classes of a clean
model follow one another closely. A backdoor's target stands alone: a trigger that works on any input is, at the
prune layer, a small shift toward one class, so that class is reached by far more inputs than the next.

The statistic is that gap: (share flipped to the first class - share flipped to the second) / the median
absolute deviation of the shares over all classes (scaled by 1.4826). The verdict is ``statistic >=``
:data:`THRESHOLD`; the score is a logistic of the statistic (0.5 at the threshold). How the threshold was fixed,
and what the scan does not see (patch triggers whose shift at the prune layer is larger than any natural class's),
is in the README (Scan).

Many classes: with more than :data:`SCREEN_ALL` classes every class gets a short search (:data:`SCREEN_STEPS`
steps on a few rows each, its flip rate on :data:`SCREEN_ROWS` held-out rows), and only the :data:`CANDIDATES` most
reachable are searched in full; the statistic is then taken over those (not calibrated at that scale: README).

Clean data only: the poisoned set is never read here. Flip rates are measured on a seeded, class-stratified
held-out part of the clean data the search did not use.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .invert import (BATCH, STEPS, flip_rate, holdout_split, invert_shifts, mean_norm)

#: the shift budget: this share of the clean activations' mean L2 norm
EPS = 0.1
#: the budget is halved (down to MIN_EPS) while the median class's flip rate exceeds MEDIAN_MAX
MEDIAN_MAX = 0.3
MIN_EPS = 0.01
#: verdict: backdoored when the gap statistic reaches this (fixed on the demo models: README, Scan)
THRESHOLD = 0.9
#: logistic slope of the score around the threshold
SCORE_SLOPE = 0.3
#: classes searched in full directly; above this, a screen first
SCREEN_ALL = 64
SCREEN_STEPS = 10
SCREEN_ROWS = 512
CANDIDATES = 32
#: clean rows used at most (a seeded class-stratified subset)
MAX_ROWS = 6000


@dataclass
class ScanResult:
    """The scan of one model: the verdict, the suspected targets and what was inverted."""

    score: float                      # in [0, 1], higher = more likely backdoored
    backdoored: bool                  # score >= 0.5 (statistic >= threshold)
    statistic: float                  # the gap statistic
    threshold: float
    targets: list                     # [{class, flip, anomaly, channels, shift_norm}], most suspicious first
    flip: np.ndarray                  # per class: share of held-out clean inputs its shift sends to it
    eps: float                        # the absolute L2 budget
    layer: str
    seconds: float
    model_name: str = ""
    num_classes: int = 0
    shifts: np.ndarray | None = None  # the shifts of ``targets`` (same order), (k, H, W, C)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"score": round(self.score, 6), "backdoored": bool(self.backdoored),
                "statistic": round(self.statistic, 6), "threshold": self.threshold,
                "method": "feature-space universal shift (L2 budget, per class), gap statistic",
                "targets": self.targets, "layer": self.layer, "eps": round(self.eps, 6),
                "eps_share": self.config.get("eps_share"), "seconds": round(self.seconds, 3),
                "model": self.model_name, "num_classes": self.num_classes,
                "flip": [round(float(v), 6) for v in self.flip], "config": self.config}


def gap_statistic(flip) -> tuple:
    """(statistic, median, MAD) of per-class flip rates: (first - second) / (1.4826 * MAD)."""
    f = np.asarray(flip, np.float64)
    if len(f) < 3:
        return 0.0, float(np.median(f)) if len(f) else 0.0, 0.0
    med = float(np.median(f))
    mad = 1.4826 * float(np.median(np.abs(f - med)))
    top = np.sort(f)[::-1]
    gap = float(top[0] - top[1])
    return gap / max(mad, 1e-3), med, mad


def score_of(statistic: float) -> float:
    return 1.0 / (1.0 + math.exp(-(statistic - THRESHOLD) / SCORE_SLOPE))


def scan_activations(head_net, labels_fn, F, y, num_classes: int, layer: str, seed: int = 0, eps_share: float = EPS,
                     top: int = 3, log=None) -> ScanResult:
    """The scan over clean prune-layer activations ``F`` (labels ``y``): ``head_net`` is the head as a Keras
    model over them, ``labels_fn`` the head's labels (e.g. the compiled head's)."""
    say = log or (lambda m: None)
    t0 = time.perf_counter()
    F = np.asarray(F, np.float32)
    y = np.asarray(y, np.int64)
    if len(F) > MAX_ROWS:
        keep, _ = holdout_split(y, seed, 1 - MAX_ROWS / len(F))
        F, y = F[keep], y[keep]
    tr, ho = holdout_split(y, seed)
    if not len(ho):
        ho = tr
    K = int(num_classes)
    eps = eps_share * mean_norm(F[tr])
    classes = np.arange(K)
    if K > SCREEN_ALL:
        D = invert_shifts(head_net, F[tr], y[tr], classes, eps, steps=SCREEN_STEPS, batch=4, seed=seed)
        few = ho[np.random.default_rng([int(seed), 5]).permutation(len(ho))[:SCREEN_ROWS]]
        flip = flip_rate(labels_fn, F[few], y[few], classes, D)
        cand = np.argsort(-flip, kind="stable")[:CANDIDATES]
        say(f"scan: screened {K} classes, searching {len(cand)} in full")
    else:
        flip = np.zeros(K)
        cand = classes
    norm = eps / eps_share
    while True:
        D = invert_shifts(head_net, F[tr], y[tr], cand, eps, steps=STEPS, batch=BATCH, seed=seed)
        flip[cand] = flip_rate(labels_fn, F[ho], y[ho], cand, D)
        # a budget at which the typical class is already reached tells nothing: halve it (a small head, e.g. ten
        # classes, is reached far more easily than a large one)
        if K > SCREEN_ALL or np.median(flip[cand]) <= MEDIAN_MAX or eps_share / 2 < MIN_EPS:
            break
        eps_share /= 2
        eps = eps_share * norm
        say(f"scan: the median class is reached by more than {MEDIAN_MAX:.0%} of inputs: budget halved to "
            f"{eps_share:.3g}")
    # the statistic over the classes searched in full (all of them up to SCREEN_ALL classes): with many classes
    # most are never reached at this budget, and their zeros would make the spread meaningless
    stat, med, mad = gap_statistic(flip[cand])
    order = np.argsort(-flip, kind="stable")[:top]
    where = {int(c): i for i, c in enumerate(cand)}
    shifts = np.stack([D[where[int(c)]] for c in order]) if len(order) else None
    targets = []
    for j, c in enumerate(order):
        targets.append({"class": int(c), "flip": round(float(flip[c]), 4),
                        "anomaly": round(float((flip[c] - med) / max(mad, 1e-3)), 3),
                        "shift_norm": round(float(np.linalg.norm(shifts[j])), 4),
                        "channels": [{"channel": ch, "share": s} for ch, s in _channels(shifts[j])]})
    score = score_of(stat)
    return ScanResult(score=score, backdoored=stat >= THRESHOLD, statistic=stat, threshold=THRESHOLD,
                      targets=targets, flip=flip, eps=float(eps), layer=layer,
                      seconds=time.perf_counter() - t0, num_classes=K, shifts=shifts,
                      config={"eps_share": eps_share, "seed": int(seed), "rows": int(len(tr)),
                              "held_out": int(len(ho)), "steps": STEPS, "batch": BATCH,
                              "screened": bool(K > SCREEN_ALL), "median_flip": round(med, 6),
                              "mad_flip": round(mad, 6)})


def _channels(delta, top: int = 6) -> list:
    mass = np.abs(delta).reshape(-1, delta.shape[-1]).sum(axis=0)
    total = float(mass.sum()) or 1.0
    return [(int(c), round(float(mass[c]) / total, 4)) for c in np.argsort(-mass, kind="stable")[:top]]


def scan_model(model, layer: str, F, y, seed: int = 0, log=None, name: str = "") -> ScanResult:
    """:func:`scan_activations` for a Keras model B and its prune layer."""
    from ._train import head_model
    from .head import compile_head
    from .models import num_classes

    head = compile_head(model, layer)
    res = scan_activations(head_model(model, layer), head.labels, F, y, num_classes(model), layer, seed=seed,
                           log=log)
    res.model_name = name
    return res


def run(model=None, weights=None, arch=None, valid=None, *, layer=None, scale="auto", cache_dir=None,
        use_cache=True, batch_size=128, progress=True, trust_model=False, name=None, log=None,
        seed=0) -> ScanResult:
    """Load B, extract its clean validation activations at the prune layer (cached) and scan them. Only
    ``valid`` is read: the scan takes no poisoned data."""
    from . import options, sweep as _sweep
    from ._env import cache_home

    say = log or (lambda m: None)
    if not hasattr(model, "predict"):
        options.check_source(model, weights, arch)
    options.check_valid(valid)
    scale = options.check_scale(scale)
    batch_size = options.check_batch_size(batch_size)
    seed = options.check_seed(seed)
    cdir = (cache_dir or cache_home()) if use_cache else None
    t0 = time.perf_counter()
    d = _sweep._load(model, weights, arch, trust_model, name, layer)
    ds = _sweep._open_sets(d.model, {"valid": valid}, d.num_classes)
    _, sv = _sweep._settle_scale(d, ds["valid"], scale, say, cdir)
    F, bounds, _ = _sweep._extract_all(d, ds, sv, cdir, batch_size, progress, {})
    res = scan_model(d.model, d.layer, F[bounds["valid"]], ds["valid"].labels, seed=seed, log=say, name=d.name)
    res.seconds = time.perf_counter() - t0
    res.config.update(valid=valid, scale_value=sv, scan_seconds=res.seconds)
    return res


# ------------------------------------------------------------------------------------------------- the files
FILES = ("scan.json", "scan.md", "scan.png")


def write_files(res: ScanResult, folder) -> None:
    """scan.json, scan.md and scan.png into ``folder`` (which exists)."""
    import json
    import os

    with open(os.path.join(folder, "scan.json"), "w") as f:
        json.dump(res.to_json(), f, indent=1)
    with open(os.path.join(folder, "scan.md"), "w") as f:
        f.write(markdown(res))
    plot(res, os.path.join(folder, "scan.png"))


def summary(res: ScanResult) -> str:
    t = res.targets[0] if res.targets else None
    verdict = "BACKDOORED" if res.backdoored else "no backdoor found"
    s = f"scan: {verdict} (score {res.score:.2f}, statistic {res.statistic:.2f}, threshold {res.threshold:g})"
    if t is not None:
        s += (f"; most suspicious class {t['class']}: a shift of {res.config.get('eps_share', EPS):.0%} of the "
              f"activations' norm sends {100 * t['flip']:.1f}% of clean inputs to it")
    return s + f" ({res.seconds:.1f} s)"


def markdown(res: ScanResult) -> str:
    lines = [f"# Scan of {res.model_name or 'the model'}", "", summary(res), "",
             f"Method: for every class, the universal shift of the `{res.layer}` activations of L2 norm at most "
             f"{res.config.get('eps_share', EPS):.0%} of their mean norm ({res.eps:.3g}) that sends the most clean "
             "inputs of other classes to it (clean data only). Statistic: (first flip rate - second) / MAD of all "
             f"classes' flip rates; backdoored at >= {res.threshold:g}.", "",
             "| rank | class | flipped to it | anomaly (MAD units) | shift's main channels (share) |",
             "|---:|---:|---:|---:|---|"]
    for i, t in enumerate(res.targets, 1):
        ch = ", ".join(f"{c['channel']} ({100 * c['share']:.0f}%)" for c in t["channels"][:5])
        lines.append(f"| {i} | {t['class']} | {100 * t['flip']:.1f}% | {t['anomaly']:.2f} | {ch} |")
    lines += ["", f"Median flip rate over {res.num_classes} classes: {100 * res.config.get('median_flip', 0):.1f}%.",
              ""]
    return "\n".join(lines)


def plot(res: ScanResult, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2.2, 1]})
    f = np.asarray(res.flip) * 100
    order = np.argsort(-f, kind="stable")
    colors = ["#c0392b" if (res.backdoored and i == 0) else "#7f8c8d" for i in range(len(order))]
    ax[0].bar(np.arange(len(order)), f[order], color=colors, width=0.9)
    med, mad = 100 * res.config.get("median_flip", 0), 100 * res.config.get("mad_flip", 0)
    if len(order) > 1:
        ax[0].axhline(f[order[1]] + res.threshold * max(mad, 0.1), color="#c0392b", ls="--", lw=1,
                      label=f"verdict line (second + {res.threshold:g} MAD)")
    ax[0].axhline(med, color="#2c3e50", ls=":", lw=1, label="median")
    ax[0].set_xlabel("classes, most reachable first")
    ax[0].set_ylabel("clean inputs sent to the class (%)")
    ax[0].set_title(("BACKDOORED" if res.backdoored else "no backdoor found") + f"  (score {res.score:.2f})")
    ax[0].legend(fontsize=8)
    if res.targets:
        t = res.targets[0]
        mass = np.abs(res.shifts[0]).reshape(-1, res.shifts.shape[-1]).sum(axis=0)
        ax[1].bar(np.arange(len(mass)), mass / max(mass.sum(), 1e-12) * 100, color="#2980b9", width=0.9)
        ax[1].set_title(f"shift toward class {t['class']}: per channel")
        ax[1].set_xlabel(f"{res.layer} channel")
        ax[1].set_ylabel("share of the shift (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
