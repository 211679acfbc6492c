"""Hostile input (issue 6): every bad file or flag ends in one ``error:`` line and exit 2 (no traceback, no output
folder), untrusted model files never run their code, interrupted runs leave nothing half-written.

Set BADPRUNE_HOSTILE_TABLE=path to append "case<TAB>message" for every error checked (the table in the report).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

import hostile_files as hf
from badprune import cli, errors, models
from badprune.errors import BadpruneError, BadpruneWarning

sweep_mod = importlib.import_module("badprune.sweep")  # the module (``badprune.sweep`` is also the API function)

keras = hf.keras


# ------------------------------------------------------------------------------------------------------ helpers
def _record(case, line):
    table = os.environ.get("BADPRUNE_HOSTILE_TABLE")
    if table:
        with open(table, "a", encoding="utf-8") as f:
            f.write(f"{case}\t{line}\n")


def _main(argv):
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        return e.code


def _leftovers(folder: Path):
    """Temporary or backup names that badprune writes next to an output folder or in a cache."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name)


def expect_error(capsys, case, argv, *fragments, out=None):
    """Run the CLI; it must exit 2 with exactly one stderr line ``error: ...`` holding ``fragments``, print no
    traceback, and leave no output folder (nor temporary folders next to it)."""
    rc = _main(argv)
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc == 2, f"{case}: exit {rc}\n{cap.err}"
    assert "Traceback" not in cap.err, cap.err
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: {cap.err!r}"
    for fr in fragments:
        assert fr in lines[0], f"{case}: {fr!r} not in {lines[0]!r}"
    if out is not None:
        out = Path(out)
        assert not out.exists() or out.is_file(), f"{case}: output folder created"
        if out.parent.is_dir():
            assert _leftovers(out.parent) == [], f"{case}: leftovers {_leftovers(out.parent)}"
    _record(case, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_model, write_lab_sets):
    """The tiny model (.keras and legacy .h5) and honest valid/test/bd_test sets for it."""
    d = tmp_path_factory.mktemp("hostile")
    m = tiny_model()
    m.save(d / "tiny.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.save(d / "tiny.h5")
    files = write_lab_sets(d, m)
    files.update(model=str(d / "tiny.keras"), model_h5=str(d / "tiny.h5"), dir=d, tiny_model=tiny_model)
    return files


def sweep_args(lab, out, valid=None, model=None, *extra, cache=None):
    args = ["sweep", "--model", model or lab["model"], "--valid", valid or lab["valid"], "--out", out,
            "--cache-dir", cache or (lab["dir"] / "cache"), "-q", *extra]
    return [str(a) for a in args]


# ------------------------------------------------------------------------------------------------ bad data files
def _copy_valid_with(lab, path, **changes):
    with h5py.File(lab["valid"], "r") as f:
        data, label = f["data"][()], f["label"][()]
    ds = {"data": data, "label": label}
    ds.update(changes)
    return hf.raw_h5(path, **{k: v for k, v in ds.items() if v is not None})


def _gzip_damaged(lab, path):
    with h5py.File(lab["valid"], "r") as f:
        data, label = f["data"][()], f["label"][()]
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data, chunks=(16,) + data.shape[1:], compression="gzip")
        f["label"] = label
    with h5py.File(path, "r") as f:
        info = f["data"].id.get_chunk_info(3)
    return hf.damage(path, path, info.byte_offset + 20, 64, seed=3)


def _external_link(lab, path):
    with h5py.File(path, "w") as f:
        f["data"] = h5py.ExternalLink(lab["valid"], "/data")
        f["label"] = h5py.ExternalLink(lab["valid"], "/label")
    return str(path)


def _soft_to_external(lab, path):
    with h5py.File(path, "w") as f:
        f["elsewhere"] = h5py.ExternalLink(lab["valid"], "/data")
        f["data"] = h5py.SoftLink("/elsewhere")
        f["label"] = np.zeros(150)
    return str(path)


def _external_raw(lab, path):
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=(2, 3, 16, 12), dtype="u1", external=[("/etc/hostname", 0, h5py.h5f.UNLIMITED)])
        f["label"] = np.zeros(2)
    return str(path)


def _unwritten(lab, path, n):
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=(n, 3, 16, 12), dtype="f4", chunks=(1, 3, 16, 12))
        f.create_dataset("label", shape=(n,), dtype="f8", chunks=(min(n, 1024),))
    return str(path)


def _nan_at(lab, path, i, value=np.nan):
    with h5py.File(lab["valid"], "r") as f:
        data, label = f["data"][()], f["label"][()]
    data[i, 1, 5, 5] = value
    return hf.raw_h5(path, data=data, label=label)


def _labels(lab, path, fn):
    with h5py.File(lab["valid"], "r") as f:
        data, label = f["data"][()], f["label"][()]
    return hf.raw_h5(path, data=data, label=fn(label))


def _folder(lab, path):
    os.mkdir(path)
    return str(path)


def _text(lab, path):
    Path(path).write_text("definitely not HDF5\n")
    return str(path)


