"""badprune.features: the trunk pass equals Keras, the activation cache hits and invalidates, detect_scale."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from badprune import data, features, models
from badprune.errors import BadpruneError
from badprune.head import compile_head

keras = pytest.importorskip("keras")
L = keras.layers


@pytest.fixture(scope="module")
def net(random_deepid):
    return random_deepid(5)


@pytest.fixture
def imgs():
    rng = np.random.default_rng(7)
    return (rng.random((50, 55, 47, 3)) * 255).astype(np.float32)


@pytest.fixture
def lab_file(tmp_path, imgs):
    path = tmp_path / "set.h5"
    data.write_lab_h5(path, imgs, np.arange(len(imgs)) % 5, dtype=np.float32)
    return path


def trunk_predict(model, layer, x):
    return keras.Model(model.inputs, model.get_layer(layer).output).predict(x, verbose=0)


# ------------------------------------------------------------------------------------------------ the trunk pass


@pytest.mark.parametrize("engine", features.ENGINES)
def test_extract_equals_keras_predict(net, lab_file, imgs, engine):
    if engine == "litert":
        pytest.importorskip("ai_edge_litert")
    ds = data.open_dataset(lab_file)
    # batch 16 over 50 images: several batches in flight and a short last one
    got, info = features.extract(net, "pool_3", ds, "raw", batch_size=16, progress=False, engine=engine,
                                 return_info=True)
    want = trunk_predict(net, "pool_3", imgs)
    assert got.dtype == np.float32 and got.shape == (50, 5, 4, 60)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert info["cached"] is False and info["engine"] == engine and info["img_per_s"] > 0
    # scaled pixels
    got_u = features.extract(net, "pool_2", ds, "unit", batch_size=16, progress=False, engine=engine)
    want_u = trunk_predict(net, "pool_2", imgs / 255.0)
    np.testing.assert_allclose(got_u, want_u, rtol=1e-4, atol=1e-4 * np.abs(want_u).max())


def test_extract_reads_channels_first_float64_and_uint8(net, tmp_path, imgs):
    want = trunk_predict(net, "pool_3", np.round(imgs))
    for dt in (np.float64, np.uint8):
        p = tmp_path / f"s_{np.dtype(dt).name}.h5"
        data.write_lab_h5(p, np.round(imgs), np.zeros(len(imgs)), dtype=dt)
        ds = data.open_dataset(p)
        assert ds.layout == "nchw"
        got = features.extract(net, "pool_3", ds, 1.0, batch_size=64, progress=False)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_progress_bar_goes_to_stderr(net, lab_file, capsys):
    features.extract(net, "pool_3", data.open_dataset(lab_file), "raw", batch_size=25, progress=True,
                     desc="trunk-test")
    cap = capsys.readouterr()
    assert "trunk-test" in cap.err and cap.out == ""


def test_bad_arguments(net, lab_file, tmp_path):
    ds = data.open_dataset(lab_file)
    for kwargs in (dict(engine="gpu"), dict(scale="half"), dict(scale=-1.0), dict(layer="nope")):
        args = dict(layer="pool_3", scale="raw")
        args.update(kwargs)
        with pytest.raises(BadpruneError):
            features.extract(net, args.pop("layer"), ds, args.pop("scale"), progress=False, **args)
    small = tmp_path / "small.h5"
    data.write_lab_h5(small, np.zeros((3, 20, 20, 3), np.float32), np.zeros(3))
    with pytest.raises(BadpruneError, match="do not fit"):
        features.extract(net, "pool_3", data.open_dataset(small), "raw", progress=False)


# ------------------------------------------------------------------------------------------------ the cache


class CountingRunner:
    """Counts the trunk passes (``_Runner.run`` calls)."""
    calls = 0


@pytest.fixture
def counting(monkeypatch):
    CountingRunner.calls = 0
    real = features._Runner.run

    def run(self, *a, **k):
        CountingRunner.calls += 1
        return real(self, *a, **k)

    monkeypatch.setattr(features._Runner, "run", run)
    return CountingRunner


def _extract(model, path, cache, layer="pool_3", scale="raw"):
    return features.extract(model, layer, data.open_dataset(path), scale, cache_dir=cache, batch_size=16,
                            progress=False, return_info=True)


def test_cache_hit_does_not_run_the_trunk(net, lab_file, tmp_path, counting, random_deepid):
    cache = tmp_path / "cache"
    a, info = _extract(net, lab_file, cache)
    assert info["cached"] is False and counting.calls == 1
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    marker = json.loads((cache / files[0]).read_text())
    assert marker["shape"] == [50, 5, 4, 60] and re.fullmatch(r"[0-9a-f]{64}", marker["key"])

    b, info = _extract(net, lab_file, cache)
    assert info["cached"] is True and counting.calls == 1  # no trunk pass
    np.testing.assert_array_equal(a, b)
    # an equal model loaded anew (same weights) hits too
    same = random_deepid(5)
    assert _extract(same, lab_file, cache)[1]["cached"] is True and counting.calls == 1


def test_cache_invalidation(net, lab_file, tmp_path, imgs, counting, random_deepid):
    cache = tmp_path / "cache"
    base, _ = _extract(net, lab_file, cache)

    # the scale
    u, info = _extract(net, lab_file, cache, scale="unit")
    assert not info["cached"]
    np.testing.assert_allclose(u, trunk_predict(net, "pool_3", imgs / 255), rtol=1e-4, atol=1e-5)
    # the layer
    p2, info = _extract(net, lab_file, cache, layer="pool_2")
    assert not info["cached"] and p2.shape == (50, 12, 10, 40)
    # the weights
    other = random_deepid(5, seed=1)
    w, info = _extract(other, lab_file, cache)
    assert not info["cached"]
    np.testing.assert_allclose(w, trunk_predict(other, "pool_3", imgs), rtol=1e-4, atol=1e-4)
    # everything above is now cached separately; the original entry is still a hit
    assert _extract(net, lab_file, cache)[1]["cached"]
    calls = counting.calls

    # the data file: rewritten with other images (same size, same name)
    new = imgs[::-1].copy()
    data.write_lab_h5(lab_file, new, np.arange(len(new)) % 5, dtype=np.float32)
    d, info = _extract(net, lab_file, cache)
    assert not info["cached"] and counting.calls == calls + 1
    np.testing.assert_allclose(d, trunk_predict(net, "pool_3", new), rtol=1e-4, atol=1e-4)
    assert not np.allclose(d, base)


def test_damaged_cache_entries_are_rebuilt(net, lab_file, tmp_path, counting):
    cache = tmp_path / "cache"
    good, _ = _extract(net, lab_file, cache)
    npy = next(cache.glob("*.npy"))
    marker = next(cache.glob("*.json"))

    marker.unlink()  # interrupted before the marker was written
    a, info = _extract(net, lab_file, cache)
    assert not info["cached"] and marker.exists()
    np.testing.assert_array_equal(a, good)

    with open(npy, "r+b") as f:  # truncated array file behind a valid marker
        f.truncate(npy.stat().st_size - 100)
    a, info = _extract(net, lab_file, cache)
    assert not info["cached"]
    np.testing.assert_array_equal(a, good)
    assert _extract(net, lab_file, cache)[1]["cached"]

    marker.write_text("{not json")  # damaged marker
    assert not _extract(net, lab_file, cache)[1]["cached"]

    m = json.loads(marker.read_text())  # marker for another shape
    m["shape"] = [49, 5, 4, 60]
    marker.write_text(json.dumps(m))
    assert not _extract(net, lab_file, cache)[1]["cached"]
    assert not list(cache.glob("*.tmp*"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BADPRUNE_CACHE", str(tmp_path / "bc"))
    assert features.default_cache_dir() == str(tmp_path / "bc")
    monkeypatch.delenv("BADPRUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert features.default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "badprune")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert features.default_cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "badprune")


# ------------------------------------------------------------------------------------------------ detect_scale


def brightness_model(threshold):
    """Class 1 when the mean pixel exceeds ``threshold``: a model 'trained' for one pixel scale."""
    inp = keras.Input((55, 47, 3))
    g = L.GlobalAveragePooling2D()(inp)
    out = L.Dense(2, name="out")(g)
    m = keras.Model(inp, out)
    m.get_layer("out").set_weights([np.array([[0, 1 / 3]] * 3, np.float32), np.array([threshold, 0], np.float32)])
    return m


def test_detect_scale_synthetic(tmp_path):
    rng = np.random.default_rng(3)
    level = rng.random(40) * 255  # stored 0..255
    x = np.clip(level[:, None, None, None] + rng.normal(0, 3, (40, 55, 47, 3)), 0, 255).astype(np.float32)
    labels = (x.mean(axis=(1, 2, 3)) > 127.5).astype(int)
    assert 5 < labels.sum() < 35
    path = tmp_path / "b.h5"
    data.write_lab_h5(path, x, labels)
    ds = data.open_dataset(path)
    name, accs = features.detect_scale(brightness_model(0.5), ds, n=40)  # made for pixels / 255
    assert name == "unit" and accs["unit"] == 1.0 and accs["raw"] < 0.9
    name, accs = features.detect_scale(brightness_model(127.5), ds, n=40)  # made for raw pixels
    assert name == "raw" and accs["raw"] == 1.0 and accs["unit"] < 0.9
    # n limits the images used
    _, accs = features.detect_scale(brightness_model(0.5), ds, n=7)
    assert accs["raw"] == pytest.approx(labels[:7].mean())


def _labelled_lab_images(shared_dir):
    from PIL import Image

    xs, ys = [], []
    for p in sorted((shared_dir / "lab" / "images").glob("*.png")):
        mt = re.match(r"(cl|sun)_\d+_label=(\d+)\.png$", p.name)
        if mt:
            with Image.open(p) as im:
                xs.append(np.asarray(im.convert("RGB"), np.float32))
            ys.append(int(mt.group(2)))
    return np.stack(xs), np.array(ys)


def test_detect_scale_real_weights(shared_dir, tmp_path):
    x, y = _labelled_lab_images(shared_dir)
    raw = tmp_path / "raw.h5"
    data.write_lab_h5(raw, x, y)
    w = shared_dir / "lab" / "weights"
    lab3 = models.load_model(weights=w / "lab3_bd_weights.h5")
    name, accs = features.detect_scale(lab3, data.open_dataset(raw))  # lab3 wants raw pixels
    assert name == "raw" and accs["raw"] == 1.0 and accs["unit"] < 0.5
    # the same images for the HackML net, which wants pixels / 255
    sun = models.load_model(weights=w / "sunglasses_bd_weights.h5")
    name, accs = features.detect_scale(sun, data.open_dataset(raw))
    assert name == "unit" and accs["unit"] > accs["raw"]
    # the trunk up to pool_3, then the compiled head (as the sweep decides): the same decision and accuracies
    for net, want in ((lab3, "raw"), (sun, "unit")):
        head = compile_head(net, "pool_3")
        full = features.detect_scale(net, data.open_dataset(raw))
        fast = features.detect_scale(net, data.open_dataset(raw), layer="pool_3", classify=head.labels)
        assert fast == full and fast[0] == want


def test_a_cached_entry_changed_on_disk_is_found_and_recomputed(net, lab_file, tmp_path, counting):
    """One float edited in place (same size, same marker): the checksum catches it, one warning, recomputed."""
    from badprune.errors import BadpruneWarning

    cache = tmp_path / "cache"
    a, _ = _extract(net, lab_file, cache)
    npy = next(p for p in cache.iterdir() if p.suffix == ".npy")
    size = npy.stat().st_size
    i = int(np.flatnonzero(a.reshape(-1))[0])  # a non-zero activation, so the edit is a real change
    with open(npy, "r+b") as f:
        f.seek(size - a.nbytes + 4 * i)
        f.write(np.float32(a.reshape(-1)[i] + 1.0).tobytes())
    assert npy.stat().st_size == size
    with pytest.warns(BadpruneWarning, match="checksum mismatch"):
        b, info = _extract(net, lab_file, cache)
    assert info["cached"] is False and counting.calls == 2
    np.testing.assert_array_equal(a, b)
    c, info = _extract(net, lab_file, cache)  # the entry was rewritten whole
    assert info["cached"] is True and counting.calls == 2
    np.testing.assert_array_equal(a, c)


def test_activations_do_not_depend_on_the_batch_size(net, lab_file):
    """The engines cap the batch (MAX_BATCH) on this: every batch size gives the same bits."""
    ds = data.open_dataset(lab_file)
    ref = features.extract(net, "pool_3", ds, "raw", batch_size=50, progress=False)
    for bs in (1, 7, 16, features.MAX_BATCH + 1, 4096):
        got = features.extract(net, "pool_3", ds, "raw", batch_size=bs, progress=False)
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_detect_scale_wants_layer_and_classify_together(lab_file, random_deepid):
    ds = data.open_dataset(lab_file)
    m = random_deepid(5, seed=3)
    with pytest.raises(ValueError, match="layer and classify"):
        features.detect_scale(m, ds, n=10, layer="pool_3")
    with pytest.raises(ValueError, match="layer and classify"):
        features.detect_scale(m, ds, n=10, classify=lambda a: a.reshape(len(a), -1).argmax(axis=1))


def test_a_model_is_freed_with_its_traced_trunk(lab_file, random_deepid):
    import gc
    import weakref

    ds = data.open_dataset(lab_file)
    m = random_deepid(5, seed=3)
    a = features.extract(m, "pool_3", ds, "raw", progress=False)
    features.detect_scale(m, ds, n=10)
    assert len(features._RUNNERS.get(m, {})) == 1  # the trunk's runner is kept with the model ...
    b = features.extract(m, "pool_3", ds, "raw", progress=False)
    np.testing.assert_array_equal(a, b)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None  # ... and does not keep it alive


@pytest.fixture
def counting_calls(monkeypatch):
    """Counts the engines' batch calls (detect_scale runs the model batch by batch)."""
    calls = []
    real = features._Runner.__call__

    def call(self, x):
        calls.append(len(x))
        return real(self, x)

    monkeypatch.setattr(features._Runner, "__call__", call)
    return calls


