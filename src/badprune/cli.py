"""``badprune-fast``: the command line. Thin: parses arguments, calls the package, prints.

Errors: a :class:`~badprune.errors.BadpruneError` prints ``error: <what> (<file>): <how to fix>`` and exits 2;
anything else is an internal fault: one line, exit 1 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from .errors import BadpruneError, cli_warnings, printable


class _Parser(argparse.ArgumentParser):
    """argparse with the error contract: a bad flag is one line, ``error: <what>: see <prog> --help``, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {printable(message)}: see '{self.prog} --help'\n")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the same clean-up as for Ctrl-C runs."""


def _on_sigterm(signum, frame):
    raise _Terminated()


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
    o.add_argument("--no-models", action="store_true", help="do not save the B'_X and G_X models")
    o.add_argument("--export", action="store_true",
                   help="also export B'_X and G_X to LiteRT (tflite/ in the output folder; see `export --help`)")
    o.add_argument("--quantize", choices=["none", "float16", "int8"], default="none",
                   help="with --export: none (float32, default), float16 or int8")
    o.add_argument("--allow-lossy", action="store_true",
                   help="with --export: keep an export whose labels agree with Keras on < 99%% of the images")
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


def _add_model_args(p, what="model"):
    m = p.add_argument_group("model")
    m.add_argument("--model", help=f"{what}: .tflite (run with LiteRT, no TensorFlow), .keras or .h5")
    m.add_argument("--weights", help="Keras weight file for --arch (B from the lab's weights)")
    m.add_argument("--arch", choices=["deepid"], help="built-in architecture for --weights")
    m.add_argument("--goodnet", action="store_true",
                   help="the model's single (n, N+1) output is a GoodNet's: its last class N means 'backdoor'")
    m.add_argument("--num-classes", type=int, help="N, for a GoodNet that outputs only labels")
    m.add_argument("--trust-model", action="store_true", help="allow Lambda layers / custom code (.keras/.h5)")
    m.add_argument("--scale", help="pixel scale raw (0..255), unit (/255) or a number (default: the run's "
                                   "sweep.json next to the model, else raw)")
    m.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    m.add_argument("--threads", type=int, help="LiteRT threads (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no note on stderr about the model and scale")
    return m


