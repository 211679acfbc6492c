"""The rules of the API's parameters, declared once (as scikit-learn's ``_parameter_constraints``): what each
keyword argument of :func:`badprune.defense.run` (the sweep, and the repair with ``fine_tune``) and of
:func:`badprune.repair.repair_run` accepts, and the rules between them.

Each rule is checked once per call path, where the call enters the library (``defense.run``, ``repair_run``,
the zoo's manifest, ``runtime.open_model``); the functions below it take the values as checked. A bad value
raises :class:`~badprune.errors.ParamError` naming the **parameter** (``fine_tune_epochs must be ...``); the
command line words it with its flags (``--fine-tune-epochs must be ...``, one table in :mod:`badprune.cli`), the
zoo with its manifest keys (one table in :mod:`badprune.zoo.manifest`).

TF-free and import-light: it imports only :mod:`badprune.errors`.
"""
from __future__ import annotations

import math

from .errors import ParamError, literal

#: multiplier applied to stored pixels for each named scale
SCALES = {"raw": 1.0, "unit": 1.0 / 255.0}
#: pruning orders (by mean clean activation)
ORDERS = ("ascending", "descending")
#: the sweep engine's modes (``full``: the reference without shortcuts)
SWEEP_MODES = ("incremental", "full")
#: fine-pruning modes (:mod:`badprune.repair`)
FINE_TUNE_MODES = ("unlearn", "head", "full")

#: the type of each parameter a manifest may set (the zoo's keys are these names, :mod:`badprune.zoo.manifest`):
#: path, str, bool, int, number, scale (a name or a number), thresholds (a non-empty list of numbers)
TYPES = {
    "model": "path", "weights": "path", "arch": "str", "valid": "path", "test": "path", "poisoned": "path",
    "layer": "str", "thresholds": "thresholds", "relative": "bool", "order": "str", "scale": "scale",
    "mode": "str", "trust_model": "bool", "fine_tune": "str", "fine_tune_epochs": "int", "fine_tune_lr": "number",
    "seed": "int", "batch_size": "int", "use_cache": "bool", "scan": "bool",
}


# ------------------------------------------------------------------------------------------- one parameter
def check_thresholds(thresholds) -> list:
    """``thresholds``: numbers in (0, 100), as a list of floats."""
    try:
        xs = [float(x) for x in thresholds]
    except (TypeError, ValueError):
        raise ParamError("thresholds", f"{{thresholds}} must be numbers, got {literal(repr(thresholds))}",
                         "thresholds are in (0, 100)") from None
    for x in xs:
        if not 0 < x < 100:
            raise ParamError("thresholds", f"threshold {x:g} is out of range", "thresholds are in (0, 100)")
    return xs


def check_order(order) -> str:
    if order not in ORDERS:
        raise ParamError("order", f"unknown order '{literal(order)}'",
                         'use {order="ascending"} or {order="descending"}')
    return order


def check_mode(mode) -> str:
    if mode not in SWEEP_MODES:
        raise ParamError("mode", f"unknown sweep mode '{literal(mode)}'",
                         'use {mode="incremental"} or {mode="full"}')
    return mode


def scale_value(scale, param: str = "scale") -> float:
    """The pixel multiplier for ``scale``: a name of :data:`SCALES`, or a positive number (or its text)."""
    if isinstance(scale, str):
        if scale in SCALES:
            return SCALES[scale]
        try:
            v = float(scale)
        except ValueError:
            raise ParamError(param, f"unknown scale '{literal(scale)}'",
                             f"use {', '.join(SCALES)} or a positive number") from None
    else:
        try:
            v = float(scale)
        except (TypeError, ValueError):
            raise ParamError(param, f"bad scale {literal(repr(scale))}",
                             f"use {', '.join(SCALES)} or a positive number") from None
    if not math.isfinite(v) or v <= 0:
        raise ParamError(param, f"bad scale {literal(repr(scale))}", "use a positive number")
    return v


def check_scale(scale):
    """``scale``: 'auto', a name of :data:`SCALES`, or a positive number (returned as a float)."""
    if isinstance(scale, str):
        if scale != "auto" and scale not in SCALES:
            raise ParamError("scale", f"unknown scale '{literal(scale)}'", "use {scale} auto, raw or unit")
        return scale
    return scale_value(scale)


def fixed_scale(scale) -> tuple:
    """``(name, multiplier)`` of a checked scale that needs no detection (a name of :data:`SCALES`, or a number,
    named ``x<number>``), as a run records it."""
    if isinstance(scale, str):
        return scale, SCALES[scale]
    return f"x{float(scale):g}", float(scale)


