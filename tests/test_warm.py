"""The warm sweep (:mod:`badprune.record`): a sweep whose every input is cached runs without TensorFlow and writes
what the cold run wrote; a damaged record is reported and not used; a changed model file is not reused."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from badprune import _tf  # noqa: F401
import keras

from badprune import cli, record
from badprune import sweep as sweep_mod
from badprune.head import compile_head

#: runs the CLI and says on the last stderr line whether TensorFlow / Keras were imported
PROBE = ("import sys\nfrom badprune.cli import main\nrc = main(sys.argv[1:])\n"
         "print('imported:', 'tensorflow' in sys.modules, 'keras' in sys.modules, file=sys.stderr)\nsys.exit(rc)\n")
MODELS = ("B_prime_X2", "B_prime_X4", "B_prime_X10", "goodnet_X2", "goodnet_X4", "goodnet_X10")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_lab):
    return tiny_lab(tmp_path_factory.mktemp("lab"))[1]


def _args(f, out, cache=None, model=None):
    a = ["sweep", "--model", model or f["model"], "--valid", f["valid"], "--test", f["test"], "--poisoned",
         f["bd_test"], "--out", str(out)]
    return a + (["--cache-dir", str(cache)] if cache is not None else ["--no-cache"])


def _probe(args):
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    err = p.stderr.strip().splitlines()
    return p.stdout, err[:-1], err[-1]


def _json(run):
    js = json.loads((run / "sweep.json").read_text())
    js.pop("timings")
    for k in ("cached", "extract_img_per_s", "trunk"):
        js["config"].pop(k)
    return js


def _labels_and_weights(path, x):
    """The lab's eval.py on the file, and its weights."""
    m = keras.models.load_model(str(path))
    return m.name, np.argmax(m.predict(x, verbose=0), axis=1), m.predict(x, verbose=0), m.get_weights()


def _same_models(a, b, x):
    for name in MODELS:
        na, la, pa, wa = _labels_and_weights(a / "models" / f"{name}.keras", x)
        nb, lb, pb, wb = _labels_and_weights(b / "models" / f"{name}.keras", x)
        assert na == nb, name
        np.testing.assert_array_equal(la, lb, err_msg=name)
        np.testing.assert_array_equal(pa, pb, err_msg=name)
        assert len(wa) == len(wb) and all(np.array_equal(u, v) for u, v in zip(wa, wb)), name


def _images(f, n=64):
    from badprune import data

    return data.open_dataset(f["test"]).read(1 / 255, 0, n)


def _summary_free(stdout):  # the summary line holds the sweep's duration, the repair hint the run folder
    return [ln for ln in stdout.splitlines() if not ln.startswith(("pruned ", "outputs: ", "repair: "))]


def test_warm_sweep_imports_no_tensorflow_and_writes_the_cold_runs_outputs(lab, tmp_path):
    cache = tmp_path / "cache"
    out1, err1, probe1 = _probe(_args(lab, tmp_path / "cold", cache))
    out2, err2, probe2 = _probe(_args(lab, tmp_path / "warm", cache))
    assert probe1 == "imported: True True"  # the probe can tell
    assert probe2 == "imported: False False"
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    assert (cold / "sweep.csv").read_bytes() == (warm / "sweep.csv").read_bytes()
    assert (cold / "results.md").read_bytes() == (warm / "results.md").read_bytes()
    assert _json(cold) == _json(warm)
    assert json.loads((warm / "sweep.json").read_text())["config"]["cached"] == \
        {"valid": True, "test": True, "poisoned": True}
    assert _summary_free(out1) == _summary_free(out2) and "X=2" in out1
    # the same notes (model, scale) and stage lines, the activations now read from the cache
    assert [ln.split(":")[0] for ln in err1] == [ln.split(":")[0] for ln in err2]
    assert err1[:2] == err2[:2] and err1[0].startswith("model tiny") and err1[1].startswith("scale: unit")
    assert sum("from the cache" in ln for ln in err2) == 3
    for name in MODELS:  # written from the same templates: the same bytes
        assert (cold / "models" / f"{name}.keras").read_bytes() == (warm / "models" / f"{name}.keras").read_bytes()
    # ... and the same models as saving each one with Keras (no cache, no record)
    assert cli.main(_args(lab, tmp_path / "plain") + ["-q"]) == 0
    _same_models(warm, tmp_path / "plain", _images(lab))
    assert (tmp_path / "plain" / "sweep.csv").read_bytes() == (warm / "sweep.csv").read_bytes()


