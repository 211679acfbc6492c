"""Baselines measured in the same run as badprune (ratios, not absolute seconds, are what the report compares):

* sgemm: this machine's float32 GEMM rate on the head's shapes (the floor of the sweep's arithmetic);
* the import floor: a fresh Python importing badprune's sweep path (TensorFlow + Keras), a fixed cost of the CLI;
* seed-style: zero one conv channel, ``model.predict`` the three sets (per step; x (C+1) for a whole sweep);
* best plain TensorFlow: trunk once, then the TF head over cached activations with channels masked (per step).
"""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from conftest import RUN_INFO, child_env, rounds, run_measured
import labscale


# -------------------------------------------------------------------------------------------------------- sgemm
def _gemm_case(name):
    """(A, B, flops) for one GEMM shape: rows x k @ k x n, float32."""
    rng = np.random.default_rng(0)
    m = 256 if labscale.small() else 1024
    shapes = {"fc_2": (m, 960, 160), "output": (m, 160, 1283), "square": (2048, 2048, 2048)}
    if labscale.small():
        shapes["square"] = (512, 512, 512)
    r, k, n = shapes[name]
    A = np.asfortranarray(rng.standard_normal((r, k), dtype=np.float32))
    B = np.asfortranarray(rng.standard_normal((k, n), dtype=np.float32))
    return A, B, 2.0 * r * k * n


@pytest.mark.parametrize("lib", ["scipy", "numpy"])
@pytest.mark.parametrize("shape", ["fc_2", "output", "square"])
def test_sgemm(benchmark, lib, shape):
    """float32 GEMM GFLOP/s: scipy's BLAS (the one prune_ext calls through cython_blas) and numpy's."""
    A, B, flops = _gemm_case(shape)
    if lib == "scipy":
        from scipy.linalg.blas import sgemm

        fn = lambda: sgemm(1.0, A, B)  # noqa: E731
    else:
        Ac, Bc = np.ascontiguousarray(A), np.ascontiguousarray(B)
        fn = lambda: Ac @ Bc  # noqa: E731
    iters = 1 if shape == "square" else 20
    benchmark.group = "sgemm"
    benchmark.extra_info.update(kind="floor", flops=flops * iters, shape=list(A.shape) + [B.shape[1]],
                                iterations=iters)
    benchmark.pedantic(lambda: [fn() for _ in range(iters)], rounds=rounds(7), warmup_rounds=1)


# ---------------------------------------------------------------------------------------------- import floor
def test_import_floor(benchmark):
    """A fresh interpreter importing what `badprune-fast sweep` imports before any work (TensorFlow, Keras)."""
    import tempfile

    code = "import badprune.cli, badprune.sweep, badprune.features, badprune.head, badprune.report"
    env = child_env()
    rss = []
    tmp = tempfile.mkdtemp(prefix="badprune-bench-")

    def once():
        rss.append(run_measured([sys.executable, "-c", code], env, tmp + "/rss"))

    benchmark.group = "cli"
    benchmark.extra_info.update(kind="floor")
    benchmark.pedantic(once, rounds=rounds(3), warmup_rounds=0 if labscale.small() else 1)
    benchmark.extra_info["max_rss_median"] = float(np.median(rss))
    RUN_INFO["import_rss_bytes"] = float(np.median(rss))


# ------------------------------------------------------------------------------------------------- seed-style
def test_seed_style_step(benchmark, lab, model, arrays, datasets):
    """One seed-style step: zero one conv channel (kernel, bias) and model.predict the three sets."""
    import keras

    from seed_style import SeedLoop

    m = keras.models.clone_model(model)  # the loop zeroes weights in place: keep B intact
    m.set_weights(model.get_weights())
    loop = SeedLoop(m, arrays, {k: d.labels for k, d in datasets.items()})
    base = loop.evaluate()  # step 0: the unpruned model (also traces predict)
    n = sum(len(x) for x in arrays.values())
    benchmark.group = "sweep-baselines"
    benchmark.extra_info.update(kind="baseline", images=n, extrapolate=loop.evaluations,
                                extrapolate_add=RUN_INFO.get("read_seconds", 0.0),
                                note=f"per step; a whole sweep is {loop.evaluations} evaluations + reading the data",
                                base_accuracies=base)
    benchmark.pedantic(loop.step, rounds=rounds(3), warmup_rounds=0)
    benchmark.extra_info["accuracies_last_step"] = loop.rows[-1]
    RUN_INFO["seed_style_measured_steps"] = len(loop.rows) - 1


def test_tf_head_step(benchmark, model, layer, arrays, datasets, ranking):
    """One step of the best plain-TensorFlow sweep: the TF head over all cached activations, one more channel
    masked. The trunk pass (once) is timed separately and added when extrapolating."""
    from tf_baseline import TFSweep, trunk_features

    trunk_features(model, layer, {k: v[:64] for k, v in arrays.items()})  # trace outside the timing
    t = time.perf_counter()
    F, bounds = trunk_features(model, layer, arrays)
    t_trunk = time.perf_counter() - t
    sw = TFSweep(model, layer, F, bounds, {k: d.labels for k, d in datasets.items()}, ranking)
    sw.evaluate()  # step 0, traces the head
    benchmark.group = "sweep-baselines"
    benchmark.extra_info.update(kind="baseline", images=len(F), extrapolate=sw.evaluations,
                                extrapolate_add=t_trunk, trunk_seconds=t_trunk,
                                trunk_img_per_s=len(F) / t_trunk,
                                note=f"per step; a whole sweep is the trunk once + {sw.evaluations} steps")
    benchmark.pedantic(sw.step, rounds=rounds(5), warmup_rounds=0)
