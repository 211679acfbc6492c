"""Tests for badprune.models.save_variants / prune_variants and goodnet.sweep_variants: the .keras files written
from one Keras save equal, file by file, what saving prune_model's B' and build_goodnet's G one at a time gives."""
from __future__ import annotations

import io
import zipfile

import h5py
import numpy as np
import pytest

from badprune import _tf  # noqa: F401
import keras

from badprune import goodnet, models
from badprune.models import saving
from badprune.sweep import SweepResult, Threshold

L = keras.layers
CHANNEL_SETS = ([2], [0, 2, 5], [])


def _conv_model(randomize):
    inp = keras.Input((10, 8, 3), name="img")
    h = L.Conv2D(6, 3, activation="relu", name="conv")(inp)
    h = L.MaxPooling2D(2, name="pool")(h)
    out = L.Dense(5, activation="softmax", name="out")(L.Flatten(name="flat")(h))
    return randomize(keras.Model(inp, out, name="tiny"), 3, "spread")


def _bn_model(randomize):  # no producing convolution: B' carries a mask layer
    inp = keras.Input((10, 8, 3), name="img")
    h = L.Conv2D(6, 3, activation="relu", name="conv")(inp)
    h = L.BatchNormalization(name="bn")(h)
    h = L.MaxPooling2D(2, name="pool")(h)
    out = L.Dense(5, activation="softmax", name="out")(L.Flatten(name="flat")(h))
    return randomize(keras.Model(inp, out, name="tiny_bn"), 4, "spread")


def _x():
    return np.random.default_rng(5).uniform(0, 1, (64, 10, 8, 3)).astype(np.float32)


def _weights(m):
    return {l.name: [np.asarray(w) for w in l.get_weights()] for l in m.layers}


def _same_model(path, ref, X):
    """The file opens with plain keras.models.load_model and is ``ref``: name, layers, weights, outputs."""
    got = keras.models.load_model(str(path))
    assert got.name == ref.name
    assert [l.name for l in got.layers] == [l.name for l in ref.layers]
    gw, rw = _weights(got), _weights(ref)
    for name in rw:
        assert len(gw[name]) == len(rw[name]), name
        for a, b in zip(gw[name], rw[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(got.predict(X, verbose=0), ref.predict(X, verbose=0))
    return got


def _odd_layout(path):  # as if Keras wrote its archive differently: each file is then saved by Keras itself
    raise saving._Layout("test")


@pytest.mark.parametrize("build", [_conv_model, _bn_model])
@pytest.mark.parametrize("fallback", [False, True])
def test_pruned_variants_equal_prune_model(build, fallback, randomize, tmp_path, monkeypatch):
    m = build(randomize)
    before = _weights(m)
    if fallback:
        monkeypatch.setattr(saving, "_read_template", _odd_layout)
    template, weights = models.prune_variants(m, "pool", CHANNEL_SETS)
    assert (template is m) == (build is _conv_model)
    paths = [tmp_path / f"B_prime_{i}.keras" for i in range(len(CHANNEL_SETS))]
    models.save_variants(template, [(p, None, w) for p, w in zip(paths, weights)])
    X = _x()
    for p, chans in zip(paths, CHANNEL_SETS):
        _same_model(p, models.prune_model(m, "pool", chans), X)
    after = _weights(m)  # B is left as it was, and so is the template
    assert all(all(np.array_equal(a, b) for a, b in zip(before[n], after[n])) for n in before)
    assert template.name == m.name
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no template left behind


@pytest.mark.parametrize("fallback", [False, True])
def test_goodnet_variants_equal_build_goodnet(fallback, randomize, tmp_path, monkeypatch):
    if fallback:
        monkeypatch.setattr(saving, "_read_template", _odd_layout)
    m = _conv_model(randomize)
    xs = (2.0, 4.0, 10.0)
    ths = [Threshold(x, i + 1, list(c)) for i, (x, c) in enumerate(zip(xs, ([2], [2, 0], [2, 0, 5])))]
    res = SweepResult(model_name="tiny", layer="pool", conv_layer="conv", n_channels=6, ranking=np.arange(6),
                      mean_activation=np.zeros(6), table={}, thresholds=ths, relative=False, num_classes=5, model=m)
    g, per_x = goodnet.sweep_variants(res, xs)
    paths = [tmp_path / f"g{i}.keras" for i in range(len(xs))]
    models.save_variants(g, [(p, name, w) for p, (name, w) in zip(paths, per_x)])
    X = _x()
    for p, t in zip(paths, ths):
        ref = goodnet.from_sweep(res, t.x)
        got = keras.models.load_model(str(p))
        assert got.name == ref.name == f"goodnet_X{t.x:g}"
        np.testing.assert_array_equal(got.predict(X, verbose=0), ref.predict(X, verbose=0))
        np.testing.assert_array_equal(got.get_layer("pool_prune_mask").get_weights()[0].reshape(-1),
                                      np.isin(np.arange(6), t.channels, invert=True).astype(np.float32))
        with zipfile.ZipFile(p) as z:  # the weights file names the model too
            with h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
                assert f["vars"].attrs["name"] == ref.name
    assert g.name == per_x[0][0]  # the template keeps its own name


def test_save_variants_refuses_weights_that_do_not_fit(randomize, tmp_path):
    m = _conv_model(randomize)
    k, b = m.get_layer("conv").get_weights()
    with pytest.raises(ValueError, match="conv"):
        models.save_variants(m, [(tmp_path / "a.keras", None, {"conv": [k[..., :3], b]})])
    with pytest.raises(ValueError):
        models.save_variants(m, [(tmp_path / "a.keras", None, {"nope": [k, b]})])
    assert list(tmp_path.iterdir()) == []
