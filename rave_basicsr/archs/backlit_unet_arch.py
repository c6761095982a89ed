"""The enhancement network shared by CLIP-LIT, CLIP-LIT-Latent and RAVE (CLIP-LIT code, ``model_small.py``; RAVE
code, ``enhancement_model.py``).

A full-resolution, stride-1 convolutional network with one global-context module (pyramid pooling) that predicts a
single-channel illumination map ``L``; the enhanced image is ``clamp(I / L, 0, 1)``. Module names follow the
official ``UNet_emb_oneBranch_symmetry`` so the released state dicts load as they are (after stripping
``module.``).

Two options cover the official train/test differences:

- ``outer_padding``: padding mode of the four outer convolutions (``cond1``, ``condx``, ``condy``,
  ``cond_add1``). The originals train with ``'zeros'`` and infer with ``'reflect'``. The residual blocks always
  reflect-pad and the PPM fuse convolution always zero-pads, as in the originals.
- ``division_eps``: the epsilon in ``I / (L + eps)``. The originals use ``1e-9`` in training and ``0`` at test.

One option departs from the originals, off by default: ``illumination_bias_init``. With the official
initialisation the conv weights are so small (N(0, 0.02)) that ``L`` starts at about the last convolution's bias,
drawn from ±1/√288 ≈ ±0.06: either 0 everywhere (a dead network) or about 0.03, which saturates every pixel brighter
than 0.03 to white. The clamp passes no gradient there, so on images without near-black pixels (a bright veil, a
mild backlight) the warm-up cannot start, whatever the seed. Setting that bias to 1 starts every draw at ``L ≈ 1``,
the identity mapping the warm-up aims for; the trained weights have the same shapes and load as before.

Division rule (so that no output is ever NaN or Inf, whatever ``eps``): where ``L > 0`` the output is
``I / (L + eps)``; where ``L == 0`` it is ``1`` if ``I > 0`` and ``0`` if ``I == 0``. For ``L == 0`` this is what the
original computes for ``I > 0`` (``I / 0 = inf``, clamped to 1; with ``eps = 1e-9`` any ``I > 1e-9`` saturates too),
and it replaces the original's ``0 / 0 = NaN`` by black. Gradients stay finite as well.

Reflect padding needs at least 2 pixels per side; for a 1-pixel-high or -wide input the reflect-padded
convolutions fall back to replicate padding (the only sensible limit; the originals raise an error there).
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY

PPM_BINS = (1, 2, 3, 6)


#: inputs with at least this many pixels take the border-recomputing reflect convolution (measured faster from
#: about 224² up, slower below, where the four extra strip convolutions cost more than the padded copy saves)
BORDER_RECOMPUTE_MIN_PIXELS = 256 * 256


class PaddedConv2d(nn.Conv2d):
    """``nn.Conv2d`` with a faster exact reflect padding at inference, degrading to replicate on inputs narrower
    than 2 pixels.

    A 3×3, stride-1 convolution with 1-pixel reflect padding differs from the zero-padded one only on the outermost
    rows and columns. So, when no gradient is needed and the input is large, the zero-padded convolution runs on the
    input as it is (no padded copy of a full-resolution activation, which took a fifth of the forward time) and the
    four border lines are recomputed from 2-pixel strips padded by reflection. Training keeps the padded copy: the
    backward pass through the recomputed lines is slower than the copy.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
        if self.padding_mode == 'zeros':
            return super()._conv_forward(input, weight, bias)
        if min(input.shape[-2:]) < 2:
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode='replicate')
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        needs_grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)
        if (needs_grad or input.shape[-2] * input.shape[-1] < BORDER_RECOMPUTE_MIN_PIXELS
                or self.padding_mode != 'reflect' or self.kernel_size != (3, 3) or self.padding != (1, 1)
                or self.stride != (1, 1) or self.dilation != (1, 1)):
            return super()._conv_forward(input, weight, bias)
        def border_conv(strip: torch.Tensor) -> torch.Tensor:  # a 2-pixel strip, reflect-padded, convolved
            return F.conv2d(F.pad(strip, (1, 1, 1, 1), mode='reflect'), weight, bias, 1, 0, 1, self.groups)

        output = F.conv2d(input, weight, bias, 1, 1, 1, self.groups)
        output[:, :, :1] = border_conv(input[:, :, :2])[:, :, :1]
        output[:, :, -1:] = border_conv(input[:, :, -2:])[:, :, -1:]
        output[..., :1] = border_conv(input[..., :2])[..., :1]
        output[..., -1:] = border_conv(input[..., -2:])[..., -1:]
        return output


