"""Many suspect models at once: one TOML manifest, one sweep per model, run as Ray tasks, one table at the end.

A manifest has a ``[defaults]`` table and one ``[[run]]`` table per model; the keys are :func:`badprune.defense.run`'s
keyword arguments (:data:`KEYS`), a run's keys override the defaults and paths are relative to the manifest's
folder::

    [defaults]
    valid = "data/valid.h5"
    test = "data/test.h5"
    poisoned = "data/bd_test.h5"
    thresholds = [2, 4, 10]

    [[run]]
    name = "lab3"
    weights = "weights/lab3_bd_weights.h5"
    arch = "deepid"
    scale = "raw"

    [[run]]
    name = "sunglasses"
    weights = "weights/sunglasses_bd_weights.h5"
    arch = "deepid"
    scale = "unit"
    fine_tune = "head"

:func:`read_manifest` checks all of it before anything runs (one :class:`~badprune.errors.BadpruneError` naming the
run and the key). :func:`run_zoo` runs each model as one Ray task (:func:`_run_entry`: :func:`badprune.defense.run`
and :func:`badprune.report.write_outputs` into a temporary folder on the task's node, the activation cache in that
node's user cache folder), writes each run folder under ``out`` whole on the driver
(:func:`badprune.outdir.staged_folder`) with its resolved manifest entry in ``zoo-entry.json``, and then the
zoo's table: ``zoo.csv``, ``zoo.md``, ``zoo.json`` and ``zoo.png``. A run folder that is complete for the same
entry is skipped on the next invocation; a run that fails is recorded with its one-line error and the others go on.

The package: :mod:`~badprune.zoo.manifest` (reading and checking), :mod:`~badprune.zoo.cluster` (Ray: start or
join, the task), :mod:`~badprune.zoo.tables` (run folders on the driver, resume, zoo.csv / .md / .json / .png), and
here :func:`run_zoo`, which ties them together.

Ray is an optional dependency (``pip install "badprune[cluster]"``) and is imported only inside the functions that
need it; reading a manifest needs neither Ray nor TensorFlow.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .._env import stop_requested
from ..errors import BadpruneError, printable, short
from ..runfolder import jsonable, missing
from .cluster import _run_entry, connect
from .manifest import (ENTRY_JSON, INSTALL_FIX, KEYS, PATH_KEYS, ZOO_CSV, ZOO_JSON, ZOO_MD, ZOO_PNG, Manifest, ZooEntry,
                       _is_number, parse_manifest, read_manifest)
from .tables import (ZooResult, _complete, _fingerprint, _read_entry, _row_numbers, _write_run, format_table,
                     summary_line, write_tables)

__all__ = ["ENTRY_JSON", "INSTALL_FIX", "KEYS", "PATH_KEYS", "ZOO_CSV", "ZOO_JSON", "ZOO_MD", "ZOO_PNG", "ZooEntry",
           "Manifest", "ZooResult", "parse_manifest", "read_manifest", "run_zoo", "connect", "format_table",
           "summary_line"]


# ------------------------------------------------------------------------------------------------- the zoo
def _check_cpus(cpus_per_run) -> float:
    if not _is_number(cpus_per_run) or not math.isfinite(cpus_per_run) or cpus_per_run <= 0:
        raise BadpruneError(f"--cpus-per-run must be a positive number, got {cpus_per_run}", fix="e.g. 1")
    return float(cpus_per_run)


def _base_row(entry: ZooEntry, folder: Path) -> dict:
    return {"name": entry.name, "model": entry.label, "status": None, "error": None, "folder": str(folder),
            "node_id": None, "host": None, "seconds": None, "entry": entry.to_json()}


def _ran_here(row: dict, res: dict) -> None:
    for k in ("node_id", "host", "seconds"):
        row[k] = res.get(k)


def run_zoo(manifest, out=None, *, address=None, cpus_per_run=1, num_cpus=None, progress=True, log=None,
            write=True, trust_model=False) -> ZooResult:
    """Run the pruning defense on every model of a manifest, one Ray task per model.

    Parameters
    ----------
    manifest : str, path or Manifest
        The TOML manifest (:func:`read_manifest`), checked whole before anything runs.
    out : str or path, optional
        The zoo's folder (default ``runs/<manifest stem>``): a run folder per run name, and ``zoo.csv``,
        ``zoo.md``, ``zoo.json``, ``zoo.png``.
    address : str, optional
        None: a local Ray on this machine, stopped at the end; ``"auto"`` or ``"ray://host:port"``: join that
        cluster (:func:`connect`). badprune must be installed on its nodes, and the manifest's paths must exist
        there.
    cpus_per_run : float
        Ray CPUs each run reserves (default 1).
    num_cpus : int, optional
        CPUs of a local Ray (default: all of this machine's).
    progress : bool
        Runs done / running / failed on stderr (a bar on a terminal, one line elsewhere).
    log : callable, optional
        Called with one-line notes (the cluster, each finished run, warnings).
    write : bool
        Write the zoo's four table files (the run folders are always written).
    trust_model : bool
        Allow code from every model file of the manifest (Lambda layers, custom classes): the user's own
        ``--trust-model``; a manifest cannot set it.

    Returns
    -------
    ZooResult
        A run folder that is already complete for the same manifest entry and input files is skipped (status
        'skipped'); a run that fails (a missing file, a bad model, any error in its task, a worker that died twice)
        is a row with status 'failed' and its one-line error, and the others go on.

    Raises
    ------
    BadpruneError
        For a bad manifest or option, a missing Ray, a cluster that cannot be reached.
    KeyboardInterrupt
        Ctrl-C (or SIGTERM through the CLI): the pending tasks are cancelled, a cluster started here is stopped;
        the run folders written so far are whole and no other is left behind.
    """
    say = log or (lambda msg: None)
    t_all = time.perf_counter()
    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    for entry in m.entries:
        entry.options["trust_model"] = trust_model is True
    cpus_per_run = _check_cpus(cpus_per_run)
    out = Path(out if out is not None else m.default_out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise BadpruneError("the zoo's output path is a file, not a folder", out, "choose another --out")
    rows, todo = [], []
    for entry in m.entries:
        folder = out / entry.name
        row = _base_row(entry, folder)
        rows.append(row)
        done = _complete(folder, entry) if folder.is_dir() else None
        if done is not None:
            row["status"] = "skipped"
            row.update({k: (done.get("ran") or {}).get(k) for k in ("node_id", "host", "seconds")})
        elif folder.is_dir() and any(folder.iterdir()) and _read_entry(folder) is None:
            row["status"] = "failed"
            row["error"] = (f"the folder exists and is not a zoo run's ({folder}): move it away or rename the "
                            "run")
        elif os.path.lexists(folder) and not folder.is_dir():
            row["status"] = "failed"
            row["error"] = f"a file is in the way of the run folder ({folder}): move it away or rename the run"
        else:
            todo.append((entry, row))
    skipped = sum(r["status"] == "skipped" for r in rows)
    if skipped:
        say(f"zoo: {skipped} of {len(rows)} runs already complete in {out}, skipped")
    cluster = None
    if todo:
        with connect(address, num_cpus) as cluster:
            out.mkdir(parents=True, exist_ok=True)
            say(f"zoo: Ray {cluster.ray_version} ({cluster.started}, {cluster.nodes} node(s), {cluster.cpus:g} "
                f"CPUs) ready in {cluster.startup_seconds:.1f} s; {len(todo)} runs, {cpus_per_run:g} CPU each")
            if cluster.max_node_cpus < cpus_per_run:
                raise BadpruneError(f"--cpus-per-run {cpus_per_run:g} is more than any node has "
                                    f"({cluster.max_node_cpus:g} CPUs)", fix="lower --cpus-per-run")
            _run_tasks(todo, cpus_per_run, progress, say)
        stop_requested()   # a SIGTERM lost while Ray shut down: no zoo tables
    for row in rows:
        if row["status"] in ("ok", "skipped"):
            try:
                row.update(_row_numbers(Path(row["folder"])))
            except BadpruneError as e:
                row.update(status="failed", error=e.line())
    result = ZooResult(out, m.path, rows, cluster, time.perf_counter() - t_all)
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_tables(result)
    return result


#: when no live node of the cluster has the CPUs a run reserves for this long (its nodes died), the runs still
#: pending fail instead of waiting for ever
LOST_NODES_SECONDS = 30.0


def _capacity_lost(ray, cpus_per_run) -> bool:
    """No live node of the cluster could run a task of ``cpus_per_run`` CPUs any more."""
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive", n.get("alive", False))]
    except Exception:  # the cluster cannot be asked: let Ray's own errors decide
        return False
    return max((float((n.get("Resources") or {}).get("CPU", 0)) for n in nodes), default=0.0) < cpus_per_run


def _run_tasks(todo, cpus_per_run, progress, say) -> None:
    """Submit one task per (entry, row), write each run folder as its result arrives, fill the rows in."""
    import ray
    from tqdm import tqdm

    from .._console import progress as stage_progress

    task = ray.remote(num_cpus=cpus_per_run, max_retries=1)(_run_entry)
    # the CLI's SIGTERM handler (SIGTERM -> its Terminated interrupt); Ray may install its own when tasks start
    on_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None

    def keep_on_term():
        if callable(on_term) and signal.getsignal(signal.SIGTERM) is not on_term:
            signal.signal(signal.SIGTERM, on_term)

    pending = {}
    submitted = {}
    for entry, row in todo:
        inputs = jsonable(_fingerprint(entry))
        ref = task.options(name=f"badprune-zoo:{entry.name}").remote(entry.sweep_kwargs(),
                                                                     not entry.options["no_models"])
        pending[ref] = (entry, row, inputs)
        submitted[ref] = time.perf_counter()

    def note(msg):
        with tqdm.external_write_mode(file=sys.stderr):
            say(msg)

    done = failed = 0
    lost_since, checked = None, time.perf_counter()
    try:
        with stage_progress(len(todo), "zoo", "run", enabled=progress, rate=False) as bar:
            while pending:
                keep_on_term()
                stop_requested()   # a SIGTERM whose exception was lost (raised inside a callback) still stops
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                lost = False
                if not ready and time.perf_counter() - checked > 2:  # every few seconds: are nodes left?
                    checked = time.perf_counter()
                    lost_since = (lost_since or checked) if _capacity_lost(ray, cpus_per_run) else None
                    lost = lost_since is not None and checked - lost_since >= LOST_NODES_SECONDS
                if lost:
                    for ref in pending:
                        with contextlib.suppress(Exception):
                            ray.cancel(ref, force=True)
                    ready = list(pending)
                for ref in ready:
                    entry, row, inputs = pending.pop(ref)
                    try:
                        if lost:
                            raise RuntimeError(f"no node of the cluster with {cpus_per_run:g} CPUs is left "
                                               f"(nodes lost for {LOST_NODES_SECONDS:g} s)")
                        res = ray.get(ref)
                    except Exception as e:  # the worker died twice, or the task was lost
                        res = {"ok": False, "error": f"the Ray task failed ({_ray_error(e)})",
                               "seconds": time.perf_counter() - submitted[ref]}
                    _ran_here(row, res)
                    if res.get("ok"):
                        try:
                            _write_run(Path(row["folder"]), entry, inputs, res)
                            row["status"] = "ok"
                        except BadpruneError as e:
                            res = {"ok": False, "error": e.line()}
                    if not res.get("ok"):
                        row.update(status="failed", error=res["error"])
                        failed += 1
                    done += 1
                    bar.update(1)
                    bar.how = f"({done - failed} ok, {failed} failed)"
                    where = f" on {row['host']}" if row.get("host") else ""
                    secs = f" in {row['seconds']:.1f} s" if not missing(row.get("seconds")) else ""
                    state = "ok" if row["status"] == "ok" else "FAILED"
                    why = f": {row['error']}" if row["status"] == "failed" else ""
                    note(f"zoo: {entry.name} {state}{secs}{where} ({done}/{len(todo)} done, {len(pending)} "
                         f"running or queued, {failed} failed){why}")
                    for w in res.get("warnings") or []:
                        note(f"warning: {entry.name}: {w}")
            stop_requested()
    except BaseException:
        for ref in pending:  # Ctrl-C, SIGTERM, or a fault here: nothing keeps running for this zoo
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise


def _ray_error(e: BaseException) -> str:
    """A Ray task error as one short line (its class, and the cause's first line)."""
    cause = getattr(e, "cause", None)
    text = short(cause) if isinstance(cause, BaseException) else short(e)
    return printable(text.splitlines()[0] if text else type(e).__name__)
