"""The run folder's format, in one module that both writes and reads it (as Keras 3's ``saving_lib`` keeps its
archive's names to itself): the file names, the per-step table's columns, the ``sweep.json`` writer
(:func:`to_json`) and its one reader (:func:`read_run` / :func:`find_run`, a :class:`Run`; a
:class:`~badprune.result.SweepResult` is built from it with :meth:`~badprune.result.SweepResult.from_run`).

TF-free, standard library and numpy only: the TF-free runtime (:mod:`badprune.runtime`) and the CLI's start-up use
it as they are. Writing any output folder whole lives next door, in :mod:`badprune.outdir`. A run folder (the
``--out`` of ``badprune-fast sweep``) holds::

    sweep.csv  sweep.json  results.md  sweep.png  channels.png (with a poisoned set)
    models/B_prime_X<X>.keras  models/goodnet_X<X>.keras  (with a repair: models/repaired_X<X>.keras,
    models/goodnet_repaired_X<X>.keras)
    tflite/<model>[.float16|.int8].tflite  tflite/export.json      (badprune-fast export)
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import BadpruneError


# ------------------------------------------------------------------------------------------------- file names
def fmt_x(x) -> str:
    """A threshold as text, as in file names: integer-like values without decimals (``2``, ``10``), others as
    given (``2.5``)."""
    x = float(x)
    if math.isfinite(x) and x.is_integer():
        return str(int(x))
    return repr(x)


SWEEP_CSV = "sweep.csv"
SWEEP_JSON = "sweep.json"
RESULTS_MD = "results.md"
SWEEP_PNG = "sweep.png"
CHANNELS_PNG = "channels.png"
MODELS_DIR = "models"
TFLITE_DIR = "tflite"
EXPORT_JSON = "export.json"
#: the kinds of model a run saves per threshold X, by file-name stem: B'_X, G_X, R_X and the GoodNet of B and R_X
MODEL_KINDS = ("B_prime", "goodnet", "repaired", "goodnet_repaired")


def model_stem(x, kind: str = "B_prime") -> str:
    """``B_prime_X4``, ``goodnet_X2.5``: the file-name stem of a run's model of ``kind`` at threshold ``x``."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, not {kind!r}")
    return f"{kind}_X{fmt_x(x)}"


def model_filename(x, kind: str = "B_prime", ext: str = ".keras") -> str:
    """``B_prime_X2.keras``, ``goodnet_X4.keras`` (or with another extension)."""
    return model_stem(x, kind) + ext


def goodnet_filename(x, ext: str = ".keras") -> str:
    """``goodnet_X4.keras`` (or with another extension)."""
    return model_filename(x, "goodnet", ext)


def tflite_filename(x, kind: str, quantize: str = "none") -> str:
    """``goodnet_X4.tflite``, ``B_prime_X4.float16.tflite``, ``goodnet_X2.5.int8.tflite``."""
    suffix = "" if quantize == "none" else f".{quantize}"
    return f"{model_stem(x, kind)}{suffix}.tflite"


