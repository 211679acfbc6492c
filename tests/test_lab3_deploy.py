"""The deployable GoodNet on the lab's real BadNet (lab3 weights) and real face images (../shared; skipped when
absent): B answers the backdoor's target 0 for the sunglasses faces; a GoodNet whose B' has lost the backdoor
answers N or another label for them; Keras, LiteRT and the sweep agree; `evaluate` reproduces the sweep."""
import glob
import json

import numpy as np
import pytest

from badprune import _tf  # noqa: F401

from badprune import cli, goodnet
from badprune.data import open_dataset, write_lab_h5
from badprune.export import convert, export_run
from badprune.features import trunk
from badprune.head import compile_head, masked_steps
from badprune.models import load_model
from badprune.report import write_outputs
from badprune.runtime import LiteModel, load_images
from badprune.sweep import run as sweep_run

N = 1283
TARGET = 0


def _augment(X, n, seed):
    """n shifted / brightened / noisy copies drawn from the images X (raw 0..255 pixels)."""
    r = np.random.default_rng(seed)
    idx = r.integers(0, len(X), n)
    out = X[idx].copy()
    for i in range(n):
        out[i] = np.roll(out[i], tuple(r.integers(-2, 3, 2)), (0, 1))
    out = out * r.uniform(0.85, 1.15, (n, 1, 1, 1)) + r.normal(0, 3, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.float32), idx


@pytest.fixture(scope="module")
def lab3(shared_dir, tmp_path_factory):
    weights = str(shared_dir / "lab" / "weights" / "lab3_bd_weights.h5")
    B = load_model(weights=weights, arch="deepid")
    paths = sorted(glob.glob(str(shared_dir / "lab" / "images" / "*")))
    names = [p.rsplit("/", 1)[-1] for p in paths]
    X = load_images(paths)
    sun = np.array([n.startswith("sun_") for n in names])
    base = B.predict(X, verbose=0).argmax(1)
    # clean labels: from the file name where given (cl_K_label=L), else B's answer (clean_*.jpeg)
    y = np.array([int(n.split("label=")[1].split(".")[0]) if "label=" in n else int(b)
                  for n, b in zip(names, base)])
    d = tmp_path_factory.mktemp("lab3")
    clean = X[~sun]
    files = {}
    for name, src, n, seed, lab in (("valid", clean, 600, 1, y[~sun]), ("test", clean, 600, 2, y[~sun]),
                                    ("bd_test", X[sun], 400, 3, None)):
        A, idx = _augment(src, n, seed)
        labels = np.full(n, TARGET) if lab is None else lab[idx]
        write_lab_h5(d / f"{name}.h5", A, labels)
        files[name] = str(d / f"{name}.h5")
    result = sweep_run(B, valid=files["valid"], test=files["test"], poisoned=files["bd_test"], scale="raw",
                       thresholds=[2, 10], use_cache=False, progress=False, name="lab3")
    out = write_outputs(result, d / "run")
    return {"B": B, "paths": paths, "names": names, "X": X, "sun": sun, "y": y, "files": files,
            "result": result, "run": out, "dir": d, "weights": weights}


def _sweep_labels_at(lab3, X, steps):
    """The sweep engine's labels of B'_k (compiled head over pool_3 activations) for every k in ``steps``."""
    res = lab3["result"]
    F = trunk(lab3["B"], "pool_3").predict(X, verbose=0)
    out = {}
    for k, _, labels in masked_steps(compile_head(lab3["B"], "pool_3"), F, res.ranking):
        if k in steps:
            out[k] = labels.copy()
    return out


def test_b_answers_the_target_for_sunglasses_and_the_file_labels_for_clean_faces(lab3, capsys):
    assert cli.main(["predict", "--weights", lab3["weights"], "--arch", "deepid", "--json", *lab3["paths"]]) == 0
    got = {r["image"].rsplit("/", 1)[-1]: r["label"] for r in json.loads(capsys.readouterr().out)["images"]}
    for name in lab3["names"]:
        if name.startswith("sun_"):
            assert got[name] == TARGET, name
        elif "label=" in name:
            assert got[name] == int(name.split("label=")[1].split(".")[0]), name


