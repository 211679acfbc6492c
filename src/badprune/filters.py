"""R_X's filters: what a repaired network computes between the prune layer and its head, written once in numpy
(what :func:`badprune.repair.repaired_labels` evaluates over cached activations) and once as Keras ops (what the
saved R_X holds), so that the two agree.

* The clean-range reset: a prune-layer feature above its largest clean training value is replaced by its clean
  mean (``where(F > cap, mean, F)``; ``keras.ops`` ``greater`` and ``where``, an ``Identity`` layer
  ``<layer>_reset``).
* The removal of a direction (unlearn mode, :func:`badprune.repair._remove_direction`): the excess over the clean
  mean along a unit direction taken away (two ``keras.ops.einsum`` nodes, the only two badprune's loader accepts,
  and an ``Identity`` layer ``<layer>_project``).

Plain Keras opens a model holding them with ``safe_mode`` on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .models.safety import GRAPH_OP_VALUES

#: suffixes of the Identity layers after the prune layer: the clean-range reset, the removed direction
RESET_SUFFIX = "_reset"
PROJECT_SUFFIX = "_project"
#: the two einsums of the direction removal (the only ones badprune's loader accepts in a model file)
PROJECT_SUBSCRIPTS = GRAPH_OP_VALUES["Einsum"]["subscripts"]


def apply_reset(F, cap, mean):
    """The clean-range reset in numpy, as the R_X graph computes it: ``where(F > cap, mean, F)``."""
    return np.where(F > cap, mean, F).astype(np.float32, copy=False)


def apply_project(F, u, mu):
    """The removal of a direction in numpy, as the R_X graph computes it: with ``s`` the projection of each row
    of ``F`` on the unit vector ``u`` (flattened), ``relu(F - relu(s - mu) * u)`` (the excess over the clean
    mean ``mu`` along ``u`` taken away)."""
    F = np.asarray(F, np.float32)
    flat = F.reshape(len(F), -1)
    ex = np.maximum(flat @ u - np.float32(mu), 0)
    return np.maximum(flat - ex[:, None] * u[None], 0).reshape(F.shape).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Filters:
    """What R_X computes between the prune layer and its head, in this order: the clean-range reset (``reset`` =
    (cap, mean), :func:`apply_reset`) and the removal of a suspected trigger direction (``project`` = (u, mu),
    :func:`apply_project`; unlearn mode, when kept). Each is a few ``keras.ops`` nodes with constant arrays and an
    ``Identity`` layer named ``<layer>_reset`` / ``<layer>_project``. The reset, a step, sees the prune layer's
    output itself, so it decides the same in numpy and in the graph; the removal, a projection, only feeds the
    head (its sum may round differently in numpy and TensorFlow, as the head's own products do)."""

    reset: tuple | None = None
    project: tuple | None = None

    def last(self, layer: str) -> str:
        """The layer R_X's head starts after."""
        return layer + (PROJECT_SUFFIX if self.project is not None else RESET_SUFFIX if self.reset is not None
                        else "")

    def apply(self, F, keep=None) -> np.ndarray:
        """``F`` (float32) as R_X's head receives it: channels outside ``keep`` zeroed, then the filters."""
        x = np.array(F, np.float32)
        if keep is not None:
            x[..., ~np.asarray(keep, bool)] = 0
        if self.reset is not None:
            x = apply_reset(x, *self.reset)
        if self.project is not None:
            x = apply_project(x, *self.project)
        return x

    def insert(self, R, layer: str):
        """R with the filters after ``layer``."""
        from ._train import keras_
        from .models import insert_after

        if self.reset is None and self.project is None:
            return R
        keras = keras_()

        def filters(t):
            if self.reset is not None:
                cap, mean = (np.asarray(a, np.float32) for a in self.reset)
                t = keras.ops.where(keras.ops.greater(t, cap), mean, t)
                t = keras.layers.Identity(name=layer + RESET_SUFFIX)(t)
            if self.project is not None:
                u = np.asarray(self.project[0], np.float32).reshape(tuple(t.shape[1:]))
                ex = keras.ops.relu(keras.ops.einsum(PROJECT_SUBSCRIPTS[0], t, u) - np.float32(self.project[1]))
                t = keras.ops.relu(t - keras.ops.einsum(PROJECT_SUBSCRIPTS[1], ex, u))
                t = keras.layers.Identity(name=layer + PROJECT_SUFFIX)(t)
            return t

        return insert_after(R, layer, filters)