BAD_DATA = {
    # case: (builder(lab, path) -> file, fragments of the message)
    "missing file": (lambda lab, p: str(p), ["data file not found"]),
    "a folder": (_folder, ["got a folder"]),
    "not HDF5": (_text, ["not an HDF5 file"]),
    "HDF5 cut in half": (lambda lab, p: hf.truncate(lab["valid"], p), ["damaged or incomplete HDF5 file"]),
    "HDF5 header bytes damaged": (lambda lab, p: hf.damage(lab["valid"], p, 600),
                                  ["cannot read the HDF5 file's structure", "damaged or incomplete"]),
    "HDF5 signature damaged": (lambda lab, p: hf.damage(lab["valid"], p, 0, 8), ["not an HDF5 file"]),
    "HDF5 middle bytes damaged": (lambda lab, p: hf.damage(lab["valid"], p, -1, 4096), ["pixels"]),
    "gzip chunk damaged": (_gzip_damaged, ["cannot read images", "damaged"]),
    "no 'data'": (lambda lab, p: _copy_valid_with(lab, p, data=None), ["needs datasets 'data' and 'label'"]),
    "no 'label'": (lambda lab, p: _copy_valid_with(lab, p, label=None), ["needs datasets 'data' and 'label'"]),
    "'data' is a group": (lambda lab, p: _group_data(lab, p), ["must be a dataset, not a group"]),
    "links to another file": (_external_link, ["is a link to another file"]),
    "soft link to a link to another file": (_soft_to_external, ["leads to another file"]),
    "pixels stored in /etc/hostname": (_external_raw, ["stored in external raw files"]),
    "declared, never written": (lambda lab, p: _unwritten(lab, p, 1000), ["never written"]),
    "declares 10^9 images": (lambda lab, p: _unwritten(lab, p, 10 ** 9), ["more than badprune handles"]),
    "declares 2,000,000 images, writes one": (lambda lab, p: hf.one_chunk_written(p, 2_000_000),
                                             ["only 1 of the 2,000,000 chunks of 'data' were written"]),
    "lengths differ": (lambda lab, p: _labels(lab, p, lambda y: y[:100]), ["150 images but 'label' has 100"]),
    "empty set": (lambda lab, p: hf.raw_h5(p, data=np.zeros((0, 3, 16, 12)), label=np.zeros(0)),
                  ["the data set is empty"]),
    "3-D data": (lambda lab, p: hf.raw_h5(p, data=np.zeros((10, 16, 12)), label=np.zeros(10)), ["must be 4-D"]),
    "string pixels": (lambda lab, p: hf.raw_h5(p, data=np.full((2, 3, 16, 12), b"x"), label=np.zeros(2)),
                      ["must hold numbers"]),
    "complex pixels": (lambda lab, p: hf.raw_h5(p, data=np.zeros((2, 3, 16, 12), np.complex64), label=np.zeros(2)),
                       ["must hold numbers"]),
    "image size wrong": (lambda lab, p: hf.raw_h5(p, data=np.zeros((10, 3, 20, 12)), label=np.zeros(10)),
                         ["do not fit the model input"]),
    "channel count wrong": (lambda lab, p: hf.raw_h5(p, data=np.zeros((10, 1, 16, 12)), label=np.zeros(10)),
                            ["do not fit the model input"]),
    "NaN pixel": (lambda lab, p: _nan_at(lab, p, 120), ["NaN, infinite", "image 120"]),
    "inf pixel": (lambda lab, p: _nan_at(lab, p, 3, np.inf), ["NaN, infinite", "image 3"]),
    "pixel beyond float32": (lambda lab, p: _nan_at(lab, p, 7, 1e300), ["out-of-range", "image 7"]),
    "fractional labels": (lambda lab, p: _labels(lab, p, lambda y: y + 0.5), ["whole numbers"]),
    "NaN label": (lambda lab, p: _labels(lab, p, lambda y: np.where(np.arange(len(y)) == 4, np.nan, y)),
                  ["whole numbers", "image 4"]),
    "negative labels": (lambda lab, p: _labels(lab, p, lambda y: y - 10), ["negative label"]),
    "label >= class count": (lambda lab, p: _labels(lab, p, lambda y: np.where(np.arange(len(y)) == 9, 5, y)),
                             ["label 5 (image 9) is not a class of this model (it has 5)"]),
    "huge label": (lambda lab, p: _labels(lab, p, lambda y: np.where(np.arange(len(y)) == 2, 1e300, y)),
                   ["is not a class of this model"]),
    "string labels": (lambda lab, p: _labels(lab, p, lambda y: np.array([b"cat"] * len(y))),
                      ["labels must be numbers"]),
    "compound labels": (lambda lab, p: _labels(lab, p, lambda y: np.zeros(len(y), [("a", "f4"), ("b", "i4")])),
                        ["labels must be numbers"]),
}


def _group_data(lab, path):
    with h5py.File(path, "w") as f:
        f.create_group("data")
        f["label"] = np.zeros(3)
    return str(path)


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_file(lab, tmp_path, capsys, case):
    build, fragments = BAD_DATA[case]
    bad = build(lab, tmp_path / "bad.h5")
    out = tmp_path / "run"
    expect_error(capsys, f"data: {case}", sweep_args(lab, out, valid=bad), *fragments, out=out)


def test_declared_size_is_bounded_by_what_is_stored(tmp_path):
    """A few-kB file declaring 2,000,000 images (27 GB of float32 pixels at the lab's size) with one chunk written
    is refused when opened, before anything is allocated."""
    from badprune import data

    f = hf.one_chunk_written(tmp_path / "big.h5", 2_000_000)
    assert os.path.getsize(f) < 200_000
    with pytest.raises(BadpruneError, match="only 1 of the 2,000,000 chunks of 'data' were written"):
        data.open_dataset(f)


