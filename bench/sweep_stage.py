"""badprune's sweep stage, as ``badprune.sweep.run`` runs it after extraction: ``sweep.sweep_table`` over the
activations of all sets at once, and at every step the accuracies, ASR and GoodNet metrics; plus the FLOP counts
of that work (for the floor analysis in RESULTS.md)."""
from __future__ import annotations

import numpy as np


def run(head, F, ranking, bounds, labels, num_classes, mode="incremental"):
    """The per-step metrics {valid_acc, test_acc, asr, goodnet_*} (percent, C+1 rows) as ``badprune.sweep.run``
    computes them, plus ``stats``: the engine's row counts."""
    from badprune.runfolder import PERCENT_COLUMNS
    from badprune.sweep import sweep_table

    cols, engine = sweep_table(head, F, ranking, None, bounds, labels, num_classes, mode=mode)
    out = {c: cols[c] for c in PERCENT_COLUMNS}
    out["stats"] = engine.stats
    return out


# ------------------------------------------------------------------------------------------------------ FLOPs
def _op_flops(head, o) -> int:
    """Multiply-adds x 2 of one head op for one sample."""
    if o.kind == "dense":
        return 2 * int(o.params["W"].shape[0]) * int(o.params["W"].shape[1])
    if o.kind == "conv":
        kh, kw, cin, _ = o.params["K"].shape
        return 2 * int(np.prod(o.shape)) * int(kh * kw * cin)
    return 0


def head_flops(head) -> dict:
    """Per-sample FLOPs of the head: 'full' (the whole head), and for the incremental sweep 'remove' (taking one
    channel out of the linear consumers' pre-activations), 'rest' (from those to the final layer's input), 'final'
    (the final Dense) and 'per_input' (the final Dense per nonzero input: its sparse argmax's cost)."""
    out = {"full": sum(_op_flops(head, o) for o in head.ops), "remove": 0, "rest": 0, "final": 0, "per_input": 0}
    if head.tf_head is not None or not head.ops:
        return out
    H, W, C = head.input_shape
    for i, kind in head.linear.items():
        o = head.ops[i]
        if kind == "dense":
            out["remove"] += 2 * H * W * int(o.params["W"].shape[1])
        else:
            kh, kw, _, cout = o.params["K"].shape
            out["remove"] += 2 * int(np.prod(o.shape[:2])) * int(kh * kw) * int(cout)
    last = head.ops[-1]
    if last.kind == "dense":
        out["final"] = _op_flops(head, last)
        out["per_input"] = 2 * int(last.params["W"].shape[1])
        given = frozenset(head.ops[i].out for i in head.linear)
        from badprune.head.evaluate import plan as head_plan

        plan = head_plan(head, given, last.inputs[0])
        out["rest"] = sum(_op_flops(head, o) for o in plan)
    return out


def trunk_flops(model, layer) -> int:
    """Per-image FLOPs of the trunk (Conv2D / Dense layers up to ``layer``)."""
    total = 0
    for lay in model.layers:
        cls = type(lay).__name__
        if cls in ("Conv2D", "Convolution2D"):
            k = lay.get_weights()[0]
            total += 2 * int(np.prod(lay.output.shape[1:])) * int(np.prod(k.shape[:3]))
        elif cls == "Dense":
            k = lay.get_weights()[0]
            total += 2 * int(k.shape[0]) * int(k.shape[1])
        if lay.name == layer:
            break
    return total


def incremental_flops(head, n_samples, stats) -> float:
    """FLOPs the incremental sweep did, from the engine's ``stats`` (rows re-evaluated, rows whose final
    layer was computed in full, nonzero inputs the sparse final layer summed over) plus the first full pass."""
    f = head_flops(head)
    return float(n_samples * f["full"] + stats.get("rows", 0) * (f["remove"] + f["rest"])
                 + stats.get("exact_final", 0) * f["final"] + stats.get("nonzeros", 0) * f["per_input"])
