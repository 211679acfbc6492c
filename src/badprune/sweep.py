"""Ranking, the pruning sweep and threshold selection, gathered into one :class:`SweepResult`.

:func:`run` is the whole defense short of writing files: load B, read the data, extract the prune layer's
activations once per set (cached), rank channels by mean activation on clean validation data, mask them one at a
time with :func:`badprune.head.masked_steps`, and record per step the accuracies of B'_k and of GoodNet(B, B'_k).
"""
from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass, field

import numpy as np

import prune_ext

from .errors import BadpruneError, warn

#: base (unpruned) validation accuracy, percent, under which :func:`run` warns (wrong pixel scale or data?)
LOW_BASE_ACC = 50.0
#: when every poisoned label is one class t and B already answers t on at least this share (percent) of the clean
#: inputs, :func:`run` warns that the attack success rate is meaningless
ASR_BASELINE_WARN = 50.0

#: columns of the per-step table, in output order (accuracies in percent)
COLUMNS = ("step", "channel", "mean_activation", "fraction_pruned", "valid_acc", "test_acc", "asr",
           "goodnet_test_acc", "goodnet_asr", "goodnet_detection", "goodnet_false_alarm")


@dataclass
class Threshold:
    """B'_X for one threshold X: the first step whose validation accuracy dropped by at least X."""

    x: float                   # threshold, percentage points (or percent of base when relative)
    step: int | None           # None: never reached
    channels: list             # channels pruned in B'_X (ranking[:step])

    @property
    def reached(self) -> bool:
        return self.step is not None


@dataclass
class SweepResult:
    """Everything a sweep produced. ``table[col]`` is an array of C+1 values (step 0 = the unpruned model B)."""

    model_name: str
    layer: str                        # the prune layer (e.g. pool_3)
    conv_layer: str | None            # the layer whose kernel/bias B'_X zeroes (e.g. conv_3)
    n_channels: int
    ranking: np.ndarray               # channel indices in pruning order
    mean_activation: np.ndarray       # per channel, indexed by channel
    table: dict                       # column -> np.ndarray (len C+1), see COLUMNS
    thresholds: list                  # [Threshold]
    relative: bool                    # thresholds relative to base accuracy rather than absolute points
    num_classes: int                  # N: the GoodNet's "backdoor detected" label
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    model: object = None              # the Keras model B (for pruned_model)

    def row(self, step: int) -> dict:
        return {c: self.table[c][step].item() for c in COLUMNS}

    def threshold(self, x: float) -> Threshold:
        for t in self.thresholds:
            if t.x == x:
                return t
        raise KeyError(f"no threshold {x}; have {[t.x for t in self.thresholds]}")

    def pruned_model(self, x: float):
        """B'_X as a plain Keras model (the channels' conv kernel and bias zeroed)."""
        from .models import prune_model

        t = self.threshold(x)
        if not t.reached:
            raise ValueError(f"threshold {x} was never reached")
        return prune_model(self.model, self.layer, t.channels)


def rank_channels(F_valid: np.ndarray, order: str = "ascending"):
    """(ranking, mean activation per channel): channels by mean activation over the clean validation set.

    Stable: ties keep channel-index order, in both directions.
    """
    C = F_valid.shape[-1]
    means = prune_ext.channel_means(np.ascontiguousarray(F_valid, np.float32).reshape(-1, C))
    if order == "ascending":
        ranking = np.argsort(means, kind="stable")
    elif order == "descending":
        ranking = np.argsort(-means, kind="stable")
    else:
        raise BadpruneError(f"unknown order '{order}'", fix="use --order ascending or --order descending")
    return ranking.astype(np.int64), means


def select_thresholds(valid_acc, thresholds, relative=False, ranking=None):
    """B'_X for each X: the first step k >= 1 whose validation accuracy dropped by >= X points from step 0
    (``relative``: by >= X percent of the step-0 accuracy)."""
    valid_acc = np.asarray(valid_acc, dtype=np.float64)
    base = valid_acc[0]
    out = []
    for x in thresholds:
        x = float(x)
        if not 0 < x < 100:
            raise BadpruneError(f"threshold {x:g} is out of range", fix="thresholds are in (0, 100)")
        limit = base * (1 - x / 100) if relative else base - x
        hits = np.flatnonzero(valid_acc[1:] <= limit + 1e-9)
        step = int(hits[0]) + 1 if len(hits) else None
        chans = [] if step is None or ranking is None else [int(c) for c in ranking[:step]]
        out.append(Threshold(x, step, chans))
    return out