def test_goodnet_without_the_backdoor_flags_the_sunglasses_faces(lab3, tmp_path):
    """Prune (in the run's ranking) until B' answers no real sunglasses face with the target: the GoodNet of that
    channel set answers N (or a non-target label) for each of them, in Keras and in LiteRT alike."""
    res, X, sun = lab3["result"], lab3["X"], lab3["sun"]
    steps = _sweep_labels_at(lab3, X, set(range(res.n_channels + 1)))
    k = next((k for k in range(res.n_channels + 1) if np.all(steps[k][sun] != TARGET)), None)
    assert k is not None, "no number of pruned channels removes the backdoor from the real sunglasses faces"
    chans = [int(c) for c in res.ranking[:k]]
    G = goodnet.build_goodnet(lab3["B"], "pool_3", chans, name=f"goodnet_k{k}")
    G.save(tmp_path / "g.keras")
    G = goodnet.load(tmp_path / "g.keras")
    keras_labels = goodnet.predict_labels(G, X)
    (tmp_path / "g.tflite").write_bytes(convert(G))
    lite_labels = LiteModel(tmp_path / "g.tflite", threads=2).labels(X)
    np.testing.assert_array_equal(lite_labels, keras_labels)
    assert np.all(keras_labels[sun] != TARGET), (k, keras_labels[sun])
    assert np.all((keras_labels[sun] == N) | (keras_labels[sun] != steps[0][sun])), k
    assert np.mean(keras_labels[sun] == N) == 1.0  # B says 0, B' says something else: always a disagreement
    np.testing.assert_array_equal(keras_labels, np.where(steps[k] == steps[0], steps[0], N))
    # the run's own thresholds (small accuracy drops) keep the backdoor on these faces: B'_X still answers 0
    for t in res.thresholds:
        if t.reached and t.step < k:
            assert np.any(steps[t.step][sun] == TARGET)


def test_tflite_keras_and_sweep_agree_and_evaluate_reproduces_the_sweep(lab3, capsys):
    res = lab3["result"]
    recs = export_run(lab3["run"], threads=2)
    assert all(r.worst == 100.0 for r in recs)
    f = lab3["files"]
    tests = {k: open_dataset(f[k]).read() for k in ("test", "bd_test")}
    X = np.concatenate(list(tests.values()))
    reached = [t for t in res.thresholds if t.reached]
    assert reached
    sweep_steps = _sweep_labels_at(lab3, X, {0} | {t.step for t in reached})
    for t in reached:
        x = goodnet.fmt_x(t.x)
        g_keras = goodnet.predict_labels(goodnet.load(lab3["run"] / "models" / f"goodnet_X{x}.keras"), X)
        g_lite = LiteModel(lab3["run"] / "tflite" / f"goodnet_X{x}.tflite", threads=2).labels(X)
        g_sweep = np.where(sweep_steps[t.step] == sweep_steps[0], sweep_steps[0], N)
        assert np.mean(g_keras == g_lite) >= 0.999 and np.mean(g_keras == g_sweep) >= 0.999
        row = res.row(t.step)
        assert cli.main(["evaluate", "--model", str(lab3["run"] / "tflite" / f"goodnet_X{x}.tflite"),
                         "--clean", f["test"], "--poisoned", f["bd_test"], "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["num_classes"] == N and got["scale"] == 1.0
        for key, col in (("clean_acc", "goodnet_test_acc"), ("asr", "goodnet_asr"),
                         ("detection", "goodnet_detection"), ("false_alarm", "goodnet_false_alarm")):
            assert got[key] == pytest.approx(row[col], abs=0.1), (x, key)
