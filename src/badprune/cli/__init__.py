"""``badprune-fast``: the command line. Thin: each command group's module maps its flags to library arguments,
calls the package and prints; every rule about the arguments themselves lives in the library.

* :mod:`~badprune.cli.sweep` -- ``sweep``; :mod:`~badprune.cli.repair` -- ``repair``;
  :mod:`~badprune.cli.demo` -- ``demo``; :mod:`~badprune.cli.zoo` -- ``zoo``;
* :mod:`~badprune.cli.deploy` -- ``export``, ``predict``, ``evaluate``;
* :mod:`~badprune.cli._common` -- the one-line argparse errors (``_Parser``), SIGTERM handling, notes.

Errors: a :class:`~badprune.errors.BadpruneError` (a :class:`~badprune.errors.ParamError` worded with the flags of
:data:`~badprune.cli._common.FLAGS`) prints ``error: <what> (<file>): <how to fix>`` and exits 2;
anything else is an internal fault: one line, exit 1 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from .._env import STOP
from ..errors import BadpruneError, ParamError, cli_warnings, printable
from . import deploy, demo, repair, scan, sweep, zoo
from ._common import Parser as _Parser
from ._common import Terminated, flag_spelling, on_sigterm


def build_parser():
    """The ``badprune-fast`` argument parser with every command."""
    ap = _Parser(prog="badprune-fast",
                 description="Exact, C-accelerated pruning defense against backdoored networks.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--version", action="version", version=f"badprune {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sweep.add_parser(sub)
    repair.add_parser(sub)
    scan.add_parser(sub)
    demo.add_parser(sub)
    deploy.add_parsers(sub)
    zoo.add_parser(sub)
    return ap


def _version():
    from .. import __version__

    return __version__


def main(argv=None):
    """Run ``badprune-fast`` with ``argv`` (default: the command line); returns the exit status."""
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad flag (its one line is already printed)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        ap.print_help()
        return 2
    previous = None
    STOP.clear()
    if threading.current_thread() is threading.main_thread():  # SIGTERM cleans up like Ctrl-C
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with cli_warnings():
            return args.func(args) or 0
    except BadpruneError as e:
        if args.debug:
            raise
        if isinstance(e, ParamError):  # a parameter's name, said as the flag the user typed
            e = e.spelled(flag_spelling)
        print(f"error: {e.line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated) or STOP.is_set()
        print(f"error: {'terminated' if term else 'interrupted'} (no partial outputs were kept)", file=sys.stderr)
        code = 128 + (signal.SIGTERM if term else signal.SIGINT)
        if argv is None:  # the program itself: outputs are already cleaned up, so end now rather than risk
            # the interpreter's shutdown (TensorFlow's and the trunk threads' clean-up) hanging after an interrupt
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except Exception as e:  # an internal fault: one line unless --debug
        if args.debug:
            raise
        print(f"error: internal error: {printable(f'{type(e).__name__}: {e}')} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        STOP.clear()   # this call's: a later library call in the same process must not see it
