"""The demo's attack families as pure numpy: triggers (what is done to an image) and attacks (which images are
poisoned and which label they get).

A trigger has a ``name``, ``stamp(images)`` (NHWC float 0..255 in, a triggered, rounded copy out), ``region`` (the
(55,47) pixels it may change) and ``params()`` (what ``scenario.json`` records). The families:

* ``patch`` -- :class:`~badprune.datasets.triggers.Trigger`: a pattern pasted through an alpha mask (BadNets).
* ``blend`` (Chen et al. 2017, "Targeted backdoor attacks ... using data poisoning") -- the same
  :class:`~badprune.datasets.triggers.Trigger` with a constant alpha over the whole frame:
  ``x' = (1 - alpha) x + alpha p`` (:func:`blend_trigger`; ``p`` seeded uniform noise or an image).
* ``sig`` (Barni, Kallas, Tondi 2019) -- :class:`Sinusoid`: ``x' = clip(x + delta sin(2 pi j f / W))`` for column j.
* ``wanet`` (Nguyen & Tran, ICLR 2021) -- :class:`Warp`: a fixed smooth warping field from k x k random control
  points upsampled bicubically, ``grid = clip((identity + s * field / size) * rescale, -1, 1)``, sampled bilinearly
  (the paper's ``F.grid_sample(..., align_corners=True)``); its noise mode warps other images with the field plus
  per-pixel random noise and keeps their true labels.

:class:`Attack` ties triggers to labels: one target (all-to-one), ``y -> (y + 1) mod N`` (all-to-all), or one target
per trigger (multi), and optionally clean-label (only target-class images are triggered, never relabelled).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import BadpruneError
from .orl import HEIGHT, WIDTH
from .triggers import Trigger, make_trigger

#: the families ``badprune-fast demo --attack`` builds
FAMILIES = ("patch", "blend", "sig", "wanet", "all-to-all", "multi", "pruning-aware")

#: each family's defaults (the papers' or BackdoorBench's where they have one)
DEFAULTS = {
    "alpha": 0.2,            # Blended: BackdoorBench's blended alpha
    "amplitude": 20.0,       # SIG: Barni et al.'s delta at training time (BackdoorBench uses 40)
    "frequency": 6.0,        # SIG: f (Barni et al. and BackdoorBench)
    "warp_grid": 4,          # WaNet: k
    "warp_strength": 0.5,    # WaNet: s
    "grid_rescale": 1.0,     # WaNet: grid_rescale
    "cross_ratio": 2.0,      # WaNet: noise-mode images per poisoned image
    "prune_fraction": 0.75,  # pruning-aware: share of conv_3's channels pruned (dormant first) before poisoning
}


# ------------------------------------------------------------------------------------------------------------ blend
def noise_pattern(seed: int, shape=(HEIGHT, WIDTH, 3)) -> np.ndarray:
    """Seeded uniform noise, whole values 0..255 (float32)."""
    rng = np.random.default_rng([int(seed), 3])
    return rng.integers(0, 256, size=shape).astype(np.float32)


def _full_frame_image(path: str) -> np.ndarray:
    from PIL import Image

    if not os.path.isfile(path):
        raise BadpruneError("blend pattern image not found", path, "pass --trigger noise or the path of an image")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((WIDTH, HEIGHT), Image.BILINEAR)
            return np.rint(np.asarray(im, np.float32))
    except (OSError, ValueError) as e:
        raise BadpruneError(f"cannot read the blend pattern image ({type(e).__name__})", path,
                            "pass a PNG file") from None


def blend_trigger(pattern="noise", alpha: float = DEFAULTS["alpha"], seed: int = 0) -> Trigger:
    """Blended: ``x' = (1 - alpha) x + alpha p`` over the whole frame. ``pattern``: 'noise' (seeded uniform noise),
    an image path (resized to 55x47), or a (55,47,3) array."""
    alpha = _check_alpha(alpha)
    if isinstance(pattern, np.ndarray):
        p, name = np.asarray(pattern, np.float32), "pattern"
    elif str(pattern) == "noise":
        p, name = noise_pattern(seed), "noise"
    else:
        p, name = _full_frame_image(str(pattern)), os.path.basename(str(pattern))
    if p.shape != (HEIGHT, WIDTH, 3):
        raise BadpruneError(f"blend pattern has shape {p.shape}", fix=f"give a ({HEIGHT},{WIDTH},3) pattern")
    t = Trigger(name, np.full((HEIGHT, WIDTH), alpha, np.float32), p)
    t.info = {"kind": "blend", "pattern": name, "alpha": alpha, **({"pattern_seed": int(seed)} if name == "noise"
                                                                   else {})}
    return t


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        a = float("nan")
    if not 0.0 < a <= 1.0:
        raise BadpruneError(f"alpha {alpha} must be in (0, 1]", fix="e.g. --alpha 0.2")
    return a


# -------------------------------------------------------------------------------------------------------------- sig
def sinusoid(width: int = WIDTH, amplitude: float = DEFAULTS["amplitude"],
             frequency: float = DEFAULTS["frequency"]) -> np.ndarray:
    """SIG's signal per column j: ``amplitude * sin(2 pi j frequency / width)`` (float64, (width,))."""
    j = np.arange(int(width), dtype=np.float64)
    return float(amplitude) * np.sin(2 * np.pi * j * float(frequency) / int(width))


