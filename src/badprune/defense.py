"""The pruning defense as one call: the sweep (:mod:`badprune.sweep`), then, with ``fine_tune``, the repair of
each B'_X into R_X (:mod:`badprune.repair`). It sits above both, so neither imports the other; it checks every
parameter once (:func:`badprune.options.check_run`) and hands the checked values down."""
from __future__ import annotations

import time

from . import options, repair, scan as _scan, sweep
from .result import SweepResult


def run(model=None, weights=None, arch=None, valid=None, test=None, poisoned=None, *, layer=None,
        thresholds=(2, 4, 10), relative=False, order="ascending", scale="auto", cache_dir=None, use_cache=True,
        batch_size=128, mode="incremental", progress=True, trust_model=False, name=None, log=None,
        fine_tune=None, fine_tune_epochs=None, fine_tune_lr=None, seed=0, before_tensorflow=None,
        scan=False) -> SweepResult:
    """Run the pruning defense and return a :class:`~badprune.result.SweepResult`: the sweep
    (:mod:`badprune.sweep`), then with ``fine_tune`` the repair of each reached B'_X (:mod:`badprune.repair`).

    Parameters
    ----------
    model : keras.Model or str, optional
        B: a Keras model object or a path (.keras / .h5 full model); or give ``weights`` and ``arch``
        (:func:`badprune.options.check_source`).
    weights, arch : str, optional
        A Keras 2 weight file and the built-in architecture it is for ('deepid').
    valid, test, poisoned : str
        Lab-format h5 paths; ``valid`` is required (ranking and thresholds); without ``test`` / ``poisoned``
        their columns are NaN.
    layer : str, optional
        The prune layer (default: the last pooling layer that cuts the model in two).
    thresholds : sequence of float
        X values in (0, 100): validation-accuracy drops in points (or percent of the base with ``relative``).
    order : {'ascending', 'descending'}
        Pruning order by mean clean activation.
    scale : 'auto', 'raw', 'unit' or float
        Pixel multiplier; 'auto' picks raw or /255 on up to 1,000 validation images.
    cache_dir : str, optional
        Where prune-layer activations are cached (default: the user cache folder); ``use_cache=False`` disables.
    batch_size : int
        Trunk batch size (at most :data:`badprune.features.MAX_BATCH`, 128: larger batches only hold more of
        TensorFlow's working memory; the activations do not depend on it).
    mode : {'incremental', 'full'}
        The sweep engine's mode (``full``: the reference without shortcuts).
    progress : bool
        Progress bars on stderr.
    trust_model : bool
        Allow code from the model file.
    name : str, optional
        The model's name in the outputs.
    log : callable, optional
        Called with one-line notes.
    fine_tune : {None, 'unlearn', 'head', 'full'}
        Also repair each reached B'_X into R_X by fine-pruning on clean data (:mod:`badprune.repair`);
        ``fine_tune_epochs``, ``fine_tune_lr`` override the recipe's defaults; ``seed`` makes it deterministic.
    scan : bool
        Also scan B (:mod:`badprune.scan`: is it backdoored, which target?) on the clean validation activations;
        the result's ``scan``. Reads no poisoned data.
    before_tensorflow : callable, optional
        Called before the run first needs TensorFlow. A warm run never does: B given by its file, without
        ``fine_tune``, with B's record (:mod:`badprune.record`), the scale decision and every activation cached.

    Returns
    -------
    SweepResult

    Raises
    ------
    ParamError
        For a bad parameter (:mod:`badprune.options`), naming it.
    BadpruneError
        For any bad input, naming the file.
    """
    p = options.check_run(model, weights, arch, valid, thresholds=thresholds, order=order, scale=scale,
                          batch_size=batch_size, mode=mode, fine_tune=fine_tune, fine_tune_epochs=fine_tune_epochs,
                          fine_tune_lr=fine_tune_lr, seed=seed)
    swept = sweep.stages(model, weights, arch, valid, test, poisoned, layer=layer, thresholds=p["thresholds"],
                         relative=relative, order=order, scale=p["scale"], cache_dir=cache_dir, use_cache=use_cache,
                         batch_size=p["batch_size"], mode=mode, progress=progress, trust_model=trust_model,
                         name=name, log=log, before_tensorflow=before_tensorflow,
                         allow_warm=fine_tune is None and not scan)
    result = swept.result
    if scan:
        t = time.perf_counter()
        result.scan = _scan.scan_model(result.get_model(), result.layer, swept.F[swept.bounds["valid"]],
                                       swept.datasets["valid"].labels, seed=p["fine"]["seed"], log=log,
                                       name=result.model_name)
        result.timings["scan"] = time.perf_counter() - t
    if fine_tune is not None:
        fine = repair.recipe(**p["fine"])
        timings = result.timings
        timings.pop("total")
        t = time.perf_counter()
        result.config["fine_tune"] = dict(fine)
        result.repaired = repair.repair_thresholds(result, swept.F, swept.bounds, swept.datasets, fine,
                                                   swept.cache_dir, log or (lambda msg: None), scan=result.scan)
        timings["repair"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - swept.started
    return result
