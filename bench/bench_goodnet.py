"""GoodNet inference on the lab-scale clean test set (12,830 images in memory), every variant against Keras
``predict`` of B alone (batch 256 everywhere):

* ``keras-B``: ``B.predict`` (the reference);
* ``keras-two-model``: ``B.predict`` and ``B'_X.predict``, label where they agree, N where they differ;
* ``keras-one-graph-predict`` / ``keras-one-graph-runtime``: badprune.goodnet's one-graph G_X, with
  ``G.predict`` and with badprune.runtime's traced function;
* ``tflite-float32`` / ``float16`` / ``int8``: G_X exported by badprune.export and run by badprune.runtime.LiteModel
  (all cores).

X = 4 (the first step whose validation accuracy dropped >= 4 points). The export issue's modules are looked up at
run time: without badprune.goodnet / export / runtime the benchmarks that need them are skipped.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from conftest import RUN_INFO, rounds

BATCH = 256
X = 4.0


@pytest.fixture(scope="session")
def x_test(arrays):
    return arrays["test"]


@pytest.fixture(scope="session")
def channels(sweep_table, ranking):
    _, ths = sweep_table
    t = next(t for t in ths if t.x == X)
    step = t.step if t.reached else len(ranking) * 3 // 4
    RUN_INFO["goodnet"] = {"x": X, "step": step, "reached": t.reached}
    return [int(c) for c in ranking[:step]]


@pytest.fixture(scope="session")
def b_prime(model, layer, channels):
    from badprune.models import prune_model

    return prune_model(model, layer, channels)


@pytest.fixture(scope="session")
def reference(model, b_prime, x_test):
    """Two-model GoodNet labels (the definition) for the agreement check of every variant."""
    n = int(model.outputs[0].shape[-1])
    lb = model.predict(x_test, batch_size=BATCH, verbose=0).argmax(1)
    lp = b_prime.predict(x_test, batch_size=BATCH, verbose=0).argmax(1)
    return np.where(lb == lp, lb, n), lb


@pytest.fixture(scope="session")
def goodnet_model(model, layer, channels):
    from badprune import goodnet

    return goodnet.build_goodnet(model, layer, channels, name="goodnet_X4")


@pytest.fixture(scope="session")
def tflite_dir():
    with tempfile.TemporaryDirectory(prefix="badprune-bench-tflite-") as d:
        yield d


def _record(benchmark, name, labels, ref, n, **extra):
    agree = float(np.mean(np.asarray(labels) == ref) * 100)
    benchmark.extra_info.update(agreement_pct=agree, images=n, **extra)
    RUN_INFO.setdefault("goodnet_agreement", {})[name] = agree


def test_keras_b(benchmark, model, x_test, reference):
    benchmark.group = "goodnet"
    out = {}
    benchmark.extra_info.update(kind="reference", variant="keras-B")
    benchmark.pedantic(lambda: out.update(l=model.predict(x_test, batch_size=BATCH, verbose=0).argmax(1)),
                       rounds=rounds(3), warmup_rounds=1)
    _record(benchmark, "keras-B", out["l"], reference[1], len(x_test), note="agreement with B's own labels")


def test_keras_two_model(benchmark, model, b_prime, x_test, reference):
    n = int(model.outputs[0].shape[-1])
    out = {}

    def run():
        lb = model.predict(x_test, batch_size=BATCH, verbose=0).argmax(1)
        lp = b_prime.predict(x_test, batch_size=BATCH, verbose=0).argmax(1)
        out["l"] = np.where(lb == lp, lb, n)

    benchmark.group = "goodnet"
    benchmark.extra_info.update(kind="badprune", variant="keras-two-model")
    benchmark.pedantic(run, rounds=rounds(3), warmup_rounds=1)
    _record(benchmark, "keras-two-model", out["l"], reference[0], len(x_test))


def test_keras_one_graph_predict(benchmark, goodnet_model, x_test, reference):
    out = {}
    benchmark.group = "goodnet"
    benchmark.extra_info.update(kind="badprune", variant="keras-one-graph-predict")
    benchmark.pedantic(lambda: out.update(l=goodnet_model.predict(x_test, batch_size=BATCH, verbose=0).argmax(1)),
                       rounds=rounds(3), warmup_rounds=1)
    _record(benchmark, "keras-one-graph-predict", np.asarray(out["l"]).reshape(-1), reference[0], len(x_test))


def test_keras_one_graph_runtime(benchmark, goodnet_model, x_test, reference):
    from badprune.runtime import KerasModel

    km = KerasModel(model=goodnet_model, batch_size=BATCH)
    out = {}
    benchmark.group = "goodnet"
    benchmark.extra_info.update(kind="badprune", variant="keras-one-graph-runtime")
    benchmark.pedantic(lambda: out.update(l=km.labels(x_test)), rounds=rounds(3), warmup_rounds=1)
    _record(benchmark, "keras-one-graph-runtime", out["l"], reference[0], len(x_test))


@pytest.mark.parametrize("quantize", ["none", "float16", "int8"])
def test_tflite(benchmark, quantize, goodnet_model, x_test, arrays, reference, tflite_dir):
    from badprune import export
    from badprune.runtime import LiteModel

    cal = arrays["valid"][:: max(1, len(arrays["valid"]) // 300)][:300] if quantize == "int8" else None
    blob = export.convert(goodnet_model, quantize, calibration=cal)
    path = os.path.join(tflite_dir, f"goodnet_X4.{quantize}.tflite")
    with open(path, "wb") as f:
        f.write(blob)
    lite = LiteModel(path, batch_size=BATCH)
    out = {}
    name = {"none": "float32"}.get(quantize, quantize)
    benchmark.group = "goodnet"
    benchmark.extra_info.update(kind="badprune", variant=f"tflite-{name}", bytes=len(blob), threads=lite.threads)
    benchmark.pedantic(lambda: out.update(l=lite.labels(x_test)), rounds=rounds(3), warmup_rounds=1)
    _record(benchmark, f"tflite-{name}", out["l"], reference[0], len(x_test))
