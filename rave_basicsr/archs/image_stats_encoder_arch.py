"""A small, CLIP-free, differentiable image-statistics encoder.

Pretrained CLIP weights cannot be had offline, and a randomly initialised CLIP embeds nothing meaningful, so RAVE's
residual guidance would do no visible work there. This encoder maps an image to hand-designed exposure statistics
(coarse luminance grid, per-channel mean and spread, luminance spread, a soft cumulative luminance histogram), each
centred so that a mid-grey, evenly exposed image sits near the origin. The residual between the mean embeddings of well-lit
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
    * 3 per-channel spreads and 1 luminance spread, ``4 * s - 1`` (0.5 is the maximum): standard deviations, or with
      ``spread: mean_abs`` mean absolute deviations from the mean;
    * ``histogram_levels`` soft cumulative-histogram values: the fraction of pixels darker than each level
      ``(k + 0.5) / levels`` (a sigmoid of width ``histogram_softness`` in luminance units), ``2 * F - 1``.

    The histogram is cumulative on purpose: brightening any pixel lowers every value, so gradients are monotone
    (a binned soft histogram pulls pixels towards the nearest bin centre, often the wrong way).

    ``cone``: every coordinate mapped from [-1, 1] to [0, 1], so that embeddings lie in a narrow cone far from the
    origin, as CLIP's image embeddings do. Residuals (differences of mean embeddings) do not change, but the cosine
    of an embedding with a residual does: around the origin it swings with the embedding's direction (a small change
    of a near-zero embedding turns it a lot, and far-off images such as a white one can score like well-lit ones);
    in the cone it varies smoothly and almost linearly with the statistics, as RAVE's loss assumes of CLIP.

    ``spread``: a standard deviation's gradient on a pixel grows with the pixel's distance from the mean, so in a
    backlit image, whose dark subject pulls the mean down, the brightest sky pixels weigh most, and a guidance that
    asks for less contrast is met most cheaply by darkening the sky. The mean absolute deviation (``mean_abs``) gives
    every pixel on one side of the mean the same weight (docs/clip_lit.md, "Where the contrast push lands").
    """

    SPREADS = ('std', 'mean_abs')

    def __init__(self, grid_size: int = 4, histogram_levels: int = 8, histogram_softness: float = 0.05,
                 cone: bool = False, spread: str = 'std') -> None:
        super().__init__()
        if not isinstance(grid_size, int) or grid_size < 1:
            raise RaveError(f'ImageStatsEncoder: option "grid_size" must be a positive integer, got {grid_size!r}.')
        if not isinstance(histogram_levels, int) or histogram_levels < 1:
            raise RaveError('ImageStatsEncoder: option "histogram_levels" must be a positive integer, '
                            f'got {histogram_levels!r}.')
        if not isinstance(histogram_softness, (int, float)) or not histogram_softness > 0:
            raise RaveError('ImageStatsEncoder: option "histogram_softness" (luminance units) must be positive, '
                            f'got {histogram_softness!r}.')
        if spread not in self.SPREADS:
            raise RaveError(f'ImageStatsEncoder: option "spread" must be one of {list(self.SPREADS)}, got {spread!r}.')
        self.spread = spread
        self.grid_size = grid_size
        self.histogram_levels = histogram_levels
        self.softness = float(histogram_softness)
        self.cone = bool(cone)
        self.embed_dim = grid_size * grid_size + 3 + 4 + histogram_levels
        levels = (torch.arange(histogram_levels, dtype=torch.float32) + 0.5) / histogram_levels
        self.register_buffer('levels', levels.view(1, histogram_levels, 1), persistent=False)
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
        channel_spread = self._spread(flat)
        luma_spread = self._spread(luma.flatten(2)).view(batch, 1)
        cumulative = torch.sigmoid((self.levels - luma.flatten(2)) / self.softness).mean(dim=2)  # [B, levels]
        embedding = torch.cat([
            2.0 * grid - 1.0,
            2.0 * channel_mean - 1.0,
            4.0 * channel_spread - 1.0,
            4.0 * luma_spread - 1.0,
            2.0 * cumulative - 1.0,
        ], dim=1)
        if self.cone:
            embedding = 0.5 * (embedding + 1.0)
        return embedding.view(batch, self.embed_dim)

    def _spread(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, C, N]`` -> ``[B, C]``: the standard deviation or the mean absolute deviation over N."""
        if self.spread == 'std':
            return values.std(dim=2, unbiased=False)
        return (values - values.mean(dim=2, keepdim=True)).abs().mean(dim=2)
