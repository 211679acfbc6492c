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
    """The scan's result and R_X's weights are identical without the poisoned set, with it, and with its labels
    scrambled."""
    ds = open_dataset(blend / "bd_test.h5")
    scrambled = tmp_path / "scrambled.h5"
    write_lab_h5(scrambled, ds.read(), np.random.default_rng(3).integers(0, 10, ds.n))
    out = []
    for poisoned in (str(blend / "bd_test.h5"), None, str(scrambled)):
        r = defense.run(model=str(blend / "model.keras"), valid=str(blend / "valid.h5"), test=str(blend / "test.h5"),
                        poisoned=poisoned, thresholds=(2,), cache_dir=str(tmp_path / "cache"), progress=False,
                        fine_tune="unlearn", scan=True)
        assert r.scan.backdoored and r.repaired[0].info["unlearn"]["class"] == TARGET
        out.append((r.scan.flip, r.scan.statistic, r.repaired[0].model.get_weights()))
    for flip, stat, w in out[1:]:
        assert np.array_equal(flip, out[0][0]) and stat == out[0][1]
        assert all(np.array_equal(p, q) for p, q in zip(w, out[0][2]))


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
