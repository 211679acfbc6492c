"""Models: safe loading, the graph walker, surgery (prune, mask, clone) and the built-in architectures.

One file per concern, like Keras' ``saving`` package:

* :mod:`~badprune.models.files` -- path checks and the architecture config read (``.keras`` or HDF5, size-capped);
* :mod:`~badprune.models.safety` -- the config check run before anything is deserialized;
* :mod:`~badprune.models.keras2` -- Keras 2 config fix-ups and weight files;
* :mod:`~badprune.models.loading` -- :func:`load_model`, :func:`num_classes`;
* :mod:`~badprune.models.graph` -- layer connectivity (:func:`find_prune_layer`, :func:`conv_producer`) and the
  tensor trace between two tensors (:func:`trace`);
* :mod:`~badprune.models.channels` -- TF-free: pruned channels as arrays (the 0/1 mask, zeroed convolution
  weights, :class:`~badprune.models.channels.Patch`);
* :mod:`~badprune.models.surgery` -- :func:`prune_model` / :func:`prune_variants` / :func:`prune_template`, the
  channel mask layer, :func:`clone`, :func:`replay`;
* :mod:`~badprune.models.saving` -- TF-free: :func:`save_variants` (many ``.keras`` files from one Keras save),
  :func:`~badprune.models.saving.write_variants` (the same from a stored template, without Keras);
* :mod:`~badprune.models.goodnet` -- the GoodNet graph (:func:`~badprune.models.goodnet.build_goodnet`,
  :func:`~badprune.models.goodnet.sweep_template`; :mod:`badprune.goodnet` is its API);
* :mod:`~badprune.models.archs` -- :func:`build_deepid`;
* :mod:`~badprune.models.digest` -- :func:`model_digest` (cache keys).

Loading never runs code from a model file: the architecture JSON is read and checked first (only built-in Keras
layer and model classes, no ``Lambda``) and Keras' ``safe_mode`` stays on, unless the caller passes ``trust=True``.

Importing this package does not import Keras: each name is imported from its module on first access (a warm sweep
runs without TensorFlow, :mod:`badprune.record`).
"""
from __future__ import annotations

import importlib

from ..runfolder import model_name  # noqa: F401  (TF-free; re-exported)

#: layer classes that are the identity at inference (the head compiler and the native trunk pass them over)
IDENTITY_AT_INFERENCE = ("Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
                         "ActivityRegularization", "Identity")

#: module -> the names it gives this package
_NAMES = {
    "archs": ("ARCHS", "build_deepid"),
    "digest": ("model_digest",),
    "files": ("check_file", "read_model_config"),
    "graph": ("Graph", "conv_producer", "find_prune_layer", "prune_output", "trace"),
    "keras2": ("read_weight_file",),
    "loading": ("load_model", "num_classes"),
    "safety": ("GRAPH_OPS", "check_config"),
    "saving": ("save_variants",),
    "channels": ("Patch", "channel_mask", "check_channels"),
    "surgery": ("clone", "insert_after", "prune_model", "prune_template", "prune_variants", "replay"),
}
_WHERE = {name: mod for mod, names in _NAMES.items() for name in names}


def __getattr__(name):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


__all__ = sorted([*_WHERE, "model_name", "IDENTITY_AT_INFERENCE"])
