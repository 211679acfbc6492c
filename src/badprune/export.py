"""LiteRT (TFLite) export of a run's B'_X and G_X (and R_X), with a label-agreement check against the Keras models.

``export_run(RUN_DIR)`` reads ``sweep.json`` and ``models/`` of a run written by ``badprune-fast sweep`` and writes,
for every threshold X that was reached,

* ``tflite/B_prime_X<X>.tflite`` and ``tflite/goodnet_X<X>.tflite`` (``--quantize none``: float32), and for a
  fine-tuned run also ``tflite/repaired_X<X>.tflite`` and ``tflite/goodnet_repaired_X<X>.tflite``,
* ``tflite/B_prime_X<X>.float16.tflite`` ... (``float16``: weights stored as float16, computed in float32),
* ``tflite/B_prime_X<X>.int8.tflite`` ... (``int8``: weights and activations int8, calibrated on clean validation
  images; float32 input and outputs),

plus ``tflite/export.json`` (one entry per file: size, agreement, images checked). Every file is run with LiteRT on
up to ``check_images`` clean validation and as many poisoned images (spread over each file) and its labels are
compared with the Keras model it came from; below ``min_agreement`` percent on either set the whole export is
refused (nothing is written) unless ``allow_lossy``. Files are converted into a temporary folder and moved into
``tflite/`` only when all passed.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from . import atomic
from ._console import quiet_fds
from .errors import BadpruneError
from .runfolder import EXPORT_JSON, TFLITE_DIR, fmt_x, model_stem, read_run, tflite_filename

QUANTIZE = ("none", "float16", "int8")
#: default minimum label agreement (percent) between an exported model and its Keras model
MIN_AGREEMENT = 99.0
#: default number of validation and of poisoned images the agreement is measured on
CHECK_IMAGES = 2000
#: images of the clean validation set used to calibrate int8
CALIBRATION_IMAGES = 300


@dataclass
class Exported:
    """One exported file and how well it agrees with its Keras model."""

    x: float
    kind: str                  # a name of badprune.runfolder.MODEL_KINDS
    quantize: str
    path: str
    bytes: int
    agreement: dict = field(default_factory=dict)   # set name -> percent of equal labels
    images: dict = field(default_factory=dict)      # set name -> images checked
    seconds: float = 0.0

    @property
    def worst(self) -> float:
        return min(self.agreement.values()) if self.agreement else float("nan")


def sample_indices(n: int, k: int, blocks: int = 8) -> list:
    """``[(start, stop)]``: up to ``k`` of ``n`` images in ``blocks`` contiguous runs spread over the file (files
    are often sorted by class, so the first k images would not be representative)."""
    if n <= k:
        return [(0, n)]
    per = max(k // blocks, 1)
    starts = np.linspace(0, n - per, blocks).astype(int)
    out, total = [], 0
    for s in starts:
        m = min(per, k - total)
        if m <= 0:
            break
        out.append((int(s), int(s) + m))
        total += m
    return out


def read_sample(path, input_shape, scale: float, k: int) -> np.ndarray:
    """Up to ``k`` images of a lab h5 file, spread over it, scaled, float32 NHWC."""
    from .data import open_dataset

    ds = open_dataset(path, input_shape=input_shape)
    return np.concatenate([ds.read(scale, a, b) for a, b in sample_indices(ds.n, k)])


def _resolve(path, run_dir, what):
    if path is None:
        return None
    for p in (path, os.path.join(str(run_dir), str(path))):
        if os.path.isfile(p):
            return p
    raise BadpruneError(f"the run's {what} set is not found", path,
                        f"pass its path with --{'valid' if what == 'validation' else 'poisoned'}")


def convert(model, quantize: str = "none", calibration=None) -> bytes:
    """A Keras model as LiteRT flatbuffer bytes. ``calibration``: float32 NHWC images (needed for int8)."""
    from . import _tf  # noqa: F401
    import tensorflow as tf

    if quantize not in QUANTIZE:
        raise BadpruneError(f"unknown quantization '{quantize}'", fix=f"use one of: {', '.join(QUANTIZE)}")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        if calibration is None or not len(calibration):
            raise BadpruneError("int8 quantization needs clean validation images to calibrate on",
                                fix="pass --valid valid.h5")
        cal = np.asarray(calibration, np.float32)

        def representative():
            for i in range(len(cal)):
                yield [cal[i:i + 1]]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
    try:
        with quiet_fds(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'Statistics for quantized inputs were expected' (float input: fine)
            return conv.convert()
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise BadpruneError(f"LiteRT conversion failed ({type(e).__name__}: {msg})",
                            fix="report the model; try another --quantize") from None


def agreement(keras_model, tflite_path, sets: dict, threads: int | None = None, batch_size: int = 256,
              goodnet: bool = False) -> tuple[dict, dict]:
    """Percent of images on which the .tflite model and the Keras model give the same label, per set."""
    from . import goodnet as gn
    from .runtime import LiteModel

    lite = LiteModel(tflite_path, threads=threads, batch_size=batch_size)
    kind = gn.model_kind(keras_model)
    agree, n = {}, {}
    for name, X in sets.items():
        if X is None or not len(X):
            continue
        a = gn.predict_labels(keras_model, X, kind, batch_size)
        b = lite.labels(X)
        agree[name] = 100.0 * float(np.mean(a == b))
        n[name] = int(len(X))
    return agree, n


def _load_models(run, x):
    """[(kind, Keras model)] of a run at X: B'_X and G_X (G_X rebuilt from the run's B when its file is missing),
    then R_X and the GoodNet of B and R_X when the run was fine-tuned."""
    from . import goodnet as gn

    bp_path = run.model_path(x, "B_prime")
    g_path = run.model_path(x, "goodnet")
    if not os.path.isfile(bp_path):
        raise BadpruneError(f"the run has no B'_{fmt_x(x)} model", bp_path, "re-run the sweep without --no-models")
    bp = gn.load(bp_path)
    if os.path.isfile(g_path):
        g = gn.load(g_path)
    else:
        cfg = run.config
        t = run.threshold(x)
        src = cfg.get("model") or cfg.get("weights")
        if not src or not os.path.isfile(src):
            raise BadpruneError(f"the run has no GoodNet G_{fmt_x(x)} and its model B is not found", g_path,
                                "re-run the sweep (it saves models/goodnet_X<X>.keras)")
        from .models import load_model

        B = load_model(model=cfg.get("model"), weights=cfg.get("weights"),
                       arch=cfg.get("arch") if cfg.get("weights") else None)
        g = gn.build_goodnet(B, run.doc["layer"], t["channels"], name=model_stem(x, "goodnet"))
    out = [("B_prime", bp), ("goodnet", g)]
    for kind in ("repaired", "goodnet_repaired"):
        if os.path.isfile(run.model_path(x, kind)):
            out.append((kind, gn.load(run.model_path(x, kind))))
    return out


def export_run(run_dir, quantize: str = "none", allow_lossy: bool = False, min_agreement: float = MIN_AGREEMENT,
               check_images: int = CHECK_IMAGES, valid=None, poisoned=None, thresholds=None, threads=None,
               log=None) -> list:
    """Export every reached X of a run (or only ``thresholds``) to ``<run_dir>/tflite``; see the module docstring.
    Returns the :class:`Exported` list. Raises :class:`BadpruneError` when a file's agreement is below
    ``min_agreement`` and not ``allow_lossy`` (then nothing is written)."""
    say = log or (lambda m: None)
    if quantize not in QUANTIZE:
        raise BadpruneError(f"unknown quantization '{quantize}'", fix=f"use one of: {', '.join(QUANTIZE)}")
    if not 0 <= float(min_agreement) <= 100:
        raise BadpruneError("--min-agreement must be a percentage (0..100)")
    if int(check_images) < 1:
        raise BadpruneError("--check-images must be positive")
    run = read_run(run_dir)
    cfg = run.config
    reached = run.reached
    if thresholds is not None:
        want = {float(x) for x in thresholds}
        missing = want - {float(t["x"]) for t in reached}
        if missing:
            raise BadpruneError(f"threshold(s) {', '.join(fmt_x(x) for x in sorted(missing))} not reached in this "
                                "run", run_dir, f"pick from: {', '.join(fmt_x(t['x']) for t in reached) or 'none'}")
        reached = [t for t in reached if float(t["x"]) in want]
    if not reached:
        raise BadpruneError("no threshold was reached in this run: nothing to export", run_dir,
                            "re-run the sweep with smaller --thresholds")
    scale = run.scale_value or 1.0
    valid = _resolve(valid or cfg.get("valid"), run_dir, "validation")
    poisoned = _resolve(poisoned or cfg.get("poisoned"), run_dir, "poisoned")
    if valid is None:
        raise BadpruneError("the run names no validation set", run_dir, "pass --valid valid.h5")

    out_dir = os.path.join(str(run_dir), TFLITE_DIR)
    atomic.remove_stale(run_dir, (f".{TFLITE_DIR}.tmp-*",))  # a killed export's (by age and owner, not pid)
    tmp = atomic.temp_name(out_dir)  # the new files, moved in one by one once all are checked
    os.makedirs(tmp)
    exported = []
    try:
        sets = None
        for t in reached:
            x = float(t["x"])
            kinds = _load_models(run, x)
            bp = kinds[0][1]
            if sets is None:
                shape = tuple(int(v) for v in bp.inputs[0].shape[1:])
                sets = {"valid": read_sample(valid, shape, scale, check_images)}
                if poisoned is not None:
                    sets["poisoned"] = read_sample(poisoned, shape, scale, check_images)
                cal = read_sample(valid, shape, scale, CALIBRATION_IMAGES) if quantize == "int8" else None
                say(f"checking on {len(sets['valid'])} validation images ({valid})"
                    + (f" and {len(sets['poisoned'])} poisoned images ({poisoned})" if "poisoned" in sets else "")
                    + f", pixels x {scale:.6g}")
            for kind, model in kinds:
                t0 = time.perf_counter()
                name = tflite_filename(x, kind, quantize)
                path = os.path.join(tmp, name)
                blob = convert(model, quantize, cal)
                with open(path, "wb") as f:
                    f.write(blob)
                agree, n = agreement(model, path, sets, threads=threads)
                done = Exported(x, kind, quantize, os.path.join(out_dir, name), len(blob), agree, n,
                                time.perf_counter() - t0)
                exported.append(done)
                say(f"{name}: {len(blob) / 1e6:.2f} MB, label agreement with the Keras model: "
                    + ", ".join(f"{k} {v:.2f}% of {n[k]}" for k, v in agree.items()))
        bad = [r for r in exported if r.worst < float(min_agreement)]
        if bad and not allow_lossy:
            r = bad[0]
            worst = min(r.agreement, key=r.agreement.get)
            raise BadpruneError(
                f"export refused: {os.path.basename(r.path)} agrees with its Keras model on only "
                f"{r.agreement[worst]:.2f}% of {r.images[worst]} {worst} images (< {float(min_agreement):g}%)",
                run_dir, "pass --allow-lossy to write it anyway, or use --quantize float16 or none")
        os.makedirs(out_dir, exist_ok=True)
        for r in exported:
            os.replace(os.path.join(tmp, os.path.basename(r.path)), r.path)
        _update_index(out_dir, exported)
    except OSError as e:
        raise BadpruneError(f"cannot write the export ({e.strerror or e})", run_dir,
                            "check free space and permissions") from None
    finally:
        atomic.remove(tmp)
    return exported


def _update_index(out_dir, exported):
    p = os.path.join(out_dir, EXPORT_JSON)
    try:
        with open(p, encoding="utf-8") as f:
            index = json.load(f)
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    for r in exported:
        d = asdict(r)
        d["path"] = os.path.basename(r.path)
        index[d["path"]] = d
    atomic.write_text(p, json.dumps(dict(sorted(index.items())), indent=1) + "\n")


def format_exported(exported) -> str:
    """A small table of exported files."""
    sets = sorted({k for r in exported for k in r.agreement}, key=lambda s: (s != "valid", s))
    head = ["file", "size"] + [f"agree {s}" for s in sets]
    rows = [[os.path.basename(r.path), f"{r.bytes / 1e6:.2f} MB"] + [f"{r.agreement[s]:.2f}%"
                                                                     if s in r.agreement else "-" for s in sets]
            for r in exported]
    widths = [max(len(str(row[i])) for row in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head] + rows]
    return "\n".join(lines)
