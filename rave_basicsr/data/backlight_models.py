"""Synthetic backlight models: turn a well-lit float RGB image into a backlit one, deterministically from an rng.

One model (``demo``) makes the demo set; the others exist so that a recipe can be checked on backlit sets it was
*not* tuned on (a recipe that only works on its own data is not robust). The RAVE demo recipe was tuned on ``hazy``,
the demo set before 2026-12-02.
Every model returns ``(backlit, subject_mask)``: float32 H×W×3 in [0, 1] and the H×W mask of the darkened subject.

* ``demo``: the demo set's model (:func:`synthesize_backlight`; described in docs/data.md): a camera exposed for the
  bright background, so the subject is under-exposed (gently: a real backlit subject needs a lift of about 23 grey
  levels in its darkest fifth) and everything bright keeps its value (as in real backlit photos, where an enhancer
  should leave the sky alone);
* ``hazy``: the demo set's model until 2026-12-02: the demo's subject under a hazed, glowing background (a veil to
  remove: the right answer darkens the brightest fifth by about 120 grey levels);
* ``subject``: subjects of other shapes and sizes (one or several soft ellipses, a doorway-like block, a band on
  one side) anywhere in the lower two thirds, no dark foreground, a darker subject than ``demo``;
* ``mild``: gentle under-exposure of the demo-shaped subject and a lightly lifted background (input PSNR against
  the ground truth 13-19 dB, where ``demo`` gives 15-23 dB, ``hazy`` 6-13, ``subject`` 6-12, ``silhouette`` 4-9
  and ``window`` 9-17);
* ``silhouette``: severe: the subject nearly black, the background blown out with a strong glow and bloom;
* ``window``: a bright window behind the subject, a bright veil over the whole frame (lost contrast) and a colour
  cast (cool daylight, warm sunset or greenish).

:data:`BACKLIGHT_MODELS` holds each model's function and the input-PSNR range its docs state (dB against the
ground truth, checked by the tests over crops of the bundled photos).
"""
from typing import Callable, Dict, NamedTuple, Tuple

import cv2
import numpy as np

from rave_basicsr.archs.image_stats_encoder_arch import LUMA_WEIGHTS
from rave_basicsr.utils.errors import RaveError

LUMA = np.array(LUMA_WEIGHTS, np.float32)
_HAZE_COLOUR = np.array([1.0, 0.97, 0.9], np.float32)
_CASTS = np.array([[0.85, 0.95, 1.05], [1.08, 0.9, 0.72], [0.92, 1.05, 0.88]], np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=max(sigma, 0.5), borderType=cv2.BORDER_REFLECT)


def _smoothstep(low: float, high: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - low) / (high - low), 0, 1)
    return t * t * (3 - 2 * t)


