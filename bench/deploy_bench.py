"""Throughput, label agreement and file size of the deployable GoodNet variants of a run.

    python bench/deploy_bench.py --run runs/lab3 --x 10 --test test.h5 --poisoned bd_test.h5 \
        --n 5000 --batch 256 --threads 2

Measures, on n images (half clean test, half poisoned, spread over each file), in images per second (best of
--repeat interleaved rounds after a warm-up): Keras B (``model.predict``), the two-model Keras GoodNet (B and B'_X
predicted separately, labels combined in numpy), the one-graph Keras GoodNet (``model.predict``), and the LiteRT
GoodNet in float32, float16 and int8 (whatever of ``tflite/goodnet_X<X>[.float16|.int8].tflite`` the run holds).
Agreement: share of images whose label equals the two-model Keras GoodNet's (for B: B's own labels, 100 %).
Prints a Markdown table and JSON.
"""
import argparse
import json
import os
import time

import numpy as np

from badprune import _tf  # noqa: F401


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--x", default="10")
    ap.add_argument("--test", required=True)
    ap.add_argument("--poisoned", required=True)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from badprune import goodnet, models
    from badprune.export import read_run, read_sample
    from badprune.runtime import LiteModel

    js = read_run(a.run)
    cfg = js["config"]
    scale = float(cfg.get("scale_value") or 1.0)
    X = np.concatenate([read_sample(a.test, (55, 47, 3), scale, a.n // 2),
                        read_sample(a.poisoned, (55, 47, 3), scale, a.n - a.n // 2)])
    n = len(X)
    B = models.load_model(model=cfg.get("model"), weights=cfg.get("weights"),
                          arch=cfg.get("arch") if cfg.get("weights") else None)
    N = models.num_classes(B)
    Bp = goodnet.load(os.path.join(a.run, "models", f"B_prime_X{a.x}.keras"))
    G = goodnet.load(os.path.join(a.run, "models", f"goodnet_X{a.x}.keras"))

    variants = [("Keras B (model.predict)", lambda x: B.predict(x, batch_size=a.batch, verbose=0).argmax(1), None)]

    def two_model(x):
        b = B.predict(x, batch_size=a.batch, verbose=0).argmax(1)
        p = Bp.predict(x, batch_size=a.batch, verbose=0).argmax(1)
        return np.where(b == p, b, N)

    variants.append(("Keras GoodNet, two models (B and B' predicted separately)", two_model, None))
    variants.append(("Keras GoodNet, one graph (model.predict)",
                     lambda x: G.predict(x, batch_size=a.batch, verbose=0).argmax(1),
                     os.path.getsize(os.path.join(a.run, "models", f"goodnet_X{a.x}.keras"))))
    for q in ("", ".float16", ".int8"):
        p = os.path.join(a.run, "tflite", f"goodnet_X{a.x}{q}.tflite")
        if os.path.exists(p):
            variants.append((f"LiteRT GoodNet {q[1:] or 'float32'}",
                             LiteModel(p, threads=a.threads, batch_size=a.batch).labels, os.path.getsize(p)))

    # interleaved rounds, best pass per variant: fair when the machine's load changes during the run
    best = [float("inf")] * len(variants)
    labels = [None] * len(variants)
    for _, fn, _ in variants:
        fn(X[: a.batch])  # warm-up (tracing, allocation)
    for _ in range(a.repeat):
        for i, (_, fn, _) in enumerate(variants):
            t = time.perf_counter()
            labels[i] = fn(X)
            best[i] = min(best[i], time.perf_counter() - t)
    lb, ref = labels[0], labels[1]
    rows = [{"variant": v, "img_per_s": n / t, "labels": lab, "bytes": size}
            for (v, _, size), t, lab in zip(variants, best, labels)]

    out = []
    print(f"{n} images ({n // 2} clean test + {n - n // 2} poisoned), batch {a.batch}, {a.threads} threads, "
          f"G_{a.x} of {a.run}\n")
    print("| variant | img/s | label agreement | file size |")
    print("|---|---:|---:|---:|")
    for r in rows:
        ref_labels = lb if r["variant"].startswith("Keras B ") else ref
        agree = 100.0 * float(np.mean(r["labels"] == ref_labels))
        size = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f} MB"
        print(f"| {r['variant']} | {r['img_per_s']:,.0f} | {agree:.2f}% | {size} |")
        out.append({"variant": r["variant"], "img_per_s": r["img_per_s"], "agreement": agree, "bytes": r["bytes"]})
    print()
    print(json.dumps({"n": n, "batch": a.batch, "threads": a.threads, "x": a.x, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
