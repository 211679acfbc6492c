"""badprune's own stages at lab scale: feature extraction (each engine), ranking, the sweep stage (incremental and
full), and the whole `badprune-fast sweep` command in a subprocess (warm and cold activation cache), whose peak
resident memory is read through a small launcher (conftest.run_measured)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import RUN_INFO, child_env, rounds, run_measured
import labscale
import sweep_stage


# --------------------------------------------------------------------------------------------------- extraction
#: the trunk batch size of badprune.sweep.run and `badprune-fast sweep` (--batch-size default)
BATCH = 128


def _engine_ok(engine) -> str | None:
    if engine == "litert":
        try:
            import ai_edge_litert.interpreter  # noqa: F401,F811
        except ImportError:
            return "ai-edge-litert is not installed"
    return None


def _engines():
    from badprune import features

    return list(features.ENGINES)


@pytest.mark.parametrize("engine", _engines())
def test_extract(benchmark, engine, model, layer, datasets, bounds, features):
    """features.extract over the three lab sets (no cache, batch 128), as badprune.sweep.run calls it; img/s =
    images / median.
    Runner set-up (tracing, XLA compilation, LiteRT conversion) happens inside each call, as in the product."""
    from badprune import features as bf

    why = _engine_ok(engine)
    if why:
        pytest.skip(why)
    F = np.empty_like(features)
    n = len(F)

    def run():
        for k, d in datasets.items():
            bf.extract(model, layer, d, 1.0, cache_dir=None, progress=False, engine=engine, out=F[bounds[k]],
                       batch_size=BATCH)

    try:  # an engine that does not work here is skipped, not failed
        _, info = bf.extract(model, layer, datasets["test"], 1.0, progress=False, engine=engine, batch_size=BATCH,
                             out=F[bounds["test"]], return_info=True)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"engine {engine} does not work here: {type(e).__name__}: {e}")
    benchmark.group = "extract"
    benchmark.extra_info.update(kind="reference" if engine == "predict" else "badprune", images=n, engine=engine,
                                trunk=info.get("trunk"))
    benchmark.pedantic(run, rounds=rounds(3 if engine != "predict" else 2), warmup_rounds=0)
    diff = float(np.abs(F - features).max())
    benchmark.extra_info["max_abs_diff_vs_tf"] = diff
    assert diff <= 1e-3 * max(1.0, float(np.abs(features).max()))
    if engine in ("tf", "tf-function", "tf-serial"):  # TensorFlow's activations, to the bit, whatever computed them
        assert F.tobytes() == features.tobytes()


# ------------------------------------------------------------------------------------------------------ ranking
def test_rank(benchmark, features, bounds):
    from badprune.sweep import rank_channels

    Fv = features[bounds["valid"]]
    benchmark.group = "sweep"
    benchmark.extra_info.update(kind="badprune", images=len(Fv))
    benchmark.pedantic(rank_channels, args=(Fv,), rounds=rounds(5), warmup_rounds=1)


# ------------------------------------------------------------------------------------------------- sweep stage
def _kernel_profile(fn):
    """One more call of ``fn``, in one thread (no shards), with every prune_ext kernel wrapped in a timer:
    {kernel: [calls, seconds, GFLOP]} (FLOPs for dense / conv2d / the sparse kernels from the operands), the total, and
    the rest (Python and numpy glue: row gathers, copies, metrics). cProfile cannot see inside the Cython kernels,
    so they are timed from outside."""
    import prune_ext

    names = [n for n in dir(prune_ext) if not n.startswith("_") and callable(getattr(prune_ext, n))
             and not isinstance(getattr(prune_ext, n), type)]
    saved = {n: getattr(prune_ext, n) for n in names}
    acc = {n: [0, 0.0, 0.0] for n in names}
    counting = [0.0]

    def flops(n, a, result):
        try:
            if n == "dense":
                return 2.0 * a[0].shape[0] * a[1].shape[0] * a[1].shape[1]
            if n == "gemm":
                return 2.0 * a[0].shape[0] * a[0].shape[1] * a[1].shape[1]
            if n == "conv2d":
                return 2.0 * float(np.prod(a[-1].shape)) * float(np.prod(a[1].shape[:3]))
            if n == "sparse_argmax":  # over each row's nonzero inputs
                return 2.0 * np.count_nonzero(a[0]) * a[1].shape[0] * a[1].shape[2]
            if n == "sparse_dense":  # likewise (0 when it declined and left the batch to dense)
                return 2.0 * np.count_nonzero(a[0]) * a[1].shape[1] if result else 0.0
        except (AttributeError, IndexError):
            pass
        return 0.0

    def wrap(n, f):
        def timed(*a, **k):
            t = time.perf_counter()
            r = None
            try:
                r = f(*a, **k)
                return r
            finally:
                e = acc[n]
                e[0] += 1
                t1 = time.perf_counter()
                e[1] += t1 - t
                e[2] += flops(n, a, r) / 1e9
                counting[0] += time.perf_counter() - t1  # the FLOP counting itself is the profiler's, not the sweep's
        return timed

    import badprune.head.engine as engine

    for n, f in saved.items():
        setattr(prune_ext, n, wrap(n, f))
    shard_rows, engine.MIN_SHARD_ROWS = engine.MIN_SHARD_ROWS, 1 << 62  # one thread: the kernels' times add up
    t = time.perf_counter()
    try:
        fn()
    finally:
        total = time.perf_counter() - t - counting[0]
        engine.MIN_SHARD_ROWS = shard_rows
        for n, f in saved.items():
            setattr(prune_ext, n, f)
    kern = {n: [c, round(s, 4), round(g, 2)] for n, (c, s, g) in sorted(acc.items(), key=lambda kv: -kv[1][1]) if c}
    return {"seconds": round(total, 4), "kernels": kern,
            "other_seconds": round(total - sum(v[1] for v in kern.values()), 4)}


@pytest.mark.parametrize("mode", ["incremental", "full"])
def test_sweep_stage(benchmark, mode, model, layer, head, features, ranking, bounds, datasets):
    """sweep.sweep_table (head.MaskedSweep) over the activations of all three sets (C+1 steps), all metrics."""
    labels = {k: d.labels for k, d in datasets.items()}
    n_classes = int(head.output_shape[-1])
    out = {}

    def run():
        out["table"] = sweep_stage.run(head, features, ranking, bounds, labels, n_classes, mode=mode)

    benchmark.group = "sweep"
    f = sweep_stage.head_flops(head)
    N = len(features)
    state = sum(int(np.prod(head.shapes[head.ops[i].out])) for i in head.linear) * 4 * N
    state += (len(ranking) + 1) * N * 4  # the labels of every step (int32), kept while the shards run ahead
    benchmark.extra_info.update(features_bytes=int(features.nbytes), state_bytes=int(state), n_classes=n_classes)
    benchmark.extra_info.update(kind="badprune", images=len(features), steps=len(ranking) + 1, mode=mode,
                                head=head.describe(), head_flops_per_sample=f,
                                trunk_flops_per_image=sweep_stage.trunk_flops(model, layer))
    benchmark.pedantic(run, rounds=rounds(3 if mode == "incremental" else 1), warmup_rounds=0)
    t = out["table"]
    st = t.pop("stats")
    if mode == "incremental":
        flops = sweep_stage.incremental_flops(head, len(features), st)
    else:
        flops = float(len(features) * f["full"] * (len(ranking) + 1))
    benchmark.extra_info.update(stats=st, flops=flops,
                                valid_acc=[round(float(v), 4) for v in t["valid_acc"]],
                                asr=[round(float(v), 4) for v in t["asr"]])
    RUN_INFO.setdefault("sweep_tables", {})[mode] = {k: [round(float(x), 4) for x in v] for k, v in t.items()}
    if mode == "incremental":  # one more, profiled run: where the time goes (kernels are C functions)
        benchmark.extra_info["profile"] = _kernel_profile(run)
    if "incremental" in RUN_INFO["sweep_tables"] and "full" in RUN_INFO["sweep_tables"]:
        a, b = RUN_INFO["sweep_tables"]["incremental"], RUN_INFO["sweep_tables"]["full"]
        assert a == b, "incremental and full sweeps disagree"


# ------------------------------------------------------------------------------------------------- whole command
def _cli_runner(args, env, tmp):
    """A callable running the command once; keeps each run's peak RSS and seconds."""
    runs = []

    def once():
        t = time.perf_counter()
        rss = run_measured([sys.executable, "-m", "badprune.cli", "sweep"] + args, env, os.path.join(tmp, "rss"))
        runs.append({"seconds": time.perf_counter() - t, "max_rss_bytes": rss})

    return once, runs


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_cli_sweep(benchmark, cache, lab, features, warm_cache):
    """The whole `badprune-fast sweep` (load, --scale auto, extraction or cache read, 61 steps x 3 sets with the
    GoodNet metrics, outputs incl. B'_X models, sweep.png) on the lab-scale files, in a fresh process."""
    out = tempfile.mkdtemp(prefix="badprune-bench-run-")
    args = list(lab["model"]["cli"]) + ["--valid", lab["paths"]["valid"], "--test", lab["paths"]["test"],
                                        "--poisoned", lab["paths"]["poisoned"], "--out", out, "--force", "-q"]
    args += ["--cache-dir", str(warm_cache)] if cache == "warm" else ["--no-cache"]
    once, runs = _cli_runner(args, child_env(), out + '.d')
    os.makedirs(out + '.d', exist_ok=True)
    n = sum(lab["sizes"].values())
    benchmark.group = "cli"
    benchmark.extra_info.update(kind="badprune", images=n, cache=cache, command="badprune-fast sweep " + " ".join(
        a if not a.startswith("/") else os.path.basename(a) for a in args))
    try:
        benchmark.pedantic(once, rounds=rounds(3), warmup_rounds=0 if labscale.small() else 1)
        import json

        with open(os.path.join(out, "sweep.json")) as f:
            js = json.load(f)
        benchmark.extra_info["timings"] = js.get("timings")
        benchmark.extra_info["config_cached"] = js.get("config", {}).get("cached")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out + '.d', ignore_errors=True)
    runs = runs[-rounds(3):]  # the timed rounds (not the warm-up)
    rss = [r["max_rss_bytes"] for r in runs]
    benchmark.extra_info.update(max_rss_bytes=rss, max_rss_median=float(np.median(rss)),
                                run_seconds=[r["seconds"] for r in runs])
    RUN_INFO.setdefault("peak_rss", {})[cache] = {"median_bytes": float(np.median(rss)), "max_bytes": max(rss),
                                                  "runs": len(rss)}
