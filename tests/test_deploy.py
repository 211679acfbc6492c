"""Deployable GoodNet on small models: sweep writes G_X, export to LiteRT (float32 / float16 / int8, agreement check
and refusal), the TensorFlow-free runtime, `predict` on image files and h5 sets, `evaluate` = the sweep's metrics."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from badprune import _tf  # noqa: F401
from badprune import cli, goodnet
import badprune
from badprune.data import open_dataset
from badprune.errors import BadpruneError, BadpruneWarning
from badprune.export import export_run, tflite_filename
from badprune.runtime import LiteModel, load_images

#: the folder holding the badprune under test (the source tree in a development install, site-packages in CI):
#: subprocesses put it first on their path, so they run the same package, with its built extensions
SRC = str(Path(badprune.__file__).resolve().parents[1])
#: ``tiny_lab`` as the test_cli files, but more images, float32 pixels and a fifth of the labels random
DEPLOY_LAB = dict(sizes=(("valid", 300), ("test", 200), ("bd_test", 150)), input_name="input", relabel_div=5,
                  dtype=np.float32)


def _sweep(files, out, extra=()):
    return cli.main(["sweep", "--model", files["model"], "--valid", files["valid"], "--test", files["test"],
                     "--poisoned", files["bd_test"], "--out", str(out), "--no-cache", "-q",
                     "--thresholds", "2", "10", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_lab):
    d = tmp_path_factory.mktemp("deploy")
    m, files = tiny_lab(d, **DEPLOY_LAB)
    assert _sweep(files, d / "run", ["--export"]) == 0
    js = json.loads((d / "run" / "sweep.json").read_text())
    reached = [t for t in js["thresholds"] if t["reached"]]
    assert len(reached) == 2 and js["config"]["scale"] == "unit"
    return {"dir": d / "run", "files": files, "model": m, "js": js, "reached": reached}


def _xs(run):
    return [goodnet.fmt_x(t["x"]) for t in run["reached"]]


def _read(path, scale=1 / 255):
    ds = open_dataset(path)
    return ds.read(scale), ds.labels


# ------------------------------------------------------------------------------------------------- files
def test_sweep_writes_goodnets_and_float32_exports(run):
    d = run["dir"]
    for x in _xs(run):
        assert (d / "models" / f"B_prime_X{x}.keras").is_file()
        assert (d / "models" / f"goodnet_X{x}.keras").is_file()
        assert (d / "tflite" / f"B_prime_X{x}.tflite").stat().st_size > 1000
        assert (d / "tflite" / f"goodnet_X{x}.tflite").stat().st_size > 1000
    index = json.loads((d / "tflite" / "export.json").read_text())
    assert len(index) == 2 * len(_xs(run))
    for name, rec in index.items():
        assert rec["quantize"] == "none" and rec["bytes"] == (d / "tflite" / name).stat().st_size
        assert rec["images"] == {"valid": 300, "poisoned": 150}
        assert rec["agreement"] == {"valid": 100.0, "poisoned": 100.0}
    assert not [p for p in d.iterdir() if p.name.startswith(".tflite")]  # no temporary folder left


def test_the_labs_eval_script_runs_on_the_goodnet_files_and_gets_the_sweeps_numbers(run):
    """The lab's eval.py: ``np.argmax(keras.models.load_model(f).predict(x), axis=1)`` on h5 data, unchanged, on
    models/goodnet_X<X>.keras (one output) and on the .tflite GoodNet: the sweep's G_X clean accuracy and ASR."""
    import keras

    from badprune.runtime import LiteModel

    scale = run["js"]["config"]["scale_value"]
    Xt, yt = _read(run["files"]["test"], scale)
    Xp, yp = _read(run["files"]["bd_test"], scale)
    for t in run["reached"]:
        x = goodnet.fmt_x(t["x"])
        g = keras.models.load_model(run["dir"] / "models" / f"goodnet_X{x}.keras")
        assert len(g.outputs) == 1
        lt = np.argmax(g.predict(Xt, verbose=0), axis=1)
        lp = np.argmax(g.predict(Xp, verbose=0), axis=1)
        assert 100 * np.mean(lt == yt) == pytest.approx(t["row"]["goodnet_test_acc"], abs=1e-9)
        assert 100 * np.mean(lp == yp) == pytest.approx(t["row"]["goodnet_asr"], abs=1e-9)
        lite = LiteModel(run["dir"] / "tflite" / f"goodnet_X{x}.tflite")
        assert lite.kind.goodnet and lite.kind.num_classes == run["js"]["num_classes"]
        assert len(lite.run(Xt[:4])) == 1
        np.testing.assert_array_equal(lite.labels(Xt), lt)


