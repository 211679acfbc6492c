"""Writing a sweep's outputs: ``sweep.csv``, ``sweep.json``, ``results.md``, ``sweep.png``, the pruned models B'_X
and the GoodNets G_X.

:func:`write_outputs` builds everything in a temporary sibling folder and renames it into place at the end, so a
failed or interrupted run never leaves a half-written output folder. :func:`format_table`, :func:`summary_line`
and :func:`results_markdown` give the same results as text (for the console and the README).

Nothing here imports TensorFlow or matplotlib at import time: matplotlib is imported inside :func:`plot_sweep`,
and Keras only runs when the pruned models are built and saved; a warm sweep's models are written from the
templates in B's cached record without it (:mod:`badprune.record`).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from .errors import BadpruneError, warn
from .runfolder import (CHANNELS_PNG, MODELS_DIR, PERCENT_COLUMNS, POISONED_MEAN, RESULTS_MD, SWEEP_CSV,
                        SWEEP_JSON, SWEEP_PNG, fmt_x, goodnet_filename, json_text, missing, model_filename,
                        table_channel, table_columns, table_value)
from .outdir import check_output, staged_folder
from .result import SweepResult

__all__ = ["write_outputs", "check_output", "format_table", "summary_line", "results_markdown", "plot_sweep",
           "plot_channels", "sweep_csv"]


def _col(result: SweepResult, col: str) -> np.ndarray:
    return np.asarray(result.table[col])


def _n_steps(result: SweepResult) -> int:
    return len(_col(result, "step"))


def _fraction(result: SweepResult, step: int) -> float:
    f = table_value(result, "fraction_pruned", step)
    if f is None:
        f = step / result.n_channels if result.n_channels else 0.0
    return float(f)


def _pct_text(v, decimals: int = 2) -> str:
    return "n/a" if missing(v) else f"{float(v):.{decimals}f}%"


def _x_unit(result: SweepResult) -> str:
    return "% of the base validation accuracy" if result.relative else "percentage points of validation accuracy"


# ---------------------------------------------------------------------------------------------- the outputs
def sweep_csv(result: SweepResult) -> str:
    """The per-step table as CSV text (header: :func:`~badprune.runfolder.table_columns`; step 0 has an empty
    channel; missing values empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = table_columns(result)
    w.writerow(cols)
    for k in range(_n_steps(result)):
        out = []
        for c in cols:
            if c == "step":
                out.append(str(int(table_value(result, c, k))))
            elif c == "channel":
                ch = table_channel(result, k)
                out.append("" if ch is None else str(ch))
            else:
                v = table_value(result, c, k)
                if v is None:
                    out.append("")
                elif c in ("mean_activation", POISONED_MEAN):
                    out.append(f"{float(v):.6g}")
                elif c == "fraction_pruned":
                    out.append(f"{float(v):.6f}")
                else:
                    out.append(f"{float(v):.4f}")
        w.writerow(out)
    return buf.getvalue()


def _data_lines(config: dict) -> list:
    """``- valid: path (n images)`` lines from config keys valid/test/poisoned and sizes."""
    sizes = config.get("sizes") or {}
    lines = []
    for key, label in (("valid", "validation (clean)"), ("test", "test (clean)"), ("poisoned", "test (poisoned)")):
        path = config.get(key)
        n = sizes.get(key) if isinstance(sizes, dict) else None
        if path is None and n is None:
            continue
        s = f"- {label}: "
        s += f"`{path}`" if path is not None else "(given)"
        if n is not None:
            s += f", {int(n)} images"
        lines.append(s)
    if isinstance(sizes, dict):  # any other sizes we do not know by name
        for key, n in sizes.items():
            if key not in ("valid", "test", "poisoned"):
                lines.append(f"- {key}: {n}")
    return lines


def _md_table(header, rows) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return out


def _cell(result: SweepResult, col: str, step: int) -> str:
    return _pct_text(table_value(result, col, step))


def repair_steps(mode: str, info: dict) -> str:
    """What the repair did for one R_X (its mode and ``info``, as sweep.json's ``repaired[]`` holds them), in a few
    words."""
    u = info.get("unlearn")
    if not u:
        return f"{mode} fine-tuning"
    if u.get("class") is None:
        return "head fine-tuning (the scan found no backdoor)"
    c = u["class"]
    pj = u.get("project") or {}
    what = {"shift": f"the direction toward class {c} removed",
            "off-class-mean": f"the direction toward class {c}, less the class's mean, removed"}.get(pj.get("direction"))
    if u.get("rejected"):
        done = f"head fine-tuning (unlearning toward class {c} lost too much held-out accuracy)"
    elif pj.get("kept") == "head":
        done = "head fine-tuning"
    else:
        done = f"shift toward class {c} unlearned"
    return f"{done}; {what}" if pj.get("kept") else done


def _repaired_tables(result: SweepResult) -> list:
    """The R_X tables (fine-pruning) of a result that has them."""
    C = result.n_channels
    mode = result.repaired[0].mode
    lines = [f"## Repaired network R_X (fine-pruning: B'_X with its {'whole network' if mode == 'full' else 'head'}"
             " fine-tuned on clean validation data)", ""]
    rows = [[fmt_x(r.x), f"{r.step}/{C}", repair_steps(r.mode, r.info), _pct_text(r.info.get("holdout_best")),
             _pct_text(r.row.get("test_acc")), _pct_text(r.row.get("asr"))] for r in result.repaired]
    lines += _md_table(["X", "channels pruned", "what the repair did", "held-out valid acc", "clean test acc",
                        "attack success rate"], rows)
    lines += ["", "## GoodNet of B and R_X (outputs N when B and R_X disagree)", ""]
    rows = [[fmt_x(r.x)] + [_pct_text(r.row.get(c)) for c in ("goodnet_test_acc", "goodnet_asr", "goodnet_detection",
                                                           "goodnet_false_alarm")] for r in result.repaired]
    lines += _md_table(["X", "clean test acc", "attack success rate", "detection rate (poisoned -> N)",
                        "false-alarm rate (clean -> N)"], rows)
    lines.append("")
    return lines


def results_markdown(result: SweepResult) -> str:
    """The lab's two tables (B'_X and the GoodNet G_X at each threshold X) as Markdown, with a short header, and
    the R_X tables when the result was fine-tuned."""
    C = result.n_channels
    lines = [f"# Pruning defense: {result.model_name}", ""]
    lines.append(f"- model: `{result.model_name}`; pruned layer: `{result.layer}`"
                 + (f" (zeroing `{result.conv_layer}`)" if result.conv_layer else "")
                 + f", {C} channels pruned one at a time, lowest mean activation first")
    lines.append(f"- N = {result.num_classes} (the GoodNet's \"backdoor detected\" label)")
    lines.append(f"- X = drop in {_x_unit(result)}")
    lines += _data_lines(result.config or {})
    lines.append("")

    lines += ["## Pruned network B'_X", ""]
    rows = [["B (base)", 0, "0.0%", _cell(result, "valid_acc", 0), _cell(result, "test_acc", 0),
             _cell(result, "asr", 0)]]
    for t in result.thresholds:
        if t.reached:
            s = t.step
            rows.append([fmt_x(t.x), f"{s}/{C}", f"{100 * _fraction(result, s):.1f}%", _cell(result, "valid_acc", s),
                         _cell(result, "test_acc", s), _cell(result, "asr", s)])
        else:
            rows.append([fmt_x(t.x)] + ["not reached"] * 5)
    lines += _md_table(["X", "channels pruned", "fraction pruned", "valid acc", "clean test acc",
                        "attack success rate"], rows)
    lines.append("")

    lines += ["## GoodNet G_X (outputs N when B and B'_X disagree)", ""]
    rows = []
    for t in result.thresholds:
        if t.reached:
            rows.append([fmt_x(t.x)] + [_cell(result, c, t.step) for c in ("goodnet_test_acc", "goodnet_asr",
                                                                              "goodnet_detection",
                                                                              "goodnet_false_alarm")])
        else:
            rows.append([fmt_x(t.x)] + ["not reached"] * 4)
    lines += _md_table(["X", "clean test acc", "attack success rate", "detection rate (poisoned -> N)",
                        "false-alarm rate (clean -> N)"], rows)
    lines.append("")
    if getattr(result, "repaired", None):
        lines += _repaired_tables(result)
    return "\n".join(lines)


def _save_png(fig, path) -> None:
    """Lay ``fig`` out once (tight) and write it as PNG: with the layout engine dropped, savefig draws once, not a
    second time to redo the layout; zlib level 1 instead of 6 costs ~15% in size and saves most of the encoding."""
    fig.tight_layout()
    fig.set_layout_engine(None)
    fig.savefig(str(path), format="png", pil_kwargs={"compress_level": 1})


def plot_sweep(result: SweepResult, path) -> None:
    """``sweep.png``: clean test accuracy and ASR vs fraction pruned, B' solid and G dashed, thresholds marked, and
    R_X (fine-pruned) as stars at its B'_X's step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, never a GUI backend

    x = 100 * np.array([_fraction(result, k) for k in range(_n_steps(result))])
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    series = [("test_acc", "B' clean test accuracy", "tab:blue", "-"),
              ("asr", "B' attack success rate", "tab:red", "-"),
              ("goodnet_test_acc", "G clean test accuracy", "tab:blue", "--"),
              ("goodnet_asr", "G attack success rate", "tab:red", "--")]
    for col, label, color, ls in series:
        y = np.asarray(_col(result, col), dtype=float)
        if np.all(np.isnan(y)):
            continue
        ax.plot(x, y, ls, color=color, label=label, linewidth=1.6)
    for i, r in enumerate(getattr(result, "repaired", None) or []):  # R_X: one marker pair at B'_X's step
        xv = 100 * _fraction(result, r.step)
        for col, color, label in (("test_acc", "tab:blue", "R_X clean test accuracy"),
                                  ("asr", "tab:red", "R_X attack success rate")):
            if not missing(r.row.get(col)):
                ax.plot([xv], [r.row[col]], "*", color=color, markersize=11, markeredgecolor="black",
                        markeredgewidth=0.6, label=label if i == 0 else None)
    by_step = {}  # thresholds reached at the same step share one line and one label
    for t in result.thresholds:
        if t.reached:
            by_step.setdefault(t.step, []).append(fmt_x(t.x))
    for i, (step, xs) in enumerate(sorted(by_step.items())):
        xv = 100 * _fraction(result, step)
        ax.axvline(xv, color="0.4", linestyle=":", linewidth=1, label="threshold X reached" if i == 0 else None)
        ax.annotate("X=" + ", ".join(xs), xy=(xv, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -6),
                    textcoords="offset points", fontsize=8, color="0.2", rotation=90, va="top", ha="left",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    ax.set_xlim(0, 100)
    ax.set_ylim(-2, 102)
    ax.set_xlabel(f"channels of {result.layer} pruned (%)")
    ax.set_ylabel("rate (%)")
    ax.set_title(f"Pruning defense: {result.model_name}, layer {result.layer} ({result.n_channels} channels)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label with only --valid and no threshold reached
        ax.legend(loc="best", fontsize=8)
    _save_png(fig, path)


def _bars(ax, left, width, heights, color, label) -> None:
    """A bar per value as one collection (one artist, not one rectangle each); NaN draws no bar."""
    from matplotlib.collections import PolyCollection

    h = np.nan_to_num(np.asarray(heights, float))
    v = np.zeros((len(h), 4, 2))
    v[:, :2, 0] = left[:, None]
    v[:, 2:, 0] = left[:, None] + width
    v[:, 1:3, 1] = h[:, None]
    bars = PolyCollection(v, facecolors=color, edgecolors="none", label=label)
    bars.sticky_edges.y.append(0)  # like ax.bar: no margin below the baseline
    ax.add_collection(bars)


def plot_channels(result: SweepResult, path) -> None:
    """``channels.png``: per channel of the prune layer, in pruning order, its mean activation on the clean
    validation set and on the poisoned set, with the channels pruned at each X marked. One look says whether the
    trigger lives in channels that are dormant on clean inputs (pruning works) or in busy ones (it cannot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import ScaledTranslation

    order = np.asarray(result.ranking)
    clean = np.asarray(result.mean_activation, float)[order]
    poisoned = np.asarray(result.poisoned_mean_activation, float)[order]
    pos = np.arange(1, len(order) + 1)
    fig = Figure(figsize=(9, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.42
    top = float(max(np.nanmax(clean, initial=0.0), np.nanmax(poisoned, initial=0.0))) or 1.0
    _bars(ax, pos - w, w, clean, "tab:blue", "clean validation")
    _bars(ax, pos, w, poisoned, "tab:red", "poisoned")
    for i, t in enumerate(t for t in result.thresholds if t.reached):
        ax.axvline(t.step + 0.5, color="0.3", linestyle=":", linewidth=1,
                   label="pruned up to here at X" if i == 0 else None)
        ax.annotate(f"X={fmt_x(t.x)}", xy=(t.step + 0.5, top), xytext=(2, -2 - 12 * (i % 3)),
                    textcoords="offset points", fontsize=8, color="0.2", va="top")
    ax.set_xlim(0.3, len(order) + 0.7)
    pad = 4.0
    if len(order) <= 64:  # name each channel under its bars: plain texts, much cheaper than 64 ticks
        ax.set_xticks([])
        size = 6 if len(order) > 24 else 8
        below = ax.get_xaxis_transform() + ScaledTranslation(0, -3 / 72, fig.dpi_scale_trans)
        names = [str(int(c)) for c in order]
        for p, name in zip(pos, names):
            ax.text(p, 0, name, transform=below, fontsize=size, rotation=90, ha="center", va="top")
        pad += 3 + 0.65 * size * max(map(len, names), default=0)
    ax.set_xlabel(f"channel of {result.layer}, in pruning order (dormant on clean data first)", labelpad=pad)
    ax.set_ylabel("mean activation")
    ax.set_title(f"{result.model_name}: where the trigger lives ({result.layer}, {len(order)} channels)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _save_png(fig, path)


# ---------------------------------------------------------------------------------------------- text output
def format_table(result: SweepResult, thresholds_only: bool = False) -> str:
    """A fixed-width console table of the steps (or only the base row and the threshold rows)."""
    marks = {}
    for t in result.thresholds:
        if t.reached:
            marks.setdefault(t.step, []).append(f"X={fmt_x(t.x)}")
    steps = range(_n_steps(result))
    if thresholds_only:
        steps = [0] + sorted(marks)
    header = ["step", "channel", "mean_act", "pruned", "valid", "test", "ASR", "G test", "G ASR", "G detect",
              "G f.alarm", ""]
    widths = [5, 7, 10, 7, 8, 8, 8, 8, 8, 9, 9, 0]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)).rstrip()]
    for k in steps:
        ch = table_channel(result, k)
        ma = table_value(result, "mean_activation", k)
        cells = [str(k), "-" if ch is None else str(ch), "-" if ma is None else f"{float(ma):.4g}",
                 f"{100 * _fraction(result, k):.1f}%"]
        cells += [_pct_text(table_value(result, c, k)) for c in PERCENT_COLUMNS]
        cells.append(("B " if k == 0 else "") + " ".join(marks.get(k, [])))
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip())
    unreached = [f"X={fmt_x(t.x)}" for t in result.thresholds if not t.reached]
    if unreached:
        lines.append(f"not reached: {', '.join(unreached)}")
    return "\n".join(lines)


def _duration(timings: dict):
    for key in ("sweep", "prune", "total"):
        v = (timings or {}).get(key)
        if v is not None and not missing(v):
            return float(v)
    return None


def summary_line(result: SweepResult) -> str:
    """One line: what was pruned, in how long, and each threshold's B'_X and G_X numbers."""
    s = f"pruned {result.n_channels} channels of {result.layer}"
    d = _duration(result.timings)
    if d is not None:
        s += f" in {d:.2f} s"
    parts = []
    for t in result.thresholds:
        if not t.reached:
            parts.append(f"X={fmt_x(t.x)}: not reached")
            continue
        k = t.step
        v = {c: _pct_text(table_value(result, c, k), 1) for c in ("valid_acc", "test_acc", "asr", "goodnet_test_acc",
                                                                "goodnet_asr")}
        parts.append(f"X={fmt_x(t.x)}: step {k} valid {v['valid_acc']} test {v['test_acc']} ASR {v['asr']} | "
                     f"GoodNet test {v['goodnet_test_acc']} ASR {v['goodnet_asr']}")
    for r in getattr(result, "repaired", None) or []:
        parts.append(f"R_{fmt_x(r.x)} ({r.mode} fine-tuned): test {_pct_text(r.row.get('test_acc'), 1)} "
                     f"ASR {_pct_text(r.row.get('asr'), 1)}")
    if parts:
        s += "; " + "; ".join(parts)
    return s


#: B'_X with an attack success rate at least this (percent) still obeys the trigger: the sweep suggests the repair
HIGH_ASR = 10.0
#: what ``repair_hint`` quotes for the repair's cost in head mode (measured on 2 cores: lab3 at lab scale 10.0 s for
#: X = 2, 4, 10 in bench/RESULTS.md; the demo 6-19 s per X on a loaded host)
REPAIR_COST = "about 5-20 s per threshold on 2 cores (20-60 s where the scan finds a shift to unlearn)"


def _pct1(v) -> str:
    return "-" if v is None or missing(v) else f"{float(v):.1f} %"


def repair_summary(result: SweepResult) -> str | None:
    """What the whole defense achieved, in one line, for the first repaired X: R_X's clean test accuracy and ASR,
    then pruning alone's (B'_X), e.g. ``R_2: clean 94.4 %, ASR 0.7 %; pruning alone: 92.6 %, 50.5 %``. None
    without a repair."""
    repaired = getattr(result, "repaired", None) or []
    if not repaired:
        return None
    r = repaired[0]
    pruned = {c: table_value(result, c, r.step) for c in ("test_acc", "asr")}
    has_asr = not (r.row.get("asr") is None or missing(r.row.get("asr")))
    if has_asr:
        return (f"R_{fmt_x(r.x)}: clean {_pct1(r.row.get('test_acc'))}, ASR {_pct1(r.row.get('asr'))}; "
                f"pruning alone: {_pct1(pruned['test_acc'])}, {_pct1(pruned['asr'])}")
    return (f"R_{fmt_x(r.x)}: clean {_pct1(r.row.get('test_acc'))}; pruning alone: {_pct1(pruned['test_acc'])} "
            "(no poisoned set: ASR not measured)")


def repair_hint(result: SweepResult, run_dir, cached: bool = True) -> str | None:
    """For a sweep without repair: one line naming ``badprune-fast repair RUN`` and its cost, when a B'_X still has
    an ASR of at least :data:`HIGH_ASR` or, without a poisoned set, whenever a threshold was reached (its ASR is
    unknown). None when no threshold was reached or every B'_X is below :data:`HIGH_ASR`."""
    reached = [t for t in result.thresholds if t.reached]
    if not reached:
        return None
    asr = [table_value(result, "asr", t.step) for t in reached]
    known = [(t, float(a)) for t, a in zip(reached, asr) if a is not None and not missing(a)]
    if known:
        high = [(t, a) for t, a in known if a >= HIGH_ASR]
        if not high:
            return None
        t, a = high[0]
        why = f"B'_{fmt_x(t.x)} still obeys the trigger (ASR {a:.1f} %)"
    else:
        why = "no poisoned set: pruning alone may leave the backdoor in place"
    how = (f"badprune-fast repair {run_dir}" if cached else
           "the same sweep with --fine-tune (this run's activations were not cached)")
    return (f"repair: {why}; `{how}` fine-tunes each B'_X on clean data into R_X, {REPAIR_COST} "
            "(over the cached activations, no trunk pass)")


# -------------------------------------------------------------------------------------------- write_outputs
def _from_templates(result: SweepResult, kind: str, variants) -> bool:
    """Write ``variants`` ((path, name, channels)) of ``kind`` from the templates in B's cached record (TF-free
    when it holds them; the first time Keras saves them into it); False when the result has no usable record."""
    rec = getattr(result, "model_record", None)
    got = None if rec is None else rec.model_template(kind, result.get_model)
    if got is None:
        return False
    from .models.saving import write_variants

    template, patch = got
    return write_variants(template, [(path, name, patch.weights(chans)) for path, name, chans in variants])


def _save_models(result: SweepResult, folder: Path, save_goodnets: bool) -> None:
    """B'_X and G_X for every X reached, each kind saved by Keras once and written per X with only its pruned
    weights changed (from the templates in B's cached record, :mod:`badprune.record`, or
    :func:`badprune.models.save_variants`); then R_X and their GoodNets, if any."""
    reached = [t for t in result.thresholds if t.reached]
    if not reached:
        return
    folder.mkdir()
    if not _from_templates(result, "bprime", [(folder / model_filename(t.x), None, t.channels) for t in reached]):
        from .models import prune_variants, save_variants

        template, weights = prune_variants(result.get_model(), result.layer, [t.channels for t in reached])
        save_variants(template, [(folder / model_filename(t.x), None, w) for t, w in zip(reached, weights)])
    if save_goodnets:
        from .goodnet import sweep_variants
        from .models import save_variants
        from .record import UnsafeTemplate

        try:
            done = _from_templates(result, "goodnet", [(folder / goodnet_filename(t.x), goodnet_filename(t.x, ""),
                                                     t.channels) for t in reached])
            if not done:
                g, per_x = sweep_variants(result, [t.x for t in reached])
        except UnsafeTemplate:
            raise
        except BadpruneError as e:  # B'_X are still useful without their one-graph GoodNets
            for t in reached:
                warn(f"no {goodnet_filename(t.x)}: {e.line()}")
        else:
            if not done:
                save_variants(g, [(folder / goodnet_filename(t.x), name, w) for t, (name, w) in zip(reached, per_x)])
    for r in getattr(result, "repaired", None) or []:
        r.model.save(str(folder / model_filename(r.x, "repaired")))
        if save_goodnets:
            from .goodnet import from_repaired

            from_repaired(result, r).save(str(folder / model_filename(r.x, "goodnet_repaired")))


def write_outputs(result: SweepResult, out_dir, force: bool = False, save_models: bool = True,
                  save_goodnets: bool = True, keep=(), protect=()):
    """Write a sweep's run folder.

    Parameters
    ----------
    result : SweepResult
    out_dir : str or path
        The run folder; an existing non-empty one is an error unless ``force`` (then it is replaced).
    save_models : bool
        Write ``models/B_prime_X<X>.keras`` (needs ``result.model``).
    save_goodnets : bool
        Also write ``models/goodnet_X<X>.keras``, the one-graph GoodNet G_X (:mod:`badprune.goodnet`).

    keep : sequence of str
        With ``force``: entries of the existing folder to carry over (e.g. ``tflite``).
    protect : sequence of paths
        With ``force``: paths the replaced folder must not hold (the run's inputs, the cache); besides, only a run
        folder badprune wrote is replaced, never the working folder, the home folder or ``/``.

    With fine-tuning (``result.repaired``) also ``models/repaired_X<X>.keras`` (R_X) and
    ``models/goodnet_repaired_X<X>.keras`` (the GoodNet of B and R_X).

    Returns
    -------
    pathlib.Path
        The run folder, written whole (:func:`badprune.outdir.staged_folder`): ``sweep.csv``, ``sweep.json``,
        ``results.md``, ``sweep.png`` and the models.
    """
    with staged_folder(out_dir, force, keep, protect) as tmp:
        (tmp / SWEEP_CSV).write_text(sweep_csv(result), encoding="utf-8")
        (tmp / SWEEP_JSON).write_text(json_text(result), encoding="utf-8")
        (tmp / RESULTS_MD).write_text(results_markdown(result), encoding="utf-8")
        plot_sweep(result, tmp / SWEEP_PNG)
        if getattr(result, "poisoned_mean_activation", None) is not None:
            plot_channels(result, tmp / CHANNELS_PNG)
        if getattr(result, "scan", None) is not None:
            from .scan import write_files

            write_files(result.scan, tmp)
        if save_models and (getattr(result, "model_record", None) is not None or result.model is not None):
            _save_models(result, tmp / MODELS_DIR, save_goodnets)
    return Path(out_dir).expanduser().absolute()
