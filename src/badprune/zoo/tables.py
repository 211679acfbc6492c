"""The zoo's run folders on the driver (written whole, resumed when complete) and its table: zoo.csv, zoo.md,
zoo.json and zoo.png."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import atomic
from ..errors import BadpruneError
from ..outdir import staged_folder
from ..runfolder import RESULTS_MD, SWEEP_CSV, fmt_x, jsonable, missing, read_run
from .cluster import Cluster
from .manifest import ENTRY_JSON, PATH_KEYS, ZOO_CSV, ZOO_JSON, ZOO_MD, ZOO_PNG, ZooEntry


# ------------------------------------------------------------------------------------------------- run folders
def _fingerprint(entry: ZooEntry) -> dict:
    """Size and modification time of each input file (a changed file makes a complete run stale)."""
    fp = {}
    for k in PATH_KEYS:
        p = entry.options.get(k)
        if p is None:
            continue
        try:
            st = os.stat(p)
            fp[k] = [st.st_size, st.st_mtime_ns]
        except OSError:
            fp[k] = None
    return fp


def _read_entry(folder: Path):
    try:
        with open(folder / ENTRY_JSON, encoding="utf-8") as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def _complete(folder: Path, entry: ZooEntry):
    """The folder's ``zoo-entry.json`` when it is a complete run of ``entry`` (same resolved entry, same input
    files, a readable sweep.json and the sweep.csv), else None."""
    doc = _read_entry(folder)
    if doc is None or doc.get("entry") != entry.to_json() or doc.get("inputs") != jsonable(_fingerprint(entry)):
        return None
    try:
        read_run(folder)
    except BadpruneError:
        return None
    return doc if (folder / SWEEP_CSV).is_file() and (folder / RESULTS_MD).is_file() else None


def _write_run(folder: Path, entry: ZooEntry, inputs: dict, res: dict) -> None:
    """The run folder, whole: the task's files and ``zoo-entry.json``."""
    with staged_folder(folder, force=True) as tmp:
        root = tmp.resolve()
        for rel, data in res["files"].items():
            p = (tmp / rel).resolve()
            if root not in p.parents:
                raise BadpruneError(f"the task returned a file outside its run folder ({rel!r})", folder)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        ran = {k: res.get(k) for k in ("node_id", "host", "seconds")}
        doc = {"entry": entry.to_json(), "inputs": inputs, "ran": ran}
        (tmp / ENTRY_JSON).write_text(json.dumps(jsonable(doc), indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------- the table
def _row_numbers(folder: Path) -> dict:
    """A run's numbers from its sweep.json (:func:`badprune.runfolder.read_run`): base test accuracy and ASR, and
    per threshold X: channels pruned, clean accuracy, ASR, GoodNet detection and false alarm, R_X's accuracy and
    ASR."""
    run = read_run(folder)
    doc = run.doc
    table = doc.get("table") or {}

    def first(col):
        v = (table.get(col) or [None])[0]
        return None if missing(v) else v

    repaired = {float(r["x"]): r.get("row") or {} for r in doc.get("repaired") or []}
    xs = []
    for t in run.thresholds:
        row = t.get("row") or {}
        rep = repaired.get(float(t["x"]), {})
        xs.append({"x": float(t["x"]), "reached": bool(t.get("reached")), "channels": t.get("step"),
                   "test_acc": row.get("test_acc"), "asr": row.get("asr"),
                   "detection": row.get("goodnet_detection"), "false_alarm": row.get("goodnet_false_alarm"),
                   "repaired_test_acc": rep.get("test_acc"), "repaired_asr": rep.get("asr")})
    out = {"model_name": doc.get("model_name"), "layer": doc.get("layer"), "n_channels": doc.get("n_channels"),
           "base_valid_acc": first("valid_acc"), "base_test_acc": first("test_acc"), "base_asr": first("asr"),
           "relative": doc.get("relative"), "thresholds": xs, "fine_tuned": bool(repaired)}
    scan = Path(folder) / "scan.json"   # the run scanned B (manifest key scan = true)
    if scan.is_file():
        js = json.loads(scan.read_text(encoding="utf-8"))
        out.update(scan_score=js.get("score"), scan_backdoored=js.get("backdoored"),
                   scan_target=(js.get("targets") or [{}])[0].get("class"))
    return out


@dataclass
class ZooResult:
    """What a zoo invocation did: ``rows`` (one dict per run, manifest order: name, model, status 'ok' /
    'failed' / 'skipped', error, folder, node, seconds and the numbers), ``cluster`` (None when every run was
    already complete), the output folder and the wall seconds."""

    out: Path
    manifest: str
    rows: list
    cluster: Cluster | None
    seconds: float

    @property
    def ok(self) -> bool:
        """True when no run failed (a skipped, already complete run counts as ok)."""
        return all(r["status"] != "failed" for r in self.rows)

    def counts(self) -> dict:
        c = {"ok": 0, "skipped": 0, "failed": 0}
        for r in self.rows:
            c[r["status"]] += 1
        return c


def _xs(rows) -> list:
    xs = sorted({t["x"] for r in rows for t in r.get("thresholds") or []})
    return xs


def _num(v, decimals=4) -> str:
    return "" if missing(v) else f"{float(v):.{decimals}f}"


def zoo_csv(result: ZooResult) -> str:
    """``zoo.csv``: a row per run (with ``scan_score``, ``scan_backdoored``, ``scan_target`` when any run
    scanned); per threshold X the columns ``X<x>_channels``, ``_test_acc``, ``_asr``,
    ``_detection``, ``_false_alarm`` (and ``_repaired_test_acc``, ``_repaired_asr`` when any run fine-tuned)."""
    xs = _xs(result.rows)
    fine = any(r.get("fine_tuned") for r in result.rows)
    per_x = ["channels", "test_acc", "asr", "detection", "false_alarm"]
    if fine:
        per_x += ["repaired_test_acc", "repaired_asr"]
    scanned = any("scan_score" in r for r in result.rows)
    header = ["name", "model", "status", "error", "n_channels", "base_test_acc", "base_asr"]
    header += ["scan_score", "scan_backdoored", "scan_target"] if scanned else []
    header += [f"X{fmt_x(x)}_{c}" for x in xs for c in per_x]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in result.rows:
        line = [r["name"], r["model"], r["status"], r.get("error") or "", r.get("n_channels") or "",
                _num(r.get("base_test_acc")), _num(r.get("base_asr"))]
        if scanned:
            line += [_num(r.get("scan_score")), "" if r.get("scan_backdoored") is None else
                     str(bool(r["scan_backdoored"])).lower(), "" if r.get("scan_target") is None else
                     str(r["scan_target"])]
        by_x = {t["x"]: t for t in r.get("thresholds") or []}
        for x in xs:
            t = by_x.get(x)
            for c in per_x:
                if t is None or not t["reached"]:
                    line.append("")
                elif c == "channels":
                    line.append(str(t["channels"]))
                else:
                    line.append(_num(t.get(c)))
        w.writerow(line)
    return buf.getvalue()


def _pct_cell(v) -> str:
    return "-" if missing(v) else f"{float(v):.2f}%"


def zoo_markdown(result: ZooResult) -> str:
    """``zoo.md``: the runs (status, base accuracy and ASR, where and how long), then one table per threshold X
    (B'_X, G_X and R_X), then the failures."""
    rows = result.rows
    c = result.counts()
    lines = [f"# Pruning defense on {len(rows)} models", "",
             f"- manifest: `{result.manifest}`",
             f"- runs: {c['ok'] + c['skipped']} ok ({c['skipped']} already complete, skipped), {c['failed']} failed"]
    cl = result.cluster
    if cl is not None:
        lines.append(f"- Ray {cl.ray_version}: {cl.started} cluster at {cl.address}, {cl.nodes} node(s), "
                     f"{cl.cpus:g} CPUs, started in {cl.startup_seconds:.1f} s")
    else:
        lines.append("- Ray: not started (every run was already complete)")
    lines += ["", "| run | model | status | base clean acc | base ASR | host | seconds |",
              "|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        secs = "" if missing(r.get("seconds")) else f"{r['seconds']:.1f}"
        lines.append(f"| {r['name']} | `{r['model']}` | {r['status']} | {_pct_cell(r.get('base_test_acc'))} | "
                     f"{_pct_cell(r.get('base_asr'))} | {r.get('host') or ''} | {secs} |")
    fine = any(r.get("fine_tuned") for r in rows)
    for x in _xs(rows):
        head = ["run", "channels pruned", "B'_X clean acc", "B'_X ASR", "G_X detection", "G_X false alarm"]
        if fine:
            head += ["R_X clean acc", "R_X ASR"]
        lines += ["", f"## X = {fmt_x(x)}", "", "| " + " | ".join(head) + " |",
                  "|---|" + "---:|" * (len(head) - 1)]
        for r in rows:
            t = {t["x"]: t for t in r.get("thresholds") or []}.get(x)
            if t is None:
                continue
            if not t["reached"]:
                cells = ["not reached"] * (len(head) - 1)
            else:
                cells = [f"{t['channels']}/{r.get('n_channels')}", _pct_cell(t["test_acc"]), _pct_cell(t["asr"]),
                         _pct_cell(t["detection"]), _pct_cell(t["false_alarm"])]
                if fine:
                    cells += [_pct_cell(t["repaired_test_acc"]), _pct_cell(t["repaired_asr"])]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {r['name']}: {r['error']}" for r in failed]
    lines += ["", f"![clean accuracy and ASR per model]({ZOO_PNG})", ""]
    return "\n".join(lines)


def _bars(r: dict) -> list:
    """A run's bars: (label, kind, clean accuracy, ASR) for B, each reached B'_X and each R_X."""
    bars = [("B", "B", r.get("base_test_acc"), r.get("base_asr"))]
    ths = [t for t in r.get("thresholds") or [] if t["reached"]]
    bars += [(f"B'{fmt_x(t['x'])}", "B'", t["test_acc"], t["asr"]) for t in ths]
    bars += [(f"R{fmt_x(t['x'])}", "R", t["repaired_test_acc"], t["repaired_asr"]) for t in ths
             if not (missing(t.get("repaired_test_acc")) and missing(t.get("repaired_asr")))]
    return bars


def plot_zoo(result: ZooResult, path) -> None:
    """``zoo.png``: per model, grouped bars of clean test accuracy (top) and ASR (bottom) for B, each reached
    B'_X and each R_X, values written on the bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot
    from matplotlib.patches import Patch

    rows = [r for r in result.rows if r["status"] != "failed"]
    colors = {"B": "0.45", "B'": "tab:blue", "R": "tab:green"}
    groups, pos, cursor = [], [], 0.0
    for r in rows:
        bars = _bars(r)
        xs = [cursor + i for i in range(len(bars))]
        groups.append((r, bars, xs))
        pos += xs
        cursor += len(bars) + 1.0
    fig = Figure(figsize=(min(24.0, max(6.0, 1.5 + 0.45 * max(1.0, cursor))), 6.5), dpi=110)
    FigureCanvasAgg(fig)
    for k, title in enumerate(("clean test accuracy (%)", "attack success rate (%)")):
        ax = fig.add_subplot(2, 1, k + 1)
        for r, bars, xs in groups:
            vals = [float("nan") if missing(b[2 + k]) else float(b[2 + k]) for b in bars]
            ax.bar(xs, vals, 0.8, color=[colors[b[1]] for b in bars])
            for x, v in zip(xs, vals):
                if v == v:  # not NaN
                    ax.text(x, v + 1.5, f"{v:.0f}", ha="center", va="bottom", fontsize=6)
            ax.annotate(r["name"], xy=((xs[0] + xs[-1]) / 2, 0), xycoords=("data", "axes fraction"),
                        xytext=(0, -22), textcoords="offset points", ha="center", va="top", fontsize=8)
        ax.set_xticks(pos)
        ax.set_xticklabels([b[0] for _, bars, _ in groups for b in bars], fontsize=6)
        ax.set_xlim(-1, max(cursor - 1, 1))
        ax.set_ylim(0, 112)
        ax.set_ylabel(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        if k == 0:
            ax.set_title(f"Pruning defense on {len(rows)} model{'s' if len(rows) != 1 else ''}: "
                         "B, B'_X (pruned) and R_X (fine-pruned)", fontsize=10)
            ax.legend(handles=[Patch(color=colors["B"], label="B (suspect)"),
                               Patch(color=colors["B'"], label="B'_X (pruned)"),
                               Patch(color=colors["R"], label="R_X (fine-pruned)")],
                      fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if not rows:
        fig.text(0.5, 0.5, "no run succeeded", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def _write_file(path: Path, write) -> None:
    """Write one file whole (:func:`badprune.atomic.replacing`): ``write(temporary path)``."""
    with atomic.replacing(path) as tmp:
        write(Path(tmp))


def zoo_json(result: ZooResult) -> dict:
    """``zoo.json``: the manifest, the cluster, the counts, the wall seconds and every row (with its resolved
    entry, node and seconds)."""
    return jsonable({"manifest": result.manifest, "out": str(result.out), "seconds": result.seconds,
                     "counts": result.counts(), "ok": result.ok,
                     "cluster": result.cluster.to_json() if result.cluster else None, "runs": result.rows})


def write_tables(result: ZooResult) -> None:
    """``zoo.csv``, ``zoo.md``, ``zoo.json`` and ``zoo.png`` in the zoo's folder, each written whole."""
    out = result.out
    _write_file(out / ZOO_CSV, lambda p: p.write_text(zoo_csv(result), encoding="utf-8"))
    _write_file(out / ZOO_MD, lambda p: p.write_text(zoo_markdown(result), encoding="utf-8"))
    _write_file(out / ZOO_JSON, lambda p: p.write_text(json.dumps(zoo_json(result), indent=2,
                                                                  allow_nan=False) + "\n", encoding="utf-8"))
    _write_file(out / ZOO_PNG, lambda p: plot_zoo(result, p))


def format_table(result: ZooResult) -> str:
    """The console table: one line per run, its status and, per threshold, B'_X's clean accuracy and ASR."""
    lines = []
    width = max([len(r["name"]) for r in result.rows] + [3])
    for r in result.rows:
        s = f"{r['name']:<{width}}  {r['status']:<7}"
        if r["status"] == "failed":
            s += f"  {r['error']}"
        else:
            s += f"  B {_pct_cell(r.get('base_test_acc'))} ASR {_pct_cell(r.get('base_asr'))}"
            for t in r.get("thresholds") or []:
                if t["reached"]:
                    s += (f" | X={fmt_x(t['x'])}: {t['channels']} ch {_pct_cell(t['test_acc'])} "
                          f"ASR {_pct_cell(t['asr'])}")
                    if not missing(t.get("repaired_asr")):
                        s += f" (R {_pct_cell(t['repaired_test_acc'])} ASR {_pct_cell(t['repaired_asr'])})"
                else:
                    s += f" | X={fmt_x(t['x'])}: not reached"
        lines.append(s)
    return "\n".join(lines)


def summary_line(result: ZooResult) -> str:
    """``zoo: 4 runs, 3 ok (1 already complete), 1 failed in 31.2 s on a local Ray (2 CPUs)``."""
    c = result.counts()
    s = (f"zoo: {len(result.rows)} runs, {c['ok'] + c['skipped']} ok ({c['skipped']} already complete), "
         f"{c['failed']} failed in {result.seconds:.1f} s")
    if result.cluster is not None:
        cl = result.cluster
        s += f" on a {cl.started} Ray ({cl.nodes} node{'s' if cl.nodes != 1 else ''}, {cl.cpus:g} CPUs)"
    return s
