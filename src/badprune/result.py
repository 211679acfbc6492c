"""What a sweep produced: :class:`SweepResult` (the per-step table, the ranking, B'_X per :class:`Threshold`),
built by :func:`badprune.sweep.run` or read back from its run folder (:meth:`SweepResult.from_run`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .runfolder import COLUMNS, POISONED_MEAN


def percent(hits) -> float:
    """The share of true values in ``hits`` (a boolean array), in percent; NaN when empty."""
    return 100.0 * float(np.mean(hits)) if len(hits) else float("nan")


def step_metrics(pred: dict, base: dict, truth: dict, num_classes: int) -> dict:
    """The table's metrics at one step, in percent, from the labels of B'_k (``pred``) and of B (``base``) per set
    ('valid', and 'test' / 'poisoned' when present) and the sets' stored labels (``truth``).

    GoodNet G = B'_k's label where B and B'_k agree, else N (``num_classes``). Sets that are absent give no key.
    """
    out = {"valid_acc": percent(pred["valid"] == truth["valid"])}
    if "test" in pred:
        p = pred["test"]
        g = np.where(p == base["test"], p, num_classes)
        out.update(test_acc=percent(p == truth["test"]), goodnet_test_acc=percent(g == truth["test"]),
                   goodnet_false_alarm=percent(g == num_classes))
    if "poisoned" in pred:
        p = pred["poisoned"]
        g = np.where(p == base["poisoned"], p, num_classes)
        out.update(asr=percent(p == truth["poisoned"]), goodnet_asr=percent(g == truth["poisoned"]),
                   goodnet_detection=percent(g == num_classes))
    return out


@dataclass
class Threshold:
    """B'_X for one threshold X: the first step whose validation accuracy dropped by at least X."""

    x: float                   # threshold, percentage points (or percent of base when relative)
    step: int | None           # None: never reached
    channels: list             # channels pruned in B'_X (ranking[:step])

    @property
    def reached(self) -> bool:
        return self.step is not None


@dataclass
class SweepResult:
    """Everything a sweep produced. ``table[col]`` is an array of C+1 values (step 0 = the unpruned model B)."""

    model_name: str
    layer: str                        # the prune layer (e.g. pool_3)
    conv_layer: str | None            # the layer whose kernel/bias B'_X zeroes (e.g. conv_3)
    n_channels: int
    ranking: np.ndarray               # channel indices in pruning order
    mean_activation: np.ndarray       # per channel, indexed by channel
    table: dict                       # column -> np.ndarray (len C+1), see COLUMNS
    thresholds: list                  # [Threshold]
    relative: bool                    # thresholds relative to base accuracy rather than absolute points
    num_classes: int                  # N: the GoodNet's "backdoor detected" label
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    model: object = field(default=None, repr=False, compare=False)   # B (Keras); None after a warm sweep: get_model
    repaired: list = field(default_factory=list)   # [badprune.repair.Repaired] when fine-tuning ran
    poisoned_mean_activation: np.ndarray | None = None   # per channel, on the poisoned set (None without one)
    #: B's cached record (:class:`badprune.record.ModelRecord`): B'_X and G_X are written from its templates
    model_record: object = field(default=None, repr=False, compare=False)
    #: after a warm sweep (``model`` None): how to load B when it is needed (:func:`badprune.models.load_model`'s
    #: keywords model, weights, arch, trust), checked against ``model_record``
    model_source: dict | None = field(default=None, repr=False, compare=False)
    scan: object = field(default=None, repr=False, compare=False)   # badprune.scan.ScanResult with --scan

    @classmethod
    def from_run(cls, run, model=None) -> "SweepResult":
        """A result read back from its run folder (a :class:`badprune.runfolder.Run`, :func:`~badprune.runfolder.
        read_run`), with B (``model``) given again; the repaired networks are not part of it."""
        doc = run.doc
        ths = [Threshold(float(t["x"]), t["step"], [int(c) for c in t["channels"]]) for t in run.thresholds]
        return cls(model_name=doc["model_name"], layer=doc["layer"], conv_layer=doc.get("conv_layer"),
                   n_channels=int(doc["n_channels"]), ranking=np.array(doc["ranking"], np.int64),
                   mean_activation=run.per_channel("mean_activation"), table=run.table(), thresholds=ths,
                   relative=bool(doc["relative"]), num_classes=int(doc["num_classes"]),
                   config=dict(run.config), timings=dict(doc.get("timings") or {}),
                   versions=dict(doc.get("versions") or {}), model=model,
                   poisoned_mean_activation=run.per_channel(POISONED_MEAN))

    def row(self, step: int) -> dict:
        return {c: self.table[c][step].item() for c in COLUMNS}

    def get_model(self):
        """B: ``model``; after a warm sweep, loaded now (once, with Keras) from ``model_source`` and checked to be
        the model of ``model_record``. None when there is no way to it."""
        if self.model is None and self.model_record is not None and self.model_source:
            self.model = self.model_record.load_model(self.model_source)
        return self.model

    def threshold(self, x: float) -> Threshold:
        for t in self.thresholds:
            if t.x == x:
                return t
        raise KeyError(f"no threshold {x}; have {[t.x for t in self.thresholds]}")

    def pruned_model(self, x: float):
        """B'_X as a plain Keras model (the channels' conv kernel and bias zeroed)."""
        from .models import prune_model

        t = self.threshold(x)
        if not t.reached:
            raise ValueError(f"threshold {x} was never reached")
        return prune_model(self.get_model(), self.layer, t.channels)