def test_detect_scale_equals_predict_at_each_scale(tmp_path):
    rng = np.random.default_rng(4)
    x = np.clip(rng.random(30)[:, None, None, None] * 255 + rng.normal(0, 3, (30, 55, 47, 3)), 0, 255)
    path = tmp_path / "c.h5"
    data.write_lab_h5(path, x, (x.mean(axis=(1, 2, 3)) > 127.5).astype(int), dtype=np.float64)
    ds = data.open_dataset(path)
    m = brightness_model(60.0)
    _, accs = features.detect_scale(m, ds, n=25, batch_size=7)
    for name, value in features.SCALES.items():
        pred = features.predict(m, ds, value, stop=25).argmax(axis=1)
        assert accs[name] == float((pred == ds.labels[:25]).mean())


def test_detect_scale_decision_is_cached(tmp_path, counting_calls):
    rng = np.random.default_rng(3)
    x = np.clip(rng.random(40)[:, None, None, None] * 255 + rng.normal(0, 3, (40, 55, 47, 3)), 0, 255)
    path = tmp_path / "b.h5"
    data.write_lab_h5(path, x.astype(np.float32), (x.mean(axis=(1, 2, 3)) > 127.5).astype(int))
    cache = tmp_path / "cache"
    m = brightness_model(0.5)
    first = features.detect_scale(m, data.open_dataset(path), n=40, cache_dir=cache)
    assert first[0] == "unit" and counting_calls and len(list(cache.glob("scale-*.json"))) == 1
    n_calls = len(counting_calls)
    assert features.detect_scale(m, data.open_dataset(path), n=40, cache_dir=cache) == first
    assert len(counting_calls) == n_calls  # the model did not run
    # another n, another model or other data: decided again
    features.detect_scale(m, data.open_dataset(path), n=20, cache_dir=cache)
    assert len(counting_calls) > n_calls
    n_calls = len(counting_calls)
    assert features.detect_scale(brightness_model(127.5), data.open_dataset(path), n=40, cache_dir=cache)[0] == "raw"
    assert len(counting_calls) > n_calls
    # an entry that does not hold together (its scale is not the best of its accuracies) is not used
    entry = next(p for p in cache.glob("scale-*.json") if json.loads(p.read_text())["n"] == 40
                 and json.loads(p.read_text())["scale"] == "unit")
    doc = json.loads(entry.read_text())
    doc["scale"] = "raw"
    entry.write_text(json.dumps(doc))
    n_calls = len(counting_calls)
    assert features.detect_scale(m, data.open_dataset(path), n=40, cache_dir=cache) == first
    assert len(counting_calls) > n_calls
    data.write_lab_h5(path, x[::-1].astype(np.float32), np.zeros(40))  # the file rewritten
    n_calls = len(counting_calls)
    features.detect_scale(m, data.open_dataset(path), n=40, cache_dir=cache)
    assert len(counting_calls) > n_calls


