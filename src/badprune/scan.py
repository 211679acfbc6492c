"""Scan: is this model backdoored, and which class is the target? A verdict from clean data alone.

Two probes of the prune layer, both over clean activations only (:mod:`badprune.invert`), each asking per class how
cheaply clean inputs of other classes are sent to it:

* the shift probe (global triggers: blends, sinusoids, warps): the universal shift of the activations, of L2 norm at
  most :data:`EPS` times their mean norm, that sends the most inputs to the class (the budget is halved while the
  median class is reached by more than :data:`MEDIAN_MAX` of the inputs). Its statistic is the gap between the
  first and second class's flip rates in MAD units of all classes' flip rates (scaled by 1.4826);
* the stimulation probe (patch triggers, whose shift at the prune layer is larger than any natural class's): each
  channel driven beyond its clean range in turn; per class the smallest stimulation that sends 80 % of the inputs
  to it. Its statistic is the gap, in octaves, between the first and second class's stimulation.

A model's classes differ in how easily they are reached, but smoothly: the most reachable classes of a clean model
follow one another closely. A backdoor's target stands alone. Each statistic is divided by its own threshold
(:data:`SHIFT_THRESHOLD`, :data:`STIM_THRESHOLD`, fixed on the demo models: README, Scan); the scan's statistic is
the larger of the two, the verdict is ``statistic >= 1`` (:data:`THRESHOLD`), the score a logistic of it (0.5 at the
threshold), and the targets are ranked by the probe that gave it.

Many classes: with more than :data:`SCREEN_ALL` classes every class gets a short shift search (:data:`SCREEN_STEPS`
steps on a few rows each, its flip rate on :data:`SCREEN_ROWS` held-out rows), and only the :data:`CANDIDATES` most
reachable are searched in full; the shift statistic is then taken over those (not calibrated at that scale:
README). The stimulation probe's cost does not grow with the classes.

Clean data only: the poisoned set is never read here. Flip rates and stimulations are measured on a seeded,
class-stratified held-out part of the clean data the search did not use.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .invert import (BATCH, LEVELS, STEPS, STIM_ROWS, STIM_SHARE, flip_rate, holdout_split, invert_shifts, level_value,
                     mean_norm, stimulate_channels)

#: the shift budget: this share of the clean activations' mean L2 norm
EPS = 0.1
#: the budget is halved (down to MIN_EPS) while the median class's flip rate exceeds MEDIAN_MAX
MEDIAN_MAX = 0.3
MIN_EPS = 0.01
#: each probe's gap statistic at the verdict line (fixed on the demo models: README, Scan): the shift probe's in MAD
#: units, the stimulation probe's in octaves
SHIFT_THRESHOLD = 0.9
STIM_THRESHOLD = 0.65
#: verdict: backdoored when the larger of the two statistics, each over its threshold, reaches this
THRESHOLD = 1.0
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
    statistic: float                  # max(shift statistic / SHIFT_THRESHOLD, stimulation statistic / STIM_THRESHOLD)
    threshold: float
    targets: list                     # [{class, flip, anomaly, channels, shift_norm, stimulation}], most suspicious
                                      # first
    flip: np.ndarray                  # per class: share of held-out clean inputs its shift sends to it
    eps: float                        # the absolute L2 budget
    layer: str
    seconds: float
    model_name: str = ""
    num_classes: int = 0
    shifts: np.ndarray | None = None  # the shifts of ``targets`` (same order), (k, H, W, C)
    config: dict = field(default_factory=dict)
    probe: str = "shift"              # the probe that gave the statistic: "shift" or "stimulation"
    shift_statistic: float = 0.0      # the shift probe's gap (MAD units)
    stim_statistic: float = 0.0       # the stimulation probe's gap (octaves)
    stim_level: np.ndarray | None = None    # per class: the stimulation that reaches it (ladder steps)

    def to_json(self) -> dict:
        lv = self.stim_level if self.stim_level is not None else np.zeros(0)
        return {"score": round(self.score, 6), "backdoored": bool(self.backdoored),
                "statistic": round(self.statistic, 6), "threshold": self.threshold,
                "method": "two probes of the prune layer over clean activations, per class: a universal shift "
                          "(L2 budget) and the stimulation of one channel; gap statistics",
                "probe": self.probe,
                "shift_statistic": round(self.shift_statistic, 6), "shift_threshold": SHIFT_THRESHOLD,
                "stimulation_statistic": round(self.stim_statistic, 6), "stimulation_threshold": STIM_THRESHOLD,
                "targets": self.targets, "layer": self.layer, "eps": round(self.eps, 6),
                "eps_share": self.config.get("eps_share"), "seconds": round(self.seconds, 3),
                "model": self.model_name, "num_classes": self.num_classes,
                "flip": [round(float(v), 6) for v in self.flip],
                "stimulation": [round(float(v) / 2, 4) if v < len(LEVELS) else None for v in lv],
                "config": self.config}


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


def stim_statistic(level) -> float:
    """The stimulation probe's statistic: the gap in octaves between the class reached by the smallest stimulation
    and the next (``level`` in half-octave ladder steps). 0 with fewer than three classes or fewer than two reached:
    a gap to a class the ladder never reaches would measure the ladder, not the model (a two-class head where one
    class is everyone's default is not a backdoor)."""
    lv = np.sort(np.asarray(level, np.float64))
    if len(lv) < 3 or lv[1] >= len(LEVELS):
        return 0.0
    return float(lv[1] - lv[0]) / 2


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
    s_shift, med, mad = gap_statistic(flip[cand])
    # the stimulation probe, on a seeded subset of the held-out rows
    rows = ho[np.random.default_rng([int(seed), 11]).permutation(len(ho))[:STIM_ROWS]]
    level, chan, unit = stimulate_channels(labels_fn, F[rows], y[rows], K)
    s_stim = stim_statistic(level)
    by_shift, by_stim = s_shift / SHIFT_THRESHOLD, s_stim / STIM_THRESHOLD
    stat = max(by_shift, by_stim)
    probe = "shift" if by_shift >= by_stim else "stimulation"
    if probe == "shift":
        order = np.argsort(-flip, kind="stable")[:top]
    else:
        order = np.lexsort((-flip, level))[:top]
    where = {int(c): i for i, c in enumerate(cand)}
    missing = [int(c) for c in order if int(c) not in where]
    if missing:       # a class the stimulation found that the shift screen left out: its shift, for the repair
        Dm = invert_shifts(head_net, F[tr], y[tr], np.array(missing), eps, steps=STEPS, batch=BATCH, seed=seed)
        flip[missing] = flip_rate(labels_fn, F[ho], y[ho], missing, Dm)
        D = np.concatenate([D, Dm])
        where.update({c: len(cand) + i for i, c in enumerate(missing)})
    shifts = np.stack([D[where[int(c)]] for c in order]) if len(order) else None
    targets = []
    for j, c in enumerate(order):
        reached = level[c] < len(LEVELS)
        targets.append({"class": int(c), "flip": round(float(flip[c]), 4),
                        "anomaly": round(float((flip[c] - med) / max(mad, 1e-3)), 3),
                        "shift_norm": round(float(np.linalg.norm(shifts[j])), 4),
                        "channels": [{"channel": ch, "share": s} for ch, s in _channels(shifts[j])],
                        "stimulation": {"channel": int(chan[c]) if reached else None,
                                        "octaves": round(float(level[c]) / 2, 4) if reached else None,
                                        "value": round(float(level_value(level[c], unit)), 4) if reached else None}})
    score = score_of(stat)
    return ScanResult(score=score, backdoored=stat >= THRESHOLD, statistic=stat, threshold=THRESHOLD,
                      targets=targets, flip=flip, eps=float(eps), layer=layer,
                      seconds=time.perf_counter() - t0, num_classes=K, shifts=shifts, probe=probe,
                      shift_statistic=s_shift, stim_statistic=s_stim, stim_level=level,
                      config={"eps_share": eps_share, "seed": int(seed), "rows": int(len(tr)),
                              "held_out": int(len(ho)), "steps": STEPS, "batch": BATCH,
                              "screened": bool(K > SCREEN_ALL), "median_flip": round(med, 6),
                              "mad_flip": round(mad, 6), "stimulation_rows": int(len(rows)),
                              "stimulation_unit": round(unit, 6)})


def _channels(delta, top: int = 6) -> list:
    mass = np.abs(delta).reshape(-1, delta.shape[-1]).sum(axis=0)
    total = float(mass.sum()) or 1.0
    return [(int(c), round(float(mass[c]) / total, 4)) for c in np.argsort(-mass, kind="stable")[:top]]


def scan_model(model, layer: str, F, y, seed: int = 0, log=None, name: str = "", net=None) -> ScanResult:
    """:func:`scan_activations` for a Keras model B and its prune layer (``net``: B's head as a Keras model over
    the activations, :func:`badprune._train.head_model`, when the caller has it already)."""
    from ._train import head_model
    from .head import compile_head
    from .models import num_classes

    head = compile_head(model, layer)
    res = scan_activations(net if net is not None else head_model(model, layer), head.labels, F, y,
                           num_classes(model), layer, seed=seed, log=log)
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


def _how(res: ScanResult, t: dict) -> str:
    st = t.get("stimulation") or {}
    if res.probe == "stimulation" and st.get("channel") is not None:
        return (f"driving channel {st['channel']} to {st['value']:.3g} sends {100 * STIM_SHARE:.0f}% of clean inputs "
                "to it")
    return (f"a shift of {res.config.get('eps_share', EPS):.0%} of the activations' norm sends {100 * t['flip']:.1f}% "
            "of clean inputs to it")


def summary(res: ScanResult) -> str:
    t = res.targets[0] if res.targets else None
    verdict = "BACKDOORED" if res.backdoored else "no backdoor found"
    s = (f"scan: {verdict} (score {res.score:.2f}, statistic {res.statistic:.2f}, threshold {res.threshold:g}; "
         f"shift {res.shift_statistic:.2f}/{SHIFT_THRESHOLD:g}, stimulation "
         f"{res.stim_statistic:.2f}/{STIM_THRESHOLD:g})")
    if t is not None:
        s += f"; most suspicious class {t['class']}: {_how(res, t)}"
    return s + f" ({res.seconds:.1f} s)"


def markdown(res: ScanResult) -> str:
    lines = [f"# Scan of {res.model_name or 'the model'}", "", summary(res), "",
             f"Method (clean data only), two probes of the `{res.layer}` activations. Shift: for every class, the "
             f"universal shift of L2 norm at most {res.config.get('eps_share', EPS):.0%} of their mean norm "
             f"({res.eps:.3g}) that sends the most clean inputs of other classes to it; statistic (first flip rate - "
             f"second) / MAD of all classes' flip rates, {res.shift_statistic:.2f} (line {SHIFT_THRESHOLD:g}). "
             "Stimulation: each channel raised in turn, at every position, along a ladder of values; per class the "
             f"smallest value at which one channel sends {100 * STIM_SHARE:.0f}% of clean inputs to it; statistic the "
             f"gap in octaves between the first class and the second, {res.stim_statistic:.2f} (line "
             f"{STIM_THRESHOLD:g}). The scan's statistic is the larger of the two over its line "
             f"({res.statistic:.2f}, from the {res.probe} probe); backdoored at >= {res.threshold:g}.", "",
             "| rank | class | flipped to it by its shift | anomaly (MAD units) | shift's main channels (share) | "
             "stimulation: channel, octaves above the ladder's foot |",
             "|---:|---:|---:|---:|---|---|"]
    for i, t in enumerate(res.targets, 1):
        ch = ", ".join(f"{c['channel']} ({100 * c['share']:.0f}%)" for c in t["channels"][:5])
        st = t.get("stimulation") or {}
        sm = f"{st['channel']}, {st['octaves']:.2f}" if st.get("channel") is not None else "not reached"
        lines.append(f"| {i} | {t['class']} | {100 * t['flip']:.1f}% | {t['anomaly']:.2f} | {ch} | {sm} |")
    lines += ["", f"Median flip rate over {res.num_classes} classes: {100 * res.config.get('median_flip', 0):.1f}%.",
              ""]
    return "\n".join(lines)


def plot(res: ScanResult, path, show: int = 60) -> None:
    """Three panels: per class (the ``show`` most reachable) the shift probe's flip rates and the stimulation probe's
    levels, each with its verdict line, and the first suspect's shift per channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 3.8), gridspec_kw={"width_ratios": [2, 2, 1.2]})
    first = res.targets[0]["class"] if res.targets else -1
    f = np.asarray(res.flip) * 100
    order = np.argsort(-f, kind="stable")[:show]
    ax[0].bar(np.arange(len(order)), f[order], width=0.9,
              color=["#c0392b" if (res.backdoored and c == first) else "#7f8c8d" for c in order])
    mad = 100 * res.config.get("mad_flip", 0)
    if len(order) > 1:
        ax[0].axhline(f[order[1]] + SHIFT_THRESHOLD * max(mad, 0.1), color="#c0392b", ls="--", lw=1,
                      label=f"verdict line (second + {SHIFT_THRESHOLD:g} MAD)")
    ax[0].axhline(100 * res.config.get("median_flip", 0), color="#2c3e50", ls=":", lw=1, label="median")
    ax[0].set_xlabel("classes, most reachable first")
    ax[0].set_ylabel("clean inputs sent by its shift (%)")
    ax[0].set_title(f"shift probe: statistic {res.shift_statistic:.2f}", fontsize=10)
    ax[0].legend(fontsize=8)
    if res.stim_level is not None and len(res.stim_level):
        lv = np.asarray(res.stim_level, float) / 2
        o = np.argsort(lv, kind="stable")[:show]
        ax[1].bar(np.arange(len(o)), lv[o], width=0.9,
                  color=["#c0392b" if (res.backdoored and c == first) else "#7f8c8d" for c in o])
        if len(o) > 1:
            ax[1].axhline(lv[o[1]] - STIM_THRESHOLD, color="#c0392b", ls="--", lw=1,
                          label=f"verdict line (second - {STIM_THRESHOLD:g} octave)")
            ax[1].legend(fontsize=8)
        ax[1].set_xlabel("classes, most reachable first")
        ax[1].set_ylabel("stimulation reaching it (octaves)")
        ax[1].set_title(f"stimulation probe: statistic {res.stim_statistic:.2f}", fontsize=10)
    if res.targets:
        mass = np.abs(res.shifts[0]).reshape(-1, res.shifts.shape[-1]).sum(axis=0)
        ax[2].bar(np.arange(len(mass)), mass / max(mass.sum(), 1e-12) * 100, color="#2980b9", width=0.9)
        ax[2].set_title(f"shift toward class {first}: per channel", fontsize=10)
        ax[2].set_xlabel(f"{res.layer} channel")
        ax[2].set_ylabel("share of the shift (%)")
    fig.suptitle(("BACKDOORED" if res.backdoored else "no backdoor found") +
                 f"  (score {res.score:.2f}, statistic {res.statistic:.2f} from the {res.probe} probe)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
