"""``badprune-fast sweep``: the pruning defense on a model and its data, or on the built-in demo BadNet."""
from __future__ import annotations

import os
import time

from ..errors import BadpruneError
from ._common import add_fine_tune_args, add_source_args, load_tensorflow, note


def add_parser(sub):
    p = sub.add_parser("sweep", help="run the pruning defense (no arguments: the built-in demo BadNet)",
                       description="Prune the prune layer's channels one by one (dormant first) and record "
                                   "accuracy, ASR and GoodNet metrics at every step.")
    add_source_args(p)
    d = p.add_argument_group("data (lab h5: 'data' (N,3,55,47) and 'label')")
    d.add_argument("--valid", help="clean validation set (ranking and thresholds)")
    d.add_argument("--test", help="clean test set")
    d.add_argument("--poisoned", help="poisoned test set (labels = the attacker's target)")
    d.add_argument("--scale", default="auto", help="pixel scale: auto (default), raw (0..255) or unit (/255)")
    s = p.add_argument_group("sweep")
    s.add_argument("--layer", help="prune layer (default: the last pooling layer before the dense part)")
    s.add_argument("--thresholds", type=float, nargs="+", default=[2, 4, 10], metavar="X",
                   help="validation-accuracy drops, in percentage points (default: 2 4 10)")
    s.add_argument("--relative", action="store_true", help="thresholds are percent of the base accuracy")
    s.add_argument("--order", choices=["ascending", "descending"], default="ascending",
                   help="pruning order by mean activation (default: ascending, dormant first)")
    s.add_argument("--mode", choices=["incremental", "full"], default="incremental",
                   help="incremental (default) or full re-evaluation at every step (reference)")
    s.add_argument("--batch-size", type=int, default=128, help="trunk batch size (default and at most 128)")
    f = p.add_argument_group("repair (fine-pruning: each B'_X fine-tuned on clean data into R_X; on by default "
                             "for the demo only)")
    add_fine_tune_args(f)
    f.add_argument("--no-fine-tune", action="store_true", help="no repair, the lab's pruning only (the demo's "
                                                               "default is --fine-tune)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="output folder (default: the first free runs/<model name>[-2, -3, ...])")
    o.add_argument("--force", action="store_true",
                   help="replace an existing output folder (without --out: runs/<model name> itself)")
    o.add_argument("--cache-dir", help="activation cache (default: $BADPRUNE_CACHE or ~/.cache/badprune)")
    o.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    o.add_argument("--no-models", action="store_true", help="do not save the B'_X and G_X models")
    o.add_argument("--export", action="store_true",
                   help="also export B'_X and G_X to LiteRT (tflite/ in the output folder; see `export --help`)")
    o.add_argument("--quantize", choices=["none", "float16", "int8"], default="none",
                   help="with --export: none (float32, default), float16 or int8")
    o.add_argument("--allow-lossy", action="store_true",
                   help="with --export: keep an export whose labels agree with Keras on < 99%% of the images")
    o.add_argument("--scan", action="store_true",
                   help="also scan B (is it backdoored, which target?) on the clean validation set: scan.json/.md/.png")
    o.add_argument("--all-steps", action="store_true", help="print every step, not only the threshold rows")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes")
    p.set_defaults(func=run)
    return p


def run(args):
    """Run the sweep the flags describe, write its run folder, print the table and the summary. A warm sweep (B's
    record and every activation cached, :mod:`badprune.record`) never imports TensorFlow."""
    from .. import defense, report

    model, weights, arch = args.model, args.weights, args.arch
    valid, test, poisoned = args.valid, args.test, args.poisoned
    out, name, default_out = args.out, None, None
    fine_tune, demo = args.fine_tune, False
    if fine_tune is not None and args.no_fine_tune:
        raise BadpruneError("--fine-tune and --no-fine-tune contradict each other", fix="pass one of them")
    if not (model or weights or arch) and not (valid or test or poisoned):
        from ..datasets import ensure_demo

        note(args, "no model or data given: running on the built-in demo BadNet (badprune-fast demo --help)")
        sc = ensure_demo(progress=not args.quiet)
        model, valid, test, poisoned = sc.model, sc.valid, sc.test, sc.bd_test
        note(args, f"demo scenario: {os.path.dirname(sc.model)}")
        default_out, name, demo = os.path.join("runs", "demo"), "demo BadNet", True
        if fine_tune is None and not args.no_fine_tune:  # the demo shows the whole defense: pruning, then repair
            from ..repair import RECOMMENDED

            fine_tune = RECOMMENDED
    if out is None:
        # the default folder is the tool's choice: never refuse it, take the first free runs/<name>[-k]
        # (--force still replaces runs/<name> itself)
        from ..outdir import fresh_folder

        if default_out is None:
            from ..runfolder import model_name

            default_out = os.path.join("runs", model_name(model or weights or "model"))
        out = default_out if args.force else str(fresh_folder(default_out))
        if out != default_out:
            note(args, f"{default_out} exists: writing to {out} (--out DIR chooses the folder)")
    if args.export and args.no_models:
        raise BadpruneError("--export needs the models", fix="drop --no-models")
    if not args.export and (args.quantize != "none" or args.allow_lossy):
        raise BadpruneError("--quantize and --allow-lossy go with --export", fix="add --export")
    # refuse an existing or unwritable output folder before doing the work, not after; --force never deletes
    # an input or the cache
    from .._env import cache_home

    protect = [model, weights, valid, test, poisoned, None if args.no_cache else (args.cache_dir or cache_home())]
    report.check_output(out, force=args.force, protect=protect)

    t0 = time.perf_counter()
    if args.export:  # LiteRT export needs TensorFlow anyway
        load_tensorflow()
    result = defense.run(model=model, weights=weights, arch=arch, valid=valid, test=test, poisoned=poisoned,
                         layer=args.layer, thresholds=args.thresholds, relative=args.relative, order=args.order,
                         scale=args.scale, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                         batch_size=args.batch_size, mode=args.mode, progress=not args.quiet,
                         trust_model=args.trust_model, name=name, log=lambda m: note(args, m),
                         fine_tune=fine_tune, fine_tune_epochs=args.fine_tune_epochs,
                         fine_tune_lr=args.fine_tune_lr, seed=args.seed, before_tensorflow=load_tensorflow,
                         scan=args.scan)
    path = report.write_outputs(result, out, force=args.force, save_models=not args.no_models, protect=protect)
    result.timings["command"] = time.perf_counter() - t0
    print(report.format_table(result, thresholds_only=not args.all_steps))
    print()
    print(report.summary_line(result))
    if result.scan is not None:
        from ..scan import summary

        print(summary(result.scan))
    achieved = report.repair_summary(result)
    if achieved:
        print(achieved)
    elif not args.quiet and not demo:
        hint = report.repair_hint(result, path, cached=not args.no_cache)
        if hint:
            print(hint)
    print(f"outputs: {path}")
    if args.export:
        from ..export import export_run, format_exported

        exported = export_run(path, quantize=args.quantize, allow_lossy=args.allow_lossy,
                             log=lambda m: note(args, m))
        print(format_exported(exported))
        print(f"exported: {os.path.join(str(path), 'tflite')}")
    return 0
