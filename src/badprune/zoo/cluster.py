"""Ray for the zoo: a local cluster started here or one joined, and the task that runs one sweep on a node."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadpruneError, BadpruneWarning, printable, short
from .._env import cache_home
from ..runfolder import jsonable
from .manifest import INSTALL_FIX


# ------------------------------------------------------------------------------------------------- the cluster
@dataclass
class Cluster:
    """The Ray cluster the zoo ran on: ``started`` ('local': started here and stopped at the end; 'joined':
    an existing one, left running), its address, alive nodes, CPUs, Ray's version and the start-up seconds."""

    started: str
    address: str | None
    nodes: int
    cpus: float
    max_node_cpus: float
    ray_version: str
    startup_seconds: float
    temp_dir: str | None = None

    def to_json(self) -> dict:
        return jsonable(self.__dict__)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BadpruneError("Ray is not installed (badprune-fast zoo runs its sweeps as Ray tasks)",
                            fix=INSTALL_FIX) from None
    return ray


def ray_temp_dir() -> str:
    """Where a local Ray keeps its session files: ``<user cache>/ray`` when that path is short, else
    ``/tmp/bpray-<uid>`` (Ray's unix sockets live below it, and a socket path must stay under ~107 characters)."""
    d = os.path.join(cache_home(), "ray")
    if len(os.path.abspath(d)) <= 40:
        return _private_dir(os.path.abspath(d))
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return _private_dir(f"/tmp/bpray-{uid}")


def _private_dir(d: str) -> str:
    """``d`` created 0700 when missing; refused when it is a symlink, not the user's own, or open to others (in a
    shared /tmp anyone could have made it first, and Ray's sockets and session files live below it)."""
    fix = "remove it (or set BADPRUNE_CACHE to a short folder of your own)"
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d)
    except OSError as e:
        raise BadpruneError(f"cannot create Ray's session folder ({e.strerror or e})", d, fix) from None
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise BadpruneError("Ray's session folder is a link or not a folder", d, fix)
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise BadpruneError(f"Ray's session folder belongs to another user (uid {st.st_uid})", d, fix)
    if st.st_mode & 0o077:
        raise BadpruneError(f"Ray's session folder is open to other users (mode {st.st_mode & 0o777:o})", d, fix)
    return d


@contextlib.contextmanager
def _loopback_only(ray):
    """While a local Ray starts: its node address is 127.0.0.1, so Ray binds its GCS, raylet, object manager,
    agents and workers to loopback only (Ray turns a loopback ``_node_ip_address`` into the machine's routable
    address, then listens on every interface, unless its cluster mode is off, as it is on macOS and Windows)."""
    from ray._private import ray_constants

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env


def _check_loopback(ray) -> None:
    """A local Ray whose nodes advertise a non-loopback address listens beyond this machine: refused."""
    import ipaddress

    for n in ray.nodes():
        ip = n.get("NodeManagerAddress") or ""
        try:
            ok = ipaddress.ip_address(ip).is_loopback
        except ValueError:
            ok = False
        if not ok:
            raise BadpruneError(f"the local Ray started on {ip or 'an unknown address'}, not on 127.0.0.1 only "
                                f"(Ray {ray.__version__})", None,
                                "start a cluster yourself (`ray start --head --node-ip-address 127.0.0.1`) and "
                                "pass --address")


