"""``badprune-fast scan``: is this model backdoored, and which class is the target? From clean data alone."""
from __future__ import annotations

import os

from ._common import add_source_args, load_tensorflow, note


def add_parser(sub):
    p = sub.add_parser("scan", help="is the model backdoored? a verdict and the suspected target from clean data",
                       description="Two probes of the prune layer's activations, per class: the small universal "
                                   "shift that sends the most clean inputs to it, and the smallest stimulation of "
                                   "one channel that sends most of them to it; a backdoor's target is reached far "
                                   "more easily than any other class. Reads only clean data.")
    add_source_args(p, "model B (the suspect)")
    d = p.add_argument_group("clean data (lab h5)")
    d.add_argument("--valid", help="clean data set (the only data the scan reads)")
    d.add_argument("--scale", default="auto", help="pixel scale: auto (default), raw (0..255) or unit (/255)")
    d.add_argument("--layer", help="the layer whose activations are searched (default: the prune layer)")
    d.add_argument("--batch-size", type=int, default=128, help="trunk batch size (default and at most 128)")
    d.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the search (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="folder for scan.json, scan.md and scan.png (default: the first free "
                                 "runs/<model name>-scan[-2, ...])")
    o.add_argument("--force", action="store_true", help="replace an existing output folder")
    o.add_argument("--cache-dir", help="activation cache (default: $BADPRUNE_CACHE or ~/.cache/badprune)")
    o.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes")
    p.set_defaults(func=run)
    return p


def run(args):
    from .. import scan as _scan
    from ..outdir import check_output, fresh_folder, staged_folder
    from .._env import cache_home
    from ..options import check_source
    from ..runfolder import model_name

    check_source(args.model, args.weights, args.arch)
    out = args.out
    if out is None:
        base = os.path.join("runs", model_name(args.model or args.weights) + "-scan")
        out = base if args.force else str(fresh_folder(base))
    protect = [args.model, args.weights, args.valid, None if args.no_cache else (args.cache_dir or cache_home())]
    check_output(out, force=args.force, protect=protect)
    load_tensorflow()
    res = _scan.run(model=args.model, weights=args.weights, arch=args.arch, valid=args.valid, layer=args.layer,
                    scale=args.scale, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                    batch_size=args.batch_size, progress=not args.quiet, trust_model=args.trust_model,
                    log=lambda m: note(args, m), seed=args.seed)
    with staged_folder(out, args.force, protect=protect) as tmp:
        _scan.write_files(res, tmp)
    print(_scan.summary(res))
    for i, t in enumerate(res.targets, 1):
        ch = ", ".join(str(c["channel"]) for c in t["channels"][:5])
        print(f"  {i}. class {t['class']}: {100 * t['flip']:.1f}% of clean inputs flipped, anomaly {t['anomaly']:.2f}"
              f" MAD, channels {ch}")
    print(f"outputs: {os.path.abspath(out)}")
    return 0
