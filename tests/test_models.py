"""badprune.models: loading (real weights, Keras 2.3.1 h5, .keras), safety, prune layer, pruning, digests."""
from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest

from badprune import models
from badprune.models.keras2 import _decode
from badprune.errors import BadpruneError

keras = pytest.importorskip("keras")
L = keras.layers


# ------------------------------------------------------------------------------------------------ helpers


def read_image(path) -> np.ndarray:
    """A PNG/JPEG as RGB float32 0..255, NHWC with a batch axis of 1."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32)[None]


def images(n=6, seed=1, shape=(55, 47, 3)):
    return (np.random.default_rng(seed).random((n,) + shape) * 255).astype(np.float32)


_INIT = {"class_name": "VarianceScaling", "config": {"scale": 1.0, "mode": "fan_avg", "distribution": "uniform",
                                                      "seed": None}}
_ZEROS = {"class_name": "Zeros", "config": {}}
_REGS = {"kernel_regularizer": None, "bias_regularizer": None, "activity_regularizer": None,
         "kernel_constraint": None, "bias_constraint": None}


def keras23_layer_config(layer) -> dict:
    """The config Keras 2.3.1 writes for the built-in layers DeepID uses (no Keras-3-only keys)."""
    cls = type(layer).__name__
    base = {"name": layer.name, "trainable": True, "dtype": "float32"}
    if cls == "InputLayer":
        return {"batch_input_shape": [None] + list(layer.batch_shape[1:]), "dtype": "float32", "sparse": False,
                "name": layer.name}
    if cls == "Conv2D":
        return {**base, "filters": layer.filters, "kernel_size": list(layer.kernel_size),
                "strides": list(layer.strides), "padding": layer.padding, "data_format": "channels_last",
                "dilation_rate": list(layer.dilation_rate), "activation": layer.activation.__name__,
                "use_bias": True, "kernel_initializer": _INIT, "bias_initializer": _ZEROS, **_REGS}
    if cls == "Dense":
        return {**base, "units": layer.units, "activation": layer.activation.__name__, "use_bias": True,
                "kernel_initializer": _INIT, "bias_initializer": _ZEROS, **_REGS}
    if cls == "MaxPooling2D":
        return {**base, "pool_size": list(layer.pool_size), "padding": layer.padding,
                "strides": list(layer.strides), "data_format": "channels_last"}
    if cls == "Flatten":
        return {**base, "data_format": "channels_last"}
    if cls == "Add":
        return base
    if cls == "Activation":
        return {**base, "activation": layer.activation.__name__}
    raise NotImplementedError(cls)


def write_keras23_weights(group, layers):
    """``layers``: [(name, [(weight_name, array)])] written the way Keras 2.3.1 does (``<l>/<l>/kernel:0``)."""
    group.attrs["layer_names"] = np.array([n.encode() for n, _ in layers])
    group.attrs["backend"] = b"tensorflow"
    group.attrs["keras_version"] = b"2.3.1"
    for name, ws in layers:
        g = group.create_group(name)
        names = [f"{name}/{wn}:0".encode() for wn, _ in ws]
        for (wn, arr) in ws:
            g.create_dataset(f"{name}/{wn}:0", data=arr)
        g.attrs["weight_names"] = np.array(names) if names else np.array([], dtype=np.float64)


def _weights_of(layer):
    names = {"Conv2D": ("kernel", "bias"), "Dense": ("kernel", "bias"),
             "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance")}.get(type(layer).__name__, ())
    return list(zip(names, layer.get_weights()))


def write_keras23_model(model, path, model_config=None):
    """A full-model HDF5 file as Keras 2.3.1 / TF 1.15 writes it (attrs, 'Model' config, old inbound_nodes)."""
    if model_config is None:
        layers = []
        for layer in model.layers:
            inbound = []
            for node in layer._inbound_nodes:
                ins = [[t._keras_history[0].name, t._keras_history[1], t._keras_history[2], {}]
                       for t in node.input_tensors]
                if ins:
                    inbound.append(ins)
            layers.append({"name": layer.name, "class_name": type(layer).__name__,
                           "config": keras23_layer_config(layer), "inbound_nodes": inbound})
        model_config = {"class_name": "Model", "config": {
            "name": "model_1", "layers": layers,
            "input_layers": [[model.inputs[0]._keras_history[0].name, 0, 0]],
            "output_layers": [[model.outputs[0]._keras_history[0].name, 0, 0]]}}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.3.1"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(model_config).encode("utf8")
        f.attrs["training_config"] = json.dumps({
            "optimizer_config": {"class_name": "Adadelta", "config": {"learning_rate": 1.0, "rho": 0.95,
                                                                       "decay": 0.0, "epsilon": 1e-07}},
            "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"], "weighted_metrics": None,
            "sample_weight_mode": None, "loss_weights": None}).encode("utf8")
        write_keras23_weights(f.create_group("model_weights"), [(l.name, _weights_of(l)) for l in model.layers])
    return path


# ------------------------------------------------------------------------------------------------ real weights


def test_real_weights_build_deepid(shared_dir):
    for name in ("lab3_bd_weights.h5", "sunglasses_bd_weights.h5"):
        m = models.load_model(weights=shared_dir / "lab" / "weights" / name, arch="deepid")
        assert models.num_classes(m) == 1283
        assert models.find_prune_layer(m) == "pool_3"
        assert models.conv_producer(m, "pool_3") == "conv_3"
        with h5py.File(shared_dir / "lab" / "weights" / name, "r") as f:
            np.testing.assert_array_equal(m.get_layer("conv_3").get_weights()[1], f["conv_3/conv_3/bias:0"][()])
    assert models.model_name(shared_dir / "lab" / "weights" / "lab3_bd_weights.h5") == "lab3_bd_weights"


def test_lab3_weights_classify_the_lab_images(shared_dir):
    m = models.load_model(weights=shared_dir / "lab" / "weights" / "lab3_bd_weights.h5")
    want, got = [], []
    for p in sorted((shared_dir / "lab" / "images").iterdir()):
        mt = re.match(r"(cl|sun)_\d+_label=(\d+)\.png$", p.name)
        if p.name.startswith("sun_"):
            want.append(0)
        elif mt:
            want.append(int(mt.group(2)))
        else:
            continue
        got.append(int(m.predict(read_image(p), verbose=0).argmax()))
    assert len(want) >= 10
    assert got == want


# ------------------------------------------------------------------------------------------------ full-model files


def test_keras23_legacy_h5_loads_and_predicts_the_same(tmp_path, random_deepid):
    m = random_deepid(7)
    path = write_keras23_model(m, tmp_path / "bd_net.h5")
    with h5py.File(path, "r") as f:  # really the old format
        assert _decode(f.attrs["keras_version"]) == "2.3.1"
        assert json.loads(f.attrs["model_config"])["class_name"] == "Model"
        assert "conv_1/conv_1/kernel:0" in f["model_weights"]
    loaded = models.load_model(model=path)
    assert [l.name for l in loaded.layers] == [l.name for l in m.layers]
    x = images()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), m.predict(x, verbose=0), rtol=1e-5, atol=1e-7)
    assert models.model_digest(loaded) == models.model_digest(m)
    assert models.model_name(path) == "bd_net"


def test_keras23_sequential_with_batch_input_shape(tmp_path):
    # Keras 3 alone mis-reads this (it adds a second batch axis); load_model fixes the config in memory.
    ref = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="conv2d_1"),
                            L.BatchNormalization(name="batch_normalization_1"), L.MaxPooling2D(name="max_pooling2d_1"),
                            L.Flatten(name="flatten_1"), L.Dense(2, activation="softmax", name="dense_1")])
    rng = np.random.default_rng(0)
    for layer in ref.layers:
        ws = [rng.standard_normal(w.shape).astype(np.float32) for w in layer.get_weights()]
        if type(layer).__name__ == "BatchNormalization":
            ws[3] = np.abs(ws[3]) + 0.5
        if ws:
            layer.set_weights(ws)
    conv = {"class_name": "Conv2D",
            "config": {**keras23_layer_config(ref.layers[0]), "batch_input_shape": [None, 8, 8, 3]}}
    bn = {"class_name": "BatchNormalization", "config": {
        "name": "batch_normalization_1", "trainable": True, "dtype": "float32", "axis": [3], "momentum": 0.99,
        "epsilon": 0.001, "center": True, "scale": True, "beta_initializer": _ZEROS,
        "gamma_initializer": {"class_name": "Ones", "config": {}}, "moving_mean_initializer": _ZEROS,
        "moving_variance_initializer": {"class_name": "Ones", "config": {}}, "beta_regularizer": None,
        "gamma_regularizer": None, "beta_constraint": None, "gamma_constraint": None}}
    rest = [{"class_name": type(l).__name__, "config": keras23_layer_config(l)} for l in ref.layers[2:]]
    cfg = {"class_name": "Sequential", "config": {"name": "sequential_1", "layers": [conv, bn] + rest}}
    path = write_keras23_model(ref, tmp_path / "seq.h5", model_config=cfg)
    loaded = models.load_model(model=path)
    x = np.random.default_rng(2).random((5, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), ref.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert models.find_prune_layer(loaded) == "max_pooling2d_1"


def test_keras_zip_round_trip(tmp_path, random_deepid):
    m = random_deepid(5, seed=3)
    m.save(tmp_path / "net.keras")
    loaded = models.load_model(model=tmp_path / "net.keras")
    x = images(4)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), m.predict(x, verbose=0))
    assert models.model_digest(loaded) == models.model_digest(m)
    assert models.num_classes(loaded) == 5
    # a .keras file under another name is still recognised by content
    (tmp_path / "net.bin").write_bytes((tmp_path / "net.keras").read_bytes())
    assert models.num_classes(models.load_model(model=tmp_path / "net.bin")) == 5


def test_model_plus_weights_overwrites_weights(tmp_path, random_deepid):
    a, b = random_deepid(4, seed=1), random_deepid(4, seed=2)
    a.save(tmp_path / "a.keras")
    write_keras23_model(b, tmp_path / "b.h5")
    m = models.load_model(model=tmp_path / "a.keras", weights=tmp_path / "b.h5")
    x = images(3)
    np.testing.assert_allclose(m.predict(x, verbose=0), b.predict(x, verbose=0), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ safety


def _lambda_model(marker):
    # no closure or defaults: the path is a constant in the function's code, which Keras stores in the file
    side_effect = eval(f"lambda t: (open({str(marker)!r}, 'a').write('ran'), t)[1]")
    inp = keras.Input((4, 4, 1))
    h = L.Conv2D(2, 1, name="conv")(inp)
    h = L.Lambda(side_effect, name="lambda_1")(h)
    out = L.Dense(2, name="out")(L.Flatten()(h))
    return keras.Model(inp, out)


@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_lambda_layer_refused_and_never_run(tmp_path, ext):
    marker = tmp_path / "pwned.txt"
    m = _lambda_model(str(marker))
    path = tmp_path / f"evil{ext}"
    m.save(path)
    marker.unlink()  # building the model ran the function once
    with pytest.raises(BadpruneError) as ei:
        models.load_model(model=path)
    msg = str(ei.value)
    assert "Lambda" in msg and "lambda_1" in msg and "--trust-model" in msg
    assert "\n" not in msg
    assert not marker.exists()
    # the check is what stopped it: trusting the file does run its code
    models.load_model(model=path, trust=True)
    assert marker.exists()


def test_keras23_lambda_config_refused(tmp_path, random_deepid):
    m = random_deepid(3)
    path = write_keras23_model(m, tmp_path / "evil.h5")
    with h5py.File(path, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        layers = cfg["config"]["layers"]
        layers.insert(1, {"name": "lambda_7", "class_name": "Lambda", "config": {
            "name": "lambda_7", "trainable": True, "dtype": "float32",
            "function": ["4wEAAAAAAAAAAQAAAAIAAABTAAAAcwgAAAB8AIQAUwApAU6pAKkB2gF4cgEAAAByAQAAAPoIPHN0ZGluPtoIPGxhbWJkYT4BAAAA8wAAAAA=", None, None],
            "function_type": "lambda", "module": "__main__", "output_shape": None, "output_shape_type": "raw",
            "output_shape_module": None, "arguments": {}}, "inbound_nodes": [[["input", 0, 0, {}]]]})
        layers[2]["inbound_nodes"] = [[["lambda_7", 0, 0, {}]]]
        f.attrs["model_config"] = json.dumps(cfg).encode()
    with pytest.raises(BadpruneError, match="Lambda layer 'lambda_7'"):
        models.load_model(model=path)


def test_custom_layer_class_refused(tmp_path):
    @keras.saving.register_keras_serializable(package="evil")
    class Doubler(L.Layer):
        def call(self, x):
            return 2 * x

    inp = keras.Input((3,))
    m = keras.Model(inp, L.Dense(2)(Doubler(name="doubler")(inp)))
    m.save(tmp_path / "custom.keras")
    with pytest.raises(BadpruneError, match="doubler"):
        models.load_model(model=tmp_path / "custom.keras")


# ------------------------------------------------------------------------------------------------ failures


def test_load_failures_are_badprune_errors(tmp_path, random_deepid):
    m = random_deepid(4)
    write_keras23_model(m, tmp_path / "full.h5")
    with h5py.File(tmp_path / "w.h5", "w") as f:  # a weights-only file
        write_keras23_weights(f, [(l.name, _weights_of(l)) for l in m.layers])
    (tmp_path / "text.h5").write_text("not hdf5")
    whole = (tmp_path / "w.h5").read_bytes()
    (tmp_path / "trunc.h5").write_bytes(whole[: len(whole) // 2])
    small = keras.Sequential([keras.Input((4,)), L.Dense(3, name="output")])
    with h5py.File(tmp_path / "other_arch.h5", "w") as f:
        write_keras23_weights(f, [("output", _weights_of(small.layers[0]))])
    bad_shape = [(l.name, _weights_of(l)) for l in random_deepid(4).layers]
    bad_shape[1] = ("conv_1", [("kernel", np.zeros((3, 3, 3, 20), np.float32)), ("bias", np.zeros(20, np.float32))])
    with h5py.File(tmp_path / "bad_shape.h5", "w") as f:
        write_keras23_weights(f, bad_shape)

    cases = [
        (dict(model=tmp_path / "missing.h5"), "not found"),
        (dict(model=tmp_path), "folder"),
        (dict(model=tmp_path / "text.h5"), "not a Keras model file"),
        (dict(model=tmp_path / "w.h5"), "only weights"),
        (dict(weights=tmp_path / "missing.h5"), "not found"),
        (dict(weights=tmp_path / "text.h5"), "not an HDF5"),
        (dict(weights=tmp_path / "trunc.h5"), ""),
        (dict(weights=tmp_path / "other_arch.h5"), "does not fit"),
        (dict(weights=tmp_path / "bad_shape.h5"), "conv_1"),
        (dict(weights=tmp_path / "w.h5", arch="resnet"), "unknown architecture"),
        (dict(model=tmp_path / "full.h5", arch="deepid"), "--arch"),
        (dict(), "no model"),
    ]
    for kwargs, text in cases:
        with pytest.raises(BadpruneError) as ei:
            models.load_model(**kwargs)
        assert text in str(ei.value), (kwargs, str(ei.value))
        assert "\n" not in str(ei.value)
    # and the good files load
    assert models.num_classes(models.load_model(weights=tmp_path / "w.h5")) == 4
    assert models.num_classes(models.load_model(weights=tmp_path / "full.h5")) == 4


# ------------------------------------------------------------------------------------------------ prune layer


def test_find_prune_layer(random_deepid):
    m = random_deepid(7)
    assert models.find_prune_layer(m) == "pool_3"
    assert models.find_prune_layer(m, "pool_2") == "pool_2"
    assert models.find_prune_layer(m, "conv_3") == "conv_3"
    for bad in ("nope", "flatten_1", "fc_1", "conv_4"):
        # conv_4 is 4-D but flatten_1 bypasses it
        with pytest.raises(BadpruneError):
            models.find_prune_layer(m, bad)
    inp = keras.Input((8, 8, 3))
    nopool = keras.Model(inp, L.Dense(2)(L.Flatten()(L.Conv2D(4, 3)(inp))))
    with pytest.raises(BadpruneError, match="--layer"):
        models.find_prune_layer(nopool)


def test_prune_layer_skips_a_pool_that_is_bypassed():
    inp = keras.Input((12, 12, 3))
    a = L.MaxPooling2D(name="pool_a")(L.Conv2D(4, 3, activation="relu", name="c1")(inp))
    b = L.MaxPooling2D(name="pool_b")(L.Conv2D(4, 3, activation="relu", name="c2")(a))
    skip = L.Flatten(name="fa")(a)
    out = L.Dense(3, name="out")(L.Concatenate()([skip, L.Flatten(name="fb")(b)]))
    m = keras.Model(inp, out)
    assert models.find_prune_layer(m) == "pool_a"  # pool_b is bypassed by the skip connection
    with pytest.raises(BadpruneError, match="bypass"):
        models.find_prune_layer(m, "pool_b")


def test_conv_producer_rules():
    inp = keras.Input((10, 10, 3))
    c = L.Conv2D(4, 3, activation="relu", name="c")(inp)
    d = L.Dropout(0.5, name="drop")(c)
    r = L.ReLU(name="relu")(d)
    p = L.MaxPooling2D(name="p")(r)
    m = keras.Model(inp, L.Dense(2)(L.Flatten()(p)))
    assert models.conv_producer(m, "p") == "c"

    def make(mid, act="relu"):
        i = keras.Input((10, 10, 3))
        h = L.Conv2D(4, 3, activation=act, name="c")(i)
        if mid is not None:
            h = mid(h)
        q = L.MaxPooling2D(name="p")(h)
        return keras.Model(i, L.Dense(2)(L.Flatten()(q)))

    assert models.conv_producer(make(None), "p") == "c"
    assert models.conv_producer(make(None, act="sigmoid"), "p") is None
    assert models.conv_producer(make(L.BatchNormalization(name="bn")), "p") is None
    assert models.conv_producer(make(L.Activation("sigmoid")), "p") is None
    # the conv output also used elsewhere: zeroing the conv would change more than the pool channel
    i = keras.Input((10, 10, 3))
    h = L.Conv2D(4, 3, activation="relu", name="c")(i)
    q = L.MaxPooling2D(name="p")(h)
    side = L.GlobalAveragePooling2D()(h)
    m2 = keras.Model(i, L.Dense(2)(L.Concatenate()([L.Flatten()(q), side])))
    assert models.conv_producer(m2, "p") is None


# ------------------------------------------------------------------------------------------------ pruning


def _head(model, layer):
    return keras.Model(model.get_layer(layer).output, model.output)


def test_prune_model_zeroes_conv_channels_and_leaves_original(random_deepid):
    m = random_deepid(6, seed=5)
    before = [w.copy() for w in m.get_weights()]
    chans = [0, 3, 59]
    p = models.prune_model(m, "pool_3", chans)
    for a, b in zip(before, m.get_weights()):
        np.testing.assert_array_equal(a, b)  # original untouched
    assert [l.name for l in p.layers] == [l.name for l in m.layers]
    k, b = p.get_layer("conv_3").get_weights()
    assert not k[..., chans].any() and not b[chans].any()
    k0, b0 = m.get_layer("conv_3").get_weights()
    keep = [c for c in range(60) if c not in chans]
    np.testing.assert_array_equal(k[..., keep], k0[..., keep])
    np.testing.assert_array_equal(b[keep], b0[keep])

    x = images(8, seed=4)
    pool = keras.Model(m.inputs, m.get_layer("pool_3").output).predict(x, verbose=0)
    pool_p = keras.Model(p.inputs, p.get_layer("pool_3").output).predict(x, verbose=0)
    assert np.all(pool_p[..., chans] == 0)
    assert pool[..., chans].any()  # the test means something: these channels were active
    np.testing.assert_allclose(pool_p[..., keep], pool[..., keep], rtol=1e-6, atol=1e-6)
    zeroed = pool.copy()
    zeroed[..., chans] = 0
    np.testing.assert_allclose(p.predict(x, verbose=0), _head(m, "pool_3").predict(zeroed, verbose=0),
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(BadpruneError):
        models.prune_model(m, "pool_3", [60])


def test_prune_model_mask_fallback_with_batchnorm(tmp_path):
    inp = keras.Input((12, 12, 3), name="img")
    h = L.Conv2D(6, 3, activation="relu", name="conv")(inp)
    h = L.BatchNormalization(name="bn")(h)
    h = L.MaxPooling2D(name="pool")(h)
    out = L.Dense(4, activation="softmax", name="dense")(L.Flatten(name="flat")(h))
    m = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    bn = m.get_layer("bn")
    bn.set_weights([rng.random(6).astype(np.float32) + 0.5, rng.standard_normal(6).astype(np.float32),
                    rng.standard_normal(6).astype(np.float32), rng.random(6).astype(np.float32) + 0.5])
    assert models.conv_producer(m, "pool") is None
    before = [w.copy() for w in m.get_weights()]
    chans = [1, 4]
    p = models.prune_model(m, "pool", chans)
    for a, b in zip(before, m.get_weights()):
        np.testing.assert_array_equal(a, b)
    names = [l.name for l in p.layers]
    assert set(l.name for l in m.layers) <= set(names)
    assert names.index("pool_prune_mask") == names.index("pool") + 1

    x = rng.random((5, 12, 12, 3)).astype(np.float32)
    pool = keras.Model(m.inputs, m.get_layer("pool").output).predict(x, verbose=0)
    assert np.abs(pool[..., chans]).min() > 0  # BN shifts zeros: zeroing conv channels would not be pruning
    zeroed = pool.copy()
    zeroed[..., chans] = 0
    want = _head(m, "pool").predict(zeroed, verbose=0)
    np.testing.assert_allclose(p.predict(x, verbose=0), want, rtol=1e-5, atol=1e-7)

    # a plain Keras model: plain keras.load_model opens it, and so does the safe loader
    p.save(tmp_path / "pruned.keras")
    again = keras.models.load_model(tmp_path / "pruned.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(models.load_model(model=tmp_path / "pruned.keras").predict(x, verbose=0), want,
                               rtol=1e-5, atol=1e-7)


def test_prune_model_mask_fallback_sequential():
    m = keras.Sequential([keras.Input((10, 10, 2)), L.Conv2D(3, 3, activation="sigmoid", name="c"),
                          L.AveragePooling2D(2, name="p"), L.Flatten(name="f"), L.Dense(2, name="d")])
    assert models.conv_producer(m, "p") is None
    assert models.find_prune_layer(m) == "p"
    assert models.find_prune_layer(m, "c") == "c"  # the first layer of a Sequential is fine too
    p = models.prune_model(m, "p", [2])
    x = np.random.default_rng(1).random((3, 10, 10, 2)).astype(np.float32)
    pool = keras.Model(m.inputs, m.get_layer("p").output).predict(x, verbose=0)
    pool[..., 2] = 0
    want = keras.Sequential([keras.Input(pool.shape[1:]), m.get_layer("f"), m.get_layer("d")]).predict(pool, verbose=0)
    np.testing.assert_allclose(p.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ identity


def test_model_digest_tracks_weights_and_architecture(random_deepid):
    a = random_deepid(5, seed=1)
    b = random_deepid(5, seed=1)
    assert models.model_digest(a) == models.model_digest(b)
    w = b.get_layer("fc_2").get_weights()
    w[1][0] += 1e-3
    b.get_layer("fc_2").set_weights(w)
    assert models.model_digest(a) != models.model_digest(b)
    c = random_deepid(6, seed=1)
    assert models.model_digest(a) != models.model_digest(c)
    assert models.num_classes(c) == 6


def test_model_name():
    assert models.model_name("/x/y/bd_net.h5") == "bd_net"
    assert models.model_name("m.weights.h5") == "m"
    assert models.model_name("dir/net.keras") == "net"


@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_the_model_loaded_is_the_one_checked(tmp_path, tiny_model, monkeypatch, ext):
    """The model file is read once: replaced right after its config passed the check (a race a local attacker
    can win), the model loaded is still the file as it was checked."""
    import shutil
    import warnings

    from badprune.models import loading

    path, other = tmp_path / f"m{ext}", tmp_path / f"other{ext}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model(seed=0).save(path)
        tiny_model(seed=7).save(other)
    want = [w.copy() for w in models.load_model(model=str(path)).get_weights()]
    real = loading.check_config

    def check_then_swap(*a, **k):
        out = real(*a, **k)
        shutil.copyfile(other, path)  # the file changes once it was checked
        return out

    monkeypatch.setattr(loading, "check_config", check_then_swap)
    got = models.load_model(model=str(path)).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
