"""The head: the part of the Keras graph after the prune layer, compiled to a small op list that ``prune_ext``
evaluates over cached prune-layer activations, with channels masked.

* :mod:`~badprune.head.compiler` -- :func:`compile_head`: a table from layer class to lowering (:data:`LOWERINGS`);
  layers outside it make the whole head fall back to TensorFlow over the cached features (the trunk is still not
  re-run);
* :mod:`~badprune.head.evaluate` -- the head's forward pass: a table from op kind to prune_ext call;
* :mod:`~badprune.head.engine` -- :class:`MaskedSweep`, the incremental masked sweep, its statistics attributes.
"""
from .compiler import LOWERINGS, SUPPORTED, Head, compile_head
from .engine import MaskedSweep, masked_steps
from .ops import Op

__all__ = ["Head", "LOWERINGS", "MaskedSweep", "Op", "SUPPORTED", "compile_head", "masked_steps"]