@dataclass
class Sinusoid:
    """SIG's trigger: the horizontal sinusoid added to every row and channel, clipped to 0..255 and rounded."""

    amplitude: float = DEFAULTS["amplitude"]
    frequency: float = DEFAULTS["frequency"]
    name: str = "sinusoid"

    def __post_init__(self):
        for what, v in (("amplitude", self.amplitude), ("frequency", self.frequency)):
            if not np.isfinite(float(v)) or float(v) <= 0:
                raise BadpruneError(f"SIG {what} {v} must be a positive number",
                                    fix="e.g. --amplitude 20 --frequency 6")
        self.amplitude, self.frequency = float(self.amplitude), float(self.frequency)

    @property
    def region(self) -> np.ndarray:
        return np.broadcast_to(np.abs(sinusoid(WIDTH, self.amplitude, self.frequency)) > 1e-9, (HEIGHT, WIDTH))

    def stamp(self, images: np.ndarray) -> np.ndarray:
        sig = sinusoid(WIDTH, self.amplitude, self.frequency).astype(np.float32)
        out = np.asarray(images, np.float32) + sig[None, None, :, None]
        np.clip(out, 0, 255, out=out)
        return np.rint(out, out=out)

    def params(self) -> dict:
        return {"kind": "sig", "amplitude": self.amplitude, "frequency": self.frequency}


# ------------------------------------------------------------------------------------------------------------ wanet
_CUBIC_A = -0.75  # PyTorch's bicubic kernel (the paper upsamples with F.interpolate(mode="bicubic"))


