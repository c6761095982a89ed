"""A CLIP-free guidance encoder: the soft cumulative histogram of log-luminance (tried for the offline RAVE demo,
not shipped in it: docs/training.md).

The network outputs ``clamp(I / L)``, so one step on the illumination map moves ``log(output)`` by the same amount
for a dark pixel as for a bright one, while it moves the output's linear value in proportion to the pixel's own
brightness. Statistics of linear values (the :class:`ImageStatsEncoder`) therefore hear the highlights ten to a
thousand times louder than the shadows (``bench/bench_guidance_balance.py``), and RAVE's loss is met by darkening the
highlights. On log-luminance every pixel pulls alike, and a cumulative histogram carries no spread or layout term
that darkening the highlights could satisfy: the residual between well-lit and backlit sets says "fewer pixels below
these levels", and the cheapest way to meet it is to lift the pixels that are below them. It has no learnable
parameters; it is registered in ``ARCH_REGISTRY`` and used through
``build_image_encoder({'type': 'arch', 'network': {'type': 'LogHistogramEncoder'}})``.
"""
from typing import Sequence

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from rave_basicsr.archs.image_stats_encoder_arch import LUMA_WEIGHTS
from rave_basicsr.utils.errors import RaveError


@ARCH_REGISTRY.register()
class LogHistogramEncoder(nn.Module):
    """Images ``[B, 3, H, W]`` in [0, 1] -> ``[B, levels + 1]``: a log-luminance histogram and an anchor (CLIP-free),
    optionally followed by a highlight coordinate (``[B, levels + 2]``).

    * ``levels`` soft cumulative-histogram values: the fraction of pixels whose ``log2(luminance + epsilon)`` lies
      below each of ``levels`` evenly spaced levels over ``log2_range`` (a sigmoid ``softness`` log2 units wide);
    * one constant coordinate, ``anchor``. It keeps every embedding in a cone away from the origin, as CLIP's image
      embeddings are, so that the cosine with a residual varies smoothly with the histogram (a white image, whose
      histogram is all zeros, would otherwise have no direction at all);
    * with ``highlight_weight > 0``, one more coordinate: ``highlight_weight`` times the fraction of pixels whose
      linear luminance lies above ``highlight_level`` (a sigmoid ``highlight_softness`` wide). Log levels crowd the
      shadows and leave one level for everything above half-brightness, so the histogram hardly tells a blown-out
      image from a well-lit one: on the ``silhouette`` demo set (blown-out backgrounds) a white image scores 0.153
      against a threshold of 0.175. Where the backlit set clips more than the well-lit one, the residual gains a
      component against clipping and a white output scores far off the target (-0.005 against 0.188 with weight
      1); where the two sets clip alike, the component is near zero and little changes (docs/guidance.md).

    The luminance is BT.601's, as in BasicSR's Y-channel metrics; ``epsilon`` keeps black pixels finite.
    """

    def __init__(self, levels: int = 12, log2_range: Sequence[float] = (-7.0, 0.0), softness: float = 0.3,
                 anchor: float = 2.0, epsilon: float = 1 / 256, highlight_weight: float = 0.0,
                 highlight_level: float = 0.9, highlight_softness: float = 0.03) -> None:
        super().__init__()
        if not isinstance(levels, int) or levels < 2:
            raise RaveError(f'LogHistogramEncoder: option "levels" must be an integer >= 2, got {levels!r}.')
        if (not isinstance(log2_range, (list, tuple)) or len(log2_range) != 2
                or not all(isinstance(v, (int, float)) for v in log2_range) or not log2_range[0] < log2_range[1]):
            raise RaveError('LogHistogramEncoder: option "log2_range" must be [low, high] with low < high (log2 '
                            f'luminance, e.g. [-7, 0] for 1/128 to 1), got {log2_range!r}.')
        for name, value in (('softness', softness), ('anchor', anchor), ('epsilon', epsilon),
                            ('highlight_softness', highlight_softness)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise RaveError(f'LogHistogramEncoder: option "{name}" must be positive, got {value!r}.')
        if not isinstance(highlight_weight, (int, float)) or highlight_weight < 0:
            raise RaveError('LogHistogramEncoder: option "highlight_weight" must be >= 0 (0 leaves the highlight '
                            f'coordinate out), got {highlight_weight!r}.')
        if not isinstance(highlight_level, (int, float)) or not 0 < highlight_level < 1:
            raise RaveError('LogHistogramEncoder: option "highlight_level" (linear luminance) must lie in (0, 1), '
                            f'got {highlight_level!r}.')
        self.softness = float(softness)
        self.anchor = float(anchor)
        self.epsilon = float(epsilon)
        self.highlight_weight = float(highlight_weight)
        self.highlight_level = float(highlight_level)
        self.highlight_softness = float(highlight_softness)
        self.embed_dim = levels + 1 + int(self.highlight_weight > 0)
        thresholds = torch.linspace(float(log2_range[0]), float(log2_range[1]), levels)
        self.register_buffer('thresholds', thresholds.view(1, levels, 1), persistent=False)
        self.register_buffer('luma', torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1), persistent=False)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.dim() != 4 or images01.shape[1] != 3:
            raise RaveError(f'LogHistogramEncoder expects [B, 3, H, W] images, got shape {list(images01.shape)}.')
        luma = (images01.float() * self.luma).sum(dim=1).flatten(1)  # [B, H*W]
        log_luma = torch.log2(luma + self.epsilon).unsqueeze(1)
        cumulative = torch.sigmoid((self.thresholds - log_luma) / self.softness).mean(dim=2)  # [B, levels]
        parts = [cumulative, cumulative.new_full((cumulative.shape[0], 1), self.anchor)]
        if self.highlight_weight > 0:
            above = torch.sigmoid((luma - self.highlight_level) / self.highlight_softness).mean(dim=1, keepdim=True)
            parts.append(self.highlight_weight * above)
        return torch.cat(parts, dim=1)
