"""``badprune-fast demo``: build a demo scenario (a real-face BadNet and its lab-format data) explicitly."""
from __future__ import annotations

import os


def add_parser(sub):
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
    p.set_defaults(func=run)
    return p


def run(args):
    """Build (or, unless --force, reuse) the scenario and print its files and the sweep command for it."""
    from ..datasets.demo import build_demo, default_demo_dir, demo_folder_name, describe

    out = args.out or os.path.join(default_demo_dir(), demo_folder_name(args.seed, args.small))
    sc = build_demo(out, seed=args.seed, small=args.small, trigger=args.trigger, poison_rate=args.poison_rate,
                    target=args.target, epochs=args.epochs, progress=not args.quiet, force=args.force)
    print(describe(sc))
    print(f"model:    {sc.model}")
    for k in ("valid", "test", "bd_valid", "bd_test"):
        print(f"{k + ':':9s} {getattr(sc, k)}")
    print(f"BadNet: clean test accuracy {sc.clean_acc:.2f}%, attack success rate {sc.asr:.2f}%")
    print("run the defense:")
    print(f"  badprune-fast sweep --model {sc.model} --valid {sc.valid} --test {sc.test} --poisoned {sc.bd_test}")
    return 0