# ------------------------------------------------------------------------------------------ the native trunk


def _tf_function_extract(model, ds, scale="raw", layer="pool_3", batch_size=16):
    """The reference: TensorFlow's traced trunk, in batches of ``batch_size`` (oneDNN's result can depend on it)."""
    return features.extract(model, layer, ds, scale, batch_size=batch_size, progress=False, engine="tf-function")


def test_tf_engine_runs_the_native_trunk_bit_identical_to_tensorflow(lab_file, random_deepid):
    import prune_ext

    m = random_deepid(5, seed=4)
    ds = data.open_dataset(lab_file)
    for layer in ("pool_3", "pool_2", "conv_3"):
        got, info = features.extract(m, layer, ds, "raw", batch_size=16, progress=False, return_info=True)
        want = _tf_function_extract(m, ds, layer=layer)
        assert got.tobytes() == want.tobytes()
        if prune_ext.ISA == "avx512":  # oneDNN's x86-64 order, checked on this CPU kind (else TF may sum otherwise)
            assert info["trunk"] == "native"
        else:
            assert info["trunk"] in ("native", "tf")


def test_native_trunk_on_the_real_lab_weights(shared_dir, tmp_path, monkeypatch):
    """lab3 (raw pixels) and the HackML net (pixels / 255) on the real lab images: TensorFlow's bits, with most
    images computed by the native trunk. Batches of 16 repeat (the first of each size is checked against TensorFlow,
    which answers it; the later ones are the native trunk's own), and a tail batch of another size."""
    from badprune import trunk as trunk_mod

    x, y = _labelled_lab_images(shared_dir)
    n = 16 * 12 + 5
    reps = -(-n // len(x))
    path = tmp_path / "lab.h5"
    data.write_lab_h5(path, np.concatenate([x] * reps)[:n], np.concatenate([y] * reps)[:n])
    ds = data.open_dataset(path)
    served = []
    real = features._Runner._native_call

    def counting(self, native, batch):
        if len(batch) > 1 or np.any(batch):  # not the blank image of the check
            served.append(len(batch))
        return real(self, native, batch)

    monkeypatch.setattr(features._Runner, "_native_call", counting)
    w = shared_dir / "lab" / "weights"
    for name, scale in (("lab3_bd_weights.h5", "raw"), ("sunglasses_bd_weights.h5", "unit")):
        m = models.load_model(weights=w / name)
        available = trunk_mod.compile_trunk(features.trunk(m, "pool_3")) is not None
        served.clear()
        got, info = features.extract(m, "pool_3", ds, scale, batch_size=16, progress=False, return_info=True)
        want = _tf_function_extract(m, ds, scale, batch_size=16)
        assert got.tobytes() == want.tobytes()
        if available:  # every batch of 16 but the first: 11 of them (the tail, of another size, is checked)
            assert info["trunk"] == "native" and sum(served) == 16 * 11, (name, served)
        else:
            assert info["trunk"] == "tf" and not served


def test_native_trunk_that_differs_is_dropped_for_tensorflow(lab_file, random_deepid, monkeypatch):
    from badprune import trunk

    real = trunk.NativeTrunk.__call__

    def off_by_one_ulp(self, x, out):
        done = real(self, x, out)
        out[0, 0, 0, :] = np.nextafter(out[0, 0, 0, :], np.float32(np.inf))
        return done

    monkeypatch.setattr(trunk.NativeTrunk, "__call__", off_by_one_ulp)
    m = random_deepid(5, seed=5)
    ds = data.open_dataset(lab_file)
    got, info = features.extract(m, "pool_3", ds, "raw", batch_size=16, progress=False, return_info=True)
    assert info["trunk"] == "tf"
    assert got.tobytes() == _tf_function_extract(m, ds).tobytes()


def test_native_trunk_waits_for_a_batch_that_proves_it(lab_file, random_deepid, monkeypatch):
    """A check on a batch with (almost) no nonzero activation proves nothing: TensorFlow computes until one does."""
    monkeypatch.setattr(features, "CHECK_NONZEROS", 10 ** 9)
    m = random_deepid(5, seed=6)
    ds = data.open_dataset(lab_file)
    got, info = features.extract(m, "pool_3", ds, "raw", batch_size=16, progress=False, return_info=True)
    assert info["trunk"] == "tf"
    assert got.tobytes() == _tf_function_extract(m, ds).tobytes()


def test_compile_trunk_takes_plain_conv_pool_chains_only(random_deepid):
    import prune_ext
    from badprune.trunk import compile_trunk

    if not prune_ext.TRUNK_VECTORIZED:
        assert compile_trunk(features.trunk(random_deepid(5), "pool_3")) is None
        return
    t = compile_trunk(features.trunk(random_deepid(5), "pool_3"))
    assert t.layers == ("conv_1", "pool_1", "conv_2", "pool_2", "conv_3", "pool_3")
    assert t.spec[:, 0].tolist() == [0, 1, 0, 1, 0, 1] and t.spec[0, 1:6].tolist() == [4, 4, 3, 20, 1]

    def chain(*layers, shape=(20, 18, 3)):
        x = keras.Input(shape)
        h = x
        for lay in layers:
            h = lay(h)
        return keras.Model(x, h)

    assert compile_trunk(chain(L.Conv2D(4, 3), L.Dropout(0.5), L.MaxPooling2D(3, strides=2))) is not None
    for bad in ([L.Conv2D(4, 3, padding="same")], [L.Conv2D(4, 3, strides=2)], [L.Conv2D(4, 3, activation="tanh")],
                [L.Conv2D(4, 3), L.BatchNormalization()], [L.Conv2D(4, 3), L.AveragePooling2D(2)],
                [L.Conv2D(4, 3, dilation_rate=2)], [L.Rescaling(1 / 255), L.Conv2D(4, 3)]):
        assert compile_trunk(chain(*bad)) is None, bad


@pytest.fixture(scope="module")
def gray_net():
    """One input channel: oneDNN here sums a batch of one image in another order than larger batches."""
    m = keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(20, 5, activation="relu", name="conv_a"),
                          L.MaxPooling2D(2, name="pool_a"), L.Flatten(), L.Dense(10)])
    g = np.random.default_rng(11)
    m.set_weights([(g.standard_normal(w.shape) * 0.2).astype(np.float32) for w in m.get_weights()])
    return m


