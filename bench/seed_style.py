"""The seed-style pruning loop, written plainly as the notebooks do it (the baseline badprune is measured against):
for each step zero one more conv channel (kernel and bias) and Keras-predict the three data sets.

    python bench/seed_style.py --weights W.h5 --valid valid.h5 --test test.h5 --poisoned bd_test.h5 --steps 3

Measures --steps steps (default 3) and extrapolates to the whole sweep (C+1 evaluations); prints JSON.
"""
import argparse
import json
import time

import numpy as np

from badprune import _tf  # noqa: F401
from badprune import data, features, models


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--poisoned", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args(argv)
    model = models.load_model(weights=a.weights, arch="deepid")
    sets = [data.open_dataset(p, input_shape=(55, 47, 3)) for p in (a.valid, a.test, a.poisoned)]
    t = time.perf_counter()
    xs = [d.read(a.scale) for d in sets]
    t_read = time.perf_counter() - t
    layer = models.find_prune_layer(model)
    conv = model.get_layer(models.conv_producer(model, layer))
    feats = features.trunk(model, layer).predict(xs[0], batch_size=1024, verbose=0)
    order = np.argsort(feats.mean(axis=(0, 1, 2)), kind="stable")
    K, b = conv.get_weights()
    times = []
    for c in order[:a.steps]:
        t = time.perf_counter()
        K[..., c] = 0
        b[c] = 0
        conv.set_weights([K, b])
        for d, x in zip(sets, xs):
            pred = model.predict(x, batch_size=1024, verbose=0).argmax(1)
            float(np.mean(pred == d.labels))
        times.append(time.perf_counter() - t)
    per_step = float(np.median(times))
    steps = len(order) + 1
    print(json.dumps({"images": sum(d.n for d in sets), "read_seconds": t_read, "measured_steps": a.steps,
                      "step_seconds": times, "per_step_median": per_step, "sweep_steps": steps,
                      "extrapolated_seconds": per_step * steps + t_read}, indent=1))


if __name__ == "__main__":
    main()
