"""``badprune-fast repair``: fine-prune the B'_X of an existing run into R_X (as ``sweep --fine-tune`` does)."""
from __future__ import annotations

from ..repair import RECOMMENDED
from ._common import add_fine_tune_args, load_tensorflow, note


def add_parser(sub):
    p = sub.add_parser("repair", help="fine-prune an existing run's B'_X into repaired networks R_X",
                       description="Fine-tune each B'_X of a sweep's output folder on its clean validation data "
                                   "(head: over the run's cached activations, no trunk pass; full: the whole "
                                   "network on the images) and rewrite the folder with the R_X rows, tables, "
                                   "plot and models/repaired_X<X>.keras.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `badprune-fast sweep`")
    add_fine_tune_args(p, default_mode=RECOMMENDED)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args):
    """Repair the run in place and print the R_X summary."""
    from .. import report
    from ..repair import repair_run

    load_tensorflow()
    result = repair_run(args.run_dir, args.fine_tune, args.fine_tune_epochs, args.fine_tune_lr, args.seed,
                        log=lambda m: note(args, m))
    print(report.summary_line(result))
    print(f"outputs: {args.run_dir}")
    return 0
