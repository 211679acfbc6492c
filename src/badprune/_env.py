"""The environment a run sees: the cores it may use, the cache home, the versions a result depends on. TF-free,
standard library only."""
from __future__ import annotations

import os
import threading

#: set by the command line's SIGTERM handler. Its exception can be lost: raised while Python runs a weakref or
#: import-lock callback, it is printed as "Exception ignored" and the program goes on. Long loops (the zoo's)
#: check this flag too.
STOP = threading.Event()


def stop_requested() -> None:
    """Raise KeyboardInterrupt if SIGTERM arrived (:data:`STOP`), whether or not its exception got through."""
    if STOP.is_set():
        raise KeyboardInterrupt("terminated")


def cpu_count() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def versions() -> dict:
    """The versions of Python and of the packages a result depends on (``sweep.json``'s ``versions``)."""
    import importlib.metadata as md
    import sys

    v = {"python": sys.version.split()[0]}
    for pkg in ("badprune", "numpy", "scipy", "h5py", "tensorflow", "tensorflow-cpu", "keras", "Cython"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


# -------------------------------------------------------------------------------------------------- cache home
def cache_home() -> str:
    """Where badprune caches activations and demo scenarios: $BADPRUNE_CACHE, else $XDG_CACHE_HOME/badprune, else
    ~/.cache/badprune."""
    env = os.environ.get("BADPRUNE_CACHE")
    if env:
        return os.path.expanduser(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return os.path.join(os.path.expanduser(xdg), "badprune")
    return os.path.join(os.path.expanduser("~"), ".cache", "badprune")
