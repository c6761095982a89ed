"""A smoothness prior on the illumination map ``L`` the network divides by (not in the originals; off by default).

An exposure change is a smooth ``L``: it scales a region's pixels alike and keeps their local contrast. An ``L`` that
follows the image's own texture is a local tone curve: it amplifies textures, noise and the colour casts of shadows
(the over-processed look). The originals have no such term (their ``noTV_epochs`` argument is unused); CLIP guidance
and the RN101 identity loss on real photos keep the released network's ``L`` smooth. A demo guided by image
statistics at 64 px has nothing that sees fine structure, so ``train:smoothness_opt`` can add this loss to the guided
stage of every method (docs/training.md, "Options reference").
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from rave_basicsr.losses.clip_guidance_loss import REDUCTIONS, _check_choice, _check_weight, _reduce, float32_loss
from rave_basicsr.utils.errors import RaveError


def _positive(value: float, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise RaveError(f'IlluminationSmoothnessLoss: option "{key}" must be a positive number, got {value!r}.')
    return float(value)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of N×C×H×W images (radius 3 sigma, reflect-padded; replicate below 2 pixels)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(images.shape[1], 1, 1, 1)
    channels = images.shape[1]
    for dim in (3, 2):
        pad = min(radius, images.shape[dim] - 1)
        padding = (pad, pad, 0, 0) if dim == 3 else (0, 0, pad, pad)
        padded = F.pad(images, padding, mode='reflect' if pad > 0 else 'replicate')
        if pad < radius:  # an image smaller than the kernel: extend its border
            rest = radius - pad
            padded = F.pad(padded, (rest, rest, 0, 0) if dim == 3 else (0, 0, rest, rest), mode='replicate')
        weight = kernel.view(channels, 1, 1, -1) if dim == 3 else kernel.view(channels, 1, -1, 1)
        images = F.conv2d(padded, weight, groups=channels)
    return images


@LOSS_REGISTRY.register()
class IlluminationSmoothnessLoss(nn.Module):
    """Fine structure of ``log L`` per image (``L`` clamped below at ``floor``), reduced over the batch:

    * ``detail_sigma: ~``: the total variation, ``mean |log L(x+1, y) - log L(x, y)| + mean |log L(x, y+1) -
      log L(x, y)|``: every step of L costs, the edge of a lifted subject as much as texture;
    * ``detail_sigma: s``: ``mean |log L - blur_s(log L)|`` with a Gaussian blur of s pixels: only what varies
      within a few s costs (texture), a lift that is smooth at that scale (a subject's, with its edge) does not.

    In the log domain the loss does not depend on the exposure (``c · L`` scores as ``L``) and a relative change
    costs the same in the shadows as in the highlights.
    """

    def __init__(self, loss_weight: float = 1.0, floor: float = 1e-3, detail_sigma: Optional[float] = None,
                 reduction: str = 'mean') -> None:
        super().__init__()
        self.loss_weight = _check_weight(loss_weight, 'IlluminationSmoothnessLoss')
        self.floor = _positive(floor, 'floor')
        self.detail_sigma = None if detail_sigma is None else _positive(detail_sigma, 'detail_sigma')
        self.reduction = _check_choice(reduction, REDUCTIONS, 'reduction', 'IlluminationSmoothnessLoss')

    @float32_loss
    def forward(self, illumination: torch.Tensor) -> torch.Tensor:
        if illumination.dim() != 4:
            raise RaveError('IlluminationSmoothnessLoss: the illumination map must be N×C×H×W, got '
                            f'{list(illumination.shape)}.')
        log_l = illumination.float().clamp_min(self.floor).log()
        if self.detail_sigma is not None:
            per_image = (log_l - gaussian_blur(log_l, self.detail_sigma)).abs().flatten(1).mean(dim=1)
        else:
            across = (log_l[..., :, 1:] - log_l[..., :, :-1]).abs().flatten(1).mean(dim=1)
            down = (log_l[..., 1:, :] - log_l[..., :-1, :]).abs().flatten(1).mean(dim=1)
            per_image = across + down
        return self.loss_weight * _reduce(per_image, self.reduction)
