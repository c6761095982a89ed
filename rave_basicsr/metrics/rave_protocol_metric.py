"""The RAVE paper's evaluation protocol (RAVE code, ``compute_metrics.py``) as BasicSR metrics, next to BasicSR's
RGB/Y PSNR and SSIM.

Inputs follow BasicSR's metric convention: ``img`` (result) and ``img2`` (ground truth) as uint8 HWC **BGR** arrays
(``tensor2img``). The original script reads both images with ``cv2.imread`` (BGR) and converts them with
``cv2.COLOR_RGB2GRAY``, i.e. with the luma weights of R and B swapped; ``swap_rb: true`` (default) reproduces that,
``swap_rb: false`` uses the correct ``COLOR_BGR2GRAY``.

* ``calculate_rave_psnr``: ``cv2.PSNR`` of the grayscale uint8 images.
* ``calculate_rave_ssim``: ``skimage.metrics.structural_similarity`` of the grayscale images with
  ``data_range = max - min`` of the enhanced grayscale image (7×7 window, the skimage default).
* ``calculate_rave_lpips``: LPIPS (AlexNet) after resizing the shorter side to 1024 px (PIL bilinear); inputs are
  ImageNet-normalised as in the original script (``normalize: imagenet``), or scaled to [-1, 1] as LPIPS expects
  (``normalize: lpips``). Needs the optional ``lpips`` package and its weights (plus torchvision's AlexNet
  weights); when they are unavailable the model skips this metric with one message.
"""
import functools
from typing import Optional

import cv2
import numpy as np
import torch
from basicsr.utils.registry import METRIC_REGISTRY
from skimage.metrics import structural_similarity

from rave_basicsr.utils.errors import RaveError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_gray(img: np.ndarray, swap_rb: bool = True) -> np.ndarray:
    """uint8 BGR HWC -> uint8 grayscale, with the original script's channel order quirk by default."""
    if img.ndim == 2:
        return img
    if img.dtype != np.uint8:
        raise RaveError(f'RAVE-protocol metrics expect uint8 images, got {img.dtype}.')
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY if swap_rb else cv2.COLOR_BGR2GRAY)


def _check_pair(img: np.ndarray, img2: np.ndarray, name: str) -> None:
    if img2 is None:
        raise RaveError(f'{name} is a full-reference metric: it needs the ground-truth image.')
    if img.shape[:2] != img2.shape[:2]:
        raise RaveError(f'{name}: result {img.shape[1]}x{img.shape[0]} and ground truth '
                        f'{img2.shape[1]}x{img2.shape[0]} differ in size.')


@METRIC_REGISTRY.register()
def calculate_rave_psnr(img: np.ndarray, img2: np.ndarray, swap_rb: bool = True, **kwargs) -> float:
    """Grayscale PSNR as ``cv2.PSNR`` in the RAVE script (identical images give cv2's 361.2 dB)."""
    _check_pair(img, img2, 'calculate_rave_psnr')
    return float(cv2.PSNR(to_gray(img2, swap_rb), to_gray(img, swap_rb)))


@METRIC_REGISTRY.register()
def calculate_rave_ssim(img: np.ndarray, img2: np.ndarray, swap_rb: bool = True, **kwargs) -> float:
    """Grayscale skimage SSIM with ``data_range`` = max − min of the enhanced image (as the RAVE script)."""
    _check_pair(img, img2, 'calculate_rave_ssim')
    gray_out, gray_gt = to_gray(img, swap_rb), to_gray(img2, swap_rb)
    data_range = float(gray_out.max()) - float(gray_out.min())
    return float(structural_similarity(gray_gt, gray_out, data_range=max(data_range, 1.0)))


def lpips_unavailable_reason(net: str = 'alex') -> Optional[str]:
    """None when LPIPS can run here, else a one-line reason (package or weights missing)."""
    try:
        _lpips_model(net)
    except Exception as exc:  # ImportError, or a download failing offline (URLError/RuntimeError)
        return (f'LPIPS is unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}); '
                'install the optional `lpips` package on a machine that can fetch its AlexNet weights once.')
    return None


@functools.lru_cache(maxsize=2)
def _lpips_model(net: str):
    import lpips  # optional: not a dependency of rave-basicsr

    return lpips.LPIPS(net=net, verbose=False).eval()


def _lpips_input(img: np.ndarray, short_side: int, normalize: str) -> torch.Tensor:
    from PIL import Image

    rgb = Image.fromarray(np.ascontiguousarray(img[:, :, ::-1]))
    if short_side:
        w, h = rgb.size
        scale = short_side / min(w, h)
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    tensor = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if normalize == 'imagenet':
        tensor = (tensor - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    elif normalize == 'lpips':
        tensor = tensor * 2 - 1
    else:
        raise RaveError(f'calculate_rave_lpips: normalize must be imagenet or lpips, got {normalize!r}.')
    return tensor.unsqueeze(0)


@METRIC_REGISTRY.register()
def calculate_rave_lpips(img: np.ndarray, img2: np.ndarray, short_side: int = 1024, normalize: str = 'imagenet',
                         net: str = 'alex', **kwargs) -> float:
    """LPIPS at ``short_side`` px (0: stored size), normalised as the RAVE script (see the module docstring)."""
    _check_pair(img, img2, 'calculate_rave_lpips')
    reason = lpips_unavailable_reason(net)
    if reason:
        raise RaveError(f'calculate_rave_lpips: {reason}')
    with torch.no_grad():
        return float(_lpips_model(net)(_lpips_input(img, short_side, normalize),
                                       _lpips_input(img2, short_side, normalize)).item())
