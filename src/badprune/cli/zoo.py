"""``badprune-fast zoo``: the sweep on every model of a TOML manifest, one Ray task per model, one table."""
from __future__ import annotations

from ._common import note


def add_parser(sub):
    p = sub.add_parser("zoo", help="run the pruning defense on many models from one TOML manifest, on Ray",
                       description="Run `sweep` on every [[run]] of a TOML manifest as Ray tasks (a local Ray, or "
                                   "a cluster with --address), write each run folder under --out and one table "
                                   "of all of them (zoo.csv, zoo.md, zoo.json, zoo.png). Complete run folders are "
                                   "skipped on the next invocation. Exit status 1 when any run failed. Needs "
                                   "pip install \"badprune[cluster]\".")
    p.add_argument("manifest", help="the TOML manifest: [defaults] and one [[run]] per model (name, model or "
                                    "weights + arch, and any sweep option by its Python name)")
    p.add_argument("--out", help="the zoo's folder (default: runs/<manifest stem>)")
    p.add_argument("--address", help="join a Ray cluster: auto, or ray://host:port (default: start a local Ray "
                                     "on this machine and stop it at the end)")
    p.add_argument("--cpus-per-run", type=float, default=1, metavar="N",
                   help="Ray CPUs each run reserves (default 1)")
    p.add_argument("--num-cpus", type=int, metavar="N",
                   help="CPUs of the local Ray (default: all of this machine's; not with --address)")
    p.add_argument("--trust-model", action="store_true",
                   help="allow Lambda layers / custom code in every model of the manifest (only for files you "
                        "trust; a manifest cannot ask for it)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or notes")
    p.set_defaults(func=run)
    return p


def run(args):
    """Run the zoo the flags describe, print one line per run and the summary; 0 when every run is ok, else 1."""
    from .. import zoo

    result = zoo.run_zoo(args.manifest, out=args.out, address=args.address, cpus_per_run=args.cpus_per_run,
                         num_cpus=args.num_cpus, progress=not args.quiet, log=lambda m: note(args, m),
                         trust_model=args.trust_model)
    print(zoo.format_table(result))
    print()
    print(zoo.summary_line(result))
    print(f"outputs: {result.out}")
    return 0 if result.ok else 1