def _cold_then(lab, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cli.main(_args(lab, tmp_path / "cold", cache) + ["-q"]) == 0
    capsys.readouterr()
    stem = next(cache.glob("rec-*.json")).with_suffix("")
    return cache, stem


def _warnings(capsys):  # badprune's one-line warnings (not Keras' deprecation notes, which pytest shows)
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]


def _flip(path, at=-40):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["npz", "json", "template"])
def test_a_damaged_record_is_reported_and_not_used(damage, lab, tmp_path, capsys):
    cache, stem = _cold_then(lab, tmp_path, capsys)
    if damage == "npz":
        _flip(stem.with_suffix(".npz"))
    elif damage == "json":  # valid JSON, a value changed
        doc = json.loads(stem.with_suffix(".json").read_text())
        doc["num_classes"] += 1
        stem.with_suffix(".json").write_text(json.dumps(doc))
    else:
        _flip(stem.parent / f"{stem.name}-goodnet.keras", at=2000)
    assert cli.main(_args(lab, tmp_path / "again", cache) + ["-q"]) == 0
    err = _warnings(capsys)
    assert len(err) == 1 and err[0].startswith("warning: the cached") and "changed on disk" in err[0], err
    assert (tmp_path / "cold" / "sweep.csv").read_bytes() == (tmp_path / "again" / "sweep.csv").read_bytes()
    _same_models(tmp_path / "cold", tmp_path / "again", _images(lab))
    # written again: the next run finds it whole, templates included, without making anything
    rec = record.load(cache, json.loads(stem.with_suffix(".json").read_text())["key"])
    assert rec is not None and all(rec.model_template(k, None) is not None for k in record.KINDS)


def test_a_changed_weights_file_is_not_reused(lab, tmp_path, capsys, tiny_model):
    m = tiny_model(seed=0, name="tiny", input_name=None, flatten_name=None)
    path = tmp_path / "b.keras"
    m.save(path)
    cache = tmp_path / "cache"
    assert cli.main(_args(lab, tmp_path / "r1", cache, str(path)) + ["-q"]) == 0
    m2 = tiny_model(seed=7, name="tiny", input_name=None, flatten_name=None)
    m2.save(path)  # the same path, other weights
    assert cli.main(_args(lab, tmp_path / "r2", cache, str(path)) + ["-q"]) == 0
    assert cli.main(_args(lab, tmp_path / "ref", None, str(path)) + ["-q"]) == 0
    capsys.readouterr()
    js = json.loads((tmp_path / "r2" / "sweep.json").read_text())
    assert js["config"]["cached"] == {"valid": False, "test": False, "poisoned": False}
    assert (tmp_path / "r2" / "sweep.csv").read_bytes() == (tmp_path / "ref" / "sweep.csv").read_bytes()
    assert (tmp_path / "r1" / "sweep.csv").read_bytes() != (tmp_path / "r2" / "sweep.csv").read_bytes()
    assert len(list(cache.glob("rec-*.json"))) == 2


def test_the_library_result_loads_b_on_first_access(lab, tmp_path):
    kw = dict(model=lab["model"], valid=lab["valid"], test=lab["test"], poisoned=lab["bd_test"],
              cache_dir=tmp_path / "cache", progress=False)
    cold = sweep_mod.run(**kw)
    warm = sweep_mod.run(**kw)
    assert warm.config["cached"] == {"valid": True, "test": True, "poisoned": True}
    assert warm.__dict__.get("_model") is None and warm.model_record is not None
    x = warm.threshold(2).x
    a, b = cold.pruned_model(x), warm.pruned_model(x)  # B loaded now, from the model file
    assert all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights()))
    for c in cold.table:
        np.testing.assert_array_equal(cold.table[c], warm.table[c])