class ResidualBlock(nn.Module):
    """``lrelu(conv2(lrelu(conv1(x))) + x)``, both convs 3×3, bias-free, reflect-padded, as the originals."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = PaddedConv2d(channels, channels, 3, 1, 1, bias=False, padding_mode='reflect')
        self.conv2 = PaddedConv2d(channels, channels, 3, 1, 1, bias=False, padding_mode='reflect')
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.lrelu(self.conv1(x)))
        out += x  # in place: the convolution's output is not needed by its backward
        return self.lrelu(out)


class PyramidPooling(nn.Module):
    """Pyramid pooling: per bin, adaptive average pool → 1×1 conv → PReLU → bilinear upsampling
    (``align_corners=True``); concatenated with the input and fused by a zero-padded 3×3 conv + PReLU.

    The bins are averaged in float32 whatever the network computes in (one conversion for all four), as the exact
    tiling does: they average up to millions of pixels, and CUDA's float16 pooling gets them wrong on large inputs
    (on an H200, torch 2.11 with CUDA 13, every value of the 2×2, 3×3 and 6×6 bins of a 4000×3000 image came out 0,
    which moved the fp16 output by 13 grey levels; 0.3 with float32 pooling).
    """

    def __init__(self, in_channels: int, reduction: int = 8, bins: Sequence[int] = PPM_BINS):
        super().__init__()
        self.bins = tuple(bins)
        # index 0 is where the originals pool; the pooling is done in concat_branches, and the identity keeps the
        # released state dicts' keys (features.K.1 conv, features.K.2 PReLU)
        self.features = nn.ModuleList([
            nn.Sequential(nn.Identity(), nn.Conv2d(in_channels, reduction, 1, bias=False), nn.PReLU())
            for _ in self.bins
        ])
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels + reduction * len(self.bins), in_channels, 3, padding=1, bias=False), nn.PReLU())

    def branch_from_pooled(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        """Branch ``index``'s 1×1 conv and PReLU applied to already pooled statistics (used by exact tiling)."""
        return self.features[index][2](self.features[index][1](pooled))

    def concat_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The fuse conv's input: ``x`` followed by the four upsampled branch maps."""
        size = x.shape[-2:]
        x32 = x.float()
        out = [x]
        for index, bins in enumerate(self.bins):
            pooled = F.adaptive_avg_pool2d(x32, bins).to(x.dtype)
            out.append(F.interpolate(self.branch_from_pooled(index, pooled), size=size, mode='bilinear',
                                     align_corners=True))
        return torch.cat(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.concat_branches(x))


def divide_by_illumination(image: torch.Tensor, illumination: torch.Tensor, eps: float) -> torch.Tensor:
    """``clamp(I / (L + eps), 0, 1)`` in float32 with the explicit ``L == 0`` rule of the module docstring."""
    image32, light32 = image.float(), illumination.float()
    positive = light32 > 0
    denominator = torch.where(positive, light32 + eps, torch.ones_like(light32))
    ratio = torch.where(positive, image32 / denominator, (image32 > 0).to(image32.dtype))
    return torch.nan_to_num(ratio, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)


