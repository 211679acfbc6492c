"""Fine-pruning at lab scale: what `--fine-tune head` adds to a sweep (R_X for the thresholds 2, 4 and 10 over the
cached activations, with the exact evaluation of each R_X), next to the sweep stage of the same run."""
from __future__ import annotations

import types

from conftest import RUN_INFO, rounds


def test_repair_head(benchmark, model, layer, features, bounds, datasets, sweep_table):
    from badprune.repair import check_args, repair_thresholds

    _, ths = sweep_table
    result = types.SimpleNamespace(model=model, layer=layer, thresholds=ths, config={"scale_value": 1.0},
                                   num_classes=int(model.outputs[0].shape[-1]))
    params = check_args("head")
    out = {}

    def run():
        out["reps"] = repair_thresholds(result, features, bounds, datasets, params)

    benchmark.group = "repair"
    benchmark.pedantic(run, rounds=rounds(3), warmup_rounds=0)  # each round a whole repair (seeded: same R_X)
    reps = out["reps"]
    info = [{"x": r.x, "step": r.step, "seconds": r.info["total_seconds"], "epochs": r.info["epochs"],
             "tried": [(t["lr"], t["weight_decay"], round(t["holdout_acc"] or 0.0, 2)) for t in r.info["tried"]],
             "holdout_b_prime": r.info["holdout_b_prime"], "row": r.row} for r in reps]
    benchmark.extra_info.update(images=int(datasets["valid"].n), thresholds=len(reps), per_x=info)
    RUN_INFO["repair"] = info
    assert len(reps) == sum(t.reached for t in ths)
