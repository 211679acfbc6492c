"""The scan's detection table: `badprune.scan` over a set of demo scenarios (clean and backdoored), and how well its
score separates them.

    python bench/detection.py DIR [DIR ...]        # scenario folders of `badprune-fast demo` (scenario.json)

A folder is clean when its scenario's poison rate is 0 and backdoored when the poison rate is above 0 and the
backdoor works (ASR >= 50 %); a poisoned model whose backdoor did not take (ASR < 50 %, e.g. SIG clean-label or some
small variants) is neither: it is listed, but left out of every measure. Targets are the scenario's
(``attack.targets``, or ``target``; all-to-all has none). Writes
``bench/DETECTION.md`` / ``.json`` and ``bench/DETECTION.png`` (the ROC curve) with, per model, the score,
verdict, statistic and suspected target, and over all: ROC-AUC, the true-positive rate at a 5 % false-positive
rate, the verdict's accuracy, the cross-entropy of the score as P(backdoored) (TrojAI's measure) and the share of
backdoored models whose target is the first suspect (a model with several targets counts when the first suspect
is one of them; all-to-all models, which have no single target, are left out of that share).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _truth(d: Path) -> dict:
    sc = json.loads((d / "scenario.json").read_text())
    att = sc.get("attack") or {}
    rate = float(sc.get("poison_rate", 0.0))
    targets = att.get("targets") if att else [sc.get("target")]
    if att.get("label_rule") == "all-to-all" or sc.get("family") == "all-to-all":
        targets = None
    backdoored = rate > 0 and float(sc.get("asr", 100.0)) >= 50.0
    return {"family": sc.get("family", "patch") if rate > 0 else "clean", "seed": sc.get("seed"),
            "weak": rate > 0 and not backdoored,
            "small": bool(sc.get("small")), "backdoored": backdoored, "targets": targets,
            "asr": sc.get("asr"), "clean_acc": sc.get("clean_acc")}


def auc(scores, labels) -> float:
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def roc(scores, labels):
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pts = [(0.0, 0.0)]
    for t in sorted(set(s), reverse=True):
        pts.append((float(np.mean(s[~y] >= t)) if (~y).any() else 0.0, float(np.mean(s[y] >= t)) if y.any() else 0.0))
    pts.append((1.0, 1.0))
    return pts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args(argv)
    from badprune import scan

    rows = []
    for d in map(Path, args.dirs):
        truth = _truth(d)
        t0 = time.perf_counter()
        res = scan.run(model=str(d / "model.keras"), valid=str(d / "valid.h5"), progress=False, use_cache=False)
        first = res.targets[0]["class"] if res.targets else None
        rows.append({"dir": str(d), **truth, "score": res.score, "backdoored_verdict": bool(res.backdoored),
                     "statistic": res.statistic, "shift_statistic": res.shift_statistic,
                     "stimulation_statistic": res.stim_statistic, "probe": res.probe, "first_suspect": first,
                     "target_first": (first in truth["targets"]) if truth["backdoored"] and truth["targets"] else None,
                     "seconds": round(time.perf_counter() - t0, 2)})
        print(f"detection: {d.name}: {truth['family']} backdoored={truth['backdoored']} -> score {res.score:.2f} "
              f"(statistic {res.statistic:.2f}), first suspect {first}", file=sys.stderr, flush=True)
    weak = [r for r in rows if r["weak"]]
    allrows, rows = rows, [r for r in rows if not r["weak"]]
    y = [r["backdoored"] for r in rows]
    s = [r["score"] for r in rows]
    eps = 1e-6
    ce = float(np.mean([-(math.log(max(p, eps)) if t else math.log(max(1 - p, eps))) for p, t in zip(s, y)]))
    neg = sorted((r["score"] for r in rows if not r["backdoored"]), reverse=True)
    k = int(math.floor(0.05 * len(neg)))
    thr = neg[k] if neg else 1.0                       # at most 5 % of the clean models at or above: strictly above
    tpr5 = float(np.mean([r["score"] > thr for r in rows if r["backdoored"]])) if any(y) else float("nan")
    firsts = [r["target_first"] for r in rows if r["target_first"] is not None]
    summary = {"models": len(rows), "backdoored": int(sum(y)), "clean": int(len(y) - sum(y)), "auc": auc(s, y),
               "tpr_at_5pct_fpr": tpr5, "verdict_accuracy": float(np.mean([r["backdoored_verdict"] == r["backdoored"]
                                                                         for r in rows])),
               "cross_entropy": ce, "target_first": float(np.mean(firsts)) if firsts else float("nan"),
               "target_first_counted": len(firsts), "false_positives": int(sum(r["backdoored_verdict"] and not
                                                                                r["backdoored"] for r in rows)),
               "threshold_statistic": scan.THRESHOLD, "shift_threshold": scan.SHIFT_THRESHOLD,
               "stimulation_threshold": scan.STIM_THRESHOLD, "left_out_weak": len(weak),
               "mean_seconds": float(np.mean([r["seconds"] for r in rows]))}
    out = Path(args.out)
    (out / "DETECTION.json").write_text(json.dumps({"summary": summary, "rows": allrows}, indent=1))
    lines = ["# Detection: `badprune-fast scan` over demo scenarios", "",
             f"Written by `python bench/detection.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
             f"{summary['models']} models ({summary['backdoored']} backdoored, {summary['clean']} clean), clean data "
             f"only (each scenario's valid.h5); {len(weak)} poisoned models whose backdoor did not take (ASR < 50 %) "
             "are listed last and left out of the measures.", "",
             "| ROC-AUC | TPR at 5 % FPR | verdict accuracy | false positives | cross-entropy | target first | "
             "seconds per model |", "|---:|---:|---:|---:|---:|---:|---:|",
             f"| {summary['auc']:.3f} | {summary['tpr_at_5pct_fpr']:.2f} | {summary['verdict_accuracy']:.2f} | "
             f"{summary['false_positives']} of {summary['clean']} | {summary['cross_entropy']:.3f} | "
             f"{summary['target_first']:.2f} ({summary['target_first_counted']} counted) | "
             f"{summary['mean_seconds']:.1f} |", "",
             "| model | family | small | backdoored | target(s) | score | statistic | shift | stimulation | probe | "
             "verdict | first suspect |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|---|---:|"]
    for r in rows + weak:
        truth = "weak (left out)" if r["weak"] else ("yes" if r["backdoored"] else "no")
        lines.append(f"| {Path(r['dir']).name} | {r['family']} | {'yes' if r['small'] else ''} | {truth} | "
                     f"{r['targets'] if r['backdoored'] or r['weak'] else '-'} | "
                     f"{r['score']:.2f} | {r['statistic']:.2f} | {r['shift_statistic']:.2f} | "
                     f"{r['stimulation_statistic']:.2f} | {r['probe']} | "
                     f"{'backdoored' if r['backdoored_verdict'] else 'clean'} | {r['first_suspect']} |")
    (out / "DETECTION.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = roc(s, y)
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#c0392b")
    ax.plot([0, 1], [0, 1], ls=":", color="#7f8c8d")
    ax.set_xlabel("false-positive rate (clean models)")
    ax.set_ylabel("true-positive rate (backdoored models)")
    ax.set_title(f"scan ROC, AUC {summary['auc']:.2f}")
    fig.tight_layout()
    fig.savefig(out / "DETECTION.png", dpi=110)
    plt.close(fig)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