@ARCH_REGISTRY.register()
class BacklitUNet(nn.Module):
    """The official enhancement network ("UNet_emb_oneBranch_symmetry", 278,790 parameters).

    Args:
        in_channels: input channels (3 for RGB).
        outer_padding: ``'zeros'`` (official training) or ``'reflect'`` (official inference) for the four outer
            convolutions.
        division_eps: epsilon of ``I / (L + eps)``; ``1e-9`` as in official training, ``0`` as at official test.
        illumination_bias_init: ``None`` (official: PyTorch's default bias draw) or the value the last convolution's
            bias starts at, at construction and at every re-initialisation (1: start at the identity mapping).
    """

    def __init__(self, in_channels: int = 3, outer_padding: str = 'zeros', division_eps: float = 1e-9,
                 illumination_bias_init: Optional[float] = None):
        super().__init__()
        if outer_padding not in ('zeros', 'reflect'):
            raise ValueError(f"BacklitUNet: outer_padding must be 'zeros' or 'reflect', got {outer_padding!r}.")
        if not division_eps >= 0:
            raise ValueError(f'BacklitUNet: division_eps must be >= 0, got {division_eps!r}.')
        if illumination_bias_init is not None and (isinstance(illumination_bias_init, bool) or not isinstance(
                illumination_bias_init, (int, float)) or not math.isfinite(illumination_bias_init)):
            raise ValueError('BacklitUNet: illumination_bias_init must be ~ (official initialisation) or a finite '
                             f'number, got {illumination_bias_init!r}.')
        self.in_channels = in_channels
        self.outer_padding = outer_padding
        self.division_eps = float(division_eps)
        self.illumination_bias_init = None if illumination_bias_init is None else float(illumination_bias_init)
        self.cond1 = PaddedConv2d(in_channels, 32, 3, 1, 1, bias=True, padding_mode=outer_padding)
        self.ResidualBlock1 = ResidualBlock(32)
        self.ResidualBlock2 = ResidualBlock(32)
        self.PPM1 = PyramidPooling(32, 8, PPM_BINS)
        self.condx = PaddedConv2d(32, 64, 3, 1, 1, bias=True, padding_mode=outer_padding)
        self.ResidualBlock3 = ResidualBlock(64)
        self.ResidualBlock4 = ResidualBlock(64)
        self.condy = PaddedConv2d(64, 32, 3, 1, 1, bias=True, padding_mode=outer_padding)
        self.ResidualBlock5 = ResidualBlock(32)
        self.ResidualBlock6 = ResidualBlock(32)
        self.cond_add1 = PaddedConv2d(32, 1, 3, 1, 1, bias=True, padding_mode=outer_padding)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.relu = nn.ReLU(inplace=True)
        self._official_conv_init()

    def _official_conv_init(self) -> None:
        """Official initialisation on top of PyTorch's defaults: conv weights ~ N(0, 0.02) (drawn in the originals'
        order, so a seed gives the originals' network); biases and PReLU keep PyTorch's defaults, except
        ``cond_add1``'s bias when ``illumination_bias_init`` is set (after every draw, so the random stream and
        thus every other parameter stay the originals')."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
        if self.illumination_bias_init is not None:
            with torch.no_grad():
                self.cond_add1.bias.fill_(self.illumination_bias_init)

    def reset_parameters(self) -> None:
        """A new random network, as the originals' warm-up guard re-creates it: every parameter is drawn again
        (PyTorch's defaults, then the official conv weights). Biases matter here: the conv weights are so small
        that the sign of ``cond_add1``'s bias decides whether ``L`` is 0 everywhere (a network with no gradient,
        about half of all draws); keeping the bias would keep such a network dead through every re-initialisation.
        """
        for module in self.modules():
            if module is not self and hasattr(module, 'reset_parameters'):
                module.reset_parameters()
        self._official_conv_init()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The layers before the pyramid pooling (receptive radius 5 px): the PPM input, 32 channels."""
        return self.ResidualBlock2(self.ResidualBlock1(self.lrelu(self.cond1(x))))

    def decode(self, fused_input: torch.Tensor) -> torch.Tensor:
        """From the PPM fuse conv's 64-channel input to the illumination map (receptive radius 12 px)."""
        x = self.condx(self.PPM1.fuse(fused_input))
        x = self.condy(self.ResidualBlock4(self.ResidualBlock3(x)))
        x = self.ResidualBlock6(self.ResidualBlock5(x))
        return self.relu(self.cond_add1(x))

    def illumination(self, x: torch.Tensor) -> torch.Tensor:
        """The illumination map L (N×1×H×W, ≥ 0)."""
        return self.decode(self.PPM1.concat_branches(self.encode(x)))

    def forward_with_illumination(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(enhanced, illumination)``; enhanced is in [0, 1] with x's dtype, never NaN/Inf."""
        light = self.illumination(x)
        return divide_by_illumination(x, light, self.division_eps).to(x.dtype), light

    def forward(self, x: torch.Tensor, return_illumination: bool = False):
        """The enhanced image, or ``(enhanced, illumination)`` with ``return_illumination`` (a keyword that reaches
        the network through a DistributedDataParallel wrapper, which a method call would bypass)."""
        enhanced, light = self.forward_with_illumination(x)
        return (enhanced, light) if return_illumination else enhanced