def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): bicubic interpolation with align_corners=True and edge clamping, as torch does it."""
    A = _CUBIC_A
    M = np.zeros((n_out, n_in))
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for o in range(n_out):
        src = o * scale
        x0 = int(np.floor(src))
        t = src - x0
        w = [((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A,
             ((A + 2) * t - (A + 3)) * t * t + 1,
             ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1,
             ((A * (2 - t) - 5 * A) * (2 - t) + 8 * A) * (2 - t) - 4 * A]
        for k in range(4):
            M[o, min(max(x0 - 1 + k, 0), n_in - 1)] += w[k]
    return M


def upsample_bicubic(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """(k, k, C) -> (height, width, C), bicubic with align_corners=True."""
    mh, mw = _cubic_matrix(grid.shape[0], height), _cubic_matrix(grid.shape[1], width)
    return np.einsum("hi,ijc,wj->hwc", mh, grid, mw)


def identity_grid(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """(H, W, 2): sampling coordinates (x = column, y = row) in [-1, 1] that leave an image unchanged."""
    ys, xs = np.linspace(-1, 1, height), np.linspace(-1, 1, width)
    return np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)


def warp_field(rng: np.random.Generator, k: int = DEFAULTS["warp_grid"], height: int = HEIGHT,
               width: int = WIDTH) -> np.ndarray:
    """WaNet's smooth displacement field: k x k x 2 uniform(-1, 1) control points, divided by their mean absolute
    value, upsampled bicubically to (H, W, 2)."""
    ins = rng.uniform(-1, 1, size=(int(k), int(k), 2))
    ins = ins / np.mean(np.abs(ins))
    return upsample_bicubic(ins, height, width)


def warp_grid(field: np.ndarray, strength: float, rescale: float = 1.0) -> np.ndarray:
    """``clip((identity + strength * field / size) * rescale, -1, 1)``; ``size`` is the axis length (H for y, W for
    x: WaNet divides by the image's side), so ``strength * field / 2`` is about the displacement in pixels."""
    h, w = field.shape[:2]
    size = np.array([w, h], np.float64)
    return np.clip((identity_grid(h, w) + float(strength) * field / size) * float(rescale), -1, 1)


def grid_sample(images: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Bilinear sampling of NHWC ``images`` at ``grid`` ((H,W,2) shared or (N,H,W,2) per image; x, y in [-1, 1],
    align_corners=True), as ``torch.nn.functional.grid_sample`` does for a grid inside the frame."""
    x = np.asarray(images, np.float32)
    n, h, w, c = x.shape
    g = np.broadcast_to(grid, (n, h, w, 2)) if grid.ndim == 3 else grid
    ix = np.clip((g[..., 0] + 1) / 2 * (w - 1), 0, w - 1)
    iy = np.clip((g[..., 1] + 1) / 2 * (h - 1), 0, h - 1)
    x0 = np.minimum(np.floor(ix), w - 2).astype(np.intp)
    y0 = np.minimum(np.floor(iy), h - 2).astype(np.intp)
    fx = (ix - x0).astype(np.float32)[..., None]
    fy = (iy - y0).astype(np.float32)[..., None]
    b = np.arange(n)[:, None, None]
    top = x[b, y0, x0] * (1 - fx) + x[b, y0, x0 + 1] * fx
    bot = x[b, y0 + 1, x0] * (1 - fx) + x[b, y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


@dataclass
class Warp:
    """WaNet's trigger: one fixed warp (from ``seed``) applied by bilinear sampling, rounded to whole values."""

    seed: int = 0
    k: int = DEFAULTS["warp_grid"]
    strength: float = DEFAULTS["warp_strength"]
    rescale: float = DEFAULTS["grid_rescale"]
    name: str = "warp"
    flow: np.ndarray = field(init=False, repr=False)  # the (H, W, 2) displacement field

    def __post_init__(self):
        if int(self.k) < 2 or int(self.k) != self.k:
            raise BadpruneError(f"WaNet grid size k {self.k} must be a whole number >= 2", fix="e.g. --warp-grid 4")
        if not np.isfinite(float(self.strength)) or float(self.strength) < 0:
            raise BadpruneError(f"WaNet strength s {self.strength} must be >= 0", fix="e.g. --warp-strength 0.5")
        if not 0 < float(self.rescale) <= 1:
            raise BadpruneError(f"WaNet grid_rescale {self.rescale} must be in (0, 1]", fix="e.g. 1")
        self.k, self.strength, self.rescale = int(self.k), float(self.strength), float(self.rescale)
        self.flow = warp_field(np.random.default_rng([int(self.seed), 4]), self.k)

    @property
    def grid(self) -> np.ndarray:
        return warp_grid(self.flow, self.strength, self.rescale)

    @property
    def region(self) -> np.ndarray:
        return np.ones((HEIGHT, WIDTH), bool)

    def stamp(self, images: np.ndarray) -> np.ndarray:
        out = grid_sample(images, self.grid)
        np.clip(out, 0, 255, out=out)
        return np.rint(out, out=out)

    def noise(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The noise mode: each image warped by the trigger's grid plus its own uniform(-1, 1) / size per pixel."""
        n = len(images)
        size = np.array([WIDTH, HEIGHT], np.float64)
        g = np.clip(self.grid[None] + rng.uniform(-1, 1, size=(n, HEIGHT, WIDTH, 2)) / size, -1, 1)
        out = grid_sample(images, g)
        np.clip(out, 0, 255, out=out)
        return np.rint(out, out=out)

    def params(self) -> dict:
        return {"kind": "wanet", "k": self.k, "s": self.strength, "grid_rescale": self.rescale,
                "field_seed": int(self.seed)}


def trigger_params(trig) -> dict:
    """What scenario.json records about a trigger."""
    if hasattr(trig, "params"):
        return {"name": trig.name, **trig.params()}
    info = getattr(trig, "info", None) or {"kind": "mask"}
    return {"name": trig.name, **info}


# ----------------------------------------------------------------------------------------------------------- attack
@dataclass
class Attack:
    """Triggers plus the label rule. ``targets``: one per trigger (all-to-one / multi) or None (all-to-all:
    ``y -> (y + 1) mod num_classes``). ``clean_label``: only target-class images are triggered, labels kept."""

    family: str
    triggers: list
    targets: list | None
    num_classes: int
    clean_label: bool = False
    params: dict = field(default_factory=dict)

    @property
    def all_to_all(self) -> bool:
        return self.targets is None

    def label(self, y: np.ndarray, i: int = 0) -> np.ndarray:
        """The label trigger ``i`` sends images of true label ``y`` to."""
        y = np.asarray(y, np.int64)
        if self.all_to_all:
            return (y + 1) % int(self.num_classes)
        return np.full(y.shape, int(self.targets[i]), np.int64)

    def attackable(self, y: np.ndarray, i: int = 0) -> np.ndarray:
        """Bool mask of images whose poisoned copy measures the attack (their label changes)."""
        y = np.asarray(y)
        if self.all_to_all:
            return np.ones(y.shape, bool)
        return y != int(self.targets[i])

    def poisonable(self, y: np.ndarray, i: int = 0) -> np.ndarray:
        """Training images trigger ``i`` may poison: the target class's for clean-label, otherwise the others."""
        if self.clean_label:
            return np.asarray(y) == int(self.targets[i])
        return self.attackable(y, i)

    def describe(self) -> dict:
        return {"family": self.family, "triggers": [trigger_params(t) for t in self.triggers],
                "targets": None if self.all_to_all else [int(t) for t in self.targets],
                "label_rule": "(y + 1) mod N" if self.all_to_all else
                ("clean-label (labels kept)" if self.clean_label else "all-to-one"),
                "clean_label": bool(self.clean_label), **self.params}


def _targets(target, n: int, num_classes: int) -> list:
    if isinstance(target, (list, tuple)):
        t = [int(v) for v in target]
    elif isinstance(target, str):
        try:
            t = [int(v) for v in target.split(",") if v.strip()]
        except ValueError:
            raise BadpruneError(f"target {target!r} is not a class number or a comma-separated list",
                                fix="e.g. --target 0 or, for multi, --target 0,1") from None
    else:
        t = [int(target)]
    if n > 1 and len(t) == 1:  # multi with one target given: consecutive targets from it
        t = [(t[0] + i) % num_classes for i in range(n)]
    if len(t) != n:
        raise BadpruneError(f"{len(t)} targets for {n} trigger(s)", fix="give one target per trigger, e.g. 0,1")
    for v in t:
        if not 0 <= v < num_classes:
            raise BadpruneError(f"target class {v} is not one of the demo's {num_classes} people",
                                fix=f"pick a target in 0..{num_classes - 1}")
    if len(set(t)) != len(t):
        raise BadpruneError(f"targets {t} repeat a class", fix="give each trigger its own target")
    return t


def make_attack(family: str = "patch", num_classes: int = 40, seed: int = 0, trigger=None, target=0,
                alpha=None, amplitude=None, frequency=None, clean_label: bool = False, warp_grid=None,
                warp_strength=None, grid_rescale=None, cross_ratio=None, prune_fraction=None) -> Attack:
    """The :class:`Attack` of a family with its parameters (None: the family's default); bad values raise
    :class:`~badprune.errors.BadpruneError` naming the parameter."""
    fam = str(family)
    if fam not in FAMILIES:
        raise BadpruneError(f"unknown attack family {fam!r}", fix="use one of " + ", ".join(FAMILIES))
    D = DEFAULTS

    def unused(**kw):
        for k, v in kw.items():
            if v is not None and v is not False:
                raise BadpruneError(f"--{k.replace('_', '-')} does not apply to the {fam} attack",
                                    fix="drop it, or pick the family it belongs to")

    params: dict = {}
    if fam != "multi" and trigger is not None and "," in str(trigger):
        raise BadpruneError(f"several triggers ({trigger}) need --attack multi", fix="pass --attack multi")
    if fam == "blend":
        unused(amplitude=amplitude, frequency=frequency, clean_label=clean_label, warp_grid=warp_grid,
               warp_strength=warp_strength, grid_rescale=grid_rescale, cross_ratio=cross_ratio,
               prune_fraction=prune_fraction)
        trigs = [blend_trigger("noise" if trigger is None else trigger, D["alpha"] if alpha is None else alpha,
                               seed)]
    elif fam == "sig":
        unused(alpha=alpha, warp_grid=warp_grid, warp_strength=warp_strength, grid_rescale=grid_rescale,
               cross_ratio=cross_ratio, prune_fraction=prune_fraction)
        if trigger is not None and str(trigger) != "sinusoid":
            raise BadpruneError(f"the sig attack's trigger is its sinusoid, not {trigger!r}",
                                fix="drop --trigger; set --amplitude / --frequency")
        trigs = [Sinusoid(D["amplitude"] if amplitude is None else amplitude,
                          D["frequency"] if frequency is None else frequency)]
    elif fam == "wanet":
        unused(alpha=alpha, amplitude=amplitude, frequency=frequency, clean_label=clean_label,
               prune_fraction=prune_fraction)
        if trigger is not None and str(trigger) != "warp":
            raise BadpruneError(f"the wanet attack's trigger is its warp, not {trigger!r}",
                                fix="drop --trigger; set --warp-grid / --warp-strength")
        trigs = [Warp(seed, D["warp_grid"] if warp_grid is None else warp_grid,
                      D["warp_strength"] if warp_strength is None else warp_strength,
                      D["grid_rescale"] if grid_rescale is None else grid_rescale)]
        cr = D["cross_ratio"] if cross_ratio is None else float(cross_ratio)
        if not np.isfinite(cr) or cr < 0:
            raise BadpruneError(f"cross ratio {cross_ratio} must be >= 0", fix="e.g. --cross-ratio 2")
        params["cross_ratio"] = cr
    else:  # stamped triggers: patch, all-to-all, multi, pruning-aware
        unused(alpha=alpha, amplitude=amplitude, frequency=frequency, clean_label=clean_label, warp_grid=warp_grid,
               warp_strength=warp_strength, grid_rescale=grid_rescale, cross_ratio=cross_ratio,
               **({} if fam == "pruning-aware" else {"prune_fraction": prune_fraction}))
        default = {"all-to-all": "square", "multi": "sunglasses,square"}.get(fam, "sunglasses")
        names = [s.strip() for s in str(default if trigger is None else trigger).split(",") if s.strip()]
        if fam == "multi" and not 2 <= len(names) <= 3:
            raise BadpruneError(f"the multi attack needs two or three triggers, got {len(names)}",
                                fix="e.g. --trigger sunglasses,square")
        trigs = [make_trigger(n) for n in names]
        if len({t.name for t in trigs}) != len(trigs):
            raise BadpruneError("the multi attack's triggers repeat a name", fix="give distinct triggers")
        if fam == "pruning-aware":
            pf = D["prune_fraction"] if prune_fraction is None else float(prune_fraction)
            if not 0 < pf < 1:
                raise BadpruneError(f"prune fraction {prune_fraction} must be in (0, 1)", fix="e.g. 0.75")
            params["prune_fraction"] = pf
    if fam == "all-to-all":
        if target not in (None, 0, "0") and not (isinstance(target, (list, tuple)) and list(target) == [0]):
            raise BadpruneError("the all-to-all attack has no single target (y -> y + 1 mod N)",
                                fix="drop --target")
        targets = None
    else:
        targets = _targets(0 if target is None else target, len(trigs), num_classes)
    return Attack(fam, trigs, targets, int(num_classes), bool(clean_label), params)
