"""Console hygiene shared by the TensorFlow side and the TF-free runtime: silence C-level output, and show the
progress of a long stage (a bar on a terminal, one summary line in a log)."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time

_QUIET_LOCK = threading.RLock()


@contextlib.contextmanager
def quiet_fds():
    """Silence C-level stdout/stderr (LiteRT's 'Created TensorFlow Lite XNNPACK delegate' line, converter logs)
    for the duration. Process-wide (file descriptors 1 and 2), so one holder at a time."""
    with _QUIET_LOCK:
        saved = []
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(null, fd)
            os.close(null)
        except OSError:  # no real file descriptors (captured streams): nothing to silence
            pass
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _plural(unit: str) -> str:
    return {"img": "images"}.get(unit, unit if unit.endswith("s") else unit + "s")


class Progress:
    """The progress of one stage, shown on stderr: a tqdm bar when stderr is a terminal; otherwise (a log file, CI,
    a pipe) nothing while it runs and one line when it ends without error, e.g.
    ``features valid: 11,547 images in 2.1 s (5,400 img/s)``. Disabled: nothing at all.

    Use it as a context manager (or call :meth:`close`); :meth:`update` counts work done.
    """

    def __init__(self, total, desc: str, unit: str = "it", enabled: bool = True, *, noun: str | None = None,
                 rate: bool = True, how: str = "", file=None):
        self.total, self.desc, self.unit, self.rate, self.how = total, desc, unit, rate, how
        self.noun = noun or _plural(unit)
        self.enabled = bool(enabled)
        self.file = file if file is not None else sys.stderr
        self.n = 0
        self._bar = None
        self._closed = False
        self._t0 = time.perf_counter()
        if self.enabled and _is_terminal(self.file):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.file, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def line(self) -> str:
        """The summary line: what, how many, how long (and how fast, with ``rate``)."""
        dt = time.perf_counter() - self._t0
        text = f"{self.desc}: {self.n:,} {self.noun}{' ' + self.how if self.how else ''} in {dt:.1f} s"
        if self.rate and dt > 0:
            r = self.n / dt
            text += f" ({r:,.0f} {self.unit}/s)" if r >= 10 else f" ({r:.2g} {self.unit}/s)"
        return text

    def close(self, ok: bool = True) -> None:
        """End the stage: remove the bar, or (off a terminal, when ``ok``) print the summary line."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and ok:
            print(self.line(), file=self.file, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(ok=exc_type is None)
        return False


def progress(total, desc: str, unit: str = "it", enabled: bool = True, **kw) -> Progress:
    """A :class:`Progress` for a stage of ``total`` units (``with progress(n, "features valid", "img") as p:
    ... p.update(k)``); keywords: ``noun`` (the count's word, default the unit's plural, 'images' for 'img'),
    ``rate`` (add units per second to the line), ``how`` (words after the count, e.g. 'from the cache')."""
    return Progress(total, desc, unit, enabled, **kw)
