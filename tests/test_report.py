"""Tests for badprune.report: the output folder (CSV, JSON, Markdown, PNG, pruned models), its atomic writing and
the console text."""
from __future__ import annotations

import csv
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from badprune import report
from badprune.errors import BadpruneError
from badprune.sweep import COLUMNS, SweepResult, Threshold

C = 6
XS = (2.0, 2.5, 4.0, 10.0, 99.0)  # 99 is never reached


# ------------------------------------------------------------------------------------------------ fixtures
def _tiny_model():
    from badprune import _tf  # noqa: F401
    import keras

    L = keras.layers
    x = keras.Input(shape=(8, 8, 3), name="input")
    h = L.Conv2D(C, 3, activation="relu", name="conv")(x)
    h = L.MaxPooling2D(name="pool")(h)
    h = L.Flatten(name="flatten")(h)
    y = L.Dense(4, activation="softmax", name="out")(h)
    model = keras.Model(x, y, name="tiny")
    conv = model.get_layer("conv")
    k, b = conv.get_weights()
    rng = np.random.default_rng(1)
    # no zero in the original kernel/bias, so "zeroed" in the pruned model can only come from pruning
    conv.set_weights([rng.uniform(0.1, 1.0, k.shape).astype("float32"), (0.1 + np.arange(C) / 10).astype("float32")])
    return model


def make_result(model=None, xs=XS, relative=False) -> SweepResult:
    rng = np.random.default_rng(0)
    mean_act = rng.uniform(0.0, 5.0, C)
    mean_act[2] = 0.0  # a dormant channel
    ranking = np.argsort(mean_act, kind="stable")
    steps = np.arange(C + 1)
    valid = np.array([98.0, 97.5, 96.9, 95.25, 90.0, 60.0, 10.0])
    test = valid - 0.3
    asr = np.array([100.0, 100.0, 99.5, 80.125, 20.0, 5.0, 1.0])
    table = {
        "step": steps,
        "channel": np.concatenate([[-1], ranking]).astype(np.int64),
        "mean_activation": np.concatenate([[np.nan], mean_act[ranking]]),
        "fraction_pruned": steps / C,
        "valid_acc": valid,
        "test_acc": test,
        "asr": asr,
        "goodnet_test_acc": test - np.linspace(0, 5, C + 1),
        "goodnet_asr": np.maximum(0.0, asr - 90.0),
        "goodnet_detection": np.linspace(0.0, 99.0, C + 1),
        "goodnet_false_alarm": np.linspace(0.0, 4.0, C + 1),
    }
    table["goodnet_detection"][0] = np.nan  # G at step 0 is B itself: leave one value missing
    thresholds = []
    for x in xs:
        drop = valid[0] - valid
        hit = np.nonzero(drop >= x)[0]
        step = int(hit[0]) if hit.size else None
        thresholds.append(Threshold(x=x, step=step, channels=[int(c) for c in ranking[:step]] if step else []))
    return SweepResult(
        model_name="tiny", layer="pool", conv_layer="conv", n_channels=C, ranking=ranking, mean_activation=mean_act,
        table=table, thresholds=thresholds, relative=relative, num_classes=4,
        config={"valid": "data/valid.h5", "test": "data/test.h5", "poisoned": "data/bd_test.h5",
                "sizes": {"valid": np.int64(100), "test": 200, "poisoned": 50}, "path": Path("/x/y.h5")},
        timings={"sweep": 0.8412, "load": np.float32(1.5)},
        versions={"numpy": np.__version__},
        model=model,
    )


@pytest.fixture(scope="module")
def result():
    # pruned models come from the real badprune.models.prune_model (via SweepResult.pruned_model)
    return make_result(_tiny_model())