def _add_export(sub):
    p = sub.add_parser("export", help="export a run's B'_X and G_X to LiteRT (.tflite)",
                       description="Convert models/B_prime_X<X>.keras and models/goodnet_X<X>.keras of a sweep's "
                                   "output folder to RUN_DIR/tflite/*.tflite, check each file's labels against "
                                   "its Keras model on validation and poisoned images, and refuse an export that "
                                   "agrees on less than --min-agreement percent.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `badprune-fast sweep`")
    p.add_argument("--quantize", choices=["none", "float16", "int8"], default="none",
                   help="none: float32 (default); float16: half-size weights; int8: integer weights and "
                        "activations, calibrated on clean validation images")
    p.add_argument("--allow-lossy", action="store_true", help="write files that agree on < --min-agreement")
    p.add_argument("--min-agreement", type=float, default=99.0, metavar="PCT",
                   help="minimum label agreement with the Keras model, percent (default 99)")
    p.add_argument("--check-images", type=int, default=2000, metavar="N",
                   help="validation and poisoned images to check on, each (default 2000, spread over the files)")
    p.add_argument("--thresholds", type=float, nargs="+", metavar="X", help="export only these X")
    p.add_argument("--valid", help="clean validation set (default: the run's, from sweep.json)")
    p.add_argument("--poisoned", help="poisoned set (default: the run's, from sweep.json)")
    p.add_argument("--threads", type=int, help="LiteRT threads for the check (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_export)
    return p


def _add_predict(sub):
    p = sub.add_parser("predict", help="label images (png/jpeg) or a lab h5 set with B, B'_X or G_X",
                       description="Print one label per image. A GoodNet answers N (the number of classes) for "
                                   "an input it flags as backdoored. .tflite models run without TensorFlow.")
    p.add_argument("images", nargs="*", metavar="IMG", help="image files (55x47 RGB; others are resized)")
    _add_model_args(p)
    p.add_argument("--data", help="a lab h5 set: print the share of stored labels matched and the flag rate")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)
    return p


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="clean accuracy and attack success rate of B, B'_X or G_X (lab eval)",
                       description="Clean accuracy on --clean and attack success rate on --poisoned (the share "
                                   "of poisoned inputs given the poisoned file's label), like the lab's eval.py; "
                                   "for a GoodNet also the detection rate (poisoned -> N) and false-alarm rate "
                                   "(clean -> N).")
    _add_model_args(p)
    p.add_argument("--clean", help="clean test set (lab h5)")
    p.add_argument("--poisoned", help="poisoned test set (lab h5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)
    return p


def build_parser():
    ap = _Parser(prog="badprune-fast",
                 description="Exact, C-accelerated pruning defense against backdoored networks.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--version", action="version", version=f"badprune {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    _add_sweep(sub)
    _add_demo(sub)
    _add_export(sub)
    _add_predict(sub)
    _add_evaluate(sub)
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
    if args.export and args.no_models:
        raise BadpruneError("--export needs the models", fix="drop --no-models")
    if not args.export and (args.quantize != "none" or args.allow_lossy):
        raise BadpruneError("--quantize and --allow-lossy go with --export", fix="add --export")
    # refuse an existing or unwritable output folder before doing the work, not after
    report.check_output(out, force=args.force)

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
    if args.export:
        from .export import export_run, format_records

        records = export_run(path, quantize=args.quantize, allow_lossy=args.allow_lossy,
                             log=lambda m: _note(args, m))
        print(format_records(records))
        print(f"exported: {os.path.join(str(path), 'tflite')}")
    return 0


def cmd_export(args):
    from .export import export_run, format_records

    records = export_run(args.run_dir, quantize=args.quantize, allow_lossy=args.allow_lossy,
                         min_agreement=args.min_agreement, check_images=args.check_images, valid=args.valid,
                         poisoned=args.poisoned, thresholds=args.thresholds, threads=args.threads,
                         log=lambda m: _note(args, m))
    print(format_records(records))
    lossy = [r for r in records if r.worst < args.min_agreement]
    if lossy:
        print(f"warning: {len(lossy)} file(s) agree on less than {args.min_agreement:g}% (--allow-lossy)",
              file=sys.stderr)
    print(f"exported: {os.path.join(args.run_dir, 'tflite')}")
    return 0


def _open_model(args):
    """The model of predict / evaluate, its pixel scale and where the scale came from."""
    from .runtime import open_model, resolve_scale

    if args.batch_size < 1:
        raise BadpruneError("--batch-size must be positive")
    if args.model and args.weights:
        raise BadpruneError("give --model or --weights, not both")
    if args.weights and not args.arch:
        raise BadpruneError("--weights needs --arch", fix="add --arch deepid (the lab's architecture)")
    if not args.model and not args.weights:
        raise BadpruneError("no model given", fix="pass --model goodnet_X4.tflite (or .keras / .h5)")
    m = open_model(args.model, threads=args.threads, batch_size=args.batch_size, goodnet=args.goodnet,
                   num_classes=args.num_classes, trust=args.trust_model, weights=args.weights, arch=args.arch)
    if args.model:
        scale, source = resolve_scale(args.model, args.scale)
    else:
        from .runtime import parse_scale

        scale, source = (parse_scale(args.scale), f"--scale {args.scale}") if args.scale else (1.0, "raw (default)")
    return m, scale, source


def _describe(m, scale, source):
    k = m.kind
    what = f"GoodNet, N = {k.num_classes}" if k.goodnet else f"classifier, {k.num_classes} classes"
    return f"model {os.path.basename(m.path)} ({what}, {m.backend}); pixels x {scale:.6g} ({source})"


def _dataset_labels(m, path, scale, batch=4096):
    """(labels, stored labels, n) of a lab h5 set, read in chunks."""
    try:
        from .data import open_dataset
    except ImportError as e:
        raise BadpruneError(f"reading h5 data needs h5py ({e})", fix="pip install h5py") from None
    import numpy as np

    num = m.kind.num_classes if not m.kind.goodnet else None
    ds = open_dataset(path, input_shape=m.input_shape, num_classes=num)
    parts = [m.labels(x) for _, x in ds.batches(batch, scale)]
    return np.concatenate(parts), ds.labels


def cmd_predict(args):
    import json

    if not args.images and not args.data:
        raise BadpruneError("nothing to predict", fix="pass image files, or --data set.h5")
    m, scale, source = _open_model(args)
    k = m.kind
    out = {"model": str(args.model or args.weights), "kind": k.name, "num_classes": k.num_classes,
           "scale": scale}
    if args.images:
        from .runtime import load_images

        if m.input_shape[2] != 3:
            raise BadpruneError(f"the model wants {m.input_shape[2]} channels; images are read as RGB",
                                args.model)
        X = load_images(args.images, size=m.input_shape[:2])
        if scale != 1.0:
            X *= scale
        labels = m.labels(X)
        if not args.json:
            _note(args, _describe(m, scale, source))
        out["images"] = [{"image": p, "label": int(l), "backdoor": bool(k.goodnet and l == k.num_classes)}
                         for p, l in zip(args.images, labels)]
        if not args.json:
            for p, l in zip(args.images, labels):
                flag = "\tbackdoor detected (N)" if k.goodnet and l == k.num_classes else ""
                print(f"{p}\t{int(l)}{flag}")
    if args.data:
        from .runtime import rates

        labels, truth = _dataset_labels(m, args.data, scale)
        r = rates(labels, truth, k)
        out["data"] = dict(r, path=args.data)
        if not args.json:
            if not args.images:
                _note(args, _describe(m, scale, source))
            print(f"{args.data}: {r['n']} images; label == stored label: {r['match']:.2f}% "
                  "(the accuracy for a clean set, the attack success rate for a poisoned set)")
            if k.goodnet:
                print(f"answered N (flagged as backdoored): {r['flagged']:.2f}%")
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


def cmd_evaluate(args):
    import json

    if not args.clean and not args.poisoned:
        raise BadpruneError("no data given", fix="pass --clean test.h5 and/or --poisoned bd_test.h5")
    m, scale, source = _open_model(args)
    k = m.kind
    res = {"model": str(args.model or args.weights), "kind": k.name, "num_classes": k.num_classes, "scale": scale}
    from .runtime import rates

    lines = []
    if args.clean:
        labels, truth = _dataset_labels(m, args.clean, scale)
        r = rates(labels, truth, k)
        res.update(clean=args.clean, n_clean=r["n"], clean_acc=r["match"])
        lines.append(("clean accuracy", r["match"], f"{args.clean}, {r['n']} images"))
        if k.goodnet:
            res["false_alarm"] = r["flagged"]
    if args.poisoned:
        labels, truth = _dataset_labels(m, args.poisoned, scale)
        r = rates(labels, truth, k)
        res.update(poisoned=args.poisoned, n_poisoned=r["n"], asr=r["match"])
        lines.append(("attack success rate", r["match"], f"{args.poisoned}, {r['n']} images"))
        if k.goodnet:
            res["detection"] = r["flagged"]
    if "detection" in res:
        lines.append(("detection rate (poisoned -> N)", res["detection"], None))
    if "false_alarm" in res:
        lines.append(("false-alarm rate (clean -> N)", res["false_alarm"], None))
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        _note(args, _describe(m, scale, source))
        for name, v, extra in lines:
            print(f"{name + ':':32s}{v:7.2f}%" + (f"  ({extra})" if extra else ""))
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
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM cleans up like Ctrl-C
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with cli_warnings():
            return args.func(args) or 0
    except BadpruneError as e:
        if args.debug:
            raise
        print(f"error: {e.line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"error: {what} (no partial outputs were kept)", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    except Exception as e:  # an internal fault: one line unless --debug
        if args.debug:
            raise
        print(f"error: internal error: {printable(f'{type(e).__name__}: {e}')} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
