"""badprune._train's traced head trainer (reused across thresholds) and repair's settings for few images per
class, on a tiny Keras model."""
from __future__ import annotations

import numpy as np
import pytest

from badprune import _tf  # noqa: F401

import keras

from badprune import repair
from badprune._tf import seed_all
from badprune._train import HeadTrainer, soft_targets


def _model():
    keras.utils.set_random_seed(5)
    x = keras.Input((6, 5, 2))
    h = keras.layers.Conv2D(4, 2, activation="relu", name="conv")(x)
    h = keras.layers.MaxPooling2D(1, name="pool")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(8, activation="relu", name="fc")(h)
    return keras.Model(x, keras.layers.Dense(7, activation="softmax", name="out")(h))


def _data(seed, n=50):
    rng = np.random.default_rng(seed)
    X = rng.random((n, 5, 4, 4), dtype=np.float32)
    return X, rng.integers(0, 7, n), soft_targets(rng.normal(size=(n, 7)), 4.0)


def test_a_reused_trainer_equals_a_fresh_one_and_trains():
    model = _model()
    p = dict(repair.check_args("head"), epochs=2, batch_size=16)
    reused = HeadTrainer(model, "pool", 50, p)
    start = [w.copy() for w in reused.net.get_weights()]
    seed_all(0)
    reused.train(*_data(1), seed=3)          # another threshold first: its state must not leak
    seed_all(0)
    losses = reused.train(*_data(2), seed=0)
    fresh = HeadTrainer(model, "pool", 50, p)
    seed_all(0)
    assert fresh.train(*_data(2), seed=0) == losses and len(losses) == 2
    got, want = reused.net.get_weights(), fresh.net.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert any(not np.array_equal(a, b) for a, b in zip(got, start))
    # B's own layers are untouched (the trainer works on a clone)
    assert model.get_layer("out").activation.__name__ == "softmax"


@pytest.mark.parametrize("n, classes, first", [
    (2880, 40, (3e-3, 1.0)),        # the demo: as tuned
    (10000, 40, (3e-3, 1.0)),       # more images per class: unchanged
    (9253, 1283, (0.000949, 0.1)),  # lab scale, 7.2 images per class: r = 0.1
])
def test_default_setting_scales_with_images_per_class(n, classes, first):
    got = repair._attempts(repair.check_args("head"), n, classes)
    assert got[0] == pytest.approx(first, rel=1e-3)
    assert all(a[0] < got[0][0] for a in got[1:])      # the backoff only gets gentler
    assert repair._attempts(repair.check_args("head", lr=2e-3), n, classes) == [(2e-3, 1.0)]