def check_batch_size(batch_size) -> int:
    """``batch_size``: a whole number of at least 1."""
    try:
        b = int(batch_size)
    except (TypeError, ValueError):
        b = 0
    if b < 1:
        raise ParamError("batch_size", "{batch_size} must be positive", "pass a batch size of at least 1")
    return b


def check_source(model=None, weights=None, arch=None, missing_fix: str | None = None) -> None:
    """The rule for naming a model to run (the sweep, predict / evaluate): a model file (or a Keras model object),
    or a weight file with its architecture, never both. ``missing_fix``: a template for when none is given.

    (:func:`badprune.models.load_model` itself is the lower-level loader and also accepts a weight file that
    overwrites a model's weights, or weights with the default architecture.)
    """
    if model is not None and weights is not None:
        raise ParamError("weights", "give {model} or {weights}, not both")
    if weights is not None and not arch:
        raise ParamError("arch", "{weights} needs {arch}", 'add {arch="deepid"} (the lab\'s architecture)')
    if arch and weights is None:
        raise ParamError("arch", "{arch} needs {weights}", 'add {weights="bd_weights.h5"}')
    if model is None and weights is None:
        raise ParamError("model", "no model given",
                         missing_fix or 'pass {model="bd_net.h5"}, or {weights="bd_weights.h5"} with '
                                        '{arch="deepid"}')


def check_valid(valid) -> None:
    if valid is None:
        raise ParamError("valid", "no validation data", 'pass {valid="valid.h5"} (clean validation set)')


def check_seed(seed) -> int:
    try:
        return int(seed)
    except (TypeError, ValueError):
        raise ParamError("seed", f"{{seed}} must be a whole number, got {literal(repr(seed))}") from None


def check_fine_tune(mode, epochs=None, lr=None, seed=0) -> dict:
    """The fine-pruning parameters, checked: ``{'mode', 'epochs', 'lr', 'seed'}`` (epochs an int or None, lr a
    float or None). ``mode`` None (no fine-tuning) takes no epochs or learning rate."""
    if mode is None:
        for name, v in (("fine_tune_epochs", epochs), ("fine_tune_lr", lr)):
            if v is not None:
                raise ParamError(name, f"{{{name}}} goes with {{fine_tune}}",
                                 f'add {{fine_tune="head"}} or drop {{{name}}}')
        return {"mode": None, "epochs": None, "lr": None, "seed": check_seed(seed)}
    if mode not in FINE_TUNE_MODES:
        raise ParamError("fine_tune", f"unknown fine-tuning mode '{literal(mode)}'",
                         'use {fine_tune="unlearn"}, {fine_tune="head"} or {fine_tune="full"}')
    e = None
    if epochs is not None:
        try:
            e = int(epochs)
        except (TypeError, ValueError):
            e = 0
        if e < 1 or e != epochs:
            raise ParamError("fine_tune_epochs", "{fine_tune_epochs} must be a whole number of at least 1, got "
                             f"{literal(epochs)}", "e.g. {fine_tune_epochs=10}")
    v = None
    if lr is not None:
        try:
            v = float(lr)
        except (TypeError, ValueError):
            v = float("nan")
        if not math.isfinite(v) or v <= 0 or v > 1:
            raise ParamError("fine_tune_lr", "{fine_tune_lr} must be a positive learning rate (at most 1), got "
                             f"{literal(lr)}", "e.g. {fine_tune_lr=3e-3}")
    return {"mode": mode, "epochs": e, "lr": v, "seed": check_seed(seed)}


# ------------------------------------------------------------------------------------------------ together
def check_run(model=None, weights=None, arch=None, valid=None, *, thresholds=(2, 4, 10), order="ascending",
              scale="auto", batch_size=128, mode="incremental", fine_tune=None, fine_tune_epochs=None,
              fine_tune_lr=None, seed=0, missing_fix=None) -> dict:
    """Every parameter of a defense run (:func:`badprune.defense.run`) that has a rule, checked in the order a
    user reads them; returns the normalized values (thresholds as floats, scale as 'auto' / a name / a float,
    batch_size an int, ``fine``: :func:`check_fine_tune`'s dict). ``missing_fix``: :func:`check_source`'s."""
    if not hasattr(model, "predict"):  # a Keras model object needs no file rule
        check_source(model, weights, arch, missing_fix)
    check_valid(valid)
    return {"thresholds": check_thresholds(thresholds), "order": check_order(order), "scale": check_scale(scale),
            "batch_size": check_batch_size(batch_size), "mode": check_mode(mode),
            "fine": check_fine_tune(fine_tune, fine_tune_epochs, fine_tune_lr, seed)}
