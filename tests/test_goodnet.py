"""The one-graph GoodNet: equal to B and B'_X predicted separately, B untouched, safe .keras round trip."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from badprune import _tf  # noqa: F401
import keras

from badprune import goodnet, models
from badprune.errors import BadpruneError

L = keras.layers


def _reference(B, Bp, X, n):
    lb = B.predict(X, verbose=0).argmax(1)
    lp = Bp.predict(X, verbose=0).argmax(1)
    return np.where(lb == lp, lb, n)


def test_goodnet_equals_b_and_b_prime_on_deepid_and_leaves_b_alone():
    keras.utils.set_random_seed(0)
    B = models.build_deepid(num_classes=9)
    X = np.random.default_rng(1).uniform(0, 255, (300, 55, 47, 3)).astype(np.float32)
    before = B.predict(X, verbose=0)
    nodes = {l.name: len(l._inbound_nodes) for l in B.layers}
    chans = list(range(0, 60, 2)) + [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    G = goodnet.build_goodnet(B, "pool_3", chans)
    assert len(G.outputs) == 1 and tuple(G.outputs[0].shape) == (None, 10)
    assert G.output_names == ["goodnet_scores"]
    assert goodnet.model_kind(G).goodnet and goodnet.model_kind(G).num_classes == 9
    probs = G.predict(X, verbose=0)
    label = probs.argmax(1)  # the lab's eval.py: np.argmax(model.predict(x), axis=1)
    ref = _reference(B, models.prune_model(B, "pool_3", chans), X, 9)
    np.testing.assert_array_equal(label, ref)
    assert 0 < np.mean(ref == 9) < 1  # both answers occur: the test can fail
    np.testing.assert_array_equal(probs.argmax(1), label)
    agree = label != 9
    np.testing.assert_allclose(probs[agree, :9], before[agree], rtol=0, atol=0)
    assert np.all(probs[~agree, 9] == 1) and np.all(probs[~agree, :9] == 0)
    # B is untouched: no new nodes on its layers, same outputs, the mask is the only new layer with weights
    assert {l.name: len(l._inbound_nodes) for l in B.layers} == nodes
    np.testing.assert_array_equal(B.predict(X, verbose=0), before)
    assert models.find_prune_layer(B) == "pool_3" and models.conv_producer(B, "pool_3") == "conv_3"
    mask = G.get_layer("pool_3_prune_mask").get_weights()[0].reshape(-1)
    assert sorted(np.flatnonzero(mask == 0).tolist()) == sorted(chans) and set(mask.tolist()) == {0.0, 1.0}
    # the trunk is computed once: conv_1 has one call in G, the head layers two
    g_cfg = {lc["name"]: len(lc["inbound_nodes"]) for lc in G.get_config()["layers"]}
    assert g_cfg["conv_1"] == 1 and g_cfg["conv_3"] == 1 and g_cfg["fc_1"] == 2 and g_cfg["output"] == 2


def test_goodnet_on_logits_sequential_and_non_conv_prune_layer(randomize):
    keras.utils.set_random_seed(2)
    # logits output (no softmax), Sequential, prune layer fed by a softplus conv (no conv producer: mask)
    B = keras.Sequential([keras.Input((12, 10, 3)), L.Conv2D(6, 3, activation="softplus", name="c"),
                          L.MaxPooling2D(2, name="p"), L.Flatten(), L.Dense(4, name="logits")])
    randomize(B, 3, "spread")
    assert models.conv_producer(B, "p") is None
    X = np.random.default_rng(4).standard_normal((400, 12, 10, 3)).astype(np.float32)
    chans = [0, 2, 5]
    G = goodnet.build_goodnet(B, "p", chans)
    probs = G.predict(X, verbose=0)
    label = probs.argmax(1)
    ref = _reference(B, models.prune_model(B, "p", chans), X, 4)
    np.testing.assert_array_equal(label, ref)
    assert 0 < np.mean(ref == 4) < 1
    np.testing.assert_allclose(probs[:, :4].sum(1)[label != 4], 1.0, rtol=1e-5)  # softmax added for probs


def test_ties_go_to_the_lowest_class_like_numpy():
    inp = keras.Input((3, 3, 1))
    h = L.Conv2D(2, 1, activation="relu", name="c")(inp)
    h = L.MaxPooling2D(1, name="p")(h)
    out = L.Dense(5, activation="softmax", name="out")(L.Flatten()(h))
    M = keras.Model(inp, out)
    M.get_layer("c").set_weights([np.ones((1, 1, 1, 2), np.float32), np.zeros(2, np.float32)])
    k = np.zeros((18, 5), np.float32)
    k[:, 2] = k[:, 3] = 1.0  # classes 2 and 3 always tie
    M.get_layer("out").set_weights([k, np.zeros(5, np.float32)])
    X = np.abs(np.random.default_rng(0).standard_normal((20, 3, 3, 1))).astype(np.float32) + 0.1
    p = M.predict(X, verbose=0)
    assert np.all(p[:, 2] == p[:, 3]) and np.all(p.argmax(1) == 2)
    label = goodnet.build_goodnet(M, "p", [0]).predict(X, verbose=0).argmax(1)
    np.testing.assert_array_equal(label, 2)  # B and B' both answer the lowest of the tied classes
    # both channels pruned: B' sees zeros, all five classes tie, B' answers 0, B answers 2 -> N
    label = goodnet.build_goodnet(M, "p", [0, 1]).predict(X, verbose=0).argmax(1)
    np.testing.assert_array_equal(label, 5)


def test_kind_from_shapes():
    k = goodnet.kind_from_shapes([(None,), (None, 1284)])
    assert k.goodnet and k.num_classes == 1283 and (k.label_output, k.score_output) == (0, 1)
    k = goodnet.kind_from_shapes([(None, 1284), (None,)])
    assert k.goodnet and k.num_classes == 1283 and (k.label_output, k.score_output) == (1, 0)
    k = goodnet.kind_from_shapes([(None, 40)])
    assert not k.goodnet and k.num_classes == 40
    k = goodnet.kind_from_shapes([(None, 41)], goodnet=True)
    assert k.goodnet and k.num_classes == 40 and k.label_output is None
    k = goodnet.kind_from_shapes([(None, 41)], names=["goodnet_scores"])  # a GoodNet file, by its output's name
    assert k.goodnet and k.num_classes == 40 and (k.label_output, k.score_output) == (None, 0)
    assert not goodnet.kind_from_shapes([(None, 41)], names=["output"]).goodnet
    assert goodnet.kind_from_shapes([(None,)], num_classes=7).num_classes == 7
    for bad in ([(None,)], [(None, 3, 4)], [], [(None, 3), (None, 4)]):
        with pytest.raises(BadpruneError):
            goodnet.kind_from_shapes(bad)
    with pytest.raises(BadpruneError):
        goodnet.kind_from_shapes([(None, 40)], num_classes=12)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, randomize):
    keras.utils.set_random_seed(5)
    inp = keras.Input((10, 8, 3), name="input")
    h = L.Conv2D(8, 3, activation="relu", name="conv")(inp)
    h = L.MaxPooling2D(2, name="pool")(h)
    out = L.Dense(6, activation="softmax", name="out")(L.Flatten()(h))
    B = randomize(keras.Model(inp, out), 6, "spread")
    d = tmp_path_factory.mktemp("g")
    X = np.random.default_rng(7).uniform(0, 1, (200, 10, 8, 3)).astype(np.float32)
    G = goodnet.build_goodnet(B, "pool", [1, 4, 6], name="goodnet_X4")
    G.save(d / "goodnet_X4.keras")
    np.save(d / "x.npy", X)
    return d, G, G.predict(X, verbose=0).argmax(1), X


def test_goodnet_file_opens_in_plain_keras_without_badprune(saved):
    d, _, label, _ = saved
    script = textwrap.dedent(f"""
        import json, os, sys
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import numpy as np, keras
        m = keras.models.load_model({str(d / "goodnet_X4.keras")!r}, safe_mode=True)
        label = np.argmax(m.predict(np.load({str(d / "x.npy")!r}), verbose=0), axis=1)  # the lab's eval.py
        print(json.dumps({{"label": label.tolist(), "names": list(m.output_names),
                          "badprune": any(n.startswith("badprune") for n in sys.modules)}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-I", "-c", script], cwd=str(d), env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["badprune"] is False and got["names"] == ["goodnet_scores"]
    np.testing.assert_array_equal(got["label"], label)


def test_badprune_load_accepts_goodnets_and_refuses_other_ops(saved, tmp_path):
    d, _, label, X = saved
    G = goodnet.load(d / "goodnet_X4.keras")
    np.testing.assert_array_equal(goodnet.predict_labels(G, X), label)
    assert goodnet.model_kind(G).num_classes == 6
    # the plain loader refuses the ops; goodnet.load only accepts the listed ones
    with pytest.raises(BadpruneError):
        models.load_model(model=str(d / "goodnet_X4.keras"))
    x = keras.Input((4,))
    y = L.Dense(3, activation="softmax")(keras.ops.sin(x))
    keras.Model(x, y).save(tmp_path / "sin.keras")
    with pytest.raises(BadpruneError, match="Sin"):
        goodnet.load(tmp_path / "sin.keras")
    y = L.Dense(3)(L.Lambda(lambda t: t * 2)(x))
    keras.Model(x, y).save(tmp_path / "lam.keras")
    with pytest.raises(BadpruneError, match="Lambda"):
        goodnet.load(tmp_path / "lam.keras")
    with pytest.raises(BadpruneError, match="not found"):
        goodnet.load(tmp_path / "nope.keras")


def test_tampered_goodnet_ops_are_refused(saved, tmp_path):
    """An op node carrying anything beyond plain values (here a serialized function in its arguments) is not one
    of the GoodNet's operations: the safety check refuses the file."""
    import zipfile

    d = saved[0]
    src = zipfile.ZipFile(d / "goodnet_X4.keras")
    cfg = json.loads(src.read("config.json"))
    op = next(lc for lc in cfg["config"]["layers"] if lc.get("class_name") == "TopK")
    op["inbound_nodes"][0]["kwargs"]["k"] = {"class_name": "__lambda__", "config": {"code": "print(1)"}}
    out = tmp_path / "tampered.keras"
    with zipfile.ZipFile(out, "w") as z:
        for item in src.infolist():
            z.writestr(item, json.dumps(cfg) if item.filename == "config.json" else src.read(item.filename))
    with pytest.raises(BadpruneError):
        goodnet.load(out)
