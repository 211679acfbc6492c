"""Models: safe loading, the graph walker, surgery (prune, mask, clone) and the built-in architectures.

One file per concern, like Keras' ``saving`` package:

* :mod:`~badprune.models.files` -- path checks and the architecture config read (``.keras`` or HDF5, size-capped);
* :mod:`~badprune.models.safety` -- the config check run before anything is deserialized;
* :mod:`~badprune.models.keras2` -- Keras 2 config fix-ups and weight files;
* :mod:`~badprune.models.loading` -- :func:`load_model`, :func:`model_name`, :func:`num_classes`;
* :mod:`~badprune.models.graph` -- layer connectivity (:func:`find_prune_layer`, :func:`conv_producer`) and the
  tensor trace between two tensors (:func:`trace`);
* :mod:`~badprune.models.surgery` -- :func:`prune_model` / :func:`prune_variants`, the channel mask layer,
  :func:`clone`, :func:`replay`;
* :mod:`~badprune.models.saving` -- :func:`save_variants` (many ``.keras`` files from one Keras save);
* :mod:`~badprune.models.archs` -- :func:`build_deepid`;
* :mod:`~badprune.models.digest` -- :func:`model_digest` (cache keys).

Loading never runs code from a model file: the architecture JSON is read and checked first (only built-in Keras
layer and model classes, no ``Lambda``) and Keras' ``safe_mode`` stays on, unless the caller passes ``trust=True``.
"""
from .archs import ARCHS, build_deepid
from .digest import model_digest
from .files import check_file, read_model_config
from .graph import Graph, conv_producer, find_prune_layer, prune_output, trace
from .keras2 import read_weight_file
from .loading import load_model, model_name, num_classes
from .safety import GRAPH_OPS, check_config
from .saving import save_variants
from .surgery import channel_mask, check_channels, clone, insert_after, prune_model, prune_variants, replay

__all__ = ["ARCHS", "GRAPH_OPS", "Graph", "build_deepid", "channel_mask", "check_channels", "check_config",
           "check_file", "clone", "insert_after", "conv_producer", "find_prune_layer", "load_model", "model_digest",
           "model_name", "num_classes", "prune_model", "prune_variants", "prune_output", "read_model_config",
           "read_weight_file", "replay", "save_variants", "trace"]