def base_warnings(valid_acc, clean_pred, poisoned_labels, scale="", clean_name="test") -> list:
    """Messages about the unpruned model B on the given data that make the sweep's numbers doubtful.

    valid_acc: B's validation accuracy (percent); clean_pred: B's labels on the clean set ``clean_name`` (test,
    else validation); poisoned_labels: the poisoned set's stored labels (None when there is none).
    """
    msgs = []
    if np.isfinite(valid_acc) and valid_acc < LOW_BASE_ACC:
        msgs.append(f"the unpruned model classifies only {valid_acc:.1f}% of the validation set correctly"
                    f"{f' (pixel scale {scale})' if scale else ''}: wrong pixel scale or wrong data? The thresholds "
                    "are drops from this base accuracy")
    if poisoned_labels is not None and len(poisoned_labels) and clean_pred is not None and len(clean_pred):
        t = int(poisoned_labels[0])
        if (np.asarray(poisoned_labels) == t).all():
            share = 100.0 * float(np.mean(np.asarray(clean_pred) == t))
            if share >= ASR_BASELINE_WARN:
                msgs.append(f"every poisoned label is class {t}, which the unpruned model already gives to "
                            f"{share:.1f}% of the clean {clean_name} inputs: the attack success rate is "
                            "meaningless (it measures that bias, not a backdoor)")
    return msgs


def _pct(a):
    return 100.0 * float(np.mean(a)) if len(a) else float("nan")


def _versions():
    import importlib.metadata as md

    v = {"python": sys.version.split()[0]}
    for pkg in ("badprune", "numpy", "scipy", "h5py", "tensorflow", "tensorflow-cpu", "keras", "Cython"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


class _Progress:
    """tqdm to stderr, or nothing."""

    def __init__(self, enabled):
        self.enabled = enabled

    def bar(self, total, desc):
        if not self.enabled:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)