def _gray_file(path, x):
    data.write_lab_h5(path, x, np.zeros(len(x)), dtype=np.float32)
    return data.open_dataset(path)


def test_native_trunk_is_checked_on_each_batch_size(gray_net, tmp_path):
    """A check passed on a batch of one image does not vouch for batches of 65."""
    g = np.random.default_rng(12)
    x = (g.random((65, 28, 28, 1)) * 255).round().astype(np.float32)
    features._RUNNERS.pop(gray_net, None)
    features.extract(gray_net, "pool_a", _gray_file(tmp_path / "one.h5", x[:1]), "unit", progress=False)
    many = _gray_file(tmp_path / "many.h5", x)
    got = features.extract(gray_net, "pool_a", many, "unit", progress=False)  # one batch of 65
    assert got.tobytes() == _tf_function_extract(gray_net, many, "unit", "pool_a", 128).tobytes()


def test_blank_images_prove_nothing(gray_net, tmp_path):
    """Blank images give the biases through the layers whatever the order of the sums: no proof."""
    g = np.random.default_rng(13)
    x = (g.random((48, 28, 28, 1)) * 255).round().astype(np.float32)
    x[:16] = 0
    features._RUNNERS.pop(gray_net, None)
    ds = _gray_file(tmp_path / "blank.h5", x)
    got = features.extract(gray_net, "pool_a", ds, "unit", batch_size=16, progress=False)
    assert got.tobytes() == _tf_function_extract(gray_net, ds, "unit", "pool_a").tobytes()