def test_memory_and_disk_are_checked_before_allocating(lab, tmp_path, capsys, monkeypatch):
    """Activations larger than the memory available: one line before allocating; a cache entry larger than the
    free disk: a warning, the run goes on and caches nothing."""
    from badprune import data, features

    monkeypatch.setattr(data, "available_memory", lambda: 50_000)
    expect_error(capsys, "memory: activations beyond the memory available", sweep_args(lab, tmp_path / "r1"),
                 "not enough memory for the activations of", "GB available", out=tmp_path / "r1")
    monkeypatch.undo()
    real = shutil.disk_usage
    monkeypatch.setattr(features.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    cache = tmp_path / "cache"
    assert _main(sweep_args(lab, tmp_path / "r2", cache=cache)) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert err and all("not enough free disk" in ln for ln in err), err
    assert not list(cache.glob("act-*"))


def test_bad_test_and_poisoned_files_too(lab, tmp_path, capsys):
    bad = _labels(lab, tmp_path / "neg.h5", lambda y: -y - 1)
    out = tmp_path / "run"
    for flag in ("--test", "--poisoned"):
        expect_error(capsys, f"data: negative labels in {flag}", sweep_args(lab, out) + [flag, bad],
                     "negative label", "neg.h5", out=out)


def test_ambiguous_channels_first_or_last(tmp_path, capsys, tiny_model):
    m = tiny_model(shape=(3, 3, 3), name="cube")
    m.save(tmp_path / "cube.keras")
    bad = hf.raw_h5(tmp_path / "cube.h5", data=np.zeros((8, 3, 3, 3)), label=np.zeros(8))
    out = tmp_path / "run"
    expect_error(capsys, "data: ambiguous layout (3x3x3 model input)",
                 ["sweep", "--model", tmp_path / "cube.keras", "--valid", bad, "--layer", "conv_a", "--out", out,
                  "--no-cache", "-q"], "ambiguous image layout", out=out)


def test_error_in_the_middle_of_a_computation_leaves_nothing(lab, tmp_path, capsys):
    """NaN pixels met in batch 7 of the third set: no output folder, no temporary cache files, and no cache entry
    for the set that failed."""
    bad = _nan_at(lab, tmp_path / "bd.h5", 7 * 16 + 3)
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = sweep_args(lab, out, None, None, "--test", lab["test"], "--poisoned", bad, "--batch-size", "16",
                      "--scale", "unit", cache=cache)
    expect_error(capsys, "data: NaN pixel in batch 7 of the poisoned set", args, "image 115", "bd.h5", out=out)
    names = sorted(p.name for p in cache.iterdir())
    assert not [n for n in names if ".tmp" in n], names
    npy = [n for n in names if n.endswith(".npy")]
    assert len(npy) == 2 and all(n[:-4] + ".json" in names for n in npy), names  # valid and test only


# ------------------------------------------------------------------------------------- untrusted model files
@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    d = tmp_path_factory.mktemp("evil")
    marker = d / "pwned.txt"
    m = hf.evil_lambda_model(marker)
    m.save(d / "evil.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.save(d / "evil.h5")
    assert not marker.exists()
    return {"dir": d, "marker": marker, "keras": str(d / "evil.keras"), "h5": str(d / "evil.h5")}


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_lambda_model_is_refused_and_runs_nothing(lab, evil, tmp_path, capsys, fmt):
    out = tmp_path / "run"
    line = expect_error(capsys, f"model: Lambda layer that writes a file (.{fmt})",
                        sweep_args(lab, out, model=evil[fmt]), "Lambda layer 'evil'", "--trust-model", out=out)
    assert "runs Python code" in line
    assert not evil["marker"].exists()
    with pytest.raises(BadpruneError, match="Lambda layer 'evil'"):
        models.load_model(model=evil[fmt])
    assert not evil["marker"].exists()
    # positive control: the payload is real; trusted, it writes the file when the model runs
    m = models.load_model(model=evil[fmt], trust=True)
    m(np.zeros((1,) + hf.SHAPE, np.float32))
    assert evil["marker"].exists()
    evil["marker"].unlink()


def _to_os_system(marker):
    def edit(cfg):
        lc = hf.layer_cfg(cfg, "conv_a")
        lc["module"], lc["class_name"] = "os", "system"
        lc["config"] = {"command": f"touch {marker}", "name": "conv_a"}
        return cfg
    return edit


def _registered_custom(cfg):
    lc = hf.layer_cfg(cfg, "conv_a")
    lc["module"], lc["class_name"], lc["registered_name"] = "keras.layers", "Conv2D", "evil_pkg>EvilConv"
    return cfg


def _custom_model_class(cfg):
    cfg["class_name"], cfg["module"] = "EvilModel", None
    return cfg


def _lambda_in_activation(cfg):
    lc = hf.layer_cfg(cfg, "conv_a")
    lc["config"]["activation"] = {"class_name": "__lambda__", "config": {"code": "AAAA", "defaults": None,
                                                                         "closure": None}}
    return cfg


def _file_reading_layer(cfg):
    lc = hf.layer_cfg(cfg, "flat")
    lc["class_name"], lc["module"] = "StringLookup", "keras.layers"
    lc["config"] = {"name": "flat", "vocabulary": "/etc/passwd"}
    return cfg


CONFIG_ATTACKS = {
    "layer from module os (os.system)": (None, ["from module 'os'", "not part of Keras"]),
    "registered custom object": (_registered_custom, ["custom object 'evil_pkg>EvilConv'"]),
    "custom model class": (_custom_model_class, ["model is of class 'EvilModel'"]),
    "lambda as an activation": (_lambda_in_activation, ["layer 'conv_a' holds a Python lambda"]),
    "layer that reads a file": (_file_reading_layer, ["'StringLookup'", "reads files"]),
}


@pytest.mark.parametrize("fmt", ["keras", "h5"])
@pytest.mark.parametrize("attack", list(CONFIG_ATTACKS))
def test_config_naming_code_outside_keras_is_refused(lab, tmp_path, capsys, fmt, attack):
    marker = tmp_path / "pwned"
    edit, fragments = CONFIG_ATTACKS[attack]
    edit = edit or _to_os_system(marker)
    src = lab["model"] if fmt == "keras" else lab["model_h5"]
    rewrite = hf.rewrite_keras_config if fmt == "keras" else hf.rewrite_h5_config
    bad = rewrite(src, tmp_path / f"bad.{fmt}", edit)
    out = tmp_path / "run"
    expect_error(capsys, f"model: {attack} (.{fmt})", sweep_args(lab, out, model=bad), *fragments, "--trust-model",
                 out=out)
    assert not marker.exists()


def test_hostile_layer_name_cannot_forge_output_lines(lab, tmp_path, capsys):
    """A layer name holding a newline, an escape sequence and a bidi override is printed escaped, on one line."""
    marker = tmp_path / "pwned.txt"
    m = hf.evil_lambda_model(marker, name="evil")
    m.save(tmp_path / "evil.keras")

    def rename(cfg):
        hf.layer_cfg(cfg, "evil")["name"] = "x\nerror: forged line\x1b[2J\u202e"
        hf.layer_cfg(cfg, "evil")["config"]["name"] = "x\nerror: forged line\x1b[2J\u202e"
        return cfg
    bad = hf.rewrite_keras_config(tmp_path / "evil.keras", tmp_path / "named.keras", rename)
    out = tmp_path / "run"
    line = expect_error(capsys, "model: layer name with newline and escape codes",
                        sweep_args(lab, out, model=bad), "Lambda layer", "\\x1b[2J", "\\u202e", out=out)
    assert "\x1b" not in line and "\u202e" not in line
    assert not marker.exists()


@pytest.mark.parametrize("case", ["zip bomb config.json", "config nested 5000 deep", "config nested 900 deep"])
def test_oversized_or_deep_model_config(lab, tmp_path, capsys, case):
    import zipfile

    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_DEFLATED) as z:
        if "bomb" in case:
            z.writestr("config.json", '{"class_name": "Functional", "config": {}}' + " " * (65 << 20))
        else:
            depth = int(case.split()[2])
            z.writestr("config.json", '{"class_name": "Functional", "config": {"layers": ' + "[" * depth
                       + "]" * depth + "}}")
        z.writestr("metadata.json", "{}")
    out = tmp_path / "run"
    expect_error(capsys, f"model: {case}", sweep_args(lab, out, model=bad), "bad.keras", out=out)


def _set(cfg, layer, key, value):
    hf.layer_cfg(cfg, layer)["config"][key] = value
    return cfg


HUGE_CONFIGS = {
    "a Dense layer of 10^9 units": (lambda c: _set(c, "out", "units", 10 ** 9),
                                    ["the model's architecture asks for over 268,435,456 weights", "layer 'out'"]),
    "an input of 100000 x 100000 x 3": (lambda c: _set(c, "img", "batch_shape", [None, 100000, 100000, 3]),
                                        ["declares an input of shape [100000, 100000, 3]"]),
}


@pytest.mark.parametrize("fmt", ["keras", "h5"])
@pytest.mark.parametrize("case", list(HUGE_CONFIGS))
def test_model_config_asking_for_huge_sizes(lab, tmp_path, capsys, case, fmt):
    """A few bytes of config can ask Keras to allocate terabytes: refused before the weights are allocated."""
    edit, fragments = HUGE_CONFIGS[case]
    rewrite = hf.rewrite_keras_config if fmt == "keras" else hf.rewrite_h5_config
    bad = rewrite(lab["model"] if fmt == "keras" else lab["model_h5"], tmp_path / f"bad.{fmt}", edit)
    out = tmp_path / "run"
    expect_error(capsys, f"model .{fmt}: {case}", sweep_args(lab, out, model=bad), *fragments, out=out)


@pytest.mark.parametrize("fmt", ["keras", "h5"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_model_file_with_non_finite_weights(lab, tmp_path, capsys, fmt, value):
    """--model files, like --weights files, may not hold NaN or infinite weights."""
    def poison(g, base, shape, dtype):
        v = np.zeros(shape, dtype)
        v.flat[1] = value
        g[base] = v
    src = lab["model"] if fmt == "keras" else lab["model_h5"]
    bad = (hf.keras_with if fmt == "keras" else hf.h5_with)(src, tmp_path / f"bad.{fmt}", _BIAS[fmt], poison)
    out = tmp_path / "run"
    expect_error(capsys, f"model .{fmt}: {value} weight", sweep_args(lab, out, model=bad, cache=tmp_path / "c"),
                 "layer 'out' has non-finite weights", out=out)


def test_legacy_h5_model_config_size_is_capped(lab, tmp_path, capsys, monkeypatch):
    """A legacy .h5's model_config attribute, like a .keras file's config.json, is refused over the cap before it
    is read (here the cap is lowered below the tiny model's config)."""
    from badprune.models import files

    monkeypatch.setattr(files, "MAX_CONFIG_BYTES", 1000)
    out = tmp_path / "run"
    expect_error(capsys, "model .h5: model_config over the cap",
                 sweep_args(lab, out, None, lab["model_h5"], cache=tmp_path / "cache"),
                 "the .h5 file's model_config is over", out=out)


def test_stale_temporaries_are_removed_by_age_and_owner_not_pid(lab, tmp_path, capsys):
    """What a killed run leaves (a half-written activation file, a template, a staging folder) is removed by the
    next run once it is an hour old; a fresh one is kept, even when it bears this process's pid (on a shared
    volume it can be another machine's run, writing right now)."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    old = time.time() - 2 * 3600
    stale = [cache / "act-0123.npy.tmp4242.77", cache / ".template-4242-7f.keras", cache / "rec-01.npz.tmp4242.1",
             cache / ".act-89ab.npy.tmp-4242-77-0a1b2c3d"]
    fresh = [cache / "act-4567.npy.tmp4243.78", cache / f".template-{os.getpid()}-7f.keras",
             cache / f".act-cdef.npy.tmp-{os.getpid()}-1-0a1b2c3d"]
    for p in stale + fresh:
        p.write_bytes(b"x" * 100)
    for p in stale:
        os.utime(p, (old, old))
    out = tmp_path / "run"
    staging = {"stale": tmp_path / ".run.tmp-4242", "old": tmp_path / ".run.old-4242",
               "mine": tmp_path / f".run.tmp-{os.getpid()}", "other": tmp_path / ".run.tmp-4243"}
    for k, d in staging.items():
        d.mkdir()
        (d / "sweep.csv").write_text("half")
        if k in ("stale", "old"):
            os.utime(d, (old, old))
    assert _main(sweep_args(lab, out, cache=cache)) == 0
    capsys.readouterr()
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in fresh)
    assert not staging["stale"].exists() and not staging["old"].exists()
    assert staging["mine"].is_dir() and staging["other"].is_dir()  # fresh: another run's, whatever its pid


def test_template_file_is_removed_when_keras_fails_half_way(tmp_path):
    from badprune.models import saving

    class Half:
        name = "m"

        def save(self, path):
            Path(path).write_bytes(b"PK half a zip")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        saving.template(Half(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_folder_is_private_and_a_shared_one_is_refused(lab, tmp_path, capsys, monkeypatch):
    """A new cache folder is created 0700; one that other users may write to, or that is not the user's own, is
    refused in one line before anything runs (others could plant activations or model records in it)."""
    import stat

    cache = tmp_path / "fresh" / "cache"
    assert _main(sweep_args(lab, tmp_path / "r1", cache=cache)) == 0
    capsys.readouterr()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    os.chmod(cache, 0o777)
    expect_error(capsys, "cache: writable by all", sweep_args(lab, tmp_path / "r2", cache=cache),
                 "the cache folder is writable by other users (mode 777)", f"({cache})", out=tmp_path / "r2")
    os.chmod(cache, 0o720)
    expect_error(capsys, "cache: writable by the group", sweep_args(lab, tmp_path / "r3", cache=cache),
                 "writable by other users (mode 720)", out=tmp_path / "r3")
    os.chmod(cache, 0o700)
    uid = cache.stat().st_uid
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    expect_error(capsys, "cache: another user's", sweep_args(lab, tmp_path / "r4", cache=cache),
                 f"the cache folder belongs to another user (uid {uid})", out=tmp_path / "r4")


def test_unwritable_cache_only_warns(lab, tmp_path, capsys):
    regular = tmp_path / "file.txt"
    regular.write_text("mine")
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        rc = _main(sweep_args(lab, out, cache=regular / "cache") + ["--no-models"])
    err = capsys.readouterr().err
    assert rc == 0 and (out / "sweep.csv").exists() and regular.read_text() == "mine"
    shown = [ln for ln in err.splitlines() if ln.startswith("warning: cannot create the cache folder")]
    recorded = [w for w in rec if issubclass(w.category, BadpruneWarning) and "cache folder" in str(w.message)]
    assert shown or recorded, err


def _damaged_keras_weights(lab, path):
    import zipfile

    with zipfile.ZipFile(lab["model"]) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith(".h5"):
                data = data[: len(data) // 2]
            zout.writestr(item, data)
    return str(path)


def _weights_only(lab, path):
    m = lab["tiny_model"]()
    m.save_weights(str(path) + ".weights.h5")
    os.rename(str(path) + ".weights.h5", path)
    return str(path)


BAD_MODELS = {
    "missing": (lambda lab, p: str(p), ["model file not found"]),
    "a folder": (_folder, ["got a folder"]),
    "text file": (_text, ["not a Keras model file"]),
    ".keras cut in half": (lambda lab, p: hf.truncate(lab["model"], p), ["damaged or incomplete .keras file"]),
    ".keras with damaged weights": (_damaged_keras_weights, ["cannot load the Keras model"]),
    ".h5 model cut in half": (lambda lab, p: hf.truncate(lab["model_h5"], p), ["cannot read the HDF5 file"]),
    ".h5 model header damaged": (lambda lab, p: hf.damage(lab["model_h5"], p, 600),
                                 ["cannot read the HDF5 file", "check the file is complete"]),
    "a data file as model": (lambda lab, p: shutil.copy(lab["valid"], p), ["without a model config"]),
    "Keras 3 weights file as model": (_weights_only, ["only Keras 3 weights, no architecture"]),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_file(lab, tmp_path, capsys, case):
    build, fragments = BAD_MODELS[case]
    ext = ".keras" if ".keras" in case else (".h5" if ".h5" in case or "data" in case or "weights" in case
                                             else ".keras")
    bad = build(lab, tmp_path / f"bad{ext}")
    out = tmp_path / "run"
    expect_error(capsys, f"model: {case}", sweep_args(lab, out, model=bad), *fragments, out=out)


# ------------------------------------------------------------------------------ --weights --arch deepid files
def _lab_weights(shared_dir):
    p = shared_dir / "lab" / "weights" / "lab3_bd_weights.h5"
    if not p.exists():
        pytest.skip(f"{p} not present")
    return str(p)


def _edited_weights(src, dst, layer, fn):
    shutil.copy(src, dst)
    os.chmod(dst, 0o644)
    with h5py.File(dst, "r+") as f:
        g = f[layer][layer]
        name = [k for k in g if k.startswith("kernel")][0]
        v = fn(g[name][()])
        del g[name]
        g[name] = v
    return str(dst)


BAD_WEIGHTS = {
    "cut in half": (lambda w, p: hf.truncate(w, p), ["cannot read the weights"]),
    "metadata bytes damaged": (lambda w, p: hf.damage(w, p, 600), ["cannot read the weights"]),
    "wrong kernel shape": (lambda w, p: _edited_weights(w, p, "conv_2", lambda k: k[..., :30]),
                           ["does not fit the deepid architecture", "conv_2"]),
    "NaN weights": (lambda w, p: _edited_weights(w, p, "fc_1", lambda k: np.where(k > 0.05, np.nan, k)),
                    ["non-finite", "fc_1"]),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_lab_weight_file(lab, shared_dir, tmp_path, capsys, case):
    build, fragments = BAD_WEIGHTS[case]
    bad = build(_lab_weights(shared_dir), tmp_path / "w.h5")
    out = tmp_path / "run"
    expect_error(capsys, f"weights: {case}",
                 ["sweep", "--weights", bad, "--arch", "deepid", "--valid", lab["valid"], "--out", out, "-q"],
                 *fragments, out=out)


@pytest.mark.parametrize("case, fragments", [
    ("another model's .h5 as deepid weights", ["does not fit the deepid architecture"]),
    ("Keras 3 weights file", ["Keras 3 weights file"]),
    ("a data file as weights", ["holds no weights"]),
])
def test_wrong_architecture_weights(lab, tmp_path, capsys, case, fragments):
    if "another" in case:
        w = lab["model_h5"]
    elif "Keras 3" in case:
        w = _weights_only(lab, tmp_path / "w.h5")
    else:
        w = lab["valid"]
    out = tmp_path / "run"
    expect_error(capsys, f"weights: {case}",
                 ["sweep", "--weights", w, "--arch", "deepid", "--valid", lab["valid"], "--out", out, "-q"],
                 *fragments, out=out)


# ---------------------------------------------------- weight arrays stored outside their file, or declared huge
#: (where, dataset) of the output layer's bias and kernel in the tiny model's files
_BIAS = {"h5": "model_weights/out/out/bias", "keras": "layers/dense/vars/1"}
_KERNEL = {"h5": "model_weights/out/out/kernel", "keras": "layers/dense/vars/0"}

REACHING_OUT = {
    # case: (make(lab, folder) for hf.h5_with / hf.keras_with, on the kernel?, fragments)
    "bias read from a secret file (external raw storage)":
        (lambda lab, d: hf.external_raw(hf.secret_file(d)), False, ["stored in external raw files"]),
    "bias is a link to another file": (lambda lab, d: hf.external_link(f"{d}/other.h5"), False,
                                       ["is a link to another file"]),
    "bias is a virtual dataset over another file": (lambda lab, d: hf.virtual(f"{d}/other.h5"), False,
                                                    ["virtual dataset"]),
    "kernel declared 256 MB in a tiny file": (lambda lab, d: hf.declared_huge(), True, []),
}


@pytest.fixture
def no_big_reads(monkeypatch):
    """Reading any HDF5 array of more than 4 M values fails the test (a hostile file must be refused from its
    declared shape, before its values are read)."""
    for name in ("__getitem__", "__array__", "read_direct"):
        orig = getattr(h5py.Dataset, name)

        def guarded(self, *a, _orig=orig, **k):
            assert self.size <= 1 << 22, f"read of a declared {self.shape} array"
            return _orig(self, *a, **k)

        monkeypatch.setattr(h5py.Dataset, name, guarded)


@pytest.mark.parametrize("fmt", ["h5", "keras"])
@pytest.mark.parametrize("case", list(REACHING_OUT))
def test_model_file_whose_weights_reach_outside_or_are_declared_huge(lab, tmp_path, capsys, no_big_reads, case,
                                                                     fmt):
    make, kernel, fragments = REACHING_OUT[case]
    where = (_KERNEL if kernel else _BIAS)[fmt]
    src = lab["model_h5"] if fmt == "h5" else lab["model"]
    build = hf.h5_with if fmt == "h5" else hf.keras_with
    bad = build(src, tmp_path / f"bad.{fmt}", where, make(lab, tmp_path))
    out = tmp_path / "run"
    if kernel:
        fragments = ["(65536, 1024)", "fits no weight of the model's architecture"]
    expect_error(capsys, f"model .{fmt}: {case}", sweep_args(lab, out, model=bad), *fragments, out=out)


@pytest.fixture(scope="module")
def deepid_h5(tmp_path_factory):
    """The lab's DeepID architecture with 5 classes, saved as a legacy .h5 (readable as --weights --arch deepid)."""
    from badprune.models.archs import BUILDERS

    p = tmp_path_factory.mktemp("deepid") / "deepid.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BUILDERS["deepid"](5).save(p)
    return str(p)


@pytest.mark.parametrize("case", list(REACHING_OUT))
def test_weight_file_whose_weights_reach_outside_or_are_declared_huge(lab, deepid_h5, tmp_path, capsys,
                                                                      no_big_reads, case):
    """--weights --arch deepid: the same hostile arrays in a Keras 2 weight file."""
    make, kernel, fragments = REACHING_OUT[case]
    where = "model_weights/fc_1/fc_1/kernel" if kernel else "model_weights/output/output/bias"
    bad = hf.h5_with(deepid_h5, tmp_path / "w.h5", where, make(lab, tmp_path))
    out = tmp_path / "run"
    if kernel:
        fragments = ["does not fit the deepid architecture", "(65536, 1024), expected (1200, 160)"]
    expect_error(capsys, f"weights: {case}",
                 ["sweep", "--weights", bad, "--arch", "deepid", "--valid", lab["valid"], "--out", out, "-q"],
                 *fragments, out=out)


# --------------------------------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize("case, extra, fragments", [
    ("--layer that does not exist", ["--layer", "nope"], ["no layer 'nope'", "pick one of: conv_a, pool_a"]),
    ("--layer on the dense output", ["--layer", "out"], ["not 4-D images"]),
    ("--layer the input", ["--layer", "img"], ["is the model's input"]),
    ("threshold 0", ["--thresholds", "0"], ["threshold 0 is out of range"]),
    ("threshold 100", ["--thresholds", "2", "100"], ["threshold 100 is out of range"]),
    ("threshold -5", ["--thresholds", "-5"], ["out of range"]),
    ("threshold nan", ["--thresholds", "nan"], ["threshold nan is out of range"]),
    ("threshold inf", ["--thresholds", "inf"], ["out of range"]),
    ("batch size 0", ["--batch-size", "0"], ["--batch-size must be positive"]),
    ("unknown scale", ["--scale", "huge"], ["unknown scale 'huge'"]),
])
def test_bad_flag(lab, tmp_path, capsys, case, extra, fragments):
    out = tmp_path / "run"
    expect_error(capsys, f"flag: {case}", sweep_args(lab, out) + extra, *fragments, out=out)


def test_layer_that_is_bypassed(lab, tmp_path, capsys):
    hf.bypass_model().save(tmp_path / "bypass.keras")
    out = tmp_path / "run"
    args = sweep_args(lab, out, model=tmp_path / "bypass.keras")
    expect_error(capsys, "flag: --layer bypassed by another path", args + ["--layer", "pool_a"],
                 "does not cut the model in two", out=out)
    expect_error(capsys, "model: only pooling layer is bypassed", args, "no pooling layer feeds the output",
                 out=out)


def test_model_without_pooling_layer(lab, tmp_path, capsys, tiny_model):
    tiny_model(pool=False, name="nopool").save(tmp_path / "nopool.keras")
    out = tmp_path / "run"
    expect_error(capsys, "model: no pooling layer", sweep_args(lab, out, model=tmp_path / "nopool.keras"),
                 "no 2-D pooling layer", "--layer", out=out)


@pytest.mark.parametrize("extra", [["--thresholds", "abc"], ["--order", "sideways"], ["--bogus"]])
def test_unparsable_flag_is_one_line(lab, tmp_path, capsys, extra):
    out = tmp_path / "run"
    rc = _main(sweep_args(lab, out) + extra)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and not out.exists()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    _record(f"flag: {' '.join(extra)}", lines[0])


# ---------------------------------------------------------------------------------------------- output folder
def test_output_folder_that_cannot_be_written(lab, tmp_path, capsys):
    regular = tmp_path / "file.txt"
    regular.write_text("mine")
    expect_error(capsys, "output: --out under a regular file", sweep_args(lab, regular / "run"),
                 "choose another --out", out=regular / "run")
    assert regular.read_text() == "mine"
    expect_error(capsys, "output: --out is a regular file", sweep_args(lab, regular), "not a folder")
    assert regular.read_text() == "mine"
    if os.path.isdir("/proc/self"):
        expect_error(capsys, "output: --out under /proc", sweep_args(lab, "/proc/badprune-run"),
                     "choose another --out")
        assert not os.path.exists("/proc/badprune-run")


def test_existing_run_is_kept_unless_force(lab, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(capsys, "output: existing run folder without --force", sweep_args(lab, out),
                 "output folder already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "sweep.json").write_text("{}")  # a run folder (--force replaces nothing else)
    assert _main(sweep_args(lab, out) + ["--force", "--no-models"]) == 0
    capsys.readouterr()
    assert not (out / "keep.txt").exists() and (out / "sweep.csv").exists()
    assert _leftovers(tmp_path) == []


def _files_under(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["--out . (the working folder)", "--out the inputs' folder", "--out $HOME",
                                  "--out /", "--out the cache's parent", "--out a folder of other files"])
def test_force_never_deletes_inputs_or_other_folders(lab, tmp_path, capsys, monkeypatch, case):
    """`--out X --force` where X holds the model and data (and is the working folder), is the home folder, `/`,
    holds the cache, or is any folder badprune did not write: one line, exit 2, and every file is still there."""
    work = tmp_path / "work"
    work.mkdir()
    for k in ("model", "valid", "test", "bd_test"):
        shutil.copy(lab[k], work / Path(lab[k]).name)
    (work / "notes.txt").write_text("mine")
    cache = tmp_path / "c" / "cache"
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work if "HOME" in case else tmp_path / "home"))
    out = {"--out /": Path("/"), "--out the cache's parent": tmp_path / "c",
           "--out a folder of other files": tmp_path / "other"}.get(case, work)
    if "other" in case:
        out.mkdir()
        (out / "mine.txt").write_text("mine")
    before = {d: _files_under(d) for d in (work, tmp_path / "other") if d.is_dir()}
    args = ["sweep", "--model", work / "tiny.keras", "--valid", work / "valid.h5", "--test", work / "test.h5",
            "--out", out, "--cache-dir", cache, "--force", "-q"]
    if "cache" in case:  # the cache exists (an earlier run), the inputs are elsewhere
        assert _main(args[:-6] + ["--out", tmp_path / "first", "--cache-dir", cache, "-q"]) == 0
        capsys.readouterr()
    fragment = {"--out . (the working folder)": "--force would replace the working folder",
                "--out the inputs' folder": "which the run reads or caches in", "--out $HOME": "your home folder",
                "--out /": "--force would replace the root folder", "--out the cache's parent": f"--force would "
                f"delete {cache}", "--out a folder of other files": "replaces only a run folder badprune wrote"}
    if case in ("--out the inputs' folder", "--out $HOME"):
        monkeypatch.chdir(tmp_path)
    expect_error(capsys, f"output: {case}", [str(a) for a in args], fragment[case])
    assert {d: _files_under(d) for d in before} == before
    assert (cache / next(iter(_files_under(cache)))).is_file() if "cache" in case else True


# ---------------------------------------------------------------------------------------- other CLI contracts
def test_internal_fault_is_one_line_exit_1_and_debug_shows_traceback(lab, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(importlib.import_module("badprune.defense"), "run", boom)
    with pytest.raises(RuntimeError):
        cli.main(["--debug"] + sweep_args(lab, tmp_path / "run"))
    assert _main(sweep_args(lab, tmp_path / "run")) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: internal error: RuntimeError: boom") and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(BadpruneError):
        cli.main(["--debug"] + sweep_args(lab, tmp_path / "run", valid=tmp_path / "missing.h5"))
    assert len(lines) == 1, err
    _record("internal fault (message with a newline)", lines[0])


def test_predict_on_a_file_that_is_not_an_image(lab, tmp_path, capsys):
    fake = tmp_path / "face.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    expect_error(capsys, "predict: a .png that is not an image",
                 ["predict", fake, "--model", lab["model"], "-q"], "not a readable image", "face.png")
    expect_error(capsys, "predict: an h5 data file as the image",
                 ["predict", lab["valid"], "--model", lab["model"], "-q"], "not a readable image")


def _png_header_only(w, h):
    """A PNG that declares w x h RGB pixels but holds no image data (what a decompression bomb looks like)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w, h", [(100_000, 100_000), (7_000, 7_000)])
def test_predict_on_a_decompression_bomb(lab, tmp_path, capsys, w, h):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(w, h))
    expect_error(capsys, f"predict: PNG declaring {w}x{h} pixels", ["predict", bomb, "--model", lab["model"], "-q"],
                 "image is too large", "bomb.png")


# ------------------------------------------------------------------------------------------------- warnings
def test_low_base_accuracy_warns_and_changes_nothing(lab, tmp_path, capsys):
    bad = _labels(lab, tmp_path / "valid.h5", lambda y: (y + 1) % 5)  # every label wrong: 0 % accuracy
    kw = dict(model=lab["model"], valid=bad, test=lab["test"], poisoned=lab["bd_test"], scale="unit",
              use_cache=False, progress=False)
    with pytest.warns(BadpruneWarning, match=r"classifies only 0\.0% of the validation set"):
        r = sweep_mod.run(**kw)
    assert len(r.config["warnings"]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadpruneWarning)
        r2 = sweep_mod.run(**kw)
    for c in sweep_mod.COLUMNS:
        np.testing.assert_array_equal(r.table[c], r2.table[c])

    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadpruneWarning)  # seen only through the CLI's own display
        rc = _main(sweep_args(lab, out, bad, None, "--scale", "unit", "--no-models"))
    err = capsys.readouterr().err
    assert rc == 0 and (out / "sweep.csv").exists()
    assert json.loads((out / "sweep.json").read_text())["config"]["warnings"]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: the unpruned model classifies only 0.0%"), err
    _record("warning: base accuracy under 50 %", lines[0])


def test_meaningless_asr_warns(tmp_path, capsys, tiny_model, write_lab_sets):
    """The poisoned set's only label is the class the model answers on most clean inputs anyway."""
    m = tiny_model(bias=[0, 0, 0, 100, 0], name="biased")
    m.save(tmp_path / "biased.keras")
    files = write_lab_sets(tmp_path, m, poison_label=3)
    kw = dict(model=str(tmp_path / "biased.keras"), valid=files["valid"], test=files["test"],
              poisoned=files["bd_test"], scale="unit", use_cache=False, progress=False)
    with pytest.warns(BadpruneWarning, match="every poisoned label is class 3") as rec:
        r = sweep_mod.run(**kw)
    assert "meaningless" in str(rec[0].message) and r.table["asr"][0] == 100.0
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadpruneWarning)
        rc = _main(["sweep", "--model", kw["model"], "--valid", files["valid"], "--test", files["test"],
                    "--poisoned", files["bd_test"], "--scale", "unit", "--no-cache", "--no-models", "--out", out,
                    "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and (out / "sweep.csv").exists()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: every poisoned label is class 3"), err
    _record("warning: poisoned label = the model's usual answer", lines[0])


def test_honest_run_gives_no_warning(lab):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadpruneWarning)
        r = sweep_mod.run(model=lab["model"], valid=lab["valid"], test=lab["test"], poisoned=lab["bd_test"],
                          scale="unit", use_cache=False, progress=False)
    assert r.config["warnings"] == []


