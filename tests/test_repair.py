"""Fine-pruning (badprune.repair) on the small demo BadNet: R_X in both modes, exactly zero pruned channels, metrics
equal TensorFlow on the saved models, no peeking at the poisoned set, `repair` on a run equals `--fine-tune`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from badprune import _tf  # noqa: F401

import keras

from badprune import cli
from badprune.data import open_dataset, write_lab_h5
from badprune.datasets import ensure_demo
from badprune.defense import run as sweep_run
from badprune.repair import TOLERANCE


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    return ensure_demo(str(tmp_path_factory.mktemp("demo")), small=True, progress=False)


def _files(sc):
    return ["--model", sc.model, "--valid", sc.valid, "--test", sc.test, "--poisoned", sc.bd_test]


@pytest.fixture(scope="module")
def runs(sc, tmp_path_factory):
    """A sweep with --fine-tune head, and the same sweep without it followed by `repair`, sharing one cache."""
    d = tmp_path_factory.mktemp("runs")
    cache = str(d / "cache")
    common = _files(sc) + ["--cache-dir", cache, "--thresholds", "2", "10", "-q"]
    assert cli.main(["sweep"] + common + ["--out", str(d / "tuned"), "--fine-tune"]) == 0  # the recommended mode, as `repair`
    assert cli.main(["sweep"] + common + ["--out", str(d / "later")]) == 0
    assert not (d / "later" / "models" / "repaired_X2.keras").exists()
    assert cli.main(["repair", str(d / "later"), "-q"]) == 0
    return d


def _json(run):
    return json.loads((run / "sweep.json").read_text())


def _images(path, scale):
    ds = open_dataset(path)
    return ds.read(scale), ds.labels


def _pool3_zero(model, channels, X):
    trunk = keras.Model(model.inputs, model.get_layer("pool_3").output)
    out = trunk.predict(X, verbose=0)
    return bool(np.all(out[..., channels] == 0))


def test_head_mode_writes_r_x_and_keeps_pruned_channels_exactly_zero(sc, runs):
    run = runs / "tuned"
    js = _json(run)
    assert [r["x"] for r in js["repaired"]] == [2.0, 10.0]
    assert "## Repaired network R_X" in (run / "results.md").read_text()
    X, _ = _images(sc.test, js["config"]["scale_value"])
    for r in js["repaired"]:
        x = int(r["x"])
        t = next(t for t in js["thresholds"] if t["x"] == r["x"])
        assert r["channels"] == t["channels"] and r["step"] == t["step"] and r["mode"] == "unlearn"
        R = keras.models.load_model(run / "models" / f"repaired_X{x}.keras")
        k, b = R.get_layer("conv_3").get_weights()
        assert np.all(k[..., r["channels"]] == 0) and np.all(b[r["channels"]] == 0)
        assert _pool3_zero(R, r["channels"], X)
        assert (run / "models" / f"goodnet_repaired_X{x}.keras").exists()
        # the head was trained: R_X is not B'_X
        Bp = keras.models.load_model(run / "models" / f"B_prime_X{x}.keras")
        assert not np.array_equal(R.get_layer("output").get_weights()[0], Bp.get_layer("output").get_weights()[0])
        # ... and it helps: on the small demo pruning alone leaves the backdoor (B'_X's ASR >= 90 %), R_X removes
        # it (ASR under 10 %) at a clean accuracy within the recipe's tolerance of B'_X's
        assert t["row"]["asr"] >= 90.0 and r["row"]["asr"] < 10.0, (t["row"], r["row"])
        assert r["row"]["test_acc"] >= t["row"]["test_acc"] - TOLERANCE, (t["row"], r["row"])


def test_repaired_metrics_equal_tensorflow_on_the_saved_models(sc, runs):
    """The rows computed over the cached features by prune_ext equal plain Keras running the saved files, as the
    lab's eval.py does (argmax of predict)."""
    run = runs / "tuned"
    js = _json(run)
    scale = js["config"]["scale_value"]
    N = js["num_classes"]
    Xt, yt = _images(sc.test, scale)
    Xp, yp = _images(sc.bd_test, scale)
    B = keras.models.load_model(sc.model)
    bt, bp = B.predict(Xt, verbose=0).argmax(1), B.predict(Xp, verbose=0).argmax(1)
    for r in js["repaired"]:
        x = int(r["x"])
        R = keras.models.load_model(run / "models" / f"repaired_X{x}.keras")
        rt, rp = R.predict(Xt, verbose=0).argmax(1), R.predict(Xp, verbose=0).argmax(1)
        assert r["row"]["test_acc"] == pytest.approx(100 * np.mean(rt == yt), abs=1e-9)
        assert r["row"]["asr"] == pytest.approx(100 * np.mean(rp == yp), abs=1e-9)
        g = keras.models.load_model(run / "models" / f"goodnet_repaired_X{x}.keras")
        gt = g.predict(Xt, verbose=0).argmax(1)
        np.testing.assert_array_equal(gt, np.where(bt == rt, bt, N))
        gp = g.predict(Xp, verbose=0).argmax(1)
        np.testing.assert_array_equal(gp, np.where(bp == rp, bp, N))
        assert r["row"]["goodnet_detection"] == pytest.approx(100 * np.mean(gp == N), abs=1e-9)
        assert r["row"]["goodnet_false_alarm"] == pytest.approx(100 * np.mean(gt == N), abs=1e-9)


