"""The benchmark suite (bench/) cannot rot: run all of it once at tiny sizes (BADPRUNE_BENCH_SMALL=1: a few hundred
images, one round each) in a subprocess, as `pytest bench/` would, then render its JSON with bench/report.py.

CI does not run the real benchmarks (lab scale, ~10 minutes); this takes well under a minute.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _env(tmp_path):
    import badprune

    env = dict(os.environ)
    root = str(Path(badprune.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(BADPRUNE_BENCH_SMALL="1", BADPRUNE_BENCH_DIR=str(tmp_path / "bench-data"),
               BADPRUNE_CACHE=str(tmp_path / "cache"), TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    return env


def _report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_suite_runs_small(tmp_path):
    env = _env(tmp_path)
    out = tmp_path / "run.json"
    r = subprocess.run([sys.executable, "-m", "pytest", str(BENCH), "-q", "-x", "--benchmark-json", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-4000:] + r.stderr[-4000:])
    js = json.loads(out.read_text())
    names = {b["name"] for b in js["benchmarks"]}
    for must in ("test_extract[tf]", "test_sweep_stage[incremental]", "test_sweep_stage[full]",
                 "test_cli_sweep[cold]", "test_cli_sweep[warm]", "test_seed_style_step", "test_tf_head_step",
                 "test_sgemm[output-scipy]", "test_rank", "test_keras_b"):
        assert must in names, f"{must} did not run: {sorted(names)}"
    info = js["machine_info"]["badprune_bench"]
    assert info["small"] and info["cores"] >= 1 and len(info["load_at_start"]) == 3
    assert info["peak_rss"]["cold"]["median_bytes"] > 0

    md, png = tmp_path / "RESULTS.md", tmp_path / "speed.png"
    r = subprocess.run([sys.executable, str(BENCH / "report.py"), str(out), "--out", str(md), "--png", str(png)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    text = md.read_text()
    for part in ("## Targets", "## All benchmarks", "## Floors", "seed-style", "GFLOP/s", "load average"):
        assert part in text
    assert png.stat().st_size > 10_000
    # every benchmark of the run is a row of the table with its own median and round count
    rep = _report_module()
    rows = {}
    for ln in text.splitlines():
        cells = [c.strip() for c in ln.split("|")]
        if ln.startswith("| ") and len(cells) > 6 and cells[2].startswith("`test_"):
            rows[cells[2]] = cells[3:6]
    for b in js["benchmarks"]:
        assert rows[f"`{b['name']}`"] == [rep.fs(b["stats"]["median"]), rep.fs(b["stats"]["iqr"]),
                                          str(b["stats"]["rounds"])], b["name"]
    # the targets' verdicts: what the command prints, --check's exit code, and one made to miss
    verdicts = dict(ln.strip().split(": ") for ln in r.stdout.splitlines()[1:])
    assert {"cli", "warm", "sweep", "extract", "repair"} <= set(verdicts)
    r = subprocess.run([sys.executable, str(BENCH / "report.py"), str(out), "--out", str(md), "--png", str(png),
                        "--check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == (1 if "not met" in verdicts.values() else 0), r.stdout + r.stderr
    cold = next(b for b in js["benchmarks"] if b["name"] == "test_cli_sweep[cold]")
    cold["stats"]["median"] = 10 * rep.TARGETS["cli_seconds"]
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(js))
    r = subprocess.run([sys.executable, str(BENCH / "report.py"), str(slow), "--out", str(md), "--png", str(png),
                        "--check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "  cli: not met" in r.stdout, r.stdout + r.stderr
    assert r.stderr.startswith("error: targets missed: ") and "cli" in r.stderr.split("(")[0], r.stderr
    # without --check a missed target is reported, not an error
    r = subprocess.run([sys.executable, str(BENCH / "report.py"), str(slow), "--out", str(md), "--png", str(png)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "  cli: not met" in r.stdout


def test_bench_not_collected_by_the_test_command():
    """`python -m pytest -q tests` (and a bare `pytest`) never collects bench/: it is its own pytest root."""
    assert (BENCH / "pytest.ini").is_file()
    assert not list(BENCH.glob("test_*.py")), "bench files are named bench_*.py"
