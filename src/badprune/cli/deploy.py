"""``badprune-fast export``, ``predict`` and ``evaluate``: deploying a run's models and measuring any model."""
from __future__ import annotations

import os
import sys

from ..errors import BadpruneError
from ._common import add_model_args, note


def add_parsers(sub):
    _add_export(sub)
    _add_predict(sub)
    _add_evaluate(sub)


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
    add_model_args(p)
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
    add_model_args(p)
    p.add_argument("--clean", help="clean test set (lab h5)")
    p.add_argument("--poisoned", help="poisoned test set (lab h5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)
    return p


def cmd_export(args):
    from ..export import export_run, format_exported

    exported = export_run(args.run_dir, quantize=args.quantize, allow_lossy=args.allow_lossy,
                          min_agreement=args.min_agreement, check_images=args.check_images, valid=args.valid,
                          poisoned=args.poisoned, thresholds=args.thresholds, threads=args.threads,
                          log=lambda m: note(args, m))
    print(format_exported(exported))
    lossy = [r for r in exported if r.worst < args.min_agreement]
    if lossy:
        print(f"warning: {len(lossy)} file(s) agree on less than {args.min_agreement:g}% (--allow-lossy)",
              file=sys.stderr)
    print(f"exported: {os.path.join(args.run_dir, 'tflite')}")
    return 0


def _open_model(args):
    """The model of predict / evaluate, its pixel scale and where the scale came from."""
    from ..runtime import open_model, resolve_scale

    m = open_model(args.model, threads=args.threads, batch_size=args.batch_size, goodnet=args.goodnet,
                   num_classes=args.num_classes, trust=args.trust_model, weights=args.weights, arch=args.arch)
    scale, source = resolve_scale(args.model, args.scale)
    return m, scale, source


def _describe(m, scale, source):
    k = m.kind
    what = f"GoodNet, N = {k.num_classes}" if k.goodnet else f"classifier, {k.num_classes} classes"
    return f"model {os.path.basename(m.path)} ({what}, {m.backend}); pixels x {scale:.6g} ({source})"


def _dataset_labels(m, path, scale, batch=4096):
    """(labels, stored labels, n) of a lab h5 set, read in chunks."""
    try:
        from ..data import open_dataset
    except ImportError as e:
        if (e.name or "").split(".")[0] == "h5py":
            raise BadpruneError(f"reading h5 data needs h5py ({e})", fix="pip install h5py") from None
        raise BadpruneError(f"badprune's native kernels are missing ({e})",
                            fix="reinstall badprune (pip install .), which builds them") from None
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
        from ..runtime import load_images

        if m.input_shape[2] != 3:
            raise BadpruneError(f"the model wants {m.input_shape[2]} channels; images are read as RGB",
                                args.model)
        X = load_images(args.images, size=m.input_shape[:2])
        if scale != 1.0:
            X *= scale
        labels = m.labels(X)
        if not args.json:
            note(args, _describe(m, scale, source))
        out["images"] = [{"image": p, "label": int(l), "backdoor": bool(k.goodnet and l == k.num_classes)}
                         for p, l in zip(args.images, labels)]
        if not args.json:
            for p, l in zip(args.images, labels):
                flag = "\tbackdoor detected (N)" if k.goodnet and l == k.num_classes else ""
                print(f"{p}\t{int(l)}{flag}")
    if args.data:
        from ..runtime import rates

        labels, truth = _dataset_labels(m, args.data, scale)
        r = rates(labels, truth, k)
        out["data"] = dict(r, path=args.data)
        if not args.json:
            if not args.images:
                note(args, _describe(m, scale, source))
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
    from ..runtime import rates

    lines = []
    for what, path, rate, share in (("clean", args.clean, "clean_acc", "false_alarm"),
                                    ("poisoned", args.poisoned, "asr", "detection")):
        if not path:
            continue
        labels, truth = _dataset_labels(m, path, scale)
        r = rates(labels, truth, k)
        res.update({what: path, f"n_{what}": r["n"], rate: r["match"]})
        lines.append(("clean accuracy" if what == "clean" else "attack success rate", r["match"],
                      f"{path}, {r['n']} images"))
        if k.goodnet:
            res[share] = r["flagged"]
    if "detection" in res:
        lines.append(("detection rate (poisoned -> N)", res["detection"], None))
    if "false_alarm" in res:
        lines.append(("false-alarm rate (clean -> N)", res["false_alarm"], None))
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        note(args, _describe(m, scale, source))
        for name, v, extra in lines:
            print(f"{name + ':':32s}{v:7.2f}%" + (f"  ({extra})" if extra else ""))
    return 0


