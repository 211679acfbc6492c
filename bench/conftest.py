"""pytest configuration of the benchmark suite (bench/ is its own pytest root: see bench/pytest.ini).

    pytest bench/ --benchmark-autosave                     # run, save .benchmarks/<machine>/NNNN_*.json
    python bench/report.py                                 # render the newest saved run into bench/RESULTS.md

Session fixtures build the lab-scale data once (:mod:`labscale`, cached in $BADPRUNE_BENCH_DIR or bench/.cache),
load model B, and extract the prune layer's activations once (into a warm activation cache the CLI benchmarks
reuse). ``BADPRUNE_BENCH_SMALL=1``: tiny sets and one round per benchmark (tests/test_bench_smoke.py).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:  # an installed badprune, else the source tree (with prune_ext built in place)
    import badprune  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))

import labscale  # noqa: E402

#: what the run measured besides times (model, data, load), merged into the JSON's machine_info
RUN_INFO: dict = {}
_START = {}


def rounds(n: int) -> int:
    """``n`` rounds, or 1 in the smoke run."""
    return 1 if labscale.small() else n


def child_env(**extra) -> dict:
    """Environment for a subprocess running badprune: PYTHONPATH names the badprune being benchmarked."""
    import badprune as bp

    env = dict(os.environ)
    root = str(Path(bp.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


#: runs ARGV[2:] and writes its peak RSS (KiB, from RUSAGE_CHILDREN) to ARGV[1]. A small launcher is needed: a
#: child forked (or vforked) straight from the big pytest process reports the parent's RSS as its own peak, since
#: Linux folds the pre-exec address space's high-water mark into the child's ru_maxrss.
_LAUNCH = ("import resource, subprocess, sys; r = subprocess.call(sys.argv[2:]); "
           "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(r)")


def run_measured(argv, env, rss_file) -> int:
    """Run ``argv`` through the launcher; return its peak RSS in bytes (raises on a non-zero exit). The launcher
    adds one small Python start-up (~30 ms) to the wall time."""
    import subprocess

    p = subprocess.run([sys.executable, "-c", _LAUNCH, str(rss_file)] + list(argv), env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return int(Path(rss_file).read_text()) * 1024


def pytest_configure(config):
    _START["load"] = os.getloadavg()
    _START["time"] = time.time()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("badprune", "numpy", "scipy", "h5py", "tensorflow", "tensorflow-cpu", "keras", "ai-edge-litert",
                "pytest-benchmark"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import badprune as bp

        out.setdefault("badprune", getattr(bp, "__version__", "?") + " (source tree)")
    except ImportError:
        pass
    return out


def _isa() -> str:
    """The instruction set prune_ext's vector kernels run in (prune_ext.ISA)."""
    import prune_ext

    return prune_ext.ISA


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    machine_info["badprune_bench"] = {
        "cpu_model": _cpu_model(), "cores": cores, "isa": _isa(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "load_at_start": list(_START.get("load", ())),
        "load_at_end": list(os.getloadavg()), "started": _START.get("time"), "finished": time.time(),
        "suite_seconds": time.time() - _START.get("time", time.time()), "versions": _versions(),
        "small": labscale.small(), **RUN_INFO,
    }


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def lab():
    """The lab-scale fixture's meta (paths, sizes, model spec, base accuracy and ASR)."""
    meta = labscale.ensure()
    RUN_INFO["fixture"] = {k: meta[k] for k in ("dir", "sizes", "dtypes", "base_valid_acc", "base_test_acc",
                                                "asr", "target", "distinct_labels", "bytes")}
    RUN_INFO["model"] = {k: meta["model"][k] for k in ("kind", "description", "labels", "target")}
    return meta


@pytest.fixture(scope="session")
def model(lab):
    return labscale.load_b(lab["model"])


@pytest.fixture(scope="session")
def layer(model):
    from badprune import models

    return models.find_prune_layer(model)


@pytest.fixture(scope="session")
def datasets(lab, model):
    from badprune import data as bd
    from badprune import models

    shape = tuple(int(v) for v in model.input_shape[1:])
    n = models.num_classes(model)
    return {k: bd.open_dataset(p, input_shape=shape, num_classes=n) for k, p in lab["paths"].items()}


@pytest.fixture(scope="session")
def bounds(datasets):
    out, lo = {}, 0
    for k, d in datasets.items():
        out[k] = slice(lo, lo + d.n)
        lo += d.n
    return out


@pytest.fixture(scope="session")
def warm_cache(lab):
    d = Path(lab["dir"]) / "activation-cache"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def features(model, layer, datasets, bounds, warm_cache):
    """Prune-layer activations of all three sets in one array (as badprune.sweep.run builds it); also fills the
    warm activation cache the CLI benchmarks use (engine tf, scale raw = 1.0, like the CLI's --scale auto here)."""
    from badprune import features as bf

    n = sum(d.n for d in datasets.values())
    shape = tuple(int(v) for v in model.get_layer(layer).output.shape[1:])
    F = np.empty((n,) + shape, np.float32)
    for k, d in datasets.items():
        bf.extract(model, layer, d, 1.0, cache_dir=str(warm_cache), progress=False, out=F[bounds[k]])
    return F


@pytest.fixture(scope="session")
def head(model, layer):
    from badprune.head import compile_head

    return compile_head(model, layer)


@pytest.fixture(scope="session")
def ranking(features, bounds):
    from badprune.sweep import rank_channels

    return rank_channels(features[bounds["valid"]])[0]


@pytest.fixture(scope="session")
def arrays(datasets):
    """The three sets as in-memory float32 NHWC arrays (what the notebooks hold), and the seconds to read them."""
    t = time.perf_counter()
    xs = {k: d.read(1.0) for k, d in datasets.items()}
    RUN_INFO["read_seconds"] = time.perf_counter() - t
    return xs


@pytest.fixture(scope="session")
def sweep_table(head, features, ranking, bounds, datasets):
    """One untimed incremental sweep: the per-step table and thresholds (for the GoodNet benchmarks)."""
    import sweep_stage

    table = sweep_stage.run(head, features, ranking, bounds, {k: d.labels for k, d in datasets.items()},
                            num_classes=head.output_shape[-1])
    from badprune.sweep import select_thresholds

    ths = select_thresholds(table["valid_acc"], (2, 4, 10), ranking=ranking)
    RUN_INFO["thresholds"] = {str(t.x): t.step for t in ths}
    RUN_INFO["asr_curve_min"] = float(np.nanmin(table["asr"]))
    return table, ths