def test_channels_png_and_the_poisoned_means_equal_the_cached_activations(run):
    """channels.png is written, and the per-channel means in sweep.json / sweep.csv are the cached activations'."""
    import csv

    from badprune.features import extract

    d, js = run["dir"], run["js"]
    assert (d / "channels.png").stat().st_size > 5000
    scale = js["config"]["scale_value"]
    Fp, Fv = (extract(run["model"], js["layer"], open_dataset(run["files"][k]), scale, progress=False)
              for k in ("bd_test", "valid"))
    want_p = Fp.reshape(-1, Fp.shape[-1]).astype(np.float64).mean(axis=0)
    want_v = Fv.reshape(-1, Fv.shape[-1]).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(js["poisoned_mean_activation"], want_p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(js["mean_activation"], want_v, rtol=1e-5, atol=1e-7)
    rows = list(csv.DictReader((d / "sweep.csv").open()))
    assert rows[0]["poisoned_mean_activation"] == ""
    for r in rows[1:]:
        assert float(r["poisoned_mean_activation"]) == pytest.approx(want_p[int(r["channel"])], rel=1e-5, abs=1e-6)


def _sweep_goodnet_labels(run, x, X):
    """The sweep engine's own GoodNet answer at X's step (compiled head over the prune layer's activations)."""
    from badprune.features import trunk
    from badprune.head import compile_head, masked_steps

    B = run["model"]
    t = next(t for t in run["reached"] if goodnet.fmt_x(t["x"]) == x)
    F = trunk(B, "pool_a").predict(X, verbose=0)
    ranking = np.array(run["js"]["ranking"])
    base = lab = None
    for k, _, labels in masked_steps(compile_head(B, "pool_a"), F, ranking):
        if k == 0:
            base = labels.copy()
        if k == t["step"]:
            lab = labels.copy()
            break
    return np.where(lab == base, lab, 5)


def test_tflite_keras_and_sweep_goodnets_agree(run):
    X = np.concatenate([_read(run["files"]["test"])[0], _read(run["files"]["bd_test"])[0]])
    for x in _xs(run):
        keras_g = goodnet.load(run["dir"] / "models" / f"goodnet_X{x}.keras")
        k = goodnet.predict_labels(keras_g, X)
        lite = LiteModel(run["dir"] / "tflite" / f"goodnet_X{x}.tflite", threads=2, batch_size=64)
        t = lite.labels(X)
        s = _sweep_goodnet_labels(run, x, X)
        assert lite.kind.goodnet and lite.num_classes == 5
        assert np.mean(k == t) >= 0.999 and np.mean(k == s) >= 0.999
        assert 0 < np.mean(k == 5) < 1


def test_evaluate_reproduces_the_sweep_metrics(run, capsys):
    f = run["files"]
    for t in run["reached"]:
        x, row = goodnet.fmt_x(t["x"]), t["row"]
        for model in (run["dir"] / "tflite" / f"goodnet_X{x}.tflite", run["dir"] / "models" / f"goodnet_X{x}.keras"):
            assert cli.main(["evaluate", "--model", str(model), "--clean", f["test"], "--poisoned", f["bd_test"],
                             "--json"]) == 0
            got = json.loads(capsys.readouterr().out)
            assert got["kind"] == "GoodNet" and got["num_classes"] == 5 and got["scale"] == pytest.approx(1 / 255)
            assert got["clean_acc"] == pytest.approx(row["goodnet_test_acc"], abs=1e-9)
            assert got["asr"] == pytest.approx(row["goodnet_asr"], abs=1e-9)
            assert got["detection"] == pytest.approx(row["goodnet_detection"], abs=1e-9)
            assert got["false_alarm"] == pytest.approx(row["goodnet_false_alarm"], abs=1e-9)
        assert cli.main(["evaluate", "--model", str(run["dir"] / "tflite" / f"B_prime_X{x}.tflite"),
                         "--clean", f["test"], "--poisoned", f["bd_test"], "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["kind"] == "classifier" and "detection" not in got
        assert got["clean_acc"] == pytest.approx(row["test_acc"], abs=1e-9)
        assert got["asr"] == pytest.approx(row["asr"], abs=1e-9)
    # B itself (the model file has no sweep.json next to it: the scale must be given)
    assert cli.main(["evaluate", "--model", f["model"], "--clean", f["test"], "--scale", "unit"]) == 0
    out = capsys.readouterr().out
    base = run["js"]["table"]["test_acc"][0]
    assert f"clean accuracy:" in out and f"{base:.2f}%" in out


# ------------------------------------------------------------------------------------------------- quantized
def test_float16_and_lossy_int8_exports(run):
    recs = export_run(run["dir"], quantize="float16", threads=2)
    assert {os.path.basename(r.path) for r in recs} == {tflite_filename(t["x"], k, "float16")
                                                        for t in run["reached"] for k in ("B_prime", "goodnet")}
    for r in recs:
        assert r.worst >= 99.0 and os.path.isfile(r.path)
        assert r.bytes < os.path.getsize(r.path.replace(".float16", ""))  # half-size weights (plus fixed overhead)
    half = recs
    recs = export_run(run["dir"], quantize="int8", allow_lossy=True, threads=2)
    assert all(os.path.isfile(r.path) and r.path.endswith(".int8.tflite") for r in recs)
    index = json.loads((run["dir"] / "tflite" / "export.json").read_text())
    assert len(index) == 3 * 2 * len(run["reached"])  # none, float16 and int8 entries side by side
    # each quantized file, run by the TF-free runtime on the clean test and poisoned images (which the export's own
    # check did not use), gives its Keras model's labels: float16 on >= 99 % (measured 100 %), int8 on >= 95 %
    # (measured 98.6-99.4 %)
    X = np.concatenate([_read(run["files"]["test"])[0], _read(run["files"]["bd_test"])[0]])
    for floor, records in ((99.0, half), (95.0, recs)):
        for r in records:
            lite = LiteModel(r.path, threads=2, batch_size=64)
            keras_model = goodnet.load(run["dir"] / "models" / f"{r.kind}_X{goodnet.fmt_x(r.x)}.keras")
            want = goodnet.predict_labels(keras_model, X)
            got = lite.labels(X)
            assert lite.kind.goodnet == (r.kind == "goodnet") and got.shape == want.shape
            agree = 100 * np.mean(got == want)
            assert agree >= floor, (os.path.basename(r.path), agree)


def test_int8_export_below_agreement_is_refused(tmp_path, capsys, tiny_lab):
    """A model whose softmax is nearly flat (probabilities within 1/256 of each other): int8 quantization of the
    softmax output makes the classes tie, so int8 labels provably disagree with float ones."""
    _, files = tiny_lab(tmp_path, **DEPLOY_LAB, gain=0.002, seed=0)
    assert _sweep(files, tmp_path / "run") == 0
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "run"), "--quantize", "int8", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: export refused: ") and "--allow-lossy" in err[0]
    assert not (tmp_path / "run" / "tflite").exists()  # nothing written
    # not even half the labels survive: a bar of 50 % refuses it too
    with pytest.raises(BadpruneError, match="export refused"):
        export_run(tmp_path / "run", quantize="int8", min_agreement=50.0, thresholds=[2])
    assert not (tmp_path / "run" / "tflite").exists()


def test_export_errors(tmp_path, run, capsys):
    assert cli.main(["export", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert cli.main(["export", str(run["dir"]), "--thresholds", "7"]) == 2
    assert "not reached" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- runtime
@pytest.fixture(scope="module")
def images(run, tmp_path_factory):
    """png, jpeg, RGBA png, grayscale png and a wrong-size png of test images, with their pixel arrays."""
    from PIL import Image

    d = tmp_path_factory.mktemp("img")
    X, _ = _read(run["files"]["test"], scale=1.0)
    px = np.clip(np.round(X[:5]), 0, 255).astype(np.uint8)
    paths = {}
    Image.fromarray(px[0]).save(d / "a.png")
    Image.fromarray(px[1]).save(d / "b.jpg", quality=100, subsampling=0)
    rgba = np.concatenate([px[2], np.full(px[2].shape[:2] + (1,), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(d / "c.png")
    Image.fromarray(px[3][..., 0]).save(d / "d.png")                            # grayscale
    Image.fromarray(px[4]).resize((24, 32), Image.NEAREST).save(d / "e.png")    # 32x24: twice the size
    for k in "abcde":
        paths[k] = str(next(d.glob(f"{k}.*")))
    return paths, px


def test_load_images_formats_and_sizes(images, capsys):
    paths, px = images
    X = load_images([paths["a"], paths["c"], paths["d"]], size=(16, 12))
    assert X.shape == (3, 16, 12, 3) and X.dtype == np.float32
    np.testing.assert_array_equal(X[0], px[0])          # png: exact
    np.testing.assert_array_equal(X[1], px[2])          # RGBA: alpha dropped
    np.testing.assert_array_equal(X[2], np.repeat(px[3][..., :1], 3, axis=2))  # gray -> RGB
    assert capsys.readouterr().err == ""
    J = load_images([paths["b"]], size=(16, 12))
    assert 0 < np.abs(J[0] - px[1]).mean() < 4          # jpeg: lossy but close
    with pytest.warns(BadpruneWarning, match="resized to 12x16"):
        W = load_images([paths["e"]], size=(16, 12))
    assert W.shape == (1, 16, 12, 3)
    with pytest.raises(BadpruneError, match="not found"):
        load_images(["/no/such.png"])
    bad = Path(paths["a"]).with_name("bad.png")
    bad.write_bytes(b"not an image")
    with pytest.raises(BadpruneError, match="not a readable image"):
        load_images([str(bad)])


def test_predict_images_with_the_runs_scale(run, images, capsys):
    paths, _ = images
    order = [paths[k] for k in "abcde"]
    g = run["dir"] / "tflite" / f"goodnet_X{_xs(run)[-1]}.tflite"
    assert cli.main(["predict", "--model", str(g), "--json", *order]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["scale"] == pytest.approx(1 / 255) and got["kind"] == "GoodNet"
    expect = LiteModel(g).labels(load_images(order, size=(16, 12), warn=lambda m: None) / 255.0)
    assert [r["label"] for r in got["images"]] == expect.tolist()
    assert [r["image"] for r in got["images"]] == order
    # the plain form: one "path<TAB>label" line per image; the Keras file gives the same labels
    k = run["dir"] / "models" / f"goodnet_X{_xs(run)[-1]}.keras"
    assert cli.main(["predict", "--model", str(k), *order]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert [ln.split("\t")[:2] for ln in lines] == [[p, str(v)] for p, v in zip(order, expect)]
    assert "resized" in cap.err
    # an explicit --scale wins over the run's
    assert cli.main(["predict", "--model", str(g), "--scale", "raw", "--json", paths["a"]]) == 0
    assert json.loads(capsys.readouterr().out)["scale"] == 1.0


def test_predict_on_an_h5_set(run, capsys):
    x = _xs(run)[0]
    row = run["reached"][0]["row"]
    g = run["dir"] / "tflite" / f"goodnet_X{x}.tflite"
    assert cli.main(["predict", "--model", str(g), "--data", run["files"]["test"], "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["data"]
    assert got["n"] == 200
    assert got["match"] == pytest.approx(row["goodnet_test_acc"]) and got["flagged"] == pytest.approx(
        row["goodnet_false_alarm"])
    assert cli.main(["predict", "--model", str(g), "--data", run["files"]["bd_test"]]) == 0
    out = capsys.readouterr().out
    assert f"{row['goodnet_asr']:.2f}%" in out and f"{row['goodnet_detection']:.2f}%" in out


def test_predict_errors_are_one_line(run, images, tmp_path, capsys):
    g = str(run["dir"] / "tflite" / f"goodnet_X{_xs(run)[0]}.tflite")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\0" * 64)
    for argv in (["predict", "--model", g, str(tmp_path / "none.png")],
                 ["predict", "--model", g],
                 ["predict", images[0]["a"]],
                 ["predict", "--model", str(junk), images[0]["a"]],
                 ["predict", "--model", g, "--scale", "big", images[0]["a"]],
                 ["evaluate", "--model", g]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)


_NO_TF = """
import json, sys
BLOCK = {block!r}
for name in BLOCK:
    sys.modules[name] = None      # any import of these now fails: prove they are not needed
from badprune import cli
from badprune.runtime import LiteModel, load_images
m = LiteModel({model!r}, threads=2)
X = load_images({images!r}, size=m.input_shape[:2], warn=lambda s: None) / 255.0
labels = m.labels(X).tolist()
rc = cli.main(["predict", "--model", {model!r}, "--json", *{images!r}])
loaded = sorted({{k.split(".")[0] for k, v in sys.modules.items() if v is not None}}
                & {{"tensorflow", "keras", "h5py", "scipy", "matplotlib", "tf_keras", "jax", "torch"}})
print(json.dumps({{"labels": labels, "rc": rc, "loaded": loaded, "tf": "tensorflow" in sys.modules}}))
"""


@pytest.mark.parametrize("block", [(), ("tensorflow", "keras", "h5py", "scipy", "matplotlib")])
def test_runtime_runs_without_tensorflow(run, images, block):
    paths, _ = images
    imgs = [paths[k] for k in "abcd"]
    g = str(run["dir"] / "tflite" / f"goodnet_X{_xs(run)[-1]}.tflite")
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.run([sys.executable, "-c", _NO_TF.format(block=list(block), model=g, images=imgs)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    got = json.loads(lines[-1])
    assert got["rc"] == 0 and got["loaded"] == []
    if not block:
        assert got["tf"] is False   # never imported, not even tried
    expect = LiteModel(g).labels(load_images(imgs, size=(16, 12)) / 255.0)
    assert got["labels"] == expect.tolist()
    printed = json.loads("\n".join(lines[:-1]))
    assert [r["label"] for r in printed["images"]] == expect.tolist()


def test_import_badprune_does_not_import_tensorflow():
    code = textwrap.dedent("""
        import sys
        import badprune, badprune.runtime, badprune.goodnet, badprune.errors, badprune.cli
        print("tensorflow" in sys.modules, "keras" in sys.modules)
    """)
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=SRC), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "False"]


_HELP_AND_EVALUATE = """
import contextlib, io, json, sys
for name in ("tensorflow", "keras"):
    sys.modules[name] = None      # any import of these now fails
from badprune import cli
helps = {{}}
for argv in (["--help"], *([c, "--help"] for c in {commands!r})):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = cli.main(argv)
    helps[" ".join(argv)] = [rc, "usage:" in out.getvalue()]
with contextlib.redirect_stdout(io.StringIO()) as out:
    rc = cli.main(["evaluate", "--model", {model!r}, "--clean", {clean!r}, "--poisoned", {poisoned!r}, "--json", "-q"])
print(json.dumps({{"helps": helps, "rc": rc, "evaluate": json.loads(out.getvalue())}}))
"""


def test_help_and_evaluate_on_tflite_without_tensorflow(run):
    """`--help` of every command, and `evaluate` of a .tflite GoodNet, with TensorFlow and Keras unimportable:
    the same rates as in the run's table."""
    commands = sorted(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {"sweep", "repair", "export", "predict", "evaluate"} <= set(commands)
    x = _xs(run)[0]
    f = run["files"]
    code = _HELP_AND_EVALUATE.format(commands=commands, model=str(run["dir"] / "tflite" / f"goodnet_X{x}.tflite"),
                                     clean=f["test"], poisoned=f["bd_test"])
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=SRC), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["helps"] == {a: [0, True] for a in ["--help"] + [f"{c} --help" for c in commands]}
    assert got["rc"] == 0
    row = run["reached"][0]["row"]
    ev = got["evaluate"]
    assert ev["kind"] == "GoodNet"
    assert ev["clean_acc"] == pytest.approx(row["goodnet_test_acc"], abs=1e-9)
    assert ev["asr"] == pytest.approx(row["goodnet_asr"], abs=1e-9)
    assert ev["detection"] == pytest.approx(row["goodnet_detection"], abs=1e-9)


def test_interpreter_fallbacks(run, monkeypatch):
    """With ai_edge_litert (and tflite_runtime) unavailable, the runtime falls back on tf.lite: same labels."""
    from badprune import runtime

    g = run["dir"] / "tflite" / f"goodnet_X{_xs(run)[0]}.tflite"
    X = _read(run["files"]["test"])[0]
    ref = LiteModel(g, threads=1).labels(X)
    assert LiteModel(g).backend == "ai_edge_litert"
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)
    _, backend = runtime.interpreter_class()
    assert backend == "tensorflow"
    m = LiteModel(g, threads=1)
    assert m.backend == "tensorflow"
    np.testing.assert_array_equal(m.labels(X), ref)
    with pytest.raises(BadpruneError, match="no LiteRT interpreter"):
        runtime.interpreter_class("tflite_runtime")


def test_export_rebuilds_a_missing_goodnet_from_the_runs_model(run, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(run["dir"], d)
    shutil.rmtree(d / "tflite")
    x = _xs(run)[0]
    (d / "models" / f"goodnet_X{x}.keras").unlink()
    recs = export_run(d, thresholds=[float(x)])
    assert [os.path.basename(r.path) for r in recs] == [f"B_prime_X{x}.tflite", f"goodnet_X{x}.tflite"]
    assert all(r.worst == 100.0 for r in recs)
    X = _read(run["files"]["test"])[0]
    np.testing.assert_array_equal(LiteModel(d / "tflite" / f"goodnet_X{x}.tflite").labels(X),
                                  LiteModel(run["dir"] / "tflite" / f"goodnet_X{x}.tflite").labels(X))
