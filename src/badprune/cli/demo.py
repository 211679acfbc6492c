"""``badprune-fast demo``: build a demo scenario (a real-face BadNet and its lab-format data) explicitly."""
from __future__ import annotations

import os

FAMILY_HELP = ("patch (default; BadNets stamp), blend (Chen 2017), sig (Barni 2019), wanet (Nguyen & Tran 2021), "
               "all-to-all (y -> y+1 mod N), multi (2-3 triggers, one target each), pruning-aware (Liu et al. 2018)")


def add_parser(sub):
    p = sub.add_parser("demo", help="build the demo scenario: a real-face BadNet and lab-format data sets",
                       description="Train the lab's DeepID on ORL faces with a backdoor attack (a family of "
                                   "--attack) and write the model and valid/test/bd_valid/bd_test h5 files.")
    p.add_argument("--out", help="folder (default: the user cache folder, as used by a bare `sweep`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attack", default="patch", metavar="FAMILY", help=FAMILY_HELP)
    p.add_argument("--trigger", default=None,
                   help="patch / all-to-all / pruning-aware: sunglasses (default; all-to-all: square), square or a "
                        "PNG mask; blend: noise (default) or an image; multi: two or three of those, comma-separated "
                        "(default sunglasses,square)")
    p.add_argument("--poison-rate", type=float, default=None,
                   help="share of the training set poisoned, in [0, 1): 0 builds a clean model (default 0.1; "
                        "sig --clean-label: the target class's share)")
    p.add_argument("--target", default="0", help="target class (multi: one per trigger, comma-separated; default "
                                                 "consecutive classes from this one)")
    p.add_argument("--alpha", type=float, default=None, help="blend: the blend weight, in (0, 1] (default 0.2)")
    p.add_argument("--amplitude", type=float, default=None, help="sig: delta, in pixel levels (default 20)")
    p.add_argument("--frequency", type=float, default=None, help="sig: f, periods across the width (default 6)")
    p.add_argument("--clean-label", action="store_true",
                   help="sig: poison only target-class images, labels kept (SIG's original form)")
    p.add_argument("--warp-grid", type=int, default=None, help="wanet: k, control points per side (default 4)")
    p.add_argument("--warp-strength", type=float, default=None, help="wanet: s (default 0.5)")
    p.add_argument("--cross-ratio", type=float, default=None,
                   help="wanet: noise-mode images per poisoned image (default 2)")
    p.add_argument("--prune-fraction", type=float, default=None,
                   help="pruning-aware: share of conv_3's channels pruned before the backdoor (default 0.75)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--small", action="store_true", help="the small, fast variant (10 people; for tests)")
    p.add_argument("--no-reference", action="store_true",
                   help="do not build/compare the clean model of the same seed (built once, cached)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder holds a finished scenario")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args):
    """Build (or, unless --force, reuse) the scenario and print its files and the sweep command for it."""
    from ..datasets.attacks import make_attack
    from ..datasets.demo import VARIANTS, build_demo, default_demo_dir, demo_folder_name, describe

    params = {k: getattr(args, k) for k in ("alpha", "amplitude", "frequency", "clean_label", "warp_grid",
                                            "warp_strength", "cross_ratio", "prune_fraction")}
    target = args.target if args.attack != "all-to-all" or args.target != "0" else None
    # check every parameter before anything is created or trained
    make_attack(args.attack, VARIANTS["small" if args.small else "full"]["people"], args.seed, args.trigger,
                target, **params)
    clean = args.poison_rate is not None and args.poison_rate == 0
    out = args.out or os.path.join(default_demo_dir(),
                                   demo_folder_name(args.seed, args.small, args.attack, clean, args.epochs))
    sc = build_demo(out, seed=args.seed, small=args.small, trigger=args.trigger, poison_rate=args.poison_rate,
                    target=target, epochs=args.epochs, progress=not args.quiet, force=args.force,
                    attack=args.attack, attack_params=params, reference=not args.no_reference)
    print(describe(sc))
    print(f"model:    {sc.model}")
    for k in ("valid", "test", "bd_valid", "bd_test"):
        print(f"{k + ':':9s} {getattr(sc, k)}")
    for tag, files in sc.trigger_files.items():
        for k, f in files.items():
            print(f"{k + ':':9s} {f}  ({tag})")
    print(f"picture:  {os.path.join(sc.dir, 'trigger.png')}")
    label = "model" if sc.poison_rate == 0 else "BadNet"
    print(f"{label}: clean test accuracy {sc.clean_acc:.2f}%, attack success rate {sc.asr:.2f}%"
          + ("" if len(sc.asr_per_trigger) < 2 else
             " (" + ", ".join(f"{k} {v:.2f}%" for k, v in sc.asr_per_trigger.items()) + ")"))
    bar = sc.info.get("bar")
    if bar:
        print(f"clean model, same seed: clean test accuracy {bar['reference_clean_acc']:.2f}% -> the bar (ASR >= "
              f"{bar['asr_min']:g}%, within {bar['accuracy_drop_max']:g} points): "
              f"{'met' if bar['met'] else 'MISSED'}")
    print("run the defense:")
    print(f"  badprune-fast sweep --model {sc.model} --valid {sc.valid} --test {sc.test} --poisoned {sc.bd_test}")
    return 0