def test_native_trunk_follows_changed_weights(lab_file, random_deepid):
    m = random_deepid(5, seed=7)
    ds = data.open_dataset(lab_file)
    a = features.extract(m, "pool_3", ds, "raw", progress=False)
    w = m.get_layer("conv_2").get_weights()
    m.get_layer("conv_2").set_weights([w[0] * 2, w[1]])
    b, info = features.extract(m, "pool_3", ds, "raw", progress=False, return_info=True)
    assert a.tobytes() != b.tobytes()
    assert b.tobytes() == _tf_function_extract(m, ds).tobytes()
    m.get_layer("conv_2").set_weights([np.full_like(w[0], np.nan), w[1]])  # not finite: TensorFlow's business
    c, info = features.extract(m, "pool_3", ds, "raw", progress=False, return_info=True)
    assert info["trunk"] == "tf"


def test_native_max_pool_equals_tensorflow_on_nan_and_infinities():
    import prune_ext
    import tensorflow as tf

    if not prune_ext.TRUNK_VECTORIZED:
        pytest.skip("no FMA instance: trunk_forward declines")
    g = np.random.default_rng(14)
    x = g.standard_normal((3, 11, 37, 2)).astype(np.float32)
    x[g.random(x.shape) < 0.3] = np.nan
    x[0, :4, :6], x[1, :4, :6], x[2, 5, 7] = np.nan, -np.inf, np.inf
    for ph, pw, sh, sw in ((2, 2, 2, 2), (3, 3, 1, 1), (2, 3, 2, 1)):
        want = tf.nn.max_pool2d(x, (ph, pw), (sh, sw), "VALID").numpy()
        got = np.empty_like(want)
        assert prune_ext.trunk_forward(x, np.array([[1, ph, pw, sh, sw, 0, 0, 0]], np.int32), [None], [None], got)
        assert got.tobytes() == want.tobytes()


def test_a_difference_on_a_later_batch_size_drops_the_native_trunk(lab_file, random_deepid, monkeypatch):
    from badprune import trunk

    real = trunk.NativeTrunk.__call__

    def off_on_the_tail(self, x, out):  # sizes 16 agree, the tail of 2 (50 = 3 x 16 + 2) does not
        done = real(self, x, out)
        if len(x) == 2:
            out[0, 0, 0, :] = np.nextafter(out[0, 0, 0, :], np.float32(np.inf))
        return done

    monkeypatch.setattr(trunk.NativeTrunk, "__call__", off_on_the_tail)
    m = random_deepid(5, seed=8)
    ds = data.open_dataset(lab_file)
    want = _tf_function_extract(m, ds)
    got = features.extract(m, "pool_3", ds, "raw", batch_size=16, progress=False)
    assert got.tobytes() == want.tobytes()
    again, info = features.extract(m, "pool_3", ds, "raw", batch_size=16, progress=False, return_info=True)
    assert info["trunk"] == "tf" and again.tobytes() == want.tobytes()
