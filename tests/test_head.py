"""The compiled head and the sweep engine against TensorFlow running the actual pruned Keras models."""
import numpy as np
import prune_ext
import pytest

from badprune import _tf  # noqa: F401
import keras

from badprune.head import compile_head, masked_steps
from badprune.models import prune_model

L = keras.layers


def _trunk(x, channels=12):
    h = L.Conv2D(8, 3, activation="relu", name="c1")(x)
    h = L.MaxPooling2D(2, name="p1")(h)
    h = L.Conv2D(channels, 3, activation="relu", name="conv_p")(h)
    return L.MaxPooling2D(2, name="pool_p")(h)


def model_deepid_like(randomize, seed=0, classes=15):
    x = keras.Input((28, 24, 3))
    p = _trunk(x)
    a = L.Dense(20, name="fa")(L.Flatten()(p))
    b = L.Dense(20, name="fb")(L.Flatten()(L.Conv2D(16, 2, activation="relu", name="c4")(p)))
    h = L.Activation("relu")(L.Add()([a, b]))
    y = L.Dense(classes, activation="softmax", name="out")(h)
    return randomize(keras.Model(x, y), seed, "sparse")


def model_beyond_deepid(randomize, seed=1, classes=12):
    """Strided 'same' conv, BatchNormalization, Concatenate, average pooling, dropout, assorted activations."""
    x = keras.Input((28, 24, 3))
    p = _trunk(x, channels=10)
    s = L.Conv2D(14, 3, strides=2, padding="same", activation="elu", name="strided")(p)
    s = L.BatchNormalization(name="bn")(s)
    s = L.GlobalAveragePooling2D()(s)
    q = L.AveragePooling2D(2, strides=1, padding="same")(p)
    q = L.Conv2D(6, 1, activation="tanh")(q)
    q = L.Flatten()(L.Dropout(0.3)(q))
    f = L.Flatten()(p)
    cat = L.Concatenate(name="cat")([s, q, f])
    h = L.Dense(24, activation="relu")(cat)
    h = L.LeakyReLU(negative_slope=0.1)(L.Dense(18)(h))
    y = L.Dense(classes, activation="softmax", name="out")(h)
    return randomize(keras.Model(x, y), seed, "sparse")


def model_unsupported(randomize, seed=2, classes=9):
    """A head with a layer outside prune_ext's set (LayerNormalization): the TensorFlow fallback."""
    x = keras.Input((28, 24, 3))
    p = _trunk(x, channels=8)
    h = L.LayerNormalization()(L.Dense(16, activation="relu")(L.Flatten()(p)))
    y = L.Dense(classes, activation="softmax")(h)
    return randomize(keras.Model(x, y), seed, "sparse")


