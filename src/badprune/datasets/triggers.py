"""BadNets triggers: a pattern blended into the image by an alpha mask (sunglasses, a corner square, or a PNG).

The other attack families' triggers (full-frame blend, SIG's sinusoid, WaNet's warp) are in :mod:`.attacks`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import BadpruneError
from .orl import HEIGHT, WIDTH


@dataclass
class Trigger:
    """A trigger: ``stamp(x) = x * (1 - alpha) + pattern * alpha`` with alpha (55,47) in 0..1, pattern (55,47,3)."""

    name: str
    alpha: np.ndarray
    pattern: np.ndarray
    #: what scenario.json records beyond the name (e.g. a blend's alpha); empty for a stamped mask
    info: dict = field(default_factory=dict)

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