def test_warning_display_is_one_printable_line(capsys):
    with errors.cli_warnings():
        errors.warn("two\nlines \x1b[31mred\x1b[0m and \x07bell")
        errors.warn("two\nlines \x1b[31mred\x1b[0m and \x07bell")  # shown every time, not once
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["warning: two lines red and \\x07bell"] * 2


# ------------------------------------------------------------------------------------ interrupted sweeps
@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A model and sets whose trunk pass takes a few seconds per set, and the uninterrupted run's sweep.csv."""
    d = tmp_path_factory.mktemp("slow")
    x = keras.Input((32, 32, 3))
    h = hf.L.Conv2D(32, 3, activation="relu", name="c1")(x)
    h = hf.L.Conv2D(32, 3, activation="relu", name="c2")(h)
    h = hf.L.MaxPooling2D(4, name="pool")(h)
    y = hf.L.Dense(10, activation="softmax", name="out")(hf.L.Flatten(name="flat")(h))
    m = keras.Model(x, y, name="slow")
    m.save(d / "slow.keras")
    r = np.random.default_rng(5)
    files = {"model": str(d / "slow.keras")}
    for name, n in (("valid", 500), ("test", 3000), ("bd_test", 1000)):
        X = r.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        lab = r.integers(0, 10, n) if name != "bd_test" else np.full(n, 7)
        hf.write_lab_h5(d / f"{name}.h5", X, lab, dtype=np.uint8)
        files[name] = str(d / f"{name}.h5")
    files["dir"] = d
    ref = d / "ref"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _main(_slow_args(files, ref, d / "refcache") + ["--no-cache"]) == 0
    files["ref_csv"] = (ref / "sweep.csv").read_text()
    return files


