"""Writing a file or a folder whole: the one write-to-a-temporary-name-then-rename of the package.

A reader never sees half a file: the content goes to a temporary sibling (same folder, so the rename is atomic on
one file system), named ``.<name>.tmp-<pid>-<thread>-<random>[<suffix>]``, renamed onto the final name when complete; on
any exception (Ctrl-C included) the temporary file or folder is removed and the exception goes on. ``fsync=True``
also flushes the file and its folder to disk before and after the rename, for a small file that vouches for
others (a marker); the large files it vouches for are checked on read (sizes, CRC-32) instead.

Whole output folders with ``--force`` and kept entries are :func:`badprune.outdir.staged_folder`'s. Stdlib only.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import secrets
import shutil
import threading
import time


#: a temporary file or folder untouched this long (its process was killed mid-write: SIGKILL, the OOM killer) is
#: removed by :func:`remove_stale`
STALE_SECONDS = 3600


def temp_name(path, suffix: str = "") -> str:
    """A fresh temporary sibling of ``path`` (``suffix``: an extension a writer needs, e.g. ``.keras``): the pid
    and thread tell a person whose it is, a random part makes it unique (a pid is reused, and in a folder shared
    between machines another one's process can have the same)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}{suffix}")


def remove_stale(folder, patterns) -> list:
    """Remove the entries of ``folder`` matching a glob of ``patterns`` that are the user's own and untouched for
    :data:`STALE_SECONDS`: what a killed process left, found by age and owner, never by pid. Returns their names."""
    gone = []
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return gone
    now, uid = time.time(), os.getuid() if hasattr(os, "getuid") else None
    for e in entries:
        if not any(fnmatch.fnmatchcase(e.name, p) for p in patterns):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if (uid is not None and st.st_uid != uid) or now - st.st_mtime < STALE_SECONDS:
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.remove(e.path)
            gone.append(e.name)
        except OSError:
            pass
    return gone


def remove(path) -> None:
    """Remove a file or a folder tree if it is there (a symlink itself, never its target); errors ignored."""
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _fsync(path, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder
        if not folder:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path, suffix: str = "", fsync: bool = False):
    """Yield a temporary path to write ``path``'s new content to (a file, or a folder the block creates); when
    the block ends without error it is renamed onto ``path`` (a file replaces a file; a folder needs ``path``
    absent). On any exception it is removed. ``fsync``: see the module docstring."""
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync(os.path.dirname(os.path.abspath(os.fspath(path))), folder=True)
    except BaseException:
        remove(tmp)
        raise


def write_bytes(path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` whole (:func:`replacing`); raises OSError."""
    with replacing(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path, text: str, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole (:func:`replacing`); raises OSError."""
    write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path, obj, fsync: bool = False, **dump) -> None:
    """Write ``obj`` as JSON (``json.dumps(obj, **dump)``) to ``path`` whole; raises OSError."""
    write_text(path, json.dumps(obj, **dump), fsync=fsync)
