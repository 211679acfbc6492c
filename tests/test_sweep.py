"""Ranking, thresholds, metrics and the lab3 equivalence of the whole sweep."""
import glob

import numpy as np
import pytest

from badprune import _tf  # noqa: F401
import keras

from badprune.data import write_lab_h5
from badprune.errors import BadpruneError
from badprune.head import compile_head, masked_steps
from badprune.models import load_model, prune_model
from badprune.sweep import SweepResult, rank_channels, run, select_thresholds

rng = np.random.default_rng(7)


def test_ranking_equals_numpy_mean_and_stable_argsort():
    F = np.maximum(rng.standard_normal((50, 3, 2, 9)), 0).astype(np.float32)
    F[..., 2] = 0
    F[..., 5] = 0          # a tie with channel 2: index order must decide
    F[..., 7] = F[..., 1]  # another tie
    ranking, means = rank_channels(F)
    ref_means = F.astype(np.float64).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(means, ref_means, rtol=1e-12)
    np.testing.assert_array_equal(ranking, np.argsort(ref_means, kind="stable"))
    assert list(ranking[:2]) == [2, 5]
    desc, _ = rank_channels(F, "descending")
    np.testing.assert_array_equal(desc, np.argsort(-ref_means, kind="stable"))
    with pytest.raises(BadpruneError):
        rank_channels(F, "sideways")


def test_threshold_selection_on_hand_made_curves():
    acc = [90.0, 90.0, 89.5, 88.0, 87.99, 85.0, 79.0, 50.0]
    t = {th.x: th.step for th in select_thresholds(acc, [2, 4, 10, 45], ranking=np.arange(7))}
    assert t == {2: 3, 4: 5, 10: 6, 45: None}  # 88.0 is exactly 2 points below: reached
    rel = {th.x: th.step for th in select_thresholds(acc, [2, 10], relative=True)}
    assert rel == {2: 3, 10: 6}  # 2 % of 90 = 1.8 points; 10 % = 9 points -> 81
    ths = select_thresholds(acc, [4], ranking=np.array([6, 5, 4, 3, 2, 1, 0]))
    assert ths[0].channels == [6, 5, 4, 3, 2]
    flat = select_thresholds([50, 50, 50], [2])
    assert flat[0].step is None and not flat[0].reached
    with pytest.raises(BadpruneError):
        select_thresholds(acc, [0])
    with pytest.raises(BadpruneError):
        select_thresholds(acc, [100])


def _lab_faces(shared, n, seed):
    """Real lab faces (../shared/lab/images) with shifts, brightness and noise; labels from the file names."""
    from PIL import Image

    paths = sorted(glob.glob(str(shared / "lab" / "images" / "*")))
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB").resize((47, 55)), np.float32) for p in paths])
    r = np.random.default_rng(seed)
    idx = r.integers(0, len(imgs), n)
    X = imgs[idx].copy()
    for i in range(n):
        X[i] = np.roll(X[i], tuple(r.integers(-2, 3, 2)), (0, 1))
    X = np.clip(X * r.uniform(0.8, 1.2, (n, 1, 1, 1)) + r.normal(0, 4, X.shape), 0, 255).astype(np.float32)
    return X, [paths[i] for i in idx]


def test_lab3_sweep_equals_tensorflow_pruned_models(shared_dir, labels_vs_tf):
    """Real lab3 BadNet, real faces: masked labels = labels of the actual pruned Keras model at every step, but for
    near-ties of the final logits within a float32 rounding bound, at most 1 in 120 per step (conftest)."""
    model = load_model(weights=str(shared_dir / "lab" / "weights" / "lab3_bd_weights.h5"), arch="deepid")
    X, _ = _lab_faces(shared_dir, 240, 0)
    F = keras.Model(model.input, model.get_layer("pool_3").output).predict(X, verbose=0)
    head = compile_head(model, "pool_3")
    ranking, _ = rank_channels(F)
    steps = [lab.copy() for _, _, lab in masked_steps(head, F, ranking, batch_size=100)]
    changed = 0
    for k in range(len(ranking) + 1):
        pm = prune_model(model, "pool_3", [int(c) for c in ranking[:k]])
        ref, _ = labels_vs_tf(pm, X, {f"step {k}": steps[k]}, cap=2)
        changed += int((ref != steps[0]).sum())
    assert changed > 0


