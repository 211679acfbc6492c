"""`badprune-fast` end to end on small lab-format h5 files written here."""
import json
import os
import subprocess
import sys

import pytest

from badprune import _tf  # noqa: F401
from badprune import cli


@pytest.fixture(scope="module")
def lab_files(tmp_path_factory, tiny_lab):
    """A small model (.keras) and channels-first valid/test/poisoned files stored as 0..255 pixels."""
    return tiny_lab(tmp_path_factory.mktemp("lab"))[1]


def _sweep_args(f, out, cache):
    return ["sweep", "--model", f["model"], "--valid", f["valid"], "--test", f["test"], "--poisoned", f["bd_test"],
            "--out", str(out), "--cache-dir", str(cache), "-q"]


def test_cli_sweep_end_to_end_and_cache(lab_files, tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert cli.main(_sweep_args(lab_files, out, cache)) == 0
    printed = capsys.readouterr().out
    assert "X=2" in printed and "outputs:" in printed
    for name in ("sweep.csv", "sweep.json", "results.md", "sweep.png"):
        assert (out / name).stat().st_size > 0
    js = json.loads((out / "sweep.json").read_text())
    assert js["config"]["scale"] == "unit"  # auto-detected: the data is stored 0..255, the model wants /255
    assert js["config"]["cached"] == {"valid": False, "test": False, "poisoned": False}
    assert js["table"]["valid_acc"][0] == pytest.approx(100.0)
    rows = (out / "sweep.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 11 and rows[0].startswith("step,channel,mean_activation")
    reached = [t for t in js["thresholds"] if t["reached"]]
    assert reached and all((out / "models" / f"B_prime_X{int(t['x'])}.keras").exists() for t in reached)

    # same inputs again: the activations come from the cache; same table
    out2 = tmp_path / "run2"
    assert cli.main(_sweep_args(lab_files, out2, cache)) == 0
    js2 = json.loads((out2 / "sweep.json").read_text())
    assert js2["config"]["cached"] == {"valid": True, "test": True, "poisoned": True}
    assert js2["table"] == js["table"]

    # a different scale is a different cache entry
    out3 = tmp_path / "run3"
    assert cli.main(_sweep_args(lab_files, out3, cache) + ["--scale", "raw"]) == 0
    js3 = json.loads((out3 / "sweep.json").read_text())
    assert js3["config"]["cached"] == {"valid": False, "test": False, "poisoned": False}


def test_cli_refuses_existing_output_and_bad_input(lab_files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(_sweep_args(lab_files, out, tmp_path / "c")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output folder already exists")
    assert (out / "keep.txt").read_text() == "mine"

    args = _sweep_args(lab_files, tmp_path / "r2", tmp_path / "c")
    args[args.index("--valid") + 1] = str(tmp_path / "missing.h5")
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and not (tmp_path / "r2").exists()

    assert cli.main(["sweep", "--weights", lab_files["model"]]) == 2
    assert "--arch" in capsys.readouterr().err


def test_console_script_runs_without_traceback(lab_files, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "badprune-fast")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "badprune.cli"]
    p = subprocess.run(cmd + ["sweep", "--model", str(tmp_path / "nope.keras"), "--valid", lab_files["valid"]],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_changed_cache_entry_gives_the_clean_runs_sweep_csv_back(lab_files, tmp_path, capsys):
    cache = tmp_path / "c"
    assert cli.main(_sweep_args(lab_files, tmp_path / "r1", cache)) == 0
    entry = max(cache.glob("act-*.npy"), key=lambda p: p.stat().st_size)
    raw = bytearray(entry.read_bytes())
    raw[-7] ^= 0x40  # one float of the last image, in place
    entry.write_bytes(bytes(raw))
    capsys.readouterr()
    assert cli.main(_sweep_args(lab_files, tmp_path / "r2", cache)) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "checksum mismatch" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: cached activations changed on disk"), err
    assert (tmp_path / "r2" / "sweep.csv").read_text() == (tmp_path / "r1" / "sweep.csv").read_text()