def test_warm_run_without_stored_templates_saves_them_with_keras(lab, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cli.main(_args(lab, tmp_path / "nomodels", cache) + ["-q", "--no-models"]) == 0
    assert not list(cache.glob("rec-*.keras"))
    assert cli.main(_args(lab, tmp_path / "warm", cache) + ["-q"]) == 0  # B loaded lazily, for the templates
    assert len(list(cache.glob("rec-*.keras"))) == 2
    assert cli.main(_args(lab, tmp_path / "plain") + ["-q"]) == 0
    assert _warnings(capsys) == []
    _same_models(tmp_path / "warm", tmp_path / "plain", _images(lab))


def test_record_head_equals_the_compiled_one(random_deepid, tmp_path):
    """DeepID's head (Dense, Conv2D, Add, ReLU, Flatten, a dropped softmax) through the record's JSON + npz."""
    m = random_deepid(7, seed=2)
    head = compile_head(m, "pool_3")
    rec = record.save(tmp_path, "k" * 64, m, "pool_3", "conv_3", 7, head)
    got = record.load(tmp_path, "k" * 64)
    assert rec is not None and got is not None and got.head.model is None
    assert record._same_head(head, got.head) and got.head.describe() == head.describe()
    F = np.maximum(np.random.default_rng(0).standard_normal((40, 5, 4, 60)), 0).astype(np.float32)
    mask = np.ones(60, np.float32)
    mask[[3, 7, 11]] = 0
    np.testing.assert_array_equal(head.labels(F, mask), got.head.labels(F, mask))
    assert record.load(tmp_path, "j" * 64) is None  # another key: nothing, silently


@pytest.mark.parametrize("kind", ["bprime", "goodnet"])
def test_a_planted_template_is_refused(kind, lab, tmp_path, capsys):
    """Someone who can write to the cache replaces a template with one holding a Lambda layer and forges its
    record entry (size and CRC-32s): the warm run refuses it in one line, exit 2, before anything is written."""
    import zipfile

    cache, stem = _cold_then(lab, tmp_path, capsys)
    tpl = stem.parent / f"{stem.name}-{kind}.keras"
    src = tpl.read_bytes()
    with zipfile.ZipFile(io.BytesIO(src)) as zin:
        items = [(i, zin.read(i.filename)) for i in zin.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zout:
        for info, data in items:
            if info.filename == "config.json":
                cfg = json.loads(data)
                cfg["config"]["layers"][-1]["class_name"] = "Lambda"
                data = json.dumps(cfg).encode()
            zout.writestr(info, data)
    tpl.write_bytes(buf.getvalue())
    doc = json.loads(stem.with_suffix(".json").read_text())
    doc["models"][kind].update(bytes=len(buf.getvalue()), crc32=record._crc(buf.getvalue()))
    doc["crc32"] = record._doc_crc(doc)
    stem.with_suffix(".json").write_text(json.dumps(doc))
    out = tmp_path / "again"
    assert cli.main(_args(lab, out, cache) + ["-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the cached {kind} template is unsafe: ") and "Lambda" in \
        err[0] and str(tpl) in err[0], err
    assert not out.exists()


def test_the_record_decoder_resolves_only_the_heads_ufuncs():
    """A record names numpy ufuncs by name: only the head's merge ufuncs resolve, never another numpy attribute
    (np.load would read a pickle; any name was resolved before)."""
    from badprune.head import compiler

    assert {f.__name__ for f in compiler._MERGE.values()} <= record.UFUNCS
    for name in record.UFUNCS:
        assert record._dec({"ufunc": name}, {}) is getattr(np, name)
    for name in ("load", "frompyfunc", "lib", "exp", "__import__"):
        with pytest.raises(record._Damaged):
            record._dec({"ufunc": name}, {})