def test_repair_on_an_existing_run_equals_fine_tune_in_the_sweep(runs):
    a, b = _json(runs / "tuned"), _json(runs / "later")
    assert [r["row"] for r in a["repaired"]] == [r["row"] for r in b["repaired"]]
    for x in (2, 10):
        wa = keras.models.load_model(runs / "tuned" / "models" / f"repaired_X{x}.keras").get_weights()
        wb = keras.models.load_model(runs / "later" / "models" / f"repaired_X{x}.keras").get_weights()
        assert all(np.array_equal(p, q) for p, q in zip(wa, wb))
    assert (runs / "later" / "sweep.csv").read_text() == (runs / "tuned" / "sweep.csv").read_text()


def test_no_peeking_the_poisoned_set_changes_nothing_in_r_x(sc, tmp_path):
    """R_X's weights are identical without the poisoned set, with it, and with its labels scrambled."""
    ds = open_dataset(sc.bd_test)
    X = ds.read()
    scrambled = tmp_path / "scrambled.h5"
    write_lab_h5(scrambled, X, np.random.default_rng(3).integers(0, sc.num_classes, len(X)))
    weights = []
    for poisoned in (sc.bd_test, None, str(scrambled)):
        r = sweep_run(model=sc.model, valid=sc.valid, test=sc.test, poisoned=poisoned, thresholds=(4,),
                      cache_dir=str(tmp_path / "cache"), progress=False, fine_tune="head")
        assert len(r.repaired) == 1
        weights.append(r.repaired[0].model.get_weights())
    for other in weights[1:]:
        assert all(np.array_equal(p, q) for p, q in zip(weights[0], other))


def test_full_mode_trains_the_whole_network_and_keeps_the_channels_zero(sc, tmp_path):
    r = sweep_run(model=sc.model, valid=sc.valid, test=sc.test, poisoned=sc.bd_test, thresholds=(4,),
                  cache_dir=str(tmp_path / "cache"), progress=False, fine_tune="full", fine_tune_epochs=1)
    rep = r.repaired[0]
    assert rep.mode == "full" and rep.info["epochs"] == 1
    B = keras.models.load_model(sc.model)
    k, b = rep.model.get_layer("conv_3").get_weights()
    assert np.all(k[..., rep.channels] == 0) and np.all(b[rep.channels] == 0)
    assert not np.array_equal(rep.model.get_layer("conv_1").get_weights()[0], B.get_layer("conv_1").get_weights()[0])
    scale = r.config["scale_value"]
    Xt, yt = _images(sc.test, scale)
    Xp, yp = _images(sc.bd_test, scale)
    assert _pool3_zero(rep.model, rep.channels, Xt)
    assert rep.row["test_acc"] == pytest.approx(100 * np.mean(rep.model.predict(Xt, verbose=0).argmax(1) == yt))
    assert rep.row["asr"] == pytest.approx(100 * np.mean(rep.model.predict(Xp, verbose=0).argmax(1) == yp))


@pytest.mark.parametrize("extra, fragment", [
    (["--fine-tune", "head", "--fine-tune-epochs", "0"], "--fine-tune-epochs must be a whole number of at least 1"),
    (["--fine-tune", "head", "--fine-tune-lr", "-1"], "--fine-tune-lr must be a positive learning rate"),
    (["--fine-tune", "bogus"], "invalid choice: 'bogus'"),
    (["--fine-tune-epochs", "3"], "--fine-tune-epochs goes with --fine-tune"),
])
def test_bad_fine_tune_values_are_one_line(sc, tmp_path, capsys, extra, fragment):
    out = tmp_path / "run"
    rc = cli.main(["sweep"] + _files(sc) + ["--out", str(out), "-q"] + extra)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not out.exists()


def test_repair_needs_the_runs_activations(sc, tmp_path, capsys):
    out = tmp_path / "nocache"
    assert cli.main(["sweep"] + _files(sc) + ["--out", str(out), "--no-cache", "--no-models", "-q"]) == 0
    capsys.readouterr()
    before = sorted(os.listdir(out))
    assert cli.main(["repair", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no cached activations" in err[0] and "--fine-tune" in err[0], err
    assert sorted(os.listdir(out)) == before
    assert cli.main(["repair", str(tmp_path / "nowhere"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run folder not found" in err[0]


def test_repaired_models_export_to_litert_and_agree(runs):
    from badprune.export import export_run

    records = export_run(runs / "tuned", thresholds=[2], check_images=200)
    kinds = {r.kind: r for r in records}
    assert set(kinds) == {"B_prime", "goodnet", "repaired", "goodnet_repaired"}
    for r in records:
        assert os.path.isfile(r.path) and r.worst >= 99.0, r
    R = keras.models.load_model(runs / "tuned" / "models" / "repaired_X2.keras")
    assert R.get_layer("pool_3_reset") is not None  # the clean-range reset sits after the prune layer