def _grid(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates scaled to [0, 1] (x, y)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return x / (w - 1), y / (h - 1)


def _soft_box(x: np.ndarray, y: np.ndarray, left: float, right: float, top: float, bottom: float) -> np.ndarray:
    """1 inside the box, 0 outside, with 0.1-wide soft edges (coordinates from :func:`_grid`)."""
    inside_x = _smoothstep(left - 0.05, left + 0.05, x) * (1 - _smoothstep(right - 0.05, right + 0.05, x))
    return inside_x * _smoothstep(top - 0.05, top + 0.05, y) * (1 - _smoothstep(bottom - 0.05, bottom + 0.05, y))


def _glow(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A wide H×W×1 Gaussian centred near the top edge: the light source behind the scene."""
    x, y = _grid(h, w)
    sx, sy, radius = rng.uniform(0.2, 0.8), rng.uniform(-0.1, 0.2), rng.uniform(0.3, 0.5)
    return np.exp(-(((x - sx) ** 2 + (y - sy) ** 2) / radius ** 2))[:, :, None]


def _spare_highlights(rgb: np.ndarray, mask: np.ndarray, w: int) -> np.ndarray:
    """``mask`` lowered on the photo's own highlights (they stay on the bright side)."""
    luma = _blur(rgb @ LUMA, 0.02 * w)
    return mask * (1.0 - 0.4 * _smoothstep(0.7, 0.95, luma))


def _bloom(out: np.ndarray, strength: float, w: int) -> np.ndarray:
    """``out`` plus a wide blur of everything above 0.85 (light spilling over the subject's edges)."""
    return out + strength * _blur(np.clip(out - 0.85, 0, None).astype(np.float32), 0.08 * w)


def _finish(out: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return np.clip(out, 0, 1).astype(np.float32), np.clip(mask, 0, 1).astype(np.float32)


def subject_mask(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The demo model's smooth H×W subject mask in [0, 1]: a soft ellipse in the lower middle joined with the
    foreground below a soft horizon, spared on highlights, blurred."""
    h, w = rgb.shape[:2]
    x, y = _grid(h, w)
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.55, 0.8)
    rx, ry = rng.uniform(0.3, 0.5), rng.uniform(0.35, 0.6)
    distance = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    ellipse = 1.0 - _smoothstep(0.6, 1.4, distance)
    horizon = rng.uniform(0.45, 0.7)
    foreground = _smoothstep(horizon - 0.2, horizon + 0.2, y)
    mask = _spare_highlights(rgb, np.maximum(ellipse, foreground), w)
    return np.clip(_blur(mask.astype(np.float32), 0.03 * w), 0, 1)


class Lighting(NamedTuple):
    """The ranges a backlight model draws its lighting from (uniformly, in this order) and its fixed glow strength.

    The subject becomes ``exposure · x^gamma``; the background ``(1 - haze) · (1 - (1 - x)^k) + haze · white``
    (``k`` from ``compression``: highlights compressed, the whole lifted) plus ``glow`` times a light source behind
    the scene; the two are blended by the subject mask, then ``bloom`` spreads what is above 0.85.
    """
    gamma: Tuple[float, float]
    exposure: Tuple[float, float]
    compression: Tuple[float, float]
    haze: Tuple[float, float]
    glow: float
    bloom: Tuple[float, float]


def light_subject_and_background(rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                                 lighting: Lighting) -> Tuple[np.ndarray, np.ndarray]:
    """The backlit image under ``lighting`` with the H×W subject ``mask``, and the mask (see :class:`Lighting`)."""
    h, w = rgb.shape[:2]
    weight = mask[:, :, None]
    gamma, exposure = rng.uniform(*lighting.gamma), rng.uniform(*lighting.exposure)
    subject = exposure * np.power(rgb, gamma)
    k, haze = rng.uniform(*lighting.compression), rng.uniform(*lighting.haze)
    background = (1 - haze) * (1 - np.power(1 - rgb, k)) + haze * _HAZE_COLOUR
    background = background + lighting.glow * _glow(h, w, rng) * _HAZE_COLOUR
    out = weight * subject + (1 - weight) * background
    return _finish(_bloom(out, rng.uniform(*lighting.bloom), w), mask)


DEMO_LIGHTING = Lighting(gamma=(1.15, 1.4), exposure=(0.58, 0.7), compression=(1.0, 1.0), haze=(0.0, 0.0), glow=0.0,
                         bloom=(0.0, 0.0))
HAZY_LIGHTING = Lighting(gamma=(1.8, 2.6), exposure=(0.3, 0.5), compression=(2.0, 3.5), haze=(0.25, 0.45), glow=0.5,
                         bloom=(0.5, 1.0))
SUBJECT_LIGHTING = Lighting(gamma=(2.2, 3.0), exposure=(0.15, 0.3), compression=(1.5, 3.0), haze=(0.15, 0.35),
                            glow=0.4, bloom=(0.3, 0.8))
MILD_LIGHTING = Lighting(gamma=(1.15, 1.4), exposure=(0.58, 0.7), compression=(1.1, 1.4), haze=(0.06, 0.1),
                         glow=0.15, bloom=(0.1, 0.3))
SILHOUETTE_LIGHTING = Lighting(gamma=(2.5, 3.5), exposure=(0.04, 0.12), compression=(3.5, 5.0), haze=(0.3, 0.5),
                               glow=0.8, bloom=(0.8, 1.2))


def highlight_spared_mask(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """:func:`subject_mask` with every bright region left out (luma above 0.45 fades out of it, above 0.7 is out)."""
    luma = _blur(rgb @ LUMA, 0.02 * rgb.shape[1])
    return subject_mask(rgb, rng) * (1.0 - _smoothstep(0.45, 0.7, luma))


def synthesize_backlight(rgb: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """The ``demo`` model: the backlit version of a well-lit float RGB image and its subject mask. The camera exposed
    for the background: the subject (:func:`highlight_spared_mask`) is under-exposed, the rest is the photo itself."""
    return light_subject_and_background(rgb, highlight_spared_mask(rgb, rng), rng, DEMO_LIGHTING)


def hazy_backlight(rgb: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """The ``hazy`` model: :func:`subject_mask` under-exposed before a background pushed towards saturation, hazed,
    lit by a glow and bloomed."""
    return light_subject_and_background(rgb, subject_mask(rgb, rng), rng, HAZY_LIGHTING)


def shaped_subject_mask(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A subject of another shape and size than the demo's: several small ellipses (people), one ellipse of
    random size, a doorway-like block rising from the bottom, or a band along one side (a wall, a tree)."""
    h, w = rgb.shape[:2]
    x, y = _grid(h, w)
    shape = int(rng.integers(4))
    if shape == 0:
        mask = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(2, 4))):
            cx, cy = rng.uniform(0.15, 0.85), rng.uniform(0.45, 0.85)
            rx, ry = rng.uniform(0.08, 0.18), rng.uniform(0.15, 0.35)
            distance = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
            mask = np.maximum(mask, 1.0 - _smoothstep(0.7, 1.2, distance))
    elif shape == 1:
        cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.4, 0.75)
        rx, ry = rng.uniform(0.15, 0.45), rng.uniform(0.2, 0.5)
        mask = 1.0 - _smoothstep(0.7, 1.3, np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2))
    elif shape == 2:
        left, width, top = rng.uniform(0.0, 0.6), rng.uniform(0.25, 0.5), rng.uniform(0.25, 0.55)
        mask = _soft_box(x, y, left, left + width, top, 2.0)
    else:
        edge = rng.uniform(0.25, 0.45)
        band = 1 - _smoothstep(edge - 0.08, edge + 0.08, x)
        mask = band if rng.random() < 0.5 else band[:, ::-1]
    mask = _spare_highlights(rgb, mask.astype(np.float32), w)
    return np.clip(_blur(mask.astype(np.float32), 0.02 * w), 0, 1)


