"""Ranking, the pruning sweep and threshold selection, gathered into one :class:`~badprune.result.SweepResult`.

:func:`run` is the sweep short of writing files (:func:`badprune.defense.run` adds the repair), in named stages
(:func:`stages`, on arguments :mod:`badprune.options` checked): load B and compile its head, open the data sets,
settle the pixel scale, extract the prune layer's activations once per set (cached), rank channels by mean
activation on clean validation data, mask them one at a time (:class:`badprune.head.MaskedSweep`) recording per
step the accuracies of B'_k and of GoodNet(B, B'_k) (:func:`sweep_table`, :func:`badprune.result.step_metrics`),
and pick B'_X for each threshold. When B's record and every activation are cached (a warm run,
:func:`badprune.record.find_warm`), B is neither loaded nor compiled and TensorFlow is not imported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

import prune_ext

from . import options
from .errors import BadpruneError, warn
from .options import ORDERS, SCALES, fixed_scale  # noqa: F401  (ORDERS: the orders of rank_channels)
from .result import SweepResult, Threshold, percent, step_metrics  # noqa: F401  (step_metrics: bench/)
from ._env import cache_home, versions
from .runfolder import COLUMNS, POISONED_MEAN, model_name

#: base (unpruned) validation accuracy, percent, under which :func:`run` warns (wrong pixel scale or data?)
LOW_BASE_ACC = 50.0
#: when every poisoned label is one class t and B already answers t on at least this share (percent) of the clean
#: inputs, :func:`run` warns that the attack success rate is meaningless
ASR_BASELINE_WARN = 50.0

def rank_channels(F_valid: np.ndarray, order: str = "ascending"):
    """(ranking, mean activation per channel): channels by mean activation over the clean validation set.

    Stable: ties keep channel-index order, in both directions.
    """
    return _rank(F_valid, options.check_order(order))


def _rank(F_valid, order):
    C = F_valid.shape[-1]
    means = prune_ext.channel_means(np.ascontiguousarray(F_valid, np.float32).reshape(-1, C))
    ranking = np.argsort(means if order == "ascending" else -means, kind="stable")
    return ranking.astype(np.int64), means


def select_thresholds(valid_acc, thresholds, relative=False, ranking=None):
    """B'_X for each X: the first step k >= 1 whose validation accuracy dropped by >= X points from step 0
    (``relative``: by >= X percent of the step-0 accuracy)."""
    return _select(valid_acc, options.check_thresholds(thresholds), relative, ranking)


def _select(valid_acc, thresholds, relative, ranking):
    valid_acc = np.asarray(valid_acc, dtype=np.float64)
    base = valid_acc[0]
    out = []
    for x in thresholds:
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


# --------------------------------------------------------------------------------------------------- stages
@dataclass
class _Defended:
    """B and what the sweep needs of it."""

    model: object
    name: str
    num_classes: int
    layer: str
    conv_layer: str | None
    head: object


def _load(model, weights, arch, trust, name, layer) -> _Defended:
    from . import models
    from .head import compile_head

    if hasattr(model, "predict"):
        B = model
        name = name or getattr(B, "name", "model")
    else:
        B = models.load_model(model=model, weights=weights, arch=arch, trust=trust)
        name = name or model_name(model or weights)
    n_classes = models.num_classes(B)
    layer = models.find_prune_layer(B, layer)
    return _Defended(B, name, n_classes, layer, models.conv_producer(B, layer), compile_head(B, layer))


def _open_sets(B, sets: dict, num_classes: int) -> dict:
    from . import data

    in_shape = tuple(int(v) for v in B.input_shape[1:])
    return {k: data.open_dataset(p, input_shape=in_shape, num_classes=num_classes) for k, p in sets.items()
            if p is not None}


def _scale_note(name, accs) -> str:
    return (f"scale: {name} (accuracy on up to 1,000 validation images: raw {100 * accs['raw']:.1f}%, "
            f"/255 {100 * accs['unit']:.1f}%)")


def _settle_scale(d: _Defended, valid, scale, say, cache_dir=None) -> tuple:
    """(scale name, multiplier): detected on the validation set for 'auto' (the trunk up to the prune layer, then
    the compiled head; the decision is cached in ``cache_dir``, so a warm run prints the same line without running
    the model)."""
    from . import features

    if isinstance(scale, str) and scale == "auto":
        scale_name, accs = features.detect_scale(d.model, valid, cache_dir=cache_dir, layer=d.layer,
                                                 classify=d.head.labels)
        say(_scale_note(scale_name, accs))
        return scale_name, SCALES[scale_name]
    return fixed_scale(scale)


def _model_note(d: _Defended) -> str:
    return (f"model {d.name}: {d.num_classes} classes, pruning {d.layer} ({d.head.input_shape[-1]} channels"
            f"{', conv ' + d.conv_layer if d.conv_layer else ''}); {d.head.describe()}")


def _extract_all(d: _Defended, ds: dict, scale_value, cache_dir, batch_size, progress, timings) -> tuple:
    """One float32 activations array for all sets (the sweep evaluates them together), filled set by set (no
    concatenation copy): (F, {set: slice}, {set: extract info})."""
    from . import cache, features
    from .data import check_memory

    lo = sum(dset.n for dset in ds.values())
    what = f"the activations of {lo:,} images at '{d.layer}'"
    fix = "use smaller data sets or an earlier, smaller --layer"
    check_memory(lo * int(np.prod(d.head.input_shape)) * 4, what, fix)
    try:
        F, bounds = cache.stacked({k: dset.n for k, dset in ds.items()}, d.head.input_shape)
    except MemoryError:
        gb = lo * int(np.prod(d.head.input_shape)) * 4 / 1e9
        raise BadpruneError(f"not enough memory for {what} ({gb:.1f} GB)", fix=fix) from None
    info = {}
    for k, dset in ds.items():
        _, info[k] = features.extract(d.model, d.layer, dset, scale_value, cache_dir=cache_dir,
                                      batch_size=batch_size, progress=progress, desc=f"features {k}",
                                      return_info=True, out=F[bounds[k]])
        timings[f"extract_{k}"] = info[k].get("seconds", float("nan"))
    return F, bounds, info


def sweep_table(head, F, ranking, means, bounds: dict, truth: dict, num_classes: int, mode: str = "incremental",
                on_step=None, poisoned_means=None) -> tuple:
    """Mask ``ranking``'s channels one at a time over the activations ``F`` of all sets (``bounds``: set ->
    rows) and record :func:`step_metrics` at every step. ``means``: the mean activation per channel (its column;
    None leaves it NaN); ``poisoned_means``: the same on the poisoned set (adds the optional column).

    Returns ``(table, engine)``: the table as {column: array of C+1 values} (:data:`COLUMNS`) and the
    :class:`~badprune.head.MaskedSweep` that ran (its statistics). ``on_step(k, labels_by_set)`` is called at
    every step (step 0: B itself).
    """
    from .head import MaskedSweep

    C = len(ranking)
    cols = {c: np.full(C + 1, np.nan) for c in COLUMNS}
    cols["step"] = np.arange(C + 1, dtype=np.int64)
    cols["channel"] = np.concatenate([[-1], ranking]).astype(np.int64)
    if means is not None:
        cols["mean_activation"] = np.concatenate([[np.nan], np.asarray(means)[ranking]])
    if poisoned_means is not None:
        cols[POISONED_MEAN] = np.concatenate([[np.nan], np.asarray(poisoned_means)[ranking]])
    cols["fraction_pruned"] = np.arange(C + 1) / C
    engine = MaskedSweep(head, F, ranking, mode=mode)
    base = None
    for k, _, lab in engine:
        p = {n: lab[s] for n, s in bounds.items()}
        if base is None:
            base = {n: v.copy() for n, v in p.items()}
        for col, v in step_metrics(p, base, truth, num_classes).items():
            cols[col][k] = v
        if on_step is not None:
            on_step(k, p)
    return cols, engine


def run(model=None, weights=None, arch=None, valid=None, test=None, poisoned=None, *, layer=None,
        thresholds=(2, 4, 10), relative=False, order="ascending", scale="auto", cache_dir=None, use_cache=True,
        batch_size=128, mode="incremental", progress=True, trust_model=False, name=None, log=None,
        before_tensorflow=None) -> SweepResult:
    """The sweep alone: :func:`badprune.defense.run` (``badprune.run_sweep``, which documents the parameters)
    without the repair. Checks its parameters (:func:`badprune.options.check_run`), then runs :func:`stages`."""
    p = options.check_run(model, weights, arch, valid, thresholds=thresholds, order=order, scale=scale,
                          batch_size=batch_size, mode=mode)
    return stages(model, weights, arch, valid, test, poisoned, layer=layer, thresholds=p["thresholds"],
                  relative=relative, order=order, scale=p["scale"], cache_dir=cache_dir, use_cache=use_cache,
                  batch_size=p["batch_size"], mode=mode, progress=progress, trust_model=trust_model, name=name,
                  log=log, before_tensorflow=before_tensorflow).result


@dataclass
class Swept:
    """What :func:`stages` leaves: the result, and for a repair that follows (:func:`badprune.defense.run`) the
    activations of all sets ``F`` (rows ``bounds[set]``), the opened ``datasets``, the activation cache in use
    (None without one) and the run's start (``time.perf_counter`` origin of ``timings['total']``)."""

    result: SweepResult
    F: np.ndarray
    bounds: dict
    datasets: dict
    cache_dir: str | None
    started: float


