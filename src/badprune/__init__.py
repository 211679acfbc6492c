"""badprune: the pruning defense against BadNets, exact and C-accelerated.

High-level API (TensorFlow is imported lazily, only when a function that needs it is called)::

    import badprune
    result = badprune.sweep(weights="bd_weights.h5", arch="deepid",
                            valid="valid.h5", test="test.h5", poisoned="bd_test.h5")
"""
__version__ = "0.1.0"

from .errors import BadpruneError  # noqa: F401


def sweep(*args, **kwargs):
    """Run the pruning sweep; see :func:`badprune.sweep.run` for the arguments."""
    from .sweep import run

    return run(*args, **kwargs)
