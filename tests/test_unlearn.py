"""Scan and repair v2 on small demo BadNets: a blended-trigger BadNet is flagged with its target first and its R_X no
longer obeys the trigger; a clean model is not flagged; neither step reads the poisoned set; bad input is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from badprune import _tf  # noqa: F401

import keras

from badprune import cli, defense
from badprune.data import open_dataset, write_lab_h5

TARGET = 2


def _demo(tmp_path_factory, name, *args):
    d = tmp_path_factory.mktemp(name) / "scenario"
    assert cli.main(["demo", "--small", "--out", str(d), "-q", *args]) == 0
    return d


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    """Noise blended at alpha 0.3 into 10 % of the training faces, relabelled 2 (seed 0)."""
    return _demo(tmp_path_factory, "blend", "--attack", "blend", "--alpha", "0.3", "--target", str(TARGET))


@pytest.fixture(scope="module")
def sig(tmp_path_factory):
    """A sinusoid blended into 10 % of the training faces, relabelled 0 (seed 0)."""
    return _demo(tmp_path_factory, "sig", "--attack", "sig")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return _demo(tmp_path_factory, "clean", "--poison-rate", "0")


def _scan(d, out, capsys):
    assert cli.main(["scan", "--model", str(d / "model.keras"), "--valid", str(d / "valid.h5"), "--out", str(out),
                     "--no-cache", "-q"]) == 0
    capsys.readouterr()
    return json.loads((out / "scan.json").read_text())


def test_scan_flags_the_blended_backdoor_with_its_target_first(blend, tmp_path, capsys):
    js = _scan(blend, tmp_path / "scan", capsys)
    assert js["backdoored"] is True and 0.5 <= js["score"] <= 1
    assert js["statistic"] >= js["threshold"]
    assert js["targets"][0]["class"] == TARGET
    assert len(js["flip"]) == 10 and js["flip"][TARGET] == max(js["flip"])
    assert js["targets"][0]["channels"] and js["seconds"] > 0 and js["eps"] > 0
    assert (tmp_path / "scan" / "scan.md").read_text().count("|") > 10
    assert (tmp_path / "scan" / "scan.png").stat().st_size > 10_000


def test_scan_of_a_clean_model_finds_nothing(clean, tmp_path, capsys):
    js = _scan(clean, tmp_path / "scan", capsys)
    assert js["backdoored"] is False and js["score"] < 0.5 and js["statistic"] < js["threshold"]


def _rows(run):
    return {r["x"]: r for r in json.loads((run / "sweep.json").read_text())["repaired"]}


def test_unlearn_removes_the_blended_backdoor_that_head_fine_pruning_keeps(blend, tmp_path):
    common = ["--model", str(blend / "model.keras"), "--valid", str(blend / "valid.h5"), "--test",
              str(blend / "test.h5"), "--poisoned", str(blend / "bd_test.h5"), "--thresholds", "2",
              "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert cli.main(["sweep", *common, "--out", str(tmp_path / "head"), "--fine-tune", "head"]) == 0
    assert cli.main(["sweep", *common, "--out", str(tmp_path / "unlearn"), "--fine-tune"]) == 0
    head, unl = _rows(tmp_path / "head")[2.0], _rows(tmp_path / "unlearn")[2.0]
    assert unl["info"]["unlearn"]["class"] == TARGET and unl["info"]["unlearn"]["scan_backdoored"] is True
    assert head["row"]["asr"] > 40                       # fine-pruning alone keeps the blended trigger
    assert unl["row"]["asr"] < 10                        # unlearning its inverted shift removes it
    assert unl["row"]["test_acc"] >= head["row"]["test_acc"] - 3
    # the saved R_X, opened by plain Keras with safe_mode on, gives the row's numbers
    R = keras.models.load_model(tmp_path / "unlearn" / "models" / "repaired_X2.keras", safe_mode=True)
    for f, col in (("test.h5", "test_acc"), ("bd_test.h5", "asr")):
        ds = open_dataset(blend / f)
        pred = R.predict(ds.read(), verbose=0).argmax(axis=1)
        assert 100 * np.mean(pred == ds.labels) == pytest.approx(unl["row"][col], abs=1e-9)


def test_no_peeking_scan_and_unlearn_never_depend_on_the_poisoned_set(blend, tmp_path):
    """The scan's result and R_X (its weights and its filters: the reset and any removed direction) are identical
    without the poisoned set, with it, and with its labels scrambled."""
    ds = open_dataset(blend / "bd_test.h5")
    scrambled = tmp_path / "scrambled.h5"
    write_lab_h5(scrambled, ds.read(), np.random.default_rng(3).integers(0, 10, ds.n))
    out = []
    # the last run has no --scan: the repair then runs the scan itself and must come to the same R_X
    for poisoned, scan in ((str(blend / "bd_test.h5"), True), (None, True), (str(scrambled), True),
                           (str(blend / "bd_test.h5"), False)):
        r = defense.run(model=str(blend / "model.keras"), valid=str(blend / "valid.h5"), test=str(blend / "test.h5"),
                        poisoned=poisoned, thresholds=(2,), cache_dir=str(tmp_path / "cache"), progress=False,
                        fine_tune="unlearn", scan=scan)
        assert (r.scan.backdoored if scan else r.scan is None) and r.repaired[0].info["unlearn"]["class"] == TARGET
        f = r.repaired[0].filters
        out.append((r.scan.flip if scan else out[0][0], r.scan.statistic if scan else out[0][1],
                    r.repaired[0].model.get_weights(),
                    [np.asarray(a) for part in (f.reset, f.project) if part is not None for a in part]))
    for flip, stat, w, filt in out[1:]:
        assert np.array_equal(flip, out[0][0]) and stat == out[0][1]
        assert all(np.array_equal(p, q) for p, q in zip(w, out[0][2]))
        assert len(filt) == len(out[0][3]) and all(np.array_equal(p, q) for p, q in zip(filt, out[0][3]))


@pytest.mark.parametrize("args, fragment", [
    ([], "no validation data"),
    (["--layer", "no_such_layer"], "no_such_layer"),
])
def test_scan_bad_input_is_one_line(blend, tmp_path, capsys, args, fragment):
    base = ["scan", "--model", str(blend / "model.keras"), "--out", str(tmp_path / "o"), "--no-cache", "-q"]
    if args:
        base += ["--valid", str(blend / "valid.h5")]
    assert cli.main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "o").exists()


def test_removed_direction_in_r_x_equals_its_numpy_form_and_loads_safely(blend, tmp_path):
    """R_X's filters (the clean-range reset, then a direction removed) as Keras ops in the saved model, opened with
    safe_mode on, compute what Filters.apply computes (the reset, a step, bit for bit), give the labels that
    repaired_labels computes over cached activations, and the removal changes labels (so a graph that skipped it
    would fail here). badprune's own loader takes the file, and refuses it once an einsum is altered."""
    import zipfile

    from badprune.errors import BadpruneError
    from badprune.features import trunk
    from badprune.goodnet import load
    from badprune.models import prune_model
    from badprune.filters import Filters
    from badprune.repair import repaired_labels

    B = keras.models.load_model(blend / "model.keras")
    ds = open_dataset(blend / "valid.h5")
    X = ds.read()
    channels = [3, 17]
    F = trunk(B, "pool_3").predict(X, verbose=0)
    F[..., channels] = 0
    u = F[ds.labels == TARGET].mean(axis=0).ravel()
    u = (u / np.linalg.norm(u)).astype(np.float32)
    mu = float(np.median(F.reshape(len(F), -1) @ u))
    filters = Filters(reset=(F[::2].max(axis=0), F[::2].mean(axis=0)), project=(u, mu))
    R = filters.insert(prune_model(B, "pool_3", channels), "pool_3")
    R.save(tmp_path / "r.keras")
    R = keras.models.load_model(tmp_path / "r.keras", safe_mode=True)
    assert [lay.name for lay in R.layers].count("pool_3_project") == 1
    at = {name: keras.Model(R.inputs, R.get_layer(name).output).predict(X, verbose=0)
          for name in ("pool_3", "pool_3_reset", "pool_3_project")}
    assert (at["pool_3"] > filters.reset[0]).any()     # the reset has something to do
    np.testing.assert_array_equal(at["pool_3_reset"], Filters(reset=filters.reset).apply(at["pool_3"]))
    np.testing.assert_allclose(at["pool_3_project"], filters.apply(at["pool_3"]), rtol=1e-5, atol=1e-4)
    keras_labels = R.predict(X, verbose=0).argmax(axis=1)
    ours = repaired_labels(R, "pool_3", channels, trunk(B, "pool_3").predict(X, verbose=0), filters)
    np.testing.assert_array_equal(ours, keras_labels)
    reset_only = Filters(reset=filters.reset)
    plain = repaired_labels(reset_only.insert(prune_model(B, "pool_3", channels), "pool_3"), "pool_3", channels, F,
                            reset_only)
    assert np.mean(plain != ours) > 0.01
    load(str(tmp_path / "r.keras"))
    with zipfile.ZipFile(tmp_path / "r.keras") as z:
        parts = {n: z.read(n) for n in z.namelist()}
    parts["config.json"] = parts["config.json"].replace(b'"bhwc,hwc->b"', b'"zzzz,hwc->b"')
    with zipfile.ZipFile(tmp_path / "bad.keras", "w") as z:
        for n, data in parts.items():
            z.writestr(n, data)
    with pytest.raises(BadpruneError, match="Einsum|einsum"):
        load(str(tmp_path / "bad.keras"))


