"""TF-free: what a model's outputs mean (:class:`Kind`): a classifier's (B, B'_X, R_X) or a GoodNet's, read from
the output shapes and names, and labels from the outputs. Used by the Keras loaders (:mod:`badprune.goodnet`) and
the TF-free runtime (:mod:`badprune.runtime`) alike."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadpruneError

#: the name of a GoodNet's single output, (n, N + 1) scores whose argmax is the label (N: backdoor detected)
GOODNET_OUTPUT = "goodnet_scores"


@dataclass
class Kind:
    """What a model's outputs mean. ``goodnet``: labels in [0, N] with N = backdoor detected.
    ``label_output`` / ``score_output``: indices of the (n,) label and (n, K) score outputs (None if absent)."""

    goodnet: bool
    num_classes: int | None          # N (a GoodNet answers 0..N; a classifier 0..N-1)
    label_output: int | None
    score_output: int | None

    @property
    def name(self) -> str:
        return "GoodNet" if self.goodnet else "classifier"


def kind_from_shapes(shapes, goodnet: bool = False, num_classes: int | None = None, what: str = "model",
                     names=None) -> Kind:
    """The :class:`Kind` of a model from its output shapes (each a tuple, batch axis first) and names.

    A single (n, K) output named ``goodnet_scores...`` (:data:`GOODNET_OUTPUT`, how badprune names a GoodNet's
    output in .keras and .tflite files) is a GoodNet's, with N = K - 1, label = argmax. A model with a rank-1
    output (a label per image: GoodNets of badprune before 0.2) is a GoodNet; its N is the width of its (n, K)
    output minus one, or ``num_classes``. Any other single (n, K) output is a classifier (B or B'_X) with N = K,
    unless ``goodnet`` says it is a GoodNet (N = K - 1, label = argmax).
    """
    if names is not None and len(names) == len(shapes) == 1 and len(shapes[0]) == 2 \
            and str(names[0]).startswith(GOODNET_OUTPUT):
        goodnet = True
    rank1 = [i for i, s in enumerate(shapes) if len(s) == 1]
    rank2 = [i for i, s in enumerate(shapes) if len(s) == 2]
    if len(rank1) + len(rank2) != len(shapes) or len(rank1) > 1 or len(rank2) > 1 or not shapes:
        raise BadpruneError(f"the {what} has outputs of shapes {[tuple(s) for s in shapes]}",
                            fix="use a classifier with one (batch, classes) output, or a badprune GoodNet")
    if rank1:
        n = None
        if rank2 and shapes[rank2[0]][-1] is not None:
            n = int(shapes[rank2[0]][-1]) - 1
        if num_classes is not None:
            if n is not None and n != num_classes:
                raise BadpruneError(f"--num-classes {num_classes} does not fit the GoodNet's {n + 1}-wide output")
            n = int(num_classes)
        if n is None:
            raise BadpruneError(f"the {what} outputs labels but no scores, so its N is unknown",
                                fix="pass --num-classes N")
        return Kind(True, n, rank1[0], rank2[0] if rank2 else None)
    k = shapes[rank2[0]][-1]
    if k is None:
        raise BadpruneError(f"the {what}'s output has no fixed number of classes")
    k = int(k)
    if goodnet:
        return Kind(True, k - 1, None, rank2[0])
    if num_classes is not None and num_classes != k:
        raise BadpruneError(f"--num-classes {num_classes} does not fit the model's {k} classes",
                            fix="pass --goodnet if the last class means 'backdoor detected'")
    return Kind(False, k, None, rank2[0])


def labels_from_outputs(outs, kind: Kind) -> np.ndarray:
    """int64 labels from a model's outputs (a list in output order): the label output, else argmax of scores."""
    if kind.label_output is not None:
        return np.asarray(outs[kind.label_output]).reshape(-1).astype(np.int64)
    return np.asarray(outs[kind.score_output]).argmax(axis=-1).astype(np.int64)
