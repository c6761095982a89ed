"""Resizing, cropping and the official augmentation set, shared by every dataset of the plugin.

The augmentation is CLIP-LIT's / RAVE's (``dataloader_*.py`` of both codes): horizontal flip, vertical flip and
transpose each with probability 0.5, zoom with probability 0.3 (zx, zy drawn independently from ``zoom_range``;
0.7-1.3 for the network loader, 0.5-1.5 for the prompt loaders), rotation with probability 0.3 (angle uniform in
[-90, 90] degrees), applied in that order, bilinear with reflected borders. Random numbers come from Python's
``random`` and NumPy's global generator, which BasicSR's ``build_dataloader`` seeds per worker, so runs are
reproducible.
"""
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from PIL import Image

from rave_basicsr.utils.errors import RaveError

AUGMENT_MODES = ('official', 'none')
SMALL_IMAGE_POLICIES = ('upscale', 'error')
NETWORK_ZOOM_RANGE = (0.7, 1.3)
PROMPT_ZOOM_RANGE = (0.5, 1.5)


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the official augmentation; applying it to several images augments them identically."""
    hflip: bool = False
    vflip: bool = False
    transpose: bool = False
    zoom: bool = False
    zx: float = 1.0
    zy: float = 1.0
    rotate: bool = False
    angle: float = 0.0


def sample_augmentation(zoom_range: Sequence[float] = NETWORK_ZOOM_RANGE) -> AugmentParams:
    """Draw the flips, transpose, zoom and rotation with the official probabilities and ranges."""
    hflip = random.random() < 0.5
    vflip = random.random() < 0.5
    transpose = random.random() < 0.5
    rotate = random.random() < 0.3
    zoom = random.random() < 0.3
    angle = random.random() * 180 - 90
    zx, zy = np.random.uniform(zoom_range[0], zoom_range[1], 2)
    return AugmentParams(hflip, vflip, transpose, zoom, float(zx), float(zy), rotate, angle)


def apply_augmentation(img: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Apply one drawn augmentation to an H×W×C float image.

    The zoom is centred at (w/2 + 0.5, h/2 + 0.5) like the original; the original swaps h and w there, which
    makes no difference for the square images it always augments.
    """
    if params.hflip:
        img = img[:, ::-1]
    if params.vflip:
        img = img[::-1]
    if params.transpose:
        img = img.transpose(1, 0, 2)
    img = np.ascontiguousarray(img)
    h, w = img.shape[:2]
    if params.zoom:
        cx, cy = w / 2 + 0.5, h / 2 + 0.5
        matrix = np.array([[params.zx, 0, cx - params.zx * cx], [0, params.zy, cy - params.zy * cy]])
        img = _warp(img, matrix)
    if params.rotate:
        img = _warp(img, cv2.getRotationMatrix2D((w // 2, h // 2), params.angle, 1.0))
    return img


def _warp(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    out = cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return out if out.ndim == 3 else out[:, :, None]


def augment_images(images: List[np.ndarray], mode: str = 'official',
                   zoom_range: Sequence[float] = NETWORK_ZOOM_RANGE) -> List[np.ndarray]:
    """Augment every image of a list with *the same* random draw (the ranking tuples need this)."""
    check_augment_mode(mode)
    if mode == 'none':
        return list(images)
    params = sample_augmentation(zoom_range)
    return [apply_augmentation(img, params) for img in images]


def check_augment_mode(mode: str, option: str = 'augment') -> None:
    if mode not in AUGMENT_MODES:
        raise RaveError(f'option {option}: "{mode}" is not one of {", ".join(AUGMENT_MODES)}.')


def check_positive_range(value, option: str) -> Tuple[float, float]:
    """Validate a ``[low, high]`` option with ``0 < low <= high`` (``zoom_range``, ``exposure_range``)."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise RaveError(f'option {option}: expected two numbers [low, high], got {value!r}.') from None
    if not 0 < low <= high:
        raise RaveError(f'option {option}: need 0 < low <= high, got [{low}, {high}].')
    return low, high


def vary_exposure(img: np.ndarray, gain_range: Sequence[float]) -> np.ndarray:
    """Multiply an image by one gain drawn uniformly from ``gain_range`` and clip to [0, 1] (not in the originals).

    Shows the network pixel values its training set lacks: a gain above 1 saturates bright regions as real skies
    are, and below 1 darkens the subject further, so the network learns what to do across the whole range rather
    than extrapolating its tone curve beyond the brightest training pixels.
    """
    gain = random.uniform(gain_range[0], gain_range[1])
    return np.clip(img * gain, 0, 1).astype(img.dtype, copy=False)


def resize_squash(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to size×size without keeping the aspect ratio, with PIL's antialiased Lanczos as the originals.

    The originals resize 8-bit images; this resizes the float planes, which avoids one rounding to 8 bits.
    """
    if img.shape[0] == size and img.shape[1] == size:
        return img
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, c]), mode='F').resize(
        (size, size), Image.LANCZOS)) for c in range(img.shape[2])]
    return np.clip(np.stack(planes, axis=2), 0, 1)


def fit_for_crop(img: np.ndarray, crop_size: int, policy: str = 'upscale', name: str = '<image>') -> np.ndarray:
    """Make sure an image can be cropped to crop_size²: upscale its short side to it, or raise (``policy``)."""
    if policy not in SMALL_IMAGE_POLICIES:
        raise RaveError(f'option small_image_policy: "{policy}" is not one of {", ".join(SMALL_IMAGE_POLICIES)}.')
    h, w = img.shape[:2]
    if h >= crop_size and w >= crop_size:
        return img
    if policy == 'error':
        raise RaveError(f'{name}: {w}×{h} pixels is smaller than crop_size {crop_size}; remove it, lower '
                        'crop_size or set small_image_policy: upscale.')
    factor = crop_size / min(h, w)
    new_w, new_h = max(crop_size, round(w * factor)), max(crop_size, round(h * factor))
    out = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    out = out if out.ndim == 3 else out[:, :, None]
    return np.clip(out, 0, 1)


def random_crop(img: np.ndarray, crop_size: int) -> np.ndarray:
    """A random crop_size² window (the image must be at least that large; see :func:`fit_for_crop`)."""
    h, w = img.shape[:2]
    top = random.randint(0, h - crop_size)
    left = random.randint(0, w - crop_size)
    return img[top:top + crop_size, left:left + crop_size]


def prepare_size(img: np.ndarray, resize: Optional[int], crop_size: Optional[int], small_image_policy: str,
                 name: str) -> np.ndarray:
    """Squash-resize to ``resize``², or random-crop ``crop_size``² (upscaling small images by policy)."""
    if crop_size:
        return random_crop(fit_for_crop(img, crop_size, small_image_policy, name), crop_size)
    if resize:
        return resize_squash(img, resize)
    return img


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """H×W×3 float32 RGB -> 3×H×W float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
