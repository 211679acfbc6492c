"""What every command shares: the argparse error contract, SIGTERM as Ctrl-C, notes on stderr, the model flags."""
from __future__ import annotations

import argparse
import gc
import sys

from .._env import STOP
from ..errors import printable


class Parser(argparse.ArgumentParser):
    """argparse with the error contract: a bad flag is one line, ``error: <what>: see <prog> --help``, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {printable(message)}: see '{self.prog} --help'\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the same clean-up as for Ctrl-C runs."""


def on_sigterm(signum, frame):
    # the flag too: C extensions that catch the interrupt in a blocking call re-raise a plain KeyboardInterrupt
    # (Ray's ray.wait does), so the exception's class alone cannot say it was SIGTERM; and the exception itself can
    # be lost (badprune._env.STOP)
    STOP.set()
    raise Terminated()


def note(args, msg):
    """A note on stderr, unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


#: the flag of each library parameter (:mod:`badprune.options` names parameters; the user typed flags): the one
#: table by which a :class:`~badprune.errors.ParamError` is worded for the command line (:func:`flag_spelling`)
FLAGS = {
    "model": "--model", "weights": "--weights", "arch": "--arch", "trust_model": "--trust-model",
    "valid": "--valid", "test": "--test", "poisoned": "--poisoned", "scale": "--scale", "layer": "--layer",
    "thresholds": "--thresholds", "relative": "--relative", "order": "--order", "mode": "--mode",
    "batch_size": "--batch-size", "fine_tune": "--fine-tune", "fine_tune_epochs": "--fine-tune-epochs",
    "fine_tune_lr": "--fine-tune-lr", "seed": "--seed", "num_classes": "--num-classes", "threads": "--threads",
}


def flag_spelling(name: str, value: str | None) -> str:
    """A parameter as the command line spells it: ``--fine-tune-epochs``, ``--fine-tune-epochs 10``."""
    flag = FLAGS.get(name, "--" + name.replace("_", "-"))
    return flag if value is None else f"{flag} {value.strip(chr(34))}"


def add_model_args(p, what="model"):
    """The model flags of predict / evaluate (mapped to :func:`badprune.runtime.open_model`)."""
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


def add_source_args(p, title="model B (the suspect BadNet)"):
    """The flags naming B (mapped to :func:`badprune.options.check_source`) of ``sweep`` and ``scan``."""
    m = p.add_argument_group(title)
    m.add_argument("--model", help="full Keras model (.keras or legacy .h5, e.g. the lab's bd_net.h5)")
    m.add_argument("--weights", help="Keras weight file for --arch (e.g. bd_weights.h5)")
    m.add_argument("--arch", choices=["deepid"], help="built-in architecture for --weights")
    m.add_argument("--trust-model", action="store_true",
                   help="allow Lambda layers / custom code from the model file (runs the file's code)")
    return m


def add_fine_tune_args(g, default_mode=None):
    """The fine-pruning flags of ``sweep`` and ``repair`` (mapped to :func:`badprune.repair.check_args`).
    ``--fine-tune`` without a value is the recommended mode (:data:`badprune.repair.RECOMMENDED`)."""
    from ..repair import MODES, RECOMMENDED

    g.add_argument("--fine-tune", choices=MODES, nargs="?", const=RECOMMENDED, default=default_mode,
                   metavar="{" + ",".join(MODES) + "}",
                   help=f"no value: {RECOMMENDED} (recommended"
                        + (", default" if default_mode == RECOMMENDED else "") + "): head plus unlearning the shift the "
                        "scan finds toward a backdoor's target, and removing that direction from R_X's input where "
                        "the held-out clean data allows it; head: train the layers after the "
                        "prune layer over the cached activations (fast); full: train the whole network on the clean "
                        "images")
    g.add_argument("--fine-tune-epochs", type=int, help="epochs (default: the recipe's, per mode)")
    g.add_argument("--fine-tune-lr", type=float, help="peak learning rate (default: the recipe's, per mode)")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the training (default 0)")


def load_tensorflow():
    """Import TensorFlow (a command about to use it anyway), then move every object alive to the garbage
    collector's permanent generation (``gc.freeze``): TensorFlow and Keras leave ~350k long-lived objects, which each
    full collection would otherwise walk again (~0.1-0.2 s apiece, several per sweep). Only the command line does
    this: it is a process-wide choice, not a library's to make (``sweep`` calls it only when the run needs
    TensorFlow, through :func:`badprune.sweep.run`'s ``before_tensorflow``)."""
    from .. import _tf  # noqa: F401

    gc.freeze()
