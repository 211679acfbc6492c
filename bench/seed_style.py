"""The seed-style pruning loop, written plainly as the course notebooks do it (the baseline badprune is measured
against): rank conv_3's channels by mean pool_3 activation on clean validation data, then for each pruning step
zero one more channel of the conv layer (kernel and bias) and ``model.predict`` the three data sets.

``model.predict`` runs with batch_size=1024 (Keras' default of 32 would make the baseline several times slower).
A whole sweep is C+1 evaluations (the unpruned model and each of the C channels); the benchmark measures a few
steps and extrapolates (time per step x (C+1), plus reading the data).

    python bench/seed_style.py --weights W.h5 --valid valid.h5 --test test.h5 --poisoned bd_test.h5 --steps 3
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

BATCH = 1024


class SeedLoop:
    """State of the loop: the in-memory sets, the conv layer, its weights (modified in place) and the order."""

    def __init__(self, model, xs: dict, ys: dict):
        from badprune import features, models

        self.model = model
        self.xs, self.ys = xs, ys
        layer = models.find_prune_layer(model)
        self.conv = model.get_layer(models.conv_producer(model, layer))
        feats = features.trunk(model, layer).predict(xs["valid"], batch_size=BATCH, verbose=0)
        self.order = [int(c) for c in np.argsort(feats.mean(axis=(0, 1, 2)), kind="stable")]
        self.K, self.b = (np.array(w) for w in self.conv.get_weights())
        self.k = 0
        self.rows = []

    @property
    def evaluations(self) -> int:
        """Evaluations in a whole sweep: the unpruned model and one per channel."""
        return len(self.order) + 1

    def evaluate(self) -> dict:
        accs = {}
        for name, x in self.xs.items():
            pred = self.model.predict(x, batch_size=BATCH, verbose=0).argmax(axis=1)
            accs[name] = float(np.mean(pred == self.ys[name]) * 100)
        self.rows.append(accs)
        return accs

    def step(self) -> dict:
        """Prune the next channel (zero its kernel and bias) and evaluate the three sets."""
        c = self.order[self.k % len(self.order)]
        self.k += 1
        self.K[..., c] = 0
        self.b[c] = 0
        self.conv.set_weights([self.K, self.b])
        return self.evaluate()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--poisoned", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args(argv)
    from badprune import _tf  # noqa: F401
    from badprune import data, models

    model = models.load_model(weights=a.weights, arch="deepid")
    t = time.perf_counter()
    sets = {k: data.open_dataset(p, input_shape=(55, 47, 3)) for k, p in
            (("valid", a.valid), ("test", a.test), ("poisoned", a.poisoned))}
    xs = {k: d.read(a.scale) for k, d in sets.items()}
    t_read = time.perf_counter() - t
    loop = SeedLoop(model, xs, {k: d.labels for k, d in sets.items()})
    loop.evaluate()  # step 0 (also traces predict)
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        loop.step()
        times.append(time.perf_counter() - t)
    per_step = float(np.median(times))
    print(json.dumps({"images": sum(d.n for d in sets.values()), "read_seconds": t_read, "measured_steps": a.steps,
                      "step_seconds": times, "per_step_median": per_step, "sweep_evaluations": loop.evaluations,
                      "extrapolated_seconds": per_step * loop.evaluations + t_read}, indent=1))


if __name__ == "__main__":
    main()