# ------------------------------------------------------------------------------------- naming a model to load
def model_name(path) -> str:
    """A short name for a model file, for default output folders: 'bd_net' for 'models/bd_net.h5'."""
    base = os.path.basename(os.path.normpath(str(path)))
    for ext in (".weights.h5", ".keras", ".h5", ".hdf5", ".hd5"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    else:
        base = os.path.splitext(base)[0]
    return base or "model"


# ------------------------------------------------------------------------------------------- the sweep table
#: columns of the per-step table, in output order (accuracies in percent)
COLUMNS = ("step", "channel", "mean_activation", "fraction_pruned", "valid_acc", "test_acc", "asr",
           "goodnet_test_acc", "goodnet_asr", "goodnet_detection", "goodnet_false_alarm")
#: columns that hold percentages (two decimals in text, four in the CSV)
PERCENT_COLUMNS = COLUMNS[4:]
#: the optional last column, present when the sweep had a poisoned set: the mean activation on it of the channel
#: pruned at that step (next to ``mean_activation``, its mean on the clean validation set)
POISONED_MEAN = "poisoned_mean_activation"


def table_columns(result) -> tuple:
    """The columns of ``result``'s table, in output order: :data:`COLUMNS`, then :data:`POISONED_MEAN` if there."""
    return COLUMNS + ((POISONED_MEAN,) if POISONED_MEAN in result.table else ())


def missing(v) -> bool:
    """True for None and NaN (a value the sweep could not measure, e.g. ASR without a poisoned set)."""
    if v is None:
        return True
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def jsonable(obj):
    """Plain JSON types: numpy scalars/arrays converted, NaN/inf -> None, paths and other objects -> str."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # other numpy-like scalars
        try:
            return jsonable(obj.item())
        except Exception:
            pass
    return str(obj)


def table_value(result, col: str, step: int):
    """``result.table[col][step]`` as a plain Python value (None when missing)."""
    v = np.asarray(result.table[col])[step]
    v = v.item() if hasattr(v, "item") else v
    return None if missing(v) else v


def table_channel(result, step: int):
    """The channel pruned at ``step`` (None for step 0, the unpruned model, or a missing/negative value)."""
    v = table_value(result, "channel", step)
    if v is None or int(v) < 0:
        return None
    return int(v)


def table_row(result, step: int) -> dict:
    """Step ``step`` of the table as plain values (``channel`` None at step 0)."""
    row = {c: table_value(result, c, step) for c in COLUMNS}
    row["step"] = int(row["step"]) if row["step"] is not None else step
    row["channel"] = table_channel(result, step)
    return row


# ----------------------------------------------------------------------------------------------- sweep.json
def to_json(result) -> dict:
    """The ``sweep.json`` document of a sweep result (a :class:`badprune.result.SweepResult`), plain JSON types
    (read back by :func:`read_run`).

    Keys: model_name, layer, conv_layer, n_channels, num_classes, relative, columns, table (column -> values per
    step), ranking, mean_activation and poisoned_mean_activation (per channel, by channel index; the latter None
    without a poisoned set), thresholds (x, reached, step, channels, row), config, timings, versions;
    with fine-tuning also repaired (x, mode, step, channels, row: R_X's metrics, info: how it was trained).
    """
    n = len(np.asarray(result.table["step"]))
    table = {}
    for c in table_columns(result):
        if c == "channel":
            table[c] = [table_channel(result, k) for k in range(n)]
        else:
            table[c] = jsonable(np.asarray(result.table[c]))
    thresholds = [{"x": float(t.x), "reached": bool(t.reached), "step": None if t.step is None else int(t.step),
                   "channels": [int(c) for c in t.channels] if t.reached else [],
                   "row": table_row(result, t.step) if t.reached else None} for t in result.thresholds]
    d = {
        "model_name": result.model_name,
        "layer": result.layer,
        "conv_layer": result.conv_layer,
        "n_channels": int(result.n_channels),
        "num_classes": int(result.num_classes),
        "relative": bool(result.relative),
        "columns": list(table_columns(result)),
        "table": table,
        "ranking": [int(c) for c in np.asarray(result.ranking).tolist()],
        "mean_activation": jsonable(np.asarray(result.mean_activation, dtype=float)),
        "poisoned_mean_activation": None if getattr(result, "poisoned_mean_activation", None) is None else
        jsonable(np.asarray(result.poisoned_mean_activation, dtype=float)),
        "thresholds": thresholds,
        "config": result.config,
        "timings": result.timings,
        "versions": result.versions,
    }
    if getattr(result, "repaired", None):
        d["repaired"] = [{"x": float(r.x), "mode": r.mode, "step": int(r.step), "channels": list(r.channels),
                          "row": dict(r.row), "info": dict(r.info)} for r in result.repaired]
    return jsonable(d)


def json_text(result) -> str:
    """``sweep.json``'s text: :func:`to_json` as indented JSON (no NaN)."""
    return json.dumps(to_json(result), indent=2, allow_nan=False) + "\n"


@dataclass
class Run:
    """A run folder's ``sweep.json``, read back: ``doc`` is the document, ``dir`` the folder, ``path`` the file.
    :meth:`table`, :meth:`per_channel` and :attr:`thresholds` parse it (the one reader of the format)."""

    dir: str
    path: str
    doc: dict

    @property
    def config(self) -> dict:
        return self.doc.get("config") or {}

    @property
    def thresholds(self) -> list:
        return self.doc["thresholds"]

    @property
    def reached(self) -> list:
        """The thresholds that were reached (dicts with x, step, channels, row)."""
        return [t for t in self.thresholds if t.get("reached")]

    def threshold(self, x) -> dict:
        for t in self.thresholds:
            if float(t["x"]) == float(x):
                return t
        raise KeyError(x)

    @property
    def scale_value(self) -> float | None:
        v = self.config.get("scale_value")
        return None if v is None else float(v)

    def model_path(self, x, kind: str = "B_prime") -> str:
        """``<run>/models/<kind>_X<x>.keras``."""
        return os.path.join(self.dir, MODELS_DIR, model_filename(x, kind))

    def table(self) -> dict:
        """The per-step table as arrays (column -> C+1 values; ``channel`` -1 and other missing values NaN at
        step 0 / where unmeasured), as :func:`to_json` wrote it."""
        doc, table = self.doc, {}
        for c in COLUMNS + ((POISONED_MEAN,) if POISONED_MEAN in doc["table"] else ()):
            v = doc["table"][c]
            if c == "channel":
                table[c] = np.array([-1 if x is None else int(x) for x in v], np.int64)
            elif c == "step":
                table[c] = np.array(v, np.int64)
            else:
                table[c] = np.array([np.nan if x is None else float(x) for x in v], np.float64)
        return table

    def per_channel(self, key: str) -> np.ndarray | None:
        """A per-channel array (``mean_activation``, ``poisoned_mean_activation``; NaN for missing), or None."""
        v = self.doc.get(key)
        return None if v is None else np.array([np.nan if x is None else x for x in v])


def _read_json(p):
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BadpruneError(f"cannot read sweep.json ({type(e).__name__})", p, "re-run the sweep") from None


def read_run(run_dir) -> Run:
    """The :class:`Run` of a run folder; raises :class:`BadpruneError` when it is not one."""
    run_dir = str(run_dir)
    if not os.path.isdir(run_dir):
        raise BadpruneError("run folder not found", run_dir, "pass the --out folder of a badprune-fast sweep")
    p = os.path.join(run_dir, SWEEP_JSON)
    if not os.path.isfile(p):
        raise BadpruneError("no sweep.json in the run folder", run_dir, "pass the --out folder of a sweep")
    doc = _read_json(p)
    if not isinstance(doc, dict) or not isinstance(doc.get("thresholds"), list):
        raise BadpruneError("sweep.json has no thresholds", p, "re-run the sweep")
    return Run(run_dir, p, doc)


def exported_kind(tflite_path) -> str | None:
    """The kind (a name of :data:`MODEL_KINDS`) of an exported ``.tflite`` file: as ``badprune-fast export``
    recorded it in the ``export.json`` next to it, else as its file name says (``goodnet_X4.tflite``), else None.
    (A .tflite file keeps no output names: this is how an exported GoodNet, whose one output is (n, N + 1) scores,
    is told from a classifier.)"""
    name = os.path.basename(str(tflite_path))
    p = os.path.join(os.path.dirname(os.path.abspath(str(tflite_path))), EXPORT_JSON)
    try:
        with open(p, encoding="utf-8") as f:
            rec = json.load(f).get(name)
    except (OSError, ValueError, AttributeError):
        rec = None
    kind = rec.get("kind") if isinstance(rec, dict) else None
    if kind in MODEL_KINDS:
        return kind
    stem = name.split(".", 1)[0]
    return next((k for k in sorted(MODEL_KINDS, key=len, reverse=True) if stem.startswith(k + "_X")), None)


def find_run(model_path) -> Run | None:
    """The run a model file belongs to (``sweep.json`` next to it, or one folder up, as for
    ``<run>/tflite/x.tflite`` and ``<run>/models/x.keras``), or None."""
    d = os.path.dirname(os.path.abspath(str(model_path)))
    for folder in (d, os.path.dirname(d)):
        p = os.path.join(folder, SWEEP_JSON)
        if os.path.isfile(p):
            doc = _read_json(p)
            if not isinstance(doc, dict):
                raise BadpruneError("cannot read the run's sweep.json", p, "re-run the sweep")
            return Run(folder, p, doc)
    return None
