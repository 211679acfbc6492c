"""Console hygiene shared by the TensorFlow side and the TF-free runtime: silence C-level output."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import threading

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