def _inputs(n, seed):
    """Images with per-sample structure: a coarse random pattern upsampled, plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (n, 4, 4, 3))
    big = np.repeat(np.repeat(coarse, 7, axis=1), 6, axis=2)
    return (big + 0.3 * rng.standard_normal(big.shape)).astype(np.float32)


def _check_against_tf(model, layer, X, modes=("incremental", "full")):
    """At every step, each mode's labels are TensorFlow's on the actual pruned model, but for near-ties of the
    final logits within a float32 rounding bound, at most 1 % of the samples (conftest's ``_labels_vs_tf``)."""
    from conftest import _labels_vs_tf

    trunk = keras.Model(model.input, model.get_layer(layer).output)
    F = trunk.predict(X, verbose=0)
    head = compile_head(model, layer)
    order = np.argsort(F.mean(axis=(0, 1, 2)), kind="stable")
    results = {m: [lab.copy() for _, _, lab in masked_steps(head, F, order, mode=m, batch_size=97)] for m in modes}
    changed = 0
    for k in range(len(order) + 1):
        pm = prune_model(model, layer, [int(c) for c in order[:k]])
        ref, _ = _labels_vs_tf(pm, X, {f"step {k} ({m})": results[m][k] for m in modes}, cap=max(1, len(X) // 100))
        changed += int((ref != results[modes[0]][0]).sum())
    assert changed > 0, "the sweep never changed a label: the test would not see a wrong update"
    return head


def test_deepid_like_head_equals_tf_pruned_models(randomize):
    m = model_deepid_like(randomize)
    head = _check_against_tf(m, "pool_p", _inputs(300, 0))
    assert head.backend == "prune_ext"
    assert sorted(head.ops[i].name for i in head.linear) == ["c4", "fa"]


def test_head_beyond_deepid_equals_tf_pruned_models(randomize):
    m = model_beyond_deepid(randomize)
    head = _check_against_tf(m, "pool_p", _inputs(300, 1))
    assert head.backend == "prune_ext"
    kinds = {o.kind for o in head.ops}
    assert {"conv", "bn", "concat", "pool", "gpool", "dense", "act"} <= kinds


def test_unsupported_layer_falls_back_to_tensorflow(randomize):
    m = model_unsupported(randomize)
    head = _check_against_tf(m, "pool_p", _inputs(200, 2), modes=("incremental",))
    assert head.backend == "tensorflow" and "LayerNormalization" in head.fallback_reason


def test_step0_logits_match_keras(randomize):
    m = model_beyond_deepid(randomize, seed=5)
    X = _inputs(64, 5)
    F = keras.Model(m.input, m.get_layer("pool_p").output).predict(X, verbose=0)
    head = compile_head(m, "pool_p")
    logits = head.forward(F)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, m.predict(X, verbose=0), rtol=1e-4, atol=1e-6)


def test_layer_that_does_not_separate_the_model_is_refused():
    from badprune.errors import BadpruneError

    x = keras.Input((12, 12, 3))
    h = L.Conv2D(4, 3, activation="relu", name="a")(x)
    p = L.MaxPooling2D(2, name="p")(h)
    skip = L.GlobalAveragePooling2D()(h)  # bypasses p
    y = L.Dense(3)(L.Concatenate()([L.Flatten()(p), skip]))
    m = keras.Model(x, y)
    with pytest.raises(BadpruneError, match="does not separate"):
        compile_head(m, "p")


@pytest.mark.parametrize("max_share", [0.0, 0.5, 1.0])
def test_final_layer_sparse_argmax_gives_the_full_mode_labels(monkeypatch, randomize, max_share):
    """The final layer's sparse argmax never, on mostly-zero batches, or always: the labels of mode='full'."""
    import badprune.head.engine as H

    monkeypatch.setattr(H, "SPARSE_MAX_SHARE", max_share)
    m = model_deepid_like(randomize, seed=3)
    X = _inputs(400, 3)
    F = keras.Model(m.input, m.get_layer("pool_p").output).predict(X, verbose=0)
    head = compile_head(m, "pool_p")
    order = np.argsort(F.mean(axis=(0, 1, 2)), kind="stable")
    engine = H.MaskedSweep(head, F, order, batch_size=64)
    inc = [lab.copy() for _, _, lab in engine]
    stats = dict(engine.stats)
    full = [lab.copy() for _, _, lab in masked_steps(head, F, order, mode="full")]
    # the channel subtractions round unlike full mode's GEMMs: a near-tie may differ (at most 1 sample in 200 per
    # step), and where the modes differ both are TensorFlow's labels up to the final logits' rounding bound
    from conftest import _labels_vs_tf

    for k, (a, b) in enumerate(zip(inc, full)):
        n = np.count_nonzero(a != b)
        assert n <= len(X) // 200, f"step {k}: {n} labels differ"
        if n:
            pm = prune_model(m, "pool_p", [int(c) for c in order[:k]])
            _labels_vs_tf(pm, X, {f"step {k} incremental": a, f"step {k} full": b}, cap=len(X) // 100)
    if max_share == 0.0 or not prune_ext.SPARSE_VECTORIZED:
        assert stats["screened"] == 0 and stats["exact_final"] == stats["rows"]
    elif max_share == 1.0:
        assert stats["screened"] == stats["rows"] > stats["exact_final"]


def test_logits_dense_without_activation_gets_the_bounded_sparse_argmax(monkeypatch, randomize):
    """A last Dense with no activation (an op, then a reshape) is still the final layer: the sparse argmax with its
    rounding bound answers it, never the unbounded sparse_dense; a hidden Dense on a ReLU is sparse_dense's. The
    labels match TensorFlow on every pruned model."""
    import badprune.head.engine as H

    x = keras.Input((12, 10, 3))
    p = L.MaxPooling2D(2, name="pool_p")(L.Conv2D(8, 3, activation="relu", name="c")(x))
    h = L.Dense(24, activation="relu", name="hidden")(L.Flatten()(p))
    y = L.Dense(40, name="logits")(L.Dense(32, activation="relu", name="hidden2")(h))
    m = keras.Model(x, y)
    randomize(m, 11, "sparse")
    X = (np.random.default_rng(11).random((300, 12, 10, 3)) * 2).astype(np.float32)
    head = _check_against_tf(m, "pool_p", X, modes=("incremental",))
    names = {o.out: o.name for o in head.ops}
    assert {names[i] for i in head.relu_fed} == {"hidden2"}
    F = keras.Model(m.input, m.get_layer("pool_p").output).predict(X, verbose=0)
    monkeypatch.setattr(H, "SPARSE_MAX_SHARE", 1.0)  # every batch, however dense its input
    engine = H.MaskedSweep(head, F, np.arange(8), batch_size=64)
    for _ in engine:
        pass
    if prune_ext.SPARSE_VECTORIZED:
        assert engine.stats["screened"] == engine.stats["rows"] > 0


@pytest.mark.parametrize("jobs", [2, 3])
def test_sharded_sweep_gives_the_one_thread_labels(monkeypatch, randomize, jobs):
    """The samples cut into shards swept in threads: the same labels at every step and the same statistics as
    one thread."""
    import badprune.head.engine as H

    monkeypatch.setattr(H, "MIN_SHARD_ROWS", 16)
    m = model_deepid_like(randomize, seed=5)
    X = _inputs(301, 5)
    F = keras.Model(m.input, m.get_layer("pool_p").output).predict(X, verbose=0)
    head = compile_head(m, "pool_p")
    order = np.argsort(F.mean(axis=(0, 1, 2)), kind="stable")
    one = H.MaskedSweep(head, F, order, batch_size=32, jobs=1)
    ref = [(k, c, lab.copy()) for k, c, lab in one]
    many = H.MaskedSweep(head, F, order, batch_size=32, jobs=jobs)
    got = [(k, c, lab.copy()) for k, c, lab in many]
    assert [(k, c) for k, c, _ in got] == [(k, c) for k, c, _ in ref]
    for (k, _, a), (_, _, b) in zip(got, ref):
        np.testing.assert_array_equal(a, b, err_msg=f"step {k}")
    assert many.stats["rows"] == one.stats["rows"] > 0
    with pytest.raises(ValueError, match="jobs"):
        H.MaskedSweep(head, F, order, jobs=0)


def test_sharded_sweep_stops_cleanly(monkeypatch, randomize):
    """A consumer that stops early and a shard that fails: no thread is left running, the failure reaches the
    consumer, and BLAS gets its threads back."""
    import threading

    from threadpoolctl import threadpool_info

    import badprune.head.engine as H

    monkeypatch.setattr(H, "MIN_SHARD_ROWS", 16)
    m = model_deepid_like(randomize, seed=6)
    F = keras.Model(m.input, m.get_layer("pool_p").output).predict(_inputs(200, 6), verbose=0)
    head = compile_head(m, "pool_p")
    order = np.argsort(F.mean(axis=(0, 1, 2)), kind="stable")
    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    def sweep_threads():
        return [t for t in threading.enumerate() if t.name.startswith("badprune-sweep")]

    it = iter(H.MaskedSweep(head, F, order, batch_size=32, jobs=2))
    for _ in range(3):
        next(it)
    it.close()
    assert sweep_threads() == []
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas
    calls = []
    real = H.prune_ext.dense_remove_channel

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("shard failed")
        return real(*a, **k)

    monkeypatch.setattr(H.prune_ext, "dense_remove_channel", failing)
    with pytest.raises(RuntimeError, match="shard failed"):
        for _ in H.MaskedSweep(head, F, order, batch_size=32, jobs=2):
            pass
    assert sweep_threads() == []
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas


def test_samples_with_no_input_left_tie_exactly_like_tensorflow(randomize):
    """Zero biases: once every channel is masked all logits tie, and the label must be class 0 (first maximum),
    as TensorFlow gives, not whatever the incremental subtractions' rounding leaves."""
    m = model_deepid_like(randomize, seed=4)
    for layer in m.layers:
        ws = layer.get_weights()
        if len(ws) == 2 and not isinstance(layer, L.Conv2D) or layer.name == "c4":
            layer.set_weights([ws[0], np.zeros_like(ws[1])])
    X = _inputs(200, 4)
    F = keras.Model(m.input, m.get_layer("pool_p").output).predict(X, verbose=0)
    head = compile_head(m, "pool_p")
    order = np.argsort(F.mean(axis=(0, 1, 2)), kind="stable")
    steps = [lab.copy() for _, _, lab in masked_steps(head, F, order)]
    ref = prune_model(m, "pool_p", [int(c) for c in order]).predict(X, verbose=0).argmax(1)
    np.testing.assert_array_equal(ref, 0)
    np.testing.assert_array_equal(steps[-1], ref)