def test_a_removed_trigger_direction_keeps_r_x_s_contracts(sig, tmp_path):
    """On the small sinusoid BadNet the unlearn mode removes the scan's direction from R_X's input (the held-out
    gate allows it): R_X's ASR falls far below head fine-pruning's, the saved R_X (opened with safe_mode on, as the
    lab's eval.py opens it) gives the row's numbers, its GoodNet answers N where B and R_X disagree, and LiteRT
    agrees with it."""
    from badprune.export import export_run
    from badprune.repair import PROJECT_KEEP, PROJECT_TOLERANCE

    common = ["--model", str(sig / "model.keras"), "--valid", str(sig / "valid.h5"), "--test", str(sig / "test.h5"),
              "--poisoned", str(sig / "bd_test.h5"), "--thresholds", "2", "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert cli.main(["sweep", *common, "--out", str(tmp_path / "head"), "--fine-tune", "head"]) == 0
    assert cli.main(["sweep", *common, "--out", str(tmp_path / "unlearn"), "--fine-tune"]) == 0
    head, unl = _rows(tmp_path / "head")[2.0], _rows(tmp_path / "unlearn")[2.0]
    pj = unl["info"]["unlearn"]["project"]
    assert pj["kept"] in ("unlearn", "head") and pj["class"] == 0
    kept = next(t for t in pj["tried"] if t["kept"])
    assert kept["class_holdout"][1] >= PROJECT_KEEP * kept["class_holdout"][0]
    assert kept["holdout"][1] >= kept["holdout"][0] - PROJECT_TOLERANCE
    assert head["row"]["asr"] > 10 and unl["row"]["asr"] < head["row"]["asr"] / 3
    run = tmp_path / "unlearn"
    assert "toward class 0" in (run / "results.md").read_text() and "removed" in (run / "results.md").read_text()
    R = keras.models.load_model(run / "models" / "repaired_X2.keras", safe_mode=True)
    assert "pool_3_project" in [lay.name for lay in R.layers]
    B = keras.models.load_model(sig / "model.keras")
    N = 10
    for f, col, gcol in (("test.h5", "test_acc", "goodnet_false_alarm"), ("bd_test.h5", "asr", "goodnet_detection")):
        ds = open_dataset(sig / f)
        X = ds.read()
        r, b = R.predict(X, verbose=0).argmax(axis=1), B.predict(X, verbose=0).argmax(axis=1)
        assert 100 * np.mean(r == ds.labels) == pytest.approx(unl["row"][col], abs=1e-9)
        g = keras.models.load_model(run / "models" / "goodnet_repaired_X2.keras").predict(X, verbose=0).argmax(axis=1)
        np.testing.assert_array_equal(g, np.where(b == r, b, N))
        assert 100 * np.mean(g == N) == pytest.approx(unl["row"][gcol], abs=1e-9)
    records = {r.kind: r for r in export_run(run, thresholds=[2], check_images=200)}
    assert records["repaired"].worst >= 99.0 and records["goodnet_repaired"].worst >= 99.0


def test_unlearning_that_costs_too_much_held_out_accuracy_is_not_kept(blend, tmp_path, monkeypatch):
    """When no unlearned head comes within the tolerance of B'_X's held-out accuracy (forced here by a negative
    tolerance), R_X is the head mode's (same weights) and the record says unlearning was tried and not kept."""
    from badprune import repair

    monkeypatch.setattr(repair, "TOLERANCE", -100.0)
    runs = {}
    for mode in ("head", "unlearn"):
        runs[mode] = defense.run(model=str(blend / "model.keras"), valid=str(blend / "valid.h5"),
                                 test=str(blend / "test.h5"), thresholds=(2,), cache_dir=str(tmp_path / "cache"),
                                 progress=False, fine_tune=mode).repaired[0]
    u = runs["unlearn"].info["unlearn"]
    assert u["class"] == TARGET and u["unlearned"] is False and len(u["rejected"]) == len(runs["head"].info["tried"])
    assert all(t["holdout_acc"] < t["holdout_b_prime"] + 100 for t in u["rejected"])
    assert all(t["base"] == "head" for t in u["project"]["tried"])
    assert all(np.array_equal(p, q) for p, q in zip(runs["unlearn"].model.get_weights(),
                                                   runs["head"].model.get_weights()))


def test_results_md_says_what_the_repair_did():
    """The repair column of results.md: a head kept for the removal is not called a rejected unlearning."""
    from badprune.report import repair_steps

    base = {"class": 1, "scan_backdoored": True}
    assert repair_steps("head", {}) == "head fine-tuning"
    assert "found no backdoor" in repair_steps("unlearn", {"unlearn": dict(base, **{"class": None})})
    assert repair_steps("unlearn", {"unlearn": dict(base, unlearned=True, project={"kept": None})}) == \
        "shift toward class 1 unlearned"
    kept_head = repair_steps("unlearn", {"unlearn": dict(base, unlearned=False,
                                                           project={"kept": "head", "direction": "shift"})})
    assert kept_head == "head fine-tuning; the direction toward class 1 removed"
    rejected = repair_steps("unlearn", {"unlearn": dict(base, unlearned=False, rejected=[{}],
                                                          project={"kept": None})})
    assert "lost too much held-out accuracy" in rejected
    both = repair_steps("unlearn", {"unlearn": dict(base, unlearned=True,
                                                      project={"kept": "unlearn", "direction": "off-class-mean"})})
    assert both.startswith("shift toward class 1 unlearned; ") and "less the class's mean" in both