@contextlib.contextmanager
def _keep_signal_handlers():
    """Ray's start-up may install its own SIGTERM handler; the caller's (the CLI turns SIGTERM into
    KeyboardInterrupt) stays."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for s, h in saved.items():
            if h is not None and signal.getsignal(s) is not h:
                signal.signal(s, h)


def _cluster_info(ray, started, t0, temp_dir=None) -> Cluster:
    nodes = [n for n in ray.nodes() if n.get("Alive", n.get("alive", False))]
    cpus = float(ray.cluster_resources().get("CPU", 0))
    max_node = max((float((n.get("Resources") or {}).get("CPU", 0)) for n in nodes), default=0.0)
    address = None
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:
        pass
    return Cluster(started, address, len(nodes), cpus, max_node, ray.__version__, time.perf_counter() - t0,
                   temp_dir)


@contextlib.contextmanager
def connect(address=None, num_cpus=None):
    """Connect to Ray for the block; yields a :class:`Cluster`.

    Parameters
    ----------
    address : str, optional
        None: start a local Ray on this machine (``num_cpus`` CPUs, default all), stopped when the block ends.
        ``"auto"`` (the cluster this machine belongs to) or ``"ray://host:port"``: join that cluster (left
        running). When this process is already connected to Ray, that connection is used and left as it was.
    num_cpus : int, optional
        CPUs of a local Ray.

    Raises
    ------
    BadpruneError
        When Ray is not installed or the cluster cannot be reached.
    """
    ray = _import_ray()
    t0 = time.perf_counter()
    if ray.is_initialized():
        yield _cluster_info(ray, "joined", t0)
        return
    if num_cpus is not None and (not isinstance(num_cpus, int) or isinstance(num_cpus, bool) or num_cpus < 1):
        raise BadpruneError(f"--num-cpus must be a whole number of at least 1, got {num_cpus}", fix="e.g. 2")
    kw = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
              configure_logging=True)
    temp_dir = None
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local cluster reports nothing anywhere
        temp_dir = ray_temp_dir()
        kw.update(num_cpus=num_cpus or os.cpu_count() or 1, _temp_dir=temp_dir, _node_ip_address="127.0.0.1",
                  dashboard_host="127.0.0.1")
        started = "local"
    else:
        if num_cpus is not None:
            raise BadpruneError("--num-cpus is for a local Ray", fix="drop it with --address (the cluster has "
                                                                     "its CPUs)")
        kw.pop("include_dashboard")
        started = "joined"
    try:
        try:
            with _keep_signal_handlers():
                if address is None:
                    with _loopback_only(ray):
                        ray.init(**kw)
                    _check_loopback(ray)
                else:
                    ray.init(address=address, **kw)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError, OSError) as e:
            what = "cannot start a local Ray" if address is None else f"cannot join the Ray cluster at {address}"
            raise BadpruneError(f"{what} ({short(e)})", temp_dir,
                                "check the address (auto, or ray://host:port)" if address
                                else "check free memory and /tmp, or start one with `ray start --head`") from None
        yield _cluster_info(ray, started, t0, temp_dir)
    finally:
        if ray.is_initialized():  # a local cluster stops; from a joined one this driver only disconnects
            ray.shutdown()


# --------------------------------------------------------------------------------------------------- the task
def _read_tree(folder: Path) -> dict:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            files[p.relative_to(folder).as_posix()] = p.read_bytes()
    return files


def _run_entry(kwargs: dict, save_models: bool) -> dict:
    """The body of one zoo task: what ``badprune-fast sweep`` does (:func:`badprune.defense.run` and
    :func:`badprune.report.write_outputs`) into a temporary folder on this node, the activation cache in this
    node's user cache folder. Returns the run folder's files ({relative path: bytes}), its summary line, the
    warnings, where it ran and how long it took; a failure is returned as its one-line error, not raised (so Ray
    retries only a task whose worker died)."""
    import tempfile
    import warnings

    t0 = time.perf_counter()
    out = {"host": socket.gethostname(), "pid": os.getpid(), "node_id": None}
    try:
        import ray

        out["node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:  # run outside Ray (tests, debugging)
        pass
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BadpruneWarning)
            from .. import defense, report

            with tempfile.TemporaryDirectory(prefix="badprune-zoo-") as tmp:
                result = defense.run(**kwargs, progress=False)
                folder = report.write_outputs(result, Path(tmp) / "run", save_models=save_models)
                out["files"] = _read_tree(folder)
            out["summary"] = report.summary_line(result)
        out["warnings"] = [printable(w.message) for w in caught if issubclass(w.category, BadpruneWarning)]
        out["ok"] = True
    except BadpruneError as e:
        out.update(ok=False, error=e.line())
    except Exception as e:  # an internal fault in this run only
        out.update(ok=False, error=f"internal error: {printable(short(e))}")
    out["seconds"] = time.perf_counter() - t0
    return out
