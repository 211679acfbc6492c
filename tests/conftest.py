"""Shared, generic test helpers.

The model and data helpers are session-scoped *factory* fixtures (each returns a function), so module-scoped
fixtures can use them too. Each keeps the exact random draws of the private copies it replaces.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

#: read-only development inputs (real weights and images), next to the project; absent in a user's clone
SHARED = Path(__file__).resolve().parents[1].parent / "shared"

#: the sets ``write_lab_sets`` writes unless told otherwise: (name, number of images)
LAB_SIZES = (("valid", 150), ("test", 120), ("bd_test", 90))


@pytest.fixture(autouse=True)
def _empty_working_folder(tmp_path_factory, monkeypatch):
    """Every test starts in an empty working folder of its own: no test depends on (or writes into) the folder
    pytest was started from, e.g. a clone holding the ``runs/demo`` of the README's first command."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (the lab's real weights and images); skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    return SHARED


# ------------------------------------------------------------------------------------------ random weights
def _keras():
    from badprune import _tf  # noqa: F401  (quiet TensorFlow)
    import keras

    return keras


def _randomize(model, seed, style, gain=3.0):
    """Give every layer with weights random ones, drawn layer by layer, weight by weight, from
    ``default_rng(seed)``. ``style``:

    * ``"sparse"``: kernels N(0, 1) * 2 / sqrt(fan-in); conv biases N(-0.2, 0.3) (mostly negative, so a prune layer
      has dormant and sparse channels), other biases N(0, 0.05); BatchNormalization weights U(0.5, 1.5);
    * ``"spread"``: kernels N(0, 1) * (gain / sqrt(fan-in)), every 1-D weight N(0, 0.1) (spreads the classes);
    * ``"fan"``: kernels N(0, 1) / sqrt(fan-in), every 1-D weight N(0, 1) / sqrt(10).
    """
    L = _keras().layers
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        if style == "sparse":
            new = []
            for w in ws:
                if isinstance(layer, L.BatchNormalization):
                    new.append(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))
                elif w.ndim == 1 and isinstance(layer, L.Conv2D):
                    new.append((rng.standard_normal(w.shape) * 0.3 - 0.2).astype(np.float32))
                elif w.ndim == 1:
                    new.append((rng.standard_normal(w.shape) * 0.05).astype(np.float32))
                else:
                    fan_in = int(np.prod(w.shape[:-1]))
                    new.append((rng.standard_normal(w.shape) * 2 / np.sqrt(fan_in)).astype(np.float32))
        elif style == "spread":
            new = [(rng.standard_normal(w.shape) * (gain / np.sqrt(np.prod(w.shape[:-1])) if w.ndim > 1
                                                    else 0.1)).astype(np.float32) for w in ws]
        elif style == "fan":
            new = [(rng.standard_normal(w.shape) / np.sqrt(np.prod(w.shape[:-1]) if w.ndim > 1 else 10))
                   .astype(np.float32) for w in ws]
        else:
            raise ValueError(f"unknown style {style!r}")
        layer.set_weights(new)
    return model


@pytest.fixture(scope="session")
def randomize():
    """``randomize(model, seed, style, gain=3.0) -> model``: random weights in place (styles "sparse", "spread",
    "fan"; see ``_randomize``)."""
    return _randomize


@pytest.fixture(scope="session")
def random_deepid():
    """``random_deepid(num_classes, seed=0)``: DeepID with random, non-trivial weights (biases too), deterministic
    (``randomize`` style "fan")."""
    def build(num_classes, seed=0):
        from badprune import models

        return _randomize(models.build_deepid(num_classes), seed, "fan")
    return build


