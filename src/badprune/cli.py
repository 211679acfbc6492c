"""``badprune-fast``: the command line. Thin: parses arguments, calls the package, prints.

Errors: a :class:`~badprune.errors.BadpruneError` prints ``error: <what> (<file>): <how to fix>`` and exits 2;
anything else is an internal fault: one line, exit 1 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import BadpruneError


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="run the pruning defense (no arguments: the built-in demo BadNet)",
                       description="Prune the prune layer's channels one by one (dormant first) and record "
                                   "accuracy, ASR and GoodNet metrics at every step.")
    m = p.add_argument_group("model B (the suspect BadNet)")
    m.add_argument("--model", help="full Keras model (.keras or legacy .h5, e.g. the lab's bd_net.h5)")
    m.add_argument("--weights", help="Keras weight file for --arch (e.g. bd_weights.h5)")
    m.add_argument("--arch", choices=["deepid"], help="built-in architecture for --weights")
    m.add_argument("--trust-model", action="store_true",
                   help="allow Lambda layers / custom code from the model file (runs the file's code)")
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
    s.add_argument("--batch-size", type=int, default=1024, help="trunk batch size (default 1024)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="output folder (default: runs/<model name>)")
    o.add_argument("--force", action="store_true", help="replace an existing output folder")
    o.add_argument("--cache-dir", help="activation cache (default: $BADPRUNE_CACHE or ~/.cache/badprune)")
    o.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    o.add_argument("--no-models", action="store_true", help="do not save B'_X models")
    o.add_argument("--all-steps", action="store_true", help="print every step, not only the threshold rows")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes")
    p.set_defaults(func=cmd_sweep)
    return p


def _add_demo(sub):
    p = sub.add_parser("demo", help="build the demo scenario: a real-face BadNet and lab-format data sets",
                       description="Train the lab's DeepID on ORL faces with a BadNets poisoning attack and "
                                   "write the model and valid/test/bd_valid/bd_test h5 files.")
    p.add_argument("--out", help="folder (default: the user cache folder, as used by a bare `sweep`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trigger", default="sunglasses", help="sunglasses (default), square, or a PNG mask path")
    p.add_argument("--poison-rate", type=float, default=0.1)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--small", action="store_true", help="the small, fast variant (10 people; for tests)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder holds a finished scenario")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return p


def build_parser():
    ap = argparse.ArgumentParser(prog="badprune-fast",
                                 description="Exact, C-accelerated pruning defense against backdoored networks.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--version", action="version", version=f"badprune {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    _add_sweep(sub)
    _add_demo(sub)
    return ap


def _version():
    from . import __version__

    return __version__


def _note(args, msg):
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def cmd_sweep(args):
    from . import report
    from .sweep import run

    for x in args.thresholds:
        if not 0 < x < 100:
            raise BadpruneError(f"threshold {x:g} is out of range", fix="give --thresholds between 0 and 100")
    if args.batch_size < 1:
        raise BadpruneError("--batch-size must be positive")
    model, weights, arch = args.model, args.weights, args.arch
    valid, test, poisoned = args.valid, args.test, args.poisoned
    if model and weights:
        raise BadpruneError("give --model or --weights, not both")
    if weights and not arch:
        raise BadpruneError("--weights needs --arch", fix="add --arch deepid (the lab's architecture)")
    if arch and not weights:
        raise BadpruneError("--arch needs --weights", fix="add --weights bd_weights.h5")
    out, name = args.out, None
    if not (model or weights) and not (valid or test or poisoned):
        from .demo import ensure_demo

        _note(args, "no model or data given: running on the built-in demo BadNet (badprune-fast demo --help)")
        sc = ensure_demo(progress=not args.quiet)
        model, valid, test, poisoned = sc.model, sc.valid, sc.test, sc.bd_test
        _note(args, f"demo scenario: {os.path.dirname(sc.model)}")
        out, name = out or os.path.join("runs", "demo"), "demo BadNet"
    elif not (model or weights):
        raise BadpruneError("no model given", fix="pass --model bd_net.h5, or --weights bd_weights.h5 --arch deepid")
    elif not valid:
        raise BadpruneError("no validation data given", fix="pass --valid valid.h5 (clean validation set)")
    if out is None:
        from .models import model_name

        out = os.path.join("runs", model_name(model or weights))
    # refuse an existing output folder before doing the work, not after
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise BadpruneError("output folder already exists", out, "pass --force to replace it or choose another --out")

    t0 = time.perf_counter()
    result = run(model=model, weights=weights, arch=arch, valid=valid, test=test, poisoned=poisoned,
                 layer=args.layer, thresholds=args.thresholds, relative=args.relative, order=args.order,
                 scale=args.scale, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                 batch_size=args.batch_size, mode=args.mode, progress=not args.quiet, trust_model=args.trust_model,
                 name=name, log=lambda m: _note(args, m))
    path = report.write_outputs(result, out, force=args.force, save_models=not args.no_models)
    result.timings["command"] = time.perf_counter() - t0
    print(report.format_table(result, thresholds_only=not args.all_steps))
    print()
    print(report.summary_line(result))
    print(f"outputs: {path}")
    return 0


def cmd_demo(args):
    from .demo import build_demo, default_demo_dir, demo_folder_name, describe

    out = args.out or os.path.join(default_demo_dir(), demo_folder_name(args.seed, args.small))
    sc = build_demo(out, seed=args.seed, small=args.small, trigger=args.trigger, poison_rate=args.poison_rate,
                    target=args.target, epochs=args.epochs, progress=not args.quiet, force=args.force) \
        if _accepts_force(build_demo) else \
        build_demo(out, seed=args.seed, small=args.small, trigger=args.trigger, poison_rate=args.poison_rate,
                   target=args.target, epochs=args.epochs, progress=not args.quiet)
    print(describe(sc))
    print(f"model:    {sc.model}")
    for k in ("valid", "test", "bd_valid", "bd_test"):
        print(f"{k + ':':9s} {getattr(sc, k)}")
    print(f"BadNet: clean test accuracy {sc.clean_acc:.2f}%, attack success rate {sc.asr:.2f}%")
    print("run the defense:")
    print(f"  badprune-fast sweep --model {sc.model} --valid {sc.valid} --test {sc.test} --poisoned {sc.bd_test}")
    return 0


def _accepts_force(fn):
    import inspect

    return "force" in inspect.signature(fn).parameters


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    try:
        return args.func(args) or 0
    except BadpruneError as e:
        if args.debug:
            raise
        print(f"error: {e.line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (no partial outputs were kept)", file=sys.stderr)
        return 130
    except Exception as e:  # an internal fault: one line unless --debug
        if args.debug:
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