def stages(model, weights, arch, valid, test, poisoned, *, layer, thresholds, relative, order, scale, cache_dir,
           use_cache, batch_size, mode, progress, trust_model, name, log, before_tensorflow,
           allow_warm=True) -> Swept:
    """The sweep's stages on parameters :func:`badprune.options.check_run` has checked (thresholds as floats,
    scale and batch size normalized). ``allow_warm``: B may come from its cached record without TensorFlow (a
    repair that follows needs B itself)."""
    say = log or (lambda msg: None)
    timings = {}
    t_all = time.perf_counter()
    if use_cache and cache_dir is None:
        cache_dir = cache_home()
    cdir = cache_dir if use_cache else None
    if cdir is not None:
        from .cache import secure_dir

        secure_dir(cdir)
    rkey = warm = rec = None
    sets = {"valid": valid, "test": test, "poisoned": poisoned}
    if cdir is not None and not hasattr(model, "predict"):
        from . import record

        rkey = record.source_key(model, weights, arch, trust_model, layer)
        rec = record.load(cdir, rkey)
        if rec is not None and allow_warm:
            warm = record.find_warm(cdir, rec, sets, scale)
    if warm is not None:  # B's record and every activation come from the cache: no TensorFlow
        d = _Defended(None, name or model_name(model or weights), rec.num_classes, rec.layer, rec.conv_layer,
                      rec.head)
        ds, scale_name, scale_value, F, bounds = warm.sets, warm.scale_name, warm.scale_value, warm.F, warm.bounds
        extract_info = warm.info
        timings.update(warm.seconds)
        say(_model_note(d))
        if warm.scale_accs is not None:
            say(_scale_note(scale_name, warm.scale_accs))
        warm.announce(progress)
    else:
        if before_tensorflow is not None:  # its time (the command line's TensorFlow import) is not the sweep's
            t = time.perf_counter()
            before_tensorflow()
            t_all += time.perf_counter() - t
        t = time.perf_counter()
        d = _load(model, weights, arch, trust_model, name, layer)
        timings["load_model"] = time.perf_counter() - t
        say(_model_note(d))
        ds = _open_sets(d.model, sets, d.num_classes)
        t = time.perf_counter()
        scale_name, scale_value = _settle_scale(d, ds["valid"], scale, say, cdir)
        timings["scale"] = time.perf_counter() - t
        F, bounds, extract_info = _extract_all(d, ds, scale_value, cdir, batch_size, progress, timings)
        if rkey is not None and rec is None:  # kept for warm runs once the activations are
            rec = record.save(cdir, rkey, d.model, d.layer, d.conv_layer, d.num_classes, d.head)

    t = time.perf_counter()
    ranking, means = _rank(F[bounds["valid"]], order)
    p_means = None
    if "poisoned" in bounds:
        p_means = prune_ext.channel_means(F[bounds["poisoned"]].reshape(-1, F.shape[-1]))
    timings["rank"] = time.perf_counter() - t

    t = time.perf_counter()
    warned = []
    from ._console import progress as stage_progress

    def on_step(k, pred):
        if k == 0:
            clean = "test" if "test" in pred else "valid"
            issued = base_warnings(percent(pred["valid"] == ds["valid"].labels), pred[clean],
                                   ds["poisoned"].labels if "poisoned" in ds else None, scale_name,
                                   "test" if clean == "test" else "validation")
            warned.extend(warn(m) for m in issued)
        bar.update(1)

    with stage_progress(len(ranking) + 1, "pruning", "step", enabled=progress, rate=False) as bar:
        cols, _ = sweep_table(d.head, F, ranking, means, bounds, {k: v.labels for k, v in ds.items()},
                              d.num_classes, mode, on_step, p_means)
    timings["sweep"] = time.perf_counter() - t

    ths = _select(cols["valid_acc"], thresholds, relative, ranking)
    config = {
        "model": model if isinstance(model, str) else None, "weights": weights, "arch": arch,
        "valid": valid, "test": test, "poisoned": poisoned, "layer": d.layer, "conv_layer": d.conv_layer,
        "thresholds": thresholds, "relative": relative, "order": order,
        "scale": scale_name, "scale_value": scale_value, "mode": mode, "head": d.head.describe(),
        "head_backend": d.head.backend, "sizes": {k: v.n for k, v in ds.items()},
        "cached": {k: bool(v.get("cached")) for k, v in extract_info.items()},
        "extract_img_per_s": {k: v.get("img_per_s") for k, v in extract_info.items()},
        "trunk": {k: v.get("trunk") for k, v in extract_info.items()},
        "warnings": warned,
        "activations": {k: v.get("path") for k, v in extract_info.items()},
    }
    result = SweepResult(model_name=d.name, layer=d.layer, conv_layer=d.conv_layer, n_channels=len(ranking),
                         ranking=ranking, mean_activation=means, table=cols, thresholds=ths, relative=relative,
                         num_classes=d.num_classes, config=config, timings=timings, versions=versions(),
                         model=d.model, poisoned_mean_activation=p_means, model_record=rec,
                         model_source=None if warm is None else
                         {"model": model, "weights": weights, "arch": arch, "trust": trust_model})
    timings["total"] = time.perf_counter() - t_all
    return Swept(result, F, bounds, ds, cdir, t_all)
