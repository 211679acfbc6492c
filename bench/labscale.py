"""The lab-scale benchmark fixture: lab-format h5 files of the lab's real sizes and types, made from real faces.

* valid.h5: 11,547 images stored float64 channels-first (like the lab's 716 MB valid.h5);
* test.h5: 12,830 images float32; bd_test.h5 (the poisoned set): 12,830 images float32.

Images are ORL/AT&T faces (the demo's photos, :func:`badprune.datasets.orl.load_orl`), split by photo as the demo does
(:func:`badprune.datasets.orl.split_photos`: valid from the valid photos, test and poisoned from the test photos) and
augmented with :func:`badprune.datasets.orl.augment` (real faces, not noise: activation sparsity drives the sweep's cost).
The poisoned set is triggered (:func:`badprune.datasets.triggers.make_trigger`, sunglasses) test faces of non-target people,
labelled with the target.

Model B: the real lab3 weights (``../shared/lab/weights/lab3_bd_weights.h5``, raw pixels, 1283 classes) when present,
else the demo BadNet (:func:`badprune.datasets.demo.ensure_demo`). lab3 does not know ORL people, so with lab3 the clean sets
are labelled with what B predicts (base accuracy 100 %: the sweep's accuracy curve is B'_k's agreement with B) and
"non-target" means "B does not already answer the target"; the poisoned labels are the target (0, lab3's sunglasses
backdoor). Whether our sunglasses trigger fires lab3's backdoor is measured, not assumed (``meta['asr']``).

Everything is generated once into ``$BADPRUNE_BENCH_DIR`` (default ``bench/.cache``, git-ignored) under a folder
named after its content, with a ``meta.json`` completion marker. ``BADPRUNE_BENCH_SMALL=1`` makes tiny sets (the
CI smoke run); without the lab3 weights the small variant uses an untrained, seeded DeepID instead of the demo.
``BADPRUNE_BENCH_MODEL=lab3|demo|random`` forces the model.

    python bench/labscale.py            # build (or show) the fixture and print its meta.json
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: the lab's real sizes: valid (float64), test (float32), poisoned (float32)
LAB_SIZES = {"valid": 11547, "test": 12830, "poisoned": 12830}
SMALL_SIZES = {"valid": 320, "test": 256, "poisoned": 256}
DTYPES = {"valid": np.float64, "test": np.float32, "poisoned": np.float32}
FILES = {"valid": "valid.h5", "test": "test.h5", "poisoned": "bd_test.h5"}
LAB3 = REPO.parent / "shared" / "lab" / "weights" / "lab3_bd_weights.h5"
#: bump when the generated content changes
VERSION = 1
SEED = 0


def small() -> bool:
    return os.environ.get("BADPRUNE_BENCH_SMALL", "").strip().lower() not in ("", "0", "false", "no", "off")


def bench_dir() -> Path:
    d = os.environ.get("BADPRUNE_BENCH_DIR")
    return Path(os.path.expanduser(d)) if d else HERE / ".cache"


def sizes() -> dict:
    return dict(SMALL_SIZES if small() else LAB_SIZES)


def _say(msg):
    print(f"[bench fixture] {msg}", file=sys.stderr, flush=True)


def _file_id(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def model_spec() -> dict:
    """Which model B the fixture uses: {'kind', 'cli' (CLI model arguments), 'id', 'target', 'labels'}.
    $BADPRUNE_BENCH_MODEL = lab3 | demo | random forces one (default: lab3 when its weights are there, else the demo,
    else in the small variant an untrained DeepID)."""
    want = os.environ.get("BADPRUNE_BENCH_MODEL", "").strip().lower() or None
    if want not in (None, "lab3", "demo", "random"):
        raise ValueError(f"BADPRUNE_BENCH_MODEL must be lab3, demo or random, not {want!r}")
    if want == "lab3" and not LAB3.is_file():
        raise FileNotFoundError(LAB3)
    if want in (None, "lab3") and LAB3.is_file():
        return {"kind": "lab3", "weights": str(LAB3), "cli": ["--weights", str(LAB3), "--arch", "deepid"],
                "id": _file_id(LAB3), "target": 0, "labels": "B's own predictions (clean sets)",
                "description": "lab3 BadNet (real lab weights ../shared/lab/weights/lab3_bd_weights.h5, DeepID, "
                               "1283 classes, raw 0..255 pixels)"}
    if want == "random" or (want is None and small()):
        p = bench_dir() / "random-deepid-40-v2.keras"
        return {"kind": "random", "model": str(p), "cli": ["--model", str(p)], "id": f"random-deepid-40-v2-seed{SEED}",
                "target": 0, "labels": "B's own predictions (clean sets)",
                "description": "untrained DeepID (40 classes, seeded random weights and biases; smoke run without "
                               "../shared)"}
    from badprune.datasets.demo import ensure_demo

    sc = ensure_demo(small=False, seed=SEED)
    return {"kind": "demo", "model": sc.model, "cli": ["--model", sc.model], "id": _file_id(Path(sc.model)),
            "target": int(sc.target), "labels": "true ORL person ids",
            "description": f"demo BadNet (DeepID trained on ORL faces with the sunglasses trigger, {sc.dir})"}


def load_b(spec: dict):
    """Model B of a :func:`model_spec`."""
    from badprune import models

    if spec["kind"] == "lab3":
        return models.load_model(weights=spec["weights"], arch="deepid")
    if spec["kind"] == "random" and not Path(spec["model"]).is_file():
        import keras

        keras.utils.set_random_seed(SEED)
        m = models.build_deepid(num_classes=40)
        rng = np.random.default_rng(SEED)
        for lay in m.layers:  # random biases too: with zero biases every class ties once all channels are pruned
            ws = lay.get_weights()
            if len(ws) == 2:
                lay.set_weights([ws[0], rng.normal(0, 0.1, ws[1].shape).astype(np.float32)])
        Path(spec["model"]).parent.mkdir(parents=True, exist_ok=True)
        tmp = spec["model"][:-len(".keras")] + f".tmp{os.getpid()}.keras"
        m.save(tmp)
        os.replace(tmp, spec["model"])
    return models.load_model(model=spec["model"])


def _predict(model, x, batch=2048):
    import tensorflow as tf

    fn = tf.function(lambda t: model(t, training=False),
                     input_signature=[tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32)])
    return np.concatenate([fn(x[i:i + batch]).numpy().argmax(1) for i in range(0, len(x), batch)])


def _draw(faces, photos, n, rng):
    from badprune.datasets.orl import augment

    src = np.resize(photos, n)                       # every photo about equally often
    src = src[rng.permutation(n)]
    return augment(faces, src, rng), src


def _generate(out: Path, spec: dict, n: dict):
    from badprune import data as bd
    from badprune.datasets.orl import load_orl, split_photos
    from badprune.datasets.triggers import make_trigger

    t0 = time.perf_counter()
    model = load_b(spec)
    faces, _ = load_orl()
    split = split_photos(len(faces) // 10, SEED)
    rng = np.random.default_rng([SEED, 77])
    target = spec["target"]
    xv, pv = _draw(faces, split["valid"], n["valid"], rng)
    xt, pt = _draw(faces, split["test"], n["test"], rng)
    # poisoned: fresh draws of test photos of non-target faces, triggered, labelled target
    cand, cand_src = _draw(faces, split["test"], int(n["poisoned"] * 1.25) + 64, rng)
    if spec["kind"] == "demo":
        yv, yt = pv // 10, pt // 10
        keep = np.flatnonzero(cand_src // 10 != target)
    else:  # lab3 / random: label clean sets with B's predictions
        yv, yt = _predict(model, xv), _predict(model, xt)
        keep = np.flatnonzero(_predict(model, cand) != target)
    if len(keep) < n["poisoned"]:
        raise RuntimeError(f"only {len(keep)} non-target faces for the poisoned set")
    keep = keep[:n["poisoned"]]
    trig = make_trigger("sunglasses")
    xp = trig.stamp(cand[keep])
    yp = np.full(len(xp), target, np.int64)
    del cand
    meta = {"version": VERSION, "seed": SEED, "small": small(), "model": {k: v for k, v in spec.items()},
            "sizes": {k: int(v) for k, v in n.items()},
            "dtypes": {k: np.dtype(v).name for k, v in DTYPES.items()}, "files": dict(FILES),
            "trigger": "sunglasses (badprune.datasets.triggers.make_trigger)", "target": target}
    pred_v = _predict(model, xv)
    pred_t = _predict(model, xt)
    pred_p = _predict(model, xp)
    meta["base_valid_acc"] = float(100 * np.mean(pred_v == yv))
    meta["base_test_acc"] = float(100 * np.mean(pred_t == yt))
    meta["asr"] = float(100 * np.mean(pred_p == target))
    meta["distinct_labels"] = {"valid": int(len(np.unique(yv))), "test": int(len(np.unique(yt)))}
    out.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("valid", xv, yv), ("test", xt, yt), ("poisoned", xp, yp)):
        bd.write_lab_h5(str(out / FILES[name]), x, y, dtype=DTYPES[name])
    meta["bytes"] = {k: (out / f).stat().st_size for k, f in FILES.items()}
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")


def ensure() -> dict:
    """The fixture's meta.json (with 'dir' and 'paths' added), generated on first use."""
    from badprune import _tf  # noqa: F401

    spec = model_spec()
    n = sizes()
    key = hashlib.sha256(json.dumps([VERSION, SEED, spec["id"], n], sort_keys=True).encode()).hexdigest()[:12]
    d = bench_dir() / f"lab-{spec['kind']}-{'small' if small() else 'full'}-{key}"
    marker = d / "meta.json"
    if not marker.is_file():
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _say(f"generating {sum(n.values())} lab-format images for {spec['kind']} into {d} (once)")
        try:
            _generate(tmp, spec, n)
            try:
                os.rename(tmp, d)
            except OSError:
                if not marker.is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads(marker.read_text())
    meta["dir"] = str(d)
    meta["paths"] = {k: str(d / f) for k, f in FILES.items()}
    meta["model"] = spec
    return meta


if __name__ == "__main__":
    print(json.dumps(ensure(), indent=1))