def _slow_args(f, out, cache):
    return ["sweep", "--model", f["model"], "--valid", f["valid"], "--test", f["test"], "--poisoned",
            f["bd_test"], "--out", str(out), "--cache-dir", str(cache), "--scale", "unit", "--batch-size", "128",
            "--no-models"]


def _interrupt(slow, tmp_path, sig):
    """Start the real CLI in a subprocess, send ``sig`` once the first cache entry is complete (the next set's
    trunk pass is running), and return (returncode, stderr, out, cache)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    pkg_root = str(Path(cli.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]),
               TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.Popen([sys.executable, "-m", "badprune.cli"] + _slow_args(slow, out, cache),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if cache.is_dir() and any(n.endswith(".json") for n in os.listdir(cache)):
            break
        time.sleep(0.01)
    assert p.poll() is None, f"the run ended before it could be interrupted:\n{p.stderr.read()}"
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        pytest.fail(f"the run did not stop after {sig!r}:\n{err}")
    return p.returncode, err, out, cache


def _check_interrupted_then_rerun(slow, tmp_path, capsys, rc, err, out, cache, expected_rc):
    assert rc == expected_rc, f"exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(("error: interrupted", "error: terminated")), err[-3000:]
    assert not out.exists() and _leftovers(tmp_path) == []
    names = sorted(os.listdir(cache))
    assert not [n for n in names if ".tmp" in n], names
    # the next run succeeds, reuses what was complete, and gives the uninterrupted run's table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _main(_slow_args(slow, out, cache) + ["-q"]) == 0
    capsys.readouterr()
    assert (out / "sweep.csv").read_text() == slow["ref_csv"]
    cached = json.loads((out / "sweep.json").read_text())["config"]["cached"]
    assert cached["valid"] is True


def test_sigint_mid_sweep_leaves_nothing_partial(slow, tmp_path, capsys):
    rc, err, out, cache = _interrupt(slow, tmp_path, signal.SIGINT)
    _check_interrupted_then_rerun(slow, tmp_path, capsys, rc, err, out, cache, 130)


def test_sigterm_mid_sweep_leaves_nothing_partial(slow, tmp_path, capsys):
    rc, err, out, cache = _interrupt(slow, tmp_path, signal.SIGTERM)
    _check_interrupted_then_rerun(slow, tmp_path, capsys, rc, err, out, cache, 128 + signal.SIGTERM)


def test_torn_cache_entry_is_rebuilt(lab, tmp_path, capsys):
    """A cache entry whose .npy was cut short (killed while writing) or lost its marker is rebuilt, not used."""
    cache = tmp_path / "cache"
    assert _main(sweep_args(lab, tmp_path / "a", cache=cache) + ["--no-models"]) == 0
    ref = (tmp_path / "a" / "sweep.csv").read_text()
    npys = sorted(cache.glob("*.npy"))
    hf.truncate(npys[0], npys[0], 0.6)
    assert _main(sweep_args(lab, tmp_path / "b", cache=cache) + ["--no-models"]) == 0
    assert (tmp_path / "b" / "sweep.csv").read_text() == ref
    npys[0].with_suffix(".json").unlink()
    assert _main(sweep_args(lab, tmp_path / "c", cache=cache) + ["--no-models"]) == 0
    assert (tmp_path / "c" / "sweep.csv").read_text() == ref
    capsys.readouterr()
    assert json.loads((tmp_path / "c" / "sweep.json").read_text())["config"]["cached"]["valid"] is False
