"""badprune: the pruning defense against BadNets, exact and C-accelerated.

The public API, re-exported here and imported on first use (``import badprune`` itself never imports
TensorFlow)::

    import badprune
    result = badprune.run_sweep(weights="bd_weights.h5", arch="deepid",
                                valid="valid.h5", test="test.h5", poisoned="bd_test.h5")
    badprune.write_outputs(result, "runs/lab3")

Data flows one way through the modules, in the order of the README's Layout section (tests/test_layout.py checks
every import): errors and :mod:`~badprune.options` (the parameters' rules) -> the run folder's format -> data,
cache, models -> features, head -> :mod:`~badprune.sweep` -> goodnet, runtime, export, report -> repair ->
:mod:`~badprune.defense` (``run_sweep``: the sweep, then the repair) -> zoo -> datasets -> cli.
"""
__version__ = "0.1.0"

from .errors import BadpruneError, BadpruneWarning  # noqa: F401

#: module -> its public names re-exported here ("name=attr" where the name differs), imported on first access
_EXPORTS = {
    "defense": ("run_sweep=run",),
    "result": ("SweepResult", "Threshold"),
    "models": ("load_model", "prune_model"),
    "head": ("compile_head", "MaskedSweep"),
    "report": ("write_outputs",),
    "goodnet": ("build_goodnet",),
    "export": ("export_run",),
    "runtime": ("open_model",),
    "datasets": ("ensure_demo",),
}
_API = {name.partition("=")[0]: (mod, name.partition("=")[2] or name) for mod, names in _EXPORTS.items()
        for name in names}

__all__ = ["BadpruneError", "BadpruneWarning", *_API]


def __getattr__(name):
    if name in _API:
        import importlib

        mod, attr = _API[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'badprune' has no attribute {name!r}")
