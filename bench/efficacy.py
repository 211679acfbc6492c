"""Efficacy of the defense over every attack family the demo builds: one scenario per family (seed 0, each its
own target), the sweep with the repair on each, and one table.

    python bench/efficacy.py                      # full-size scenarios, --fine-tune unlearn (the default repair)
    python bench/efficacy.py --fine-tune full     # another repair mode; scenarios are reused, only sweeps re-run
    python bench/efficacy.py --small              # the small variants (10 people; minutes, for a smoke run)

Scenarios are built with ``badprune-fast demo`` (one process each, as a user would) into
``$BADPRUNE_CACHE/efficacy/<variant>/<family>`` (the patch row is the default demo, ``demo-v1-seed0``, and the
clean row the clean reference model of the same seed, ``demo-v1-clean-seed0``, both in ``$BADPRUNE_CACHE``) and
reused on a rerun (``--rebuild`` builds them again). Each sweep runs ``badprune-fast sweep --fine-tune MODE`` into
``$BADPRUNE_CACHE/efficacy/<variant>/runs-<mode>/<family>``.

Writes (next to this file, or ``--out``): ``EFFICACY.md`` / ``EFFICACY.json`` (``-small`` suffixed for the small
variants) with, per family, B, B'_X and R_X (clean accuracy / ASR; GoodNet detection / false alarm) for X = 2, 4,
10, the time of each stage, and BackdoorBench's published CIFAR-10 PreAct-ResNet18 rows for the same family at a
10 % poison rate; and ``EFFICACY.png`` (ASR of B, B'_2 and R_X per family).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: family -> the ``badprune-fast demo`` arguments (seed 0 everywhere; a different target per family)
SPECS = {
    "patch": [],                                              # the default demo: sunglasses -> person 0
    "blend": ["--attack", "blend", "--target", "1"],
    "sig": ["--attack", "sig", "--target", "2"],
    "sig-clean-label": ["--attack", "sig", "--clean-label", "--target", "7"],  # SIG's original form
    "wanet": ["--attack", "wanet", "--target", "3"],
    "all-to-all": ["--attack", "all-to-all"],
    "multi": ["--attack", "multi", "--target", "4,5"],
    "pruning-aware": ["--attack", "pruning-aware", "--target", "6"],
    "clean": ["--poison-rate", "0"],                          # no attack: the negative (false alarms)
}
XS = (2, 4, 10)

#: BackdoorBench's published results, CIFAR-10, PreAct-ResNet18, poison rate 10 %: (clean acc %, ASR %) per
#: defense, from static/data/results.csv of github.com/backdoorbench/backdoorbench.github.io (commit b98eab4,
#: rows 11524-12454; rounded to 0.1). None: the cell is blank in that file. BackdoorBench's SIG is clean-label
#: (target-class images only, delta 40, f 6): its row is shown next to both our sig rows.
BACKDOORBENCH_SOURCE = ("BackdoorBench leaderboard data, github.com/backdoorbench/backdoorbench.github.io, "
                        "static/data/results.csv (commit b98eab4), dataset cifar10, backbone preactresnet18, ratio 0.1")
BACKDOORBENCH = {
    "patch": ("badnet", {"no defense": (91.3, 95.0), "FT": (90.0, 1.5), "FP": (91.3, 57.1), "NAD": (89.9, 2.1),
                         "ANP": (84.2, 0.7), "i-BAU": None}),
    "blend": ("blended", {"no defense": (93.5, 99.9), "FT": (92.8, 96.1), "FP": (93.2, 99.3), "NAD": (92.2, 97.7),
                          "ANP": (86.6, 2.2), "i-BAU": (87.0, 50.5)}),
    "sig": ("sig", {"no defense": (84.5, 98.3), "FT": (90.8, 2.4), "FP": (89.1, 26.2), "NAD": (90.0, 10.7),
                    "ANP": (78.0, 0.0), "i-BAU": (85.7, 3.7)}),
    "sig-clean-label": ("sig", {"no defense": (84.5, 98.3), "FT": (90.8, 2.4), "FP": (89.1, 26.2),
                                "NAD": (90.0, 10.7), "ANP": (78.0, 0.0), "i-BAU": (85.7, 3.7)}),
    "wanet": ("wanet", {"no defense": (91.3, 89.7), "FT": (93.5, 17.1), "FP": (91.5, 1.1), "NAD": (93.2, 23.0),
                        "ANP": (85.7, 0.4), "i-BAU": (89.5, 5.2)}),
}


def _cli(*args, log=None):
    """Run ``python -m badprune.cli ARGS`` (this checkout's package); returns (seconds, exit code)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    t0 = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "badprune.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                             env=env)
    return time.perf_counter() - t0, rc


def _cache() -> Path:
    sys.path.insert(0, str(REPO / "src"))
    from badprune._env import cache_home

    return Path(cache_home())


def scenario_dir(family: str, small: bool, root: Path) -> Path:
    from badprune.datasets.demo import demo_folder_name

    if family == "patch":
        return _cache() / demo_folder_name(0, small)
    if family == "clean":
        return _cache() / demo_folder_name(0, small, clean=True)
    return root / family


def build(family: str, small: bool, root: Path, logs: Path, rebuild: bool) -> dict:
    d = scenario_dir(family, small, root)
    args = ["demo", *SPECS[family], "--out", str(d)] + (["--small"] if small else []) + \
        (["--force"] if rebuild else [])
    wall, rc = _cli(*args, log=logs / f"build-{family}.log")
    if rc != 0:
        raise SystemExit(f"error: building {family} failed (exit {rc}); see {logs / f'build-{family}.log'}")
    with open(d / "scenario.json") as f:
        info = json.load(f)
    info["_dir"] = str(d)
    info["_wall"] = wall
    return info


def sweep(family: str, info: dict, mode: str, runs: Path, logs: Path) -> dict:
    d = Path(info["_dir"])
    out = runs / family
    args = ["sweep", "--model", str(d / "model.keras"), "--valid", str(d / "valid.h5"), "--test", str(d / "test.h5"),
            "--poisoned", str(d / "bd_test.h5"), "--out", str(out), "--force"]
    if mode != "none":
        args += ["--fine-tune", mode]
    wall, rc = _cli(*args, log=logs / f"sweep-{family}-{mode}.log")
    if rc != 0:
        raise SystemExit(f"error: the sweep on {family} failed (exit {rc}); see {logs / f'sweep-{family}-{mode}.log'}")
    with open(out / "sweep.json") as f:
        sw = json.load(f)
    sw["_wall"] = wall
    sw["_out"] = str(out)
    return sw


def _per_trigger(info: dict, sw: dict) -> dict:
    """multi: the ASR of B, B'_X and R_X on each trigger's own poisoned test set (Keras on the saved models)."""
    import numpy as np

    from badprune.data import open_dataset

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    d, out = Path(info["_dir"]), Path(sw["_out"])
    models = {"B": d / "model.keras"}
    for x in XS:
        models[f"B'_{x}"] = out / "models" / f"B_prime_X{x:g}.keras"
        models[f"R_{x}"] = out / "models" / f"repaired_X{x:g}.keras"
    res = {}
    for tag, files in info.get("trigger_files", {}).items():
        ds = open_dataset(str(d / files["bd_test"]))
        x, y = ds.read(), ds.labels
        res[tag] = {}
        for name, path in models.items():
            if path.is_file():
                m = keras.models.load_model(str(path), compile=False)
                res[tag][name] = round(float((m.predict(x, batch_size=1024, verbose=0).argmax(1) == y).mean() * 100),
                                       2)
    return res


def row(family: str, info: dict, sw: dict) -> dict:
    from badprune.report import repair_steps

    base = {k: sw["table"][k][0] for k in sw["columns"]}
    r = {"family": family, "dir": info["_dir"], "seed": info["seed"], "targets": info.get("attack", {}).get(
        "targets", [info.get("target")]), "poison_rate": info["poison_rate"], "attack": info.get("attack"),
         "build_seconds": info["seconds"], "build_train_seconds": info.get("seconds_train"),
         "B": {"clean_acc": base["test_acc"], "asr": base["asr"], "valid_acc": base["valid_acc"]},
         "scenario_clean_acc": info["clean_acc"], "scenario_asr": info["asr"],
         "asr_per_trigger": info.get("asr_per_trigger"), "bar": info.get("bar"),
         "sweep_seconds": {k: round(v, 2) for k, v in sw["timings"].items()}, "sweep_wall": round(sw["_wall"], 1),
         "X": {}}
    rep = {float(t["x"]): t for t in sw.get("repaired") or []}
    for t in sw["thresholds"]:
        x = float(t["x"])
        e = {"reached": t["reached"]}
        if t["reached"]:
            rw = t["row"]
            e.update(step=t["step"], fraction_pruned=round(rw["fraction_pruned"] * 100, 2),
                     B_prime={"clean_acc": rw["test_acc"], "asr": rw["asr"]},
                     G={"clean_acc": rw["goodnet_test_acc"], "detection": rw["goodnet_detection"],
                        "false_alarm": rw["goodnet_false_alarm"]})
        if x in rep:
            rr = rep[x]["row"]
            e["R"] = {"clean_acc": rr["test_acc"], "asr": rr["asr"],
                      "steps": repair_steps(rep[x].get("mode", ""), rep[x].get("info") or {})}
            e["G_R"] = {"clean_acc": rr["goodnet_test_acc"], "detection": rr["goodnet_detection"],
                        "false_alarm": rr["goodnet_false_alarm"]}
        r["X"][f"{x:g}"] = e
    return r


def _f(v, nd=1):
    return "–" if v is None else f"{v:.{nd}f}"


def _pair(d, a, b):
    return "–" if not d else f"{_f(d.get(a))} / {_f(d.get(b))}"


def write_md(path: Path, rows: list, meta: dict):
    L = [f"# Efficacy over attack families{' (small variants)' if meta['small'] else ''}", "",
         f"Written by `{meta['command']}` on {meta['date']} ({meta['machine']}). Scenarios: `badprune-fast demo` "
         f"({'small: 10 people, 5 epochs' if meta['small'] else 'full size: 40 people, 8 epochs'}), seed 0, one "
         f"target per family; sweep: `badprune-fast sweep --fine-tune {meta['fine_tune']}` (thresholds 2, 4, 10). "
         f"Accuracies and ASR in percent on test.h5 / bd_test.h5 (multi: both triggers' sets together; the clean row's "
         f"ASR is on the sunglasses set it cannot have learnt). The bar: ASR >= 90 % at a clean accuracy within 2 "
         f"points of the clean model of the same seed.", "",
         "## The attacks (B)", "",
         "| family | target(s) | poison rate | build (s) | B clean acc | B ASR | clean model acc | ASR of the clean "
         "model | bar |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        bar = r["bar"]
        per = r["asr_per_trigger"] or {}
        asr = _f(r["B"]["asr"], 2) + ("" if len(per) < 2 else " (" + ", ".join(f"{k} {v:.1f}" for k, v in per.items())
                                      + ")")
        L.append(f"| {r['family']} | {r['targets']} | {r['poison_rate']:.3g} | {r['build_seconds']:.0f} | "
                 f"{_f(r['B']['clean_acc'], 2)} | {asr} | "
                 f"{_f(bar['reference_clean_acc'], 2) if bar else '(itself)'} | "
                 f"{_f(bar['reference_asr'], 2) if bar else '–'} | "
                 f"{('met' if bar['met'] else '**missed**') if bar else 'n/a'} |")
    met = [r["family"] for r in rows if r["bar"] and r["bar"]["met"]]
    missed = [r["family"] for r in rows if r["bar"] and not r["bar"]["met"]]
    L += ["", f"At the defaults, the bar is met by {', '.join(met) or 'none'}; "
          f"missed by {', '.join(missed) or 'none'}."]
    L += ["", "## Pruning (B'_X, GoodNet G_X) and repair (R_X, GoodNet on R_X)", "",
          "clean acc / ASR for B'_X and R_X; detection / false alarm for the GoodNets.", "",
          "| family | X | pruned | B'_X | G_X det / FA | R_X | G(R_X) det / FA | what the repair did |",
          "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        for x, e in r["X"].items():
            if not e["reached"]:
                L.append(f"| {r['family']} | {x} | not reached | – | – | – | – | – |")
                continue
            L.append(f"| {r['family']} | {x} | {e['fraction_pruned']:.0f} % | "
                     f"{_pair(e.get('B_prime'), 'clean_acc', 'asr')} | {_pair(e.get('G'), 'detection', 'false_alarm')} "
                     f"| {_pair(e.get('R'), 'clean_acc', 'asr')} | {_pair(e.get('G_R'), 'detection', 'false_alarm')} "
                     f"| {(e.get('R') or {}).get('steps', '–')} |")
    multi = [r for r in rows if r.get("per_trigger")]
    if multi:
        L += ["", "Multi, per trigger (ASR on each trigger's own bd_test_<trigger>.h5, Keras on the saved models):",
              ""]
        for r in multi:
            cols = list(next(iter(r["per_trigger"].values())))
            L += ["| trigger | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            for tag, v in r["per_trigger"].items():
                L.append(f"| {tag} | " + " | ".join(_f(v.get(c)) for c in cols) + " |")
    L += ["", "## Time of each stage (seconds)", "",
          "build: the scenario's own build (training included; the clean reference is built once and not counted); "
          "sweep: the whole `badprune-fast sweep` process (wall), of which activations (extract), the pruning "
          "sweep and the repair. Activations are cached, so a rerun's extraction is warm.", "",
          "| family | build | of it training | sweep (wall) | extract | pruning sweep | repair |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["sweep_seconds"]
        ext = sum(v for k, v in t.items() if k.startswith("extract"))
        L.append(f"| {r['family']} | {r['build_seconds']:.0f} | {_f(r['build_train_seconds'], 0)} | "
                 f"{r['sweep_wall']:.0f} | {ext:.1f} | {_f(t.get('sweep'))} | {_f(t.get('repair'))} |")
    L += ["", "## For reference: BackdoorBench, CIFAR-10, PreAct-ResNet18, 10 % poison", "",
          f"Clean acc / ASR after each defense, as published ({BACKDOORBENCH_SOURCE}). A blank cell in that file is "
          f"shown as n/a. Not comparable number for number (another data set, network and training): it shows "
          f"which families other defenses find hard. No published row exists for our all-to-all, multi and "
          f"pruning-aware scenarios.", "",
          "| family (BackdoorBench name) | no defense | FT | FP | NAD | ANP | i-BAU |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for fam, (bb, cells) in BACKDOORBENCH.items():
        L.append(f"| {fam} ({bb}) | " + " | ".join("n/a" if v is None else f"{v[0]:.1f} / {v[1]:.1f}"
                                                   for v in cells.values()) + " |")
    L += ["", f"![ASR before and after, per family]({meta['png']})", ""]
    path.write_text("\n".join(L))


def write_png(path: Path, rows: list, mode: str):
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fams = [r["family"] for r in rows]
    series = [("B", [r["B"]["asr"] for r in rows]),
              ("B'_2 (pruning)", [(r["X"].get("2", {}).get("B_prime") or {}).get("asr") for r in rows])]
    for x in XS:
        series.append((f"R_{x} ({mode})", [(r["X"].get(f"{x}", {}).get("R") or {}).get("asr") for r in rows]))
    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(series)
    pos = np.arange(len(fams))
    for i, (label, vals) in enumerate(series):
        v = [np.nan if a is None else a for a in vals]
        ax.bar(pos + (i - (len(series) - 1) / 2) * w, v, w, label=label)
    ax.set_xticks(pos, fams)
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(0, 105)
    ax.axhline(90, color="gray", lw=0.8, ls=":")
    ax.set_title("ASR before and after the defense, per attack family (the clean row: a model without a backdoor)",
                 fontsize=9)
    ax.legend(fontsize=8, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the small variants (a smoke run)")
    ap.add_argument("--fine-tune", default="unlearn", help="the repair mode passed to the sweep (unlearn, the default; head, full, none)")
    ap.add_argument("--families", nargs="+", default=list(SPECS), choices=list(SPECS))
    ap.add_argument("--rebuild", action="store_true", help="rebuild the scenarios instead of reusing them")
    ap.add_argument("--out", default=str(HERE), help="folder for EFFICACY.md/.json/.png (default bench/)")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite EFFICACY.md and .png from the EFFICACY.json already in --out")
    a = ap.parse_args(argv)
    if a.render:
        suffix = "-small" if a.small else ""
        doc = json.loads((Path(a.out) / f"EFFICACY{suffix}.json").read_text())
        write_md(Path(a.out) / f"EFFICACY{suffix}.md", doc["rows"], doc["meta"])
        write_png(Path(a.out) / doc["meta"]["png"], doc["rows"], doc["meta"]["fine_tune"])
        return
    variant = "small" if a.small else "full"
    root = _cache() / "efficacy" / variant
    runs = root / f"runs-{a.fine_tune}"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    for fam in a.families:
        print(f"efficacy: {fam}: scenario ...", flush=True)
        info = build(fam, a.small, root, logs, a.rebuild)
        print(f"efficacy: {fam}: B clean {info['clean_acc']:.2f} %, ASR {info['asr']:.2f} % (built in "
              f"{info['seconds']:.0f} s); sweep --fine-tune {a.fine_tune} ...", flush=True)
        sw = sweep(fam, info, a.fine_tune, runs, logs)
        r = row(fam, info, sw)
        if info.get("trigger_files"):
            r["per_trigger"] = _per_trigger(info, sw)
        rows.append(r)
        x2 = r["X"].get("2", {})
        print(f"efficacy: {fam}: B'_2 ASR {_f((x2.get('B_prime') or {}).get('asr'))} %, R_2 "
              f"{_pair(x2.get('R'), 'clean_acc', 'asr')} (sweep {r['sweep_wall']:.0f} s)", flush=True)
    suffix = "-small" if a.small else ""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    png = f"EFFICACY{suffix}.png"
    meta = {"command": "python bench/efficacy.py" + (" --small" if a.small else "") +
            (f" --fine-tune {a.fine_tune}" if a.fine_tune != "head" else ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "small": a.small, "fine_tune": a.fine_tune, "png": png, "seconds": round(time.perf_counter() - t_all, 1),
            "backdoorbench_source": BACKDOORBENCH_SOURCE}
    doc = {"meta": meta, "rows": rows,
           "backdoorbench": {f: {"name": bb, "cells": {k: (None if v is None else {"clean_acc": v[0], "asr": v[1]})
                                                       for k, v in cells.items()}}
                             for f, (bb, cells) in BACKDOORBENCH.items()}}
    (out / f"EFFICACY{suffix}.json").write_text(json.dumps(doc, indent=1))
    write_md(out / f"EFFICACY{suffix}.md", rows, meta)
    write_png(out / png, rows, a.fine_tune)
    print(f"efficacy: wrote {out / f'EFFICACY{suffix}.md'}, .json, .png in {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