def subject_backlight(rgb: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """The ``subject`` model: :func:`shaped_subject_mask`, a darker subject, a lighter haze than ``demo``."""
    return light_subject_and_background(rgb, shaped_subject_mask(rgb, rng), rng, SUBJECT_LIGHTING)


def mild_backlight(rgb: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """The ``mild`` model: the demo's subject shape, gently under-exposed, under a lightly lifted background."""
    return light_subject_and_background(rgb, subject_mask(rgb, rng), rng, MILD_LIGHTING)


def silhouette_mask(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The demo's subject shape with sharper edges and a higher, sharper horizon (H×W, in [0, 1])."""
    h, w = rgb.shape[:2]
    x, y = _grid(h, w)
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.5, 0.8)
    rx, ry = rng.uniform(0.2, 0.4), rng.uniform(0.3, 0.55)
    ellipse = 1.0 - _smoothstep(0.85, 1.1, np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2))
    horizon = rng.uniform(0.6, 0.8)
    mask = _blur(np.maximum(ellipse, _smoothstep(horizon - 0.05, horizon + 0.05, y)).astype(np.float32), 0.01 * w)
    return np.clip(mask, 0, 1)


def silhouette_backlight(rgb: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """The ``silhouette`` model: :func:`silhouette_mask`, the subject nearly black, before a blown-out background
    with a strong glow and bloom."""
    return light_subject_and_background(rgb, silhouette_mask(rgb, rng), rng, SILHOUETTE_LIGHTING)


def window_backlight(rgb: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """The ``window`` model: an under-exposed subject before a bright window, a bright veil over the whole frame
    (flare: lost contrast) and a colour cast of the light."""
    h, w = rgb.shape[:2]
    x, y = _grid(h, w)
    mask = subject_mask(rgb, rng)[:, :, None]
    cast = _CASTS[int(rng.integers(len(_CASTS)))]
    gamma, exposure = rng.uniform(1.8, 2.4), rng.uniform(0.15, 0.3)
    subject = exposure * np.power(rgb, gamma) * cast
    left, top = rng.uniform(0.05, 0.45), rng.uniform(0.0, 0.2)
    right, bottom = left + rng.uniform(0.3, 0.5), top + rng.uniform(0.35, 0.6)
    window = _soft_box(x, y, left, right, top, bottom)[:, :, None]
    k = rng.uniform(1.5, 2.5)
    background = (1 - np.power(1 - rgb, k)) * cast
    background = (1 - 0.8 * window) * background + 0.8 * window * np.minimum(cast, 1.0)
    out = mask * subject + (1 - mask) * background
    veil = rng.uniform(0.08, 0.16)
    out = (1 - veil) * out + veil * np.minimum(cast, 1.0)
    return _finish(_bloom(out, rng.uniform(0.3, 0.6), w), mask[:, :, 0])


class BacklightModel(NamedTuple):
    """A synthetic backlight model and the input-PSNR range (dB against the ground truth) its docs state."""
    synthesize: Callable[[np.ndarray, np.random.Generator], Tuple[np.ndarray, np.ndarray]]
    psnr_range: Tuple[float, float]


BACKLIGHT_MODELS: Dict[str, BacklightModel] = {
    'demo': BacklightModel(synthesize_backlight, (15.0, 23.0)),
    'hazy': BacklightModel(hazy_backlight, (6.0, 13.0)),
    'subject': BacklightModel(subject_backlight, (6.0, 12.0)),
    'mild': BacklightModel(mild_backlight, (13.0, 19.0)),
    'silhouette': BacklightModel(silhouette_backlight, (4.0, 9.0)),
    'window': BacklightModel(window_backlight, (9.0, 17.0)),
}
DEFAULT_BACKLIGHT = 'demo'


def get_backlight_model(name: str) -> BacklightModel:
    """The model called ``name``; an unknown name raises a :class:`RaveError` that lists the valid ones."""
    if name not in BACKLIGHT_MODELS:
        raise RaveError(f'unknown backlight model {name!r}; choose one of {", ".join(BACKLIGHT_MODELS)}.')
    return BACKLIGHT_MODELS[name]