# ------------------------------------------------------------------------------------------ tiny models
def _tiny_model(shape=(16, 12, 3), classes=5, pool=True, seed=0, name="tiny", bias=None, *, filters=10,
                conv_scale=0.4, gain=1.0, input_name="img", flatten_name="flat", rng=None):
    """Input -> Conv2D(filters) "conv_a" -> MaxPooling2D "pool_a" -> Flatten -> Dense softmax "out", with fixed
    random weights: conv kernel N(0, 1) * conv_scale, conv bias N(-0.1, 0.3), output kernel N(0, 1) * 0.3 * gain,
    output bias ``bias`` (default zeros). The draws come from ``rng`` when given (the caller goes on drawing from
    it), else from ``default_rng(seed)``. ``input_name``/``flatten_name`` None: Keras's automatic names."""
    keras = _keras()
    L = keras.layers
    x = keras.Input(shape, name=input_name)
    h = L.Conv2D(filters, 3, activation="relu", padding="same" if min(shape[:2]) < 4 else "valid",
                 name="conv_a")(x)
    if pool:
        h = L.MaxPooling2D(2, name="pool_a")(h)
    y = L.Dense(classes, activation="softmax", name="out")(L.Flatten(name=flatten_name)(h))
    m = keras.Model(x, y, name=name)
    r = np.random.default_rng(seed) if rng is None else rng
    m.get_layer("conv_a").set_weights([r.standard_normal((3, 3, shape[2], filters)).astype(np.float32) * conv_scale,
                                       (r.standard_normal(filters) * 0.3 - 0.1).astype(np.float32)])
    k = m.get_layer("out")
    b = np.zeros(classes, np.float32) if bias is None else np.asarray(bias, np.float32)
    k.set_weights([r.standard_normal(k.kernel.shape).astype(np.float32) * 0.3 * gain, b])
    return m


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(shape=(16, 12, 3), classes=5, pool=True, seed=0, name="tiny", bias=None, *, filters=10,
    conv_scale=0.4, gain=1.0, input_name="img", flatten_name="flat", rng=None)``: see ``_tiny_model``."""
    return _tiny_model


# ------------------------------------------------------------------------------------------ lab-format sets
def _write_lab_sets(d, model, sizes=LAB_SIZES, poison_label=None, seed=1, *, rng=None, relabel_div=None,
                    dtype=np.float64, batch_size=256):
    """Lab-format sets ``d/<name>.h5`` for ``model``: uniform-noise images stored as raw 0..255 pixels
    (channels-first, ``dtype``), labelled with what the model answers on /255 pixels (so its accuracy is 100 %);
    with ``relabel_div`` the first n // relabel_div labels are then drawn at random. Sets whose name starts with
    "bd" get one label, ``poison_label`` or (None) the class the model gives least often to the clean test inputs.
    Draws from ``rng`` when given, else ``default_rng(seed)``; ``batch_size`` is the one of ``model.predict``.
    Returns {name: path}."""
    from badprune.data import write_lab_h5

    r = np.random.default_rng(seed) if rng is None else rng
    shape = tuple(int(v) for v in model.inputs[0].shape[1:])
    classes = model.outputs[0].shape[-1]
    files = {}
    preds = {}
    for name, n in sizes:
        X = r.uniform(0, 1, (n,) + shape).astype(np.float32)
        y = model.predict(X, verbose=0, batch_size=batch_size).argmax(1)
        preds[name] = y.copy()
        if relabel_div:
            y[: n // relabel_div] = r.integers(0, classes, n // relabel_div)
        if name.startswith("bd"):
            if poison_label is None:  # the class the model gives least often to clean inputs
                counts = np.bincount(preds.get("test", y), minlength=classes)
                poison_label = int(np.argmin(counts))
            y = np.full(n, poison_label)
        path = os.path.join(str(d), f"{name}.h5")
        write_lab_h5(path, X * 255.0, y, dtype=dtype)
        files[name] = path
    return files


@pytest.fixture(scope="session")
def write_lab_sets():
    """``write_lab_sets(d, model, sizes=LAB_SIZES, poison_label=None, seed=1, *, rng=None, relabel_div=None,
    dtype=np.float64, batch_size=256) -> {name: path}``: see ``_write_lab_sets``."""
    return _write_lab_sets


def _tiny_lab(d, sizes=LAB_SIZES, *, seed=0, gain=1.0, input_name=None, relabel_div=None, dtype=np.float64):
    """The tiny model (Keras's own Flatten name) saved as ``d/tiny.keras`` and its sets, poisoned label 1, the
    model's weights and then the images all drawn from one ``default_rng(seed)`` (labels from ``model.predict``'s
    default batch size). Returns (model, {name: path}) with the model file as "model"."""
    r = np.random.default_rng(seed)
    m = _tiny_model(gain=gain, input_name=input_name, flatten_name=None, rng=r)
    m.save(Path(d) / "tiny.keras")
    files = _write_lab_sets(d, m, sizes, poison_label=1, rng=r, relabel_div=relabel_div, dtype=dtype,
                            batch_size=None)
    files["model"] = str(Path(d) / "tiny.keras")
    return m, files


@pytest.fixture(scope="session")
def tiny_lab():
    """``tiny_lab(d, sizes=LAB_SIZES, *, seed=0, gain=1.0, input_name=None, relabel_div=None, dtype=np.float64)
    -> (model, files)``: see ``_tiny_lab``."""
    return _tiny_lab


# -------------------------------------------------------------------------- labels against TensorFlow's own
#: a label that differs from TensorFlow's must be a near-tie of the final Dense layer's logits: their gap at most
#: TIE_FACTOR * gamma_(K+2) * (sum_t |h_t W_tj| + |b_j|, over both classes j), gamma_n = n u / (1 - n u), u = 2^-24,
#: h the layer's input as TensorFlow computed it (the engine's own h differs from it by the earlier layers'
#: rounding, hence the factor rather than gamma's 1)
TIE_FACTOR = 16.0


def _labels_vs_tf(model, X, labels, cap):
    """Check ``labels`` (one array, or a dict of them) against the Keras ``model`` (whose last layer is a Dense) on
    ``X``: every label that differs from TensorFlow's argmax is within the float32 rounding bound of the final
    layer's logits (see :data:`TIE_FACTOR`), and at most ``cap`` differ. Returns TensorFlow's labels and the
    number that differed (the largest count over the arrays)."""
    keras = _keras()
    last = model.layers[-1]
    assert isinstance(last, keras.layers.Dense), type(last).__name__
    h, out = keras.Model(model.inputs, [last.input, model.outputs[0]]).predict(X, verbose=0)
    ref = np.asarray(out).argmax(1)
    W, b = (np.asarray(w, np.float64) for w in last.get_weights())
    K, u = W.shape[0] + 2, 2.0 ** -24
    gamma = K * u / (1 - K * u)
    worst = 0
    for name, lab in (labels.items() if isinstance(labels, dict) else [("labels", labels)]):
        diff = np.flatnonzero(np.asarray(lab) != ref)
        assert len(diff) <= cap, f"{name}: {len(diff)} labels differ from TensorFlow's (at most {cap} near-ties)"
        if len(diff):
            hd = np.asarray(h, np.float64)[diff].reshape(len(diff), -1)
            z = hd @ W + b
            mag = np.abs(hd) @ np.abs(W) + np.abs(b)
            r, l_ = ref[diff], np.asarray(lab)[diff]
            rows = np.arange(len(diff))
            gap = np.abs(z[rows, r] - z[rows, l_])
            bound = TIE_FACTOR * gamma * (mag[rows, r] + mag[rows, l_])
            assert np.all(gap <= bound), (f"{name}: labels differ from TensorFlow's beyond the rounding bound: gap "
                                          f"{gap.max():.3g} > {bound[gap.argmax()]:.3g}")
        worst = max(worst, len(diff))
    return ref, worst


@pytest.fixture(scope="session")
def labels_vs_tf():
    """``labels_vs_tf(model, X, labels, cap) -> (tf_labels, n_differing)``: see ``_labels_vs_tf``."""
    return _labels_vs_tf
