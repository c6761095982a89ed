"""A small, CLIP-free, differentiable image-statistics encoder.

Pretrained CLIP weights cannot be had offline, and a randomly initialised CLIP embeds nothing meaningful, so RAVE's
residual guidance would do no visible work there. This encoder maps an image to hand-designed exposure statistics
(coarse luminance grid, per-channel mean and spread, luminance spread, a soft luminance histogram), each centred so
that a mid-grey, evenly exposed image sits near the origin. The residual between the mean embeddings of well-lit
and backlit images then points towards "brighter, less bimodal, less contrasty", and RAVE's loss on it pushes a
backlit image towards well-lit statistics. It has no learnable parameters; it is registered in ``ARCH_REGISTRY`` and
used through ``build_image_encoder({'type': 'arch', 'network': {'type': 'ImageStatsEncoder'}})``.
"""
import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from rave_basicsr.utils.errors import RaveError

#: ITU-R BT.601 luma weights (the Y of YCbCr), as used by BasicSR's Y-channel metrics
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@ARCH_REGISTRY.register()
class ImageStatsEncoder(nn.Module):
    """Images ``[B, 3, H, W]`` in [0, 1] -> exposure-statistics embedding ``[B, embed_dim]`` (CLIP-free).

    Embedding layout (each group centred and scaled to roughly [-1, 1]):

    * ``grid_size**2`` coarse luminance cells (area means), ``2 * y - 1``;
    * 3 per-channel means, ``2 * m - 1``;
    * 3 per-channel standard deviations and 1 luminance standard deviation, ``4 * s - 1`` (0.5 is the maximum);
    * ``histogram_bins`` soft luminance histogram masses (Gaussian kernels of width ``histogram_sigma`` bins,
      normalised per pixel), ``bins * h - 1`` so that a flat histogram is 0.
    """

    def __init__(self, grid_size: int = 4, histogram_bins: int = 8, histogram_sigma: float = 0.5) -> None:
        super().__init__()
        if not isinstance(grid_size, int) or grid_size < 1:
            raise RaveError(f'ImageStatsEncoder: option "grid_size" must be a positive integer, got {grid_size!r}.')
        if not isinstance(histogram_bins, int) or histogram_bins < 2:
            raise RaveError('ImageStatsEncoder: option "histogram_bins" must be an integer >= 2, '
                            f'got {histogram_bins!r}.')
        if not histogram_sigma > 0:
            raise RaveError('ImageStatsEncoder: option "histogram_sigma" (in bins) must be positive, '
                            f'got {histogram_sigma!r}.')
        self.grid_size = grid_size
        self.histogram_bins = histogram_bins
        self.sigma = float(histogram_sigma) / histogram_bins
        self.embed_dim = grid_size * grid_size + 3 + 4 + histogram_bins
        centres = (torch.arange(histogram_bins, dtype=torch.float32) + 0.5) / histogram_bins
        self.register_buffer('bin_centres', centres.view(1, histogram_bins, 1), persistent=False)
        self.register_buffer('luma', torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1), persistent=False)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.dim() != 4 or images01.shape[1] != 3:
            raise RaveError(f'ImageStatsEncoder expects [B, 3, H, W] images, got shape {list(images01.shape)}.')
        x = images01.float()
        batch = x.shape[0]
        luma = (x * self.luma).sum(dim=1, keepdim=True)  # [B, 1, H, W]
        grid = F.adaptive_avg_pool2d(luma, self.grid_size).flatten(1)
        flat = x.flatten(2)
        channel_mean = flat.mean(dim=2)
        channel_std = flat.std(dim=2, unbiased=False)
        luma_std = luma.flatten(1).std(dim=1, unbiased=False, keepdim=True)
        weights = torch.exp(-0.5 * ((luma.flatten(2) - self.bin_centres) / self.sigma) ** 2)  # [B, bins, HW]
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        histogram = weights.mean(dim=2)
        embedding = torch.cat([
            2.0 * grid - 1.0,
            2.0 * channel_mean - 1.0,
            4.0 * channel_std - 1.0,
            4.0 * luma_std - 1.0,
            self.histogram_bins * histogram - 1.0,
        ], dim=1)
        return embedding.view(batch, self.embed_dim)