def run(model=None, weights=None, arch=None, valid=None, test=None, poisoned=None, *, layer=None,
        thresholds=(2, 4, 10), relative=False, order="ascending", scale="auto", cache_dir=None, use_cache=True,
        batch_size=1024, mode="incremental", progress=True, trust_model=False, name=None, log=None) -> SweepResult:
    """Run the pruning defense and return a :class:`SweepResult`.

    model: a Keras model object or a path (.keras / .h5 full model); or weights=PATH with arch='deepid'.
    valid / test / poisoned: lab-format h5 paths (test and poisoned may be None: their columns are NaN).
    scale: 'auto' | 'raw' | 'unit' or a number; cache_dir: where prune-layer activations are cached
    (default: the user cache folder; use_cache=False to disable); name: the model's name in the outputs.
    """
    from . import data as bd
    from . import features, models
    from .head import compile_head, masked_steps

    say = log or (lambda msg: None)
    timings = {}
    t_all = time.perf_counter()
    if valid is None:
        raise BadpruneError("no validation data", fix="pass --valid valid.h5 (clean validation set)")
    try:
        thresholds = [float(x) for x in thresholds]
    except (TypeError, ValueError):
        raise BadpruneError(f"thresholds must be numbers, got {thresholds!r}", fix="thresholds are in (0, 100)") \
            from None
    for x in thresholds:
        if not 0 < x < 100:
            raise BadpruneError(f"threshold {x:g} is out of range", fix="thresholds are in (0, 100)")
    if order not in ("ascending", "descending"):
        raise BadpruneError(f"unknown order '{order}'", fix="use ascending or descending")

    t = time.perf_counter()
    if hasattr(model, "predict"):
        B = model
        name = name or getattr(B, "name", "model")
    else:
        B = models.load_model(model=model, weights=weights, arch=arch, trust=trust_model)
        name = name or models.model_name(model or weights)
    n_classes = models.num_classes(B)
    layer = models.find_prune_layer(B, layer)
    conv_layer = models.conv_producer(B, layer)
    head = compile_head(B, layer)
    timings["load_model"] = time.perf_counter() - t
    say(f"model {name}: {n_classes} classes, pruning {layer} ({head.input_shape[-1]} channels"
        f"{', conv ' + conv_layer if conv_layer else ''}); {head.describe()}")

    in_shape = tuple(int(v) for v in B.input_shape[1:])
    sets = {"valid": valid, "test": test, "poisoned": poisoned}
    ds = {k: bd.open_dataset(p, input_shape=in_shape, num_classes=n_classes) for k, p in sets.items()
          if p is not None}

    t = time.perf_counter()
    if isinstance(scale, str) and scale == "auto":
        scale_name, accs = features.detect_scale(B, ds["valid"])
        say(f"scale: {scale_name} (accuracy on up to 1,000 validation images: raw {100 * accs['raw']:.1f}%, "
            f"/255 {100 * accs['unit']:.1f}%)")
        scale_value = bd.SCALES[scale_name]
    elif isinstance(scale, str):
        if scale not in bd.SCALES:
            raise BadpruneError(f"unknown scale '{scale}'", fix="use --scale auto, raw or unit")
        scale_name, scale_value = scale, bd.SCALES[scale]
    else:
        scale_name, scale_value = f"x{float(scale):g}", float(scale)
    timings["scale"] = time.perf_counter() - t

    if use_cache and cache_dir is None:
        cache_dir = features.default_cache_dir()
    # one array for all sets (the sweep evaluates them together), filled set by set: no concatenation copy
    names = list(ds)
    sizes = {k: ds[k].n for k in names}
    bounds, lo = {}, 0
    for k in names:
        bounds[k] = slice(lo, lo + sizes[k])
        lo += sizes[k]
    try:
        F = np.empty((lo,) + tuple(head.input_shape), np.float32)
    except MemoryError:
        gb = lo * int(np.prod(head.input_shape)) * 4 / 1e9
        raise BadpruneError(f"not enough memory for the activations of {lo:,} images at '{layer}' ({gb:.1f} GB)",
                            fix="use smaller data sets or an earlier, smaller --layer") from None
    extract_info = {}
    for k, d in ds.items():
        _, info = features.extract(B, layer, d, scale_value, cache_dir=cache_dir if use_cache else None,
                                   batch_size=batch_size, progress=progress, desc=f"features {k}",
                                   return_info=True, out=F[bounds[k]])
        extract_info[k] = info
        timings[f"extract_{k}"] = info.get("seconds", float("nan"))

    t = time.perf_counter()
    ranking, means = rank_channels(F[bounds["valid"]], order)
    timings["rank"] = time.perf_counter() - t

    t = time.perf_counter()
    y = {k: ds[k].labels for k in names}
    C = len(ranking)
    cols = {c: np.full(C + 1, np.nan) for c in COLUMNS}
    cols["step"] = np.arange(C + 1, dtype=np.int64)
    cols["channel"] = np.concatenate([[-1], ranking]).astype(np.int64)
    cols["mean_activation"] = np.concatenate([[np.nan], means[ranking]])
    cols["fraction_pruned"] = np.arange(C + 1) / C
    base = None
    warned = []
    bar = _Progress(progress).bar(C + 1, "pruning")
    for k, c, lab in masked_steps(head, F, ranking, mode=mode):
        if base is None:
            base = lab.copy()
        p = {n: lab[bounds[n]] for n in names}
        cols["valid_acc"][k] = _pct(p["valid"] == y["valid"])
        if "test" in p:
            cols["test_acc"][k] = _pct(p["test"] == y["test"])
            g = np.where(p["test"] == base[bounds["test"]], p["test"], n_classes)
            cols["goodnet_test_acc"][k] = _pct(g == y["test"])
            cols["goodnet_false_alarm"][k] = _pct(g == n_classes)
        if "poisoned" in p:
            cols["asr"][k] = _pct(p["poisoned"] == y["poisoned"])
            g = np.where(p["poisoned"] == base[bounds["poisoned"]], p["poisoned"], n_classes)
            cols["goodnet_asr"][k] = _pct(g == y["poisoned"])
            cols["goodnet_detection"][k] = _pct(g == n_classes)
        if k == 0:
            clean = "test" if "test" in p else "valid"
            issued = base_warnings(cols["valid_acc"][0], p[clean], y.get("poisoned"), scale_name,
                                   "test" if clean == "test" else "validation")
            warned.extend(warn(m) for m in issued)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    timings["sweep"] = time.perf_counter() - t
    del F

    ths = select_thresholds(cols["valid_acc"], thresholds, relative, ranking)
    timings["total"] = time.perf_counter() - t_all
    config = {
        "model": model if isinstance(model, str) else None, "weights": weights, "arch": arch,
        "valid": valid, "test": test, "poisoned": poisoned, "layer": layer, "conv_layer": conv_layer,
        "thresholds": [float(x) for x in thresholds], "relative": relative, "order": order,
        "scale": scale_name, "scale_value": scale_value, "mode": mode, "head": head.describe(),
        "head_backend": head.backend, "sizes": sizes,
        "cached": {k: bool(v.get("cached")) for k, v in extract_info.items()},
        "extract_img_per_s": {k: v.get("img_per_s") for k, v in extract_info.items()},
        "warnings": warned,
    }
    return SweepResult(model_name=name, layer=layer, conv_layer=conv_layer, n_channels=C, ranking=ranking,
                       mean_activation=means, table=cols, thresholds=ths, relative=relative,
                       num_classes=n_classes, config=config, timings=timings, versions=_versions(), model=B)


class _CallableModule(types.ModuleType):
    """``badprune.sweep`` is both this module and the API function: calling the module runs :func:`run`."""

    def __call__(self, *args, **kwargs):
        return run(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