@pytest.fixture(scope="module")
def written(result, tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "run1"
    got = report.write_outputs(result, out)
    assert got == out.absolute()
    return out


def _siblings(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


# ------------------------------------------------------------------------------------------------ contents
def test_folder_contents(written):
    names = sorted(p.name for p in written.iterdir())
    assert names == ["models", "results.md", "sweep.csv", "sweep.json", "sweep.png"]
    assert sorted(p.name for p in (written / "models").iterdir()) == [
        "B_prime_X10.keras", "B_prime_X2.5.keras", "B_prime_X2.keras", "B_prime_X4.keras",
        "goodnet_X10.keras", "goodnet_X2.5.keras", "goodnet_X2.keras", "goodnet_X4.keras"]
    assert _siblings(written) == []  # no temp folder left


def test_csv_round_trip(written, result):
    with open(written / "sweep.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == COLUMNS
    body = rows[1:]
    assert len(body) == C + 1
    for k, r in enumerate(body):
        d = dict(zip(COLUMNS, r))
        assert int(d["step"]) == k
        if k == 0:
            assert d["channel"] == "" and d["mean_activation"] == ""
        else:
            assert int(d["channel"]) == int(result.ranking[k - 1])
            assert float(d["mean_activation"]) == pytest.approx(result.table["mean_activation"][k], rel=1e-5)
        for c in COLUMNS[3:]:
            v = result.table[c][k]
            if math.isnan(v):
                assert d[c] == ""
            else:
                assert float(d[c]) == pytest.approx(v, abs=1e-4), (k, c)
    assert body[3][COLUMNS.index("asr")] == "80.1250"


def test_json(written, result):
    def no_nan(s):
        raise AssertionError(f"non-standard JSON constant {s}")

    d = json.loads((written / "sweep.json").read_text(), parse_constant=no_nan)
    assert d["ranking"] == [int(c) for c in result.ranking]
    assert d["layer"] == "pool" and d["conv_layer"] == "conv" and d["model_name"] == "tiny"
    assert d["num_classes"] == 4 and d["relative"] is False
    assert d["mean_activation"] == pytest.approx(list(result.mean_activation))
    assert set(d["table"]) == set(COLUMNS)
    assert d["table"]["channel"][0] is None and d["table"]["channel"][1:] == [int(c) for c in result.ranking]
    assert d["table"]["goodnet_detection"][0] is None  # NaN -> null
    assert d["table"]["valid_acc"] == pytest.approx(list(result.table["valid_acc"]))
    th = {t["x"]: t for t in d["thresholds"]}
    assert sorted(th) == sorted(XS)
    for t in result.thresholds:
        j = th[t.x]
        assert j["reached"] == t.reached and j["step"] == t.step and j["channels"] == t.channels
        if t.reached:
            assert j["row"]["asr"] == pytest.approx(result.table["asr"][t.step])
            assert j["row"]["channel"] == int(result.ranking[t.step - 1])
        else:
            assert j["row"] is None
    assert th[2.0]["step"] == 3 and th[99.0]["reached"] is False
    assert d["config"]["sizes"]["valid"] == 100 and d["config"]["path"] == "/x/y.h5"
    assert d["timings"]["load"] == pytest.approx(1.5)


def test_results_markdown(written, result):
    md = (written / "results.md").read_text()
    lines = md.splitlines()
    assert "## Pruned network B'_X" in lines and "## Repaired network B'_X" not in lines  # R_X is the repaired one
    # every table row has its header's cells, and each reached X's B'_X and G_X rows hold the sweep table's values
    tables, cur = [], None
    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cur is None:
                cur = [cells]
                tables.append(cur)
            else:
                cur.append(cells)
        else:
            cur = None
    assert len(tables) == 2 and all(len(row) == len(t[0]) for t in tables for row in t)
    bp, gx = ({r[0]: r for r in t[2:]} for t in tables)
    t = result.table
    for th in result.thresholds:
        x = report.fmt_x(th.x)
        if th.reached:
            k = th.step
            assert bp[x][1:] == [f"{k}/{C}", f"{100 * k / C:.1f}%"] + [f"{t[c][k]:.2f}%" for c in
                                                                      ("valid_acc", "test_acc", "asr")], x
            assert gx[x][1:] == [f"{t[c][k]:.2f}%" for c in ("goodnet_test_acc", "goodnet_asr",
                                                              "goodnet_detection", "goodnet_false_alarm")], x
    assert any(line.startswith("| B (base) | 0 | 0.0% | 98.00% | 97.70% | 100.00% |") for line in lines)
    # B'_X table: X=2 reached at step 3 (98 -> 95.25)
    assert "| 2 | 3/6 | 50.0% | 95.25% | 94.95% | 80.12% |" in lines  # 80.125 rounds half to even
    for x in ("2", "2.5", "4", "10"):
        assert sum(line.startswith(f"| {x} | ") for line in lines) == 2, x  # one row in each table
    assert sum(line.startswith("| 99 | not reached") for line in lines) == 2
    assert "not reached" not in "".join(line for line in lines if line.startswith("| 10 "))
    # G_X row at X=4 (step 4): test, ASR, detection, false alarm
    g = result.table
    want = (f"| 4 | {g['goodnet_test_acc'][4]:.2f}% | {g['goodnet_asr'][4]:.2f}% | "
            f"{g['goodnet_detection'][4]:.2f}% | {g['goodnet_false_alarm'][4]:.2f}% |")
    assert want in lines
    assert "data/valid.h5" in md and "100 images" in md and "N = 4" in md


def test_png(written):
    data = (written / "sweep.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (960, 600)  # 8x5 in at 120 dpi
    assert len(data) > 5000


def test_models_load_in_plain_keras(written, result):
    """Each B'_X loads with plain keras (no badprune importable or imported) and has exactly its channels zeroed."""
    expect = {report.model_filename(t.x): t.channels for t in result.thresholds if t.reached}
    script = textwrap.dedent(f"""
        import json, sys, os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import numpy as np, keras
        expect = json.loads({json.dumps(json.dumps(expect))})
        out = {{}}
        for name, chans in expect.items():
            m = keras.models.load_model(os.path.join({str(written / "models")!r}, name))
            k, b = m.get_layer("conv").get_weights()
            zeroed = [c for c in range(k.shape[-1]) if not k[..., c].any() and b[c] == 0]
            m.predict(np.zeros((1, 8, 8, 3), "float32"), verbose=0)
            out[name] = zeroed
        print(json.dumps({{"zeroed": out, "badprune_loaded": any(n.startswith("badprune") for n in sys.modules)}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-I", "-c", script], cwd=str(written), env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["badprune_loaded"] is False
    assert got["zeroed"] == {n: sorted(c) for n, c in expect.items()}


# ------------------------------------------------------------------------------------------ atomic writing
def test_existing_folder_without_force_is_untouched(result, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(BadpruneError) as ei:
        report.write_outputs(result, out, save_models=False)
    assert "already exists" in str(ei.value) and "--force" in str(ei.value) and str(out) in str(ei.value)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert _siblings(out) == []


def test_force_replaces(result, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    (out / "sweep.json").write_text("{}")  # an earlier run's folder (--force replaces no other)
    report.write_outputs(result, out, force=True, save_models=False)
    assert sorted(p.name for p in out.iterdir()) == ["results.md", "sweep.csv", "sweep.json", "sweep.png"]
    assert _siblings(out) == []  # neither the temp folder nor the old one is left


def test_empty_existing_folder_needs_no_force(result, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    report.write_outputs(result, out, save_models=False)
    assert (out / "sweep.csv").is_file()


def test_nested_new_folder(result, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    report.write_outputs(result, out, save_models=False)
    assert (out / "sweep.json").is_file()


def test_failure_leaves_nothing(result, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "plot_sweep", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        report.write_outputs(result, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    # with --force, a failure leaves the previous output as it was
    out.mkdir()
    (out / "mine.txt").write_text("old")
    (out / "sweep.json").write_text("{}")  # an earlier run's folder
    with pytest.raises(RuntimeError):
        report.write_outputs(result, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "sweep.json"]
    assert _siblings(out) == []


def test_failure_while_saving_models_leaves_nothing(result, tmp_path, monkeypatch):
    from badprune import models

    def bad_save(model, variants):  # the first file written, then a failure
        with open(variants[0][0], "wb") as f:
            f.write(b"half")
        raise BadpruneError("cannot save", None, None)

    monkeypatch.setattr(models, "save_variants", bad_save)
    out = tmp_path / "out"
    with pytest.raises(BadpruneError, match="cannot save"):
        report.write_outputs(result, out)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_parent(result, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BadpruneError, match="cannot"):
        report.write_outputs(result, f / "out", save_models=False)
    with pytest.raises(BadpruneError, match="not a folder"):
        report.write_outputs(result, f, force=True, save_models=False)
    assert f.read_text() == "x"


def test_no_model_or_save_models_false(tmp_path):
    res = make_result(model=None)
    report.write_outputs(res, tmp_path / "a")
    assert not (tmp_path / "a" / "models").exists()
    res = make_result(model=object())  # save_models=False must not even build the pruned models
    report.write_outputs(res, tmp_path / "b", save_models=False)
    assert not (tmp_path / "b" / "models").exists()


def test_no_threshold_reached(tmp_path):
    res = make_result(model=None, xs=(95.0, 99.0), relative=True)
    out = report.write_outputs(res, tmp_path / "o")
    md = (out / "results.md").read_text()
    assert md.count("not reached") == 2 * (5 + 4) and "% of the base" in md
    d = json.loads((out / "sweep.json").read_text())
    assert d["relative"] is True and all(not t["reached"] for t in d["thresholds"])


# ---------------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("x,want", [(2, "2"), (2.0, "2"), (4.0, "4"), (10.0, "10"), (2.5, "2.5"), (0.25, "0.25"),
                                    (np.float64(3.0), "3")])
def test_fmt_x(x, want):
    assert report.fmt_x(x) == want


def test_format_table(result):
    full = report.format_table(result).splitlines()
    assert full[0].split()[:3] == ["step", "channel", "mean_act"]
    assert len(full) == 1 + (C + 1) + 1  # header, steps, "not reached" line
    assert full[-1] == "not reached: X=99"
    header = full[0]
    for name in ("channel", "valid", "ASR", "G f.alarm"):  # fixed-width, right-aligned columns
        end = header.index(name) + len(name)
        for line in full[1:-1]:
            assert line[end - 1] != " " and line[end:end + 1] in ("", " "), (name, line)
    step3 = full[1 + 3]
    assert step3.split()[0] == "3" and "95.25%" in step3 and "X=2 X=2.5" in step3
    short = report.format_table(result, thresholds_only=True).splitlines()
    assert [line.split()[0] for line in short[1:-1]] == ["0", "3", "4", "5"]
    assert short[1].rstrip().endswith("B")


def test_repair_hint_names_the_repair_when_a_b_prime_keeps_the_backdoor(result):
    # make_result: B'_2 (step 3) ASR 80.1 %, B'_4 (step 4) 20 %, B'_10 (step 5) 5 %
    hint = report.repair_hint(result, "runs/tiny")
    assert "\n" not in hint and hint.startswith("repair: B'_2 still obeys the trigger (ASR 80.1 %); ")
    assert "`badprune-fast repair runs/tiny`" in hint and report.REPAIR_COST in hint
    assert "--fine-tune" in report.repair_hint(result, "runs/tiny", cached=False)
    low = make_result(xs=(10.0, 99.0))  # only B'_10 (5 %) reached: nothing to suggest
    assert report.repair_hint(low, "runs/tiny") is None
    assert report.repair_hint(make_result(xs=(99.0,)), "runs/tiny") is None  # nothing reached, nothing to repair
    low.table["asr"] = np.full(C + 1, np.nan)  # no poisoned set: always
    assert report.repair_hint(low, "runs/tiny").startswith("repair: no poisoned set")


def test_repair_summary_sets_r_x_against_pruning_alone(result):
    from badprune.repair import Repaired

    assert report.repair_summary(result) is None
    result.repaired = [Repaired(x=2.0, mode="head", step=3, channels=[], row={"test_acc": 94.444, "asr": 0.66}),
                       Repaired(x=4.0, mode="head", step=4, channels=[], row={"test_acc": 90.0, "asr": 0.1})]
    try:
        assert report.repair_summary(result) == "R_2: clean 94.4 %, ASR 0.7 %; pruning alone: 95.0 %, 80.1 %"
    finally:
        result.repaired = []


def test_summary_line(result):
    s = report.summary_line(result)
    assert "\n" not in s
    assert s.startswith("pruned 6 channels of pool in 0.84 s; X=2: step 3 valid 95.2% test 95.0% ASR 80.1% | GoodNet")
    assert "X=99: not reached" in s and "X=10: step 5" in s