#: ``tiny_model`` with 8 filters of scale 0.3, 6 classes, seed 3 and Keras's own names
SMALL = dict(classes=6, seed=3, filters=8, conv_scale=0.3, name=None, input_name=None, flatten_name=None)


def test_run_metrics_match_direct_computation(tmp_path, tiny_model):
    m = tiny_model(**SMALL)
    r = np.random.default_rng(4)
    sets = {}
    for name, n in (("valid", 120), ("test", 100), ("poisoned", 80)):
        X = r.uniform(0, 1, (n, 16, 12, 3)).astype(np.float32)
        y = m.predict(X, verbose=0).argmax(1)
        y[: n // 4] = r.integers(0, 6, n // 4)  # some wrong labels
        if name == "poisoned":
            y[:] = 2
        p = tmp_path / f"{name}.h5"
        write_lab_h5(p, X, y)
        sets[name] = (X, y, str(p))
    res = run(m, valid=sets["valid"][2], test=sets["test"][2], poisoned=sets["poisoned"][2], scale="raw",
              use_cache=False, progress=False, thresholds=[2, 4])
    assert isinstance(res, SweepResult) and res.layer == "pool_a" and res.conv_layer == "conv_a"
    assert res.num_classes == 6 and res.n_channels == 8
    base = {k: m.predict(v[0], verbose=0).argmax(1) for k, v in sets.items()}
    for k in (0, 3, 8):
        pm = prune_model(m, "pool_a", [int(c) for c in res.ranking[:k]])
        pred = {n: pm.predict(v[0], verbose=0).argmax(1) for n, v in sets.items()}
        row = res.row(k)
        assert row["valid_acc"] == pytest.approx(100 * np.mean(pred["valid"] == sets["valid"][1]))
        assert row["test_acc"] == pytest.approx(100 * np.mean(pred["test"] == sets["test"][1]))
        assert row["asr"] == pytest.approx(100 * np.mean(pred["poisoned"] == 2))
        g_t = np.where(pred["test"] == base["test"], pred["test"], 6)
        g_p = np.where(pred["poisoned"] == base["poisoned"], pred["poisoned"], 6)
        assert row["goodnet_test_acc"] == pytest.approx(100 * np.mean(g_t == sets["test"][1]))
        assert row["goodnet_asr"] == pytest.approx(100 * np.mean(g_p == 2))
        assert row["goodnet_detection"] == pytest.approx(100 * np.mean(g_p == 6))
        assert row["goodnet_false_alarm"] == pytest.approx(100 * np.mean(g_t == 6))
    assert res.row(0)["goodnet_detection"] == 0 and res.row(0)["goodnet_false_alarm"] == 0
    t = res.threshold(2)
    if t.reached:
        pm = res.pruned_model(2)
        K, b = pm.get_layer("conv_a").get_weights()
        assert np.all(K[..., t.channels] == 0) and np.all(b[t.channels] == 0)


def test_run_rejects_bad_arguments(tmp_path, tiny_model):
    m = tiny_model(**SMALL)
    X = np.zeros((4, 16, 12, 3), np.float32)
    write_lab_h5(tmp_path / "v.h5", X, np.zeros(4))
    with pytest.raises(BadpruneError):
        run(m, valid=None)
    with pytest.raises(BadpruneError):
        run(m, valid=str(tmp_path / "v.h5"), thresholds=[150], use_cache=False, progress=False)
    with pytest.raises(BadpruneError):
        run(m, valid=str(tmp_path / "v.h5"), scale="big", use_cache=False, progress=False)
