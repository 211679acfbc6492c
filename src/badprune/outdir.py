"""Writing an output folder whole: checked before the work, filled in a temporary sibling folder, renamed into
place at the end (so no reader ever sees half of one, and a failed run leaves nothing), and the first free name
for a default folder. TF-free."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from . import atomic
from .errors import BadpruneError


def _is_nonempty_dir(p: Path) -> bool:
    try:
        return any(p.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False


#: files that mark a folder badprune wrote (a sweep's run folder, a zoo's run folder, a scan's folder): only such a
#: folder may be replaced with --force
RUN_MARKERS = ("sweep.json", "zoo-entry.json", "scan.json")


def _check_replace(out: Path, protect) -> None:
    """With ``force``: refuse to replace the working folder, the home folder, ``/``, a folder holding (or being)
    any path of ``protect`` (the run's inputs, the cache), or a non-empty folder that is not a run folder."""
    fix = "choose another --out (a new folder, or a run folder badprune wrote)"
    real = Path(os.path.realpath(out))
    for what, p in (("the working folder", os.getcwd()), ("your home folder", os.path.expanduser("~")),
                    ("the root folder", os.sep)):
        if real == Path(os.path.realpath(p)):
            raise BadpruneError(f"--force would replace {what}", out, fix)
    for p in protect:
        if p is None:
            continue
        rp = Path(os.path.realpath(os.path.expanduser(str(p))))
        if rp == real or real in rp.parents:
            raise BadpruneError(f"--force would delete {p}, which the run reads or caches in", out, fix)
    if _is_nonempty_dir(out) and not any((out / m).is_file() for m in RUN_MARKERS):
        raise BadpruneError("--force replaces only a run folder badprune wrote, and this one holds no "
                            f"{RUN_MARKERS[0]}", out, fix)


def _check_target(out: Path, force: bool, protect=()) -> None:
    if out.exists() and not out.is_dir():
        raise BadpruneError("output path exists and is not a folder", out, "choose another --out")
    if _is_nonempty_dir(out) and not force:
        raise BadpruneError("output folder already exists", out, "pass --force to replace it or choose another --out")
    if force:
        _check_replace(out, protect)


def check_output(out_dir, force: bool = False, protect=()) -> Path:
    """Before the work: refuse an output folder that exists (unless ``force``; even then, one that is not a run
    folder or that holds a path of ``protect``, see :func:`_check_replace`) or could not be written (a part of
    the path is a file, or the nearest existing folder is not writable). Creates nothing; returns the path."""
    out = Path(out_dir).expanduser().absolute()
    _check_target(out, force, protect)
    anc = out.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise BadpruneError("a part of the output path is a file, not a folder", anc, "choose another --out")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=anc)
    except OSError as e:
        raise BadpruneError(f"cannot write to the output folder's parent ({e.strerror or e})", anc,
                            "check its permissions or choose another --out") from None
    os.rmdir(probe)
    return out


def fresh_folder(base) -> Path:
    """The first free run folder of the names ``base``, ``base-2``, ``base-3``, ... (free: not there, or an empty
    folder), as given (not made absolute). For a default output folder, which is the tool's choice and so must not
    be refused; nothing is created (a concurrent run that takes the same name first makes this one's final rename
    refuse it)."""
    base = Path(base).expanduser()

    def free(p: Path) -> bool:
        if not os.path.lexists(p):
            return True
        return p.is_dir() and not p.is_symlink() and not _is_nonempty_dir(p)

    if free(base):
        return base
    k = 2
    while not free(base.with_name(f"{base.name}-{k}")):
        k += 1
    return base.with_name(f"{base.name}-{k}")


def remove(p: Path) -> None:
    """Remove a file or folder tree if it is there."""
    p = Path(p)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def staged_folder(out_dir, force: bool = False, keep=(), protect=()):
    """Write a folder all at once: yields a temporary sibling folder ``.<name>.tmp-<pid>-<thread>-<random>`` to fill, renamed to
    ``out_dir`` when the block ends without error; on any error it is removed and ``out_dir`` is left as it was.

    An existing non-empty ``out_dir`` is an error unless ``force`` (then it is replaced; the entries named in
    ``keep`` that the block did not write are carried over from it). ``OSError`` inside the block becomes a
    :class:`BadpruneError` naming ``out_dir``. ``protect``: paths ``force`` must not delete (:func:`check_output`).
    """
    out = Path(out_dir).expanduser().absolute()
    _check_target(out, force, protect)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadpruneError(f"cannot create the output folder's parent ({e.strerror or e})", parent,
                            "choose another --out") from None
    atomic.remove_stale(parent, (f".{out.name}.tmp-*", f".{out.name}.old-*"))  # a killed run's (age, owner)
    tmp = Path(atomic.temp_name(out))
    try:
        tmp.mkdir()
    except OSError as e:
        raise BadpruneError(f"cannot write to the output folder's parent ({e.strerror or e})", parent,
                            "check its permissions or choose another --out") from None
    old = None
    try:
        yield tmp
        for name in keep:
            if (out / name).exists() and not (tmp / name).exists():
                shutil.copytree(out / name, tmp / name, symlinks=True) if (out / name).is_dir() \
                    else shutil.copy2(out / name, tmp / name)
        # move into place (re-check: the folder may have appeared while we worked)
        _check_target(out, force, protect)
        if out.exists():
            if _is_nonempty_dir(out):
                old = Path(atomic.temp_name(out, ".old"))
                os.rename(out, old)
            else:
                out.rmdir()
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None and not out.exists():
                os.rename(old, out)  # put the previous output back
                old = None
            raise
    except BaseException as e:
        remove(tmp)
        if isinstance(e, OSError):
            raise BadpruneError(f"cannot write the outputs ({e.strerror or e})", out,
                                "check free space and permissions or choose another --out") from e
        raise
    if old is not None:
        remove(old)
