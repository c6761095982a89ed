"""Compute precisions of the enhancement network at inference, and the network copies that implement them.

- ``fp32``: float32 throughout (the reference).
- ``bf16``: bfloat16 throughout (a bfloat16 copy of the network on the CPU, autocast on CUDA). The fastest, but
  the output moves by up to about 1.7 grey levels (of 255) from fp32.
- ``mixed``: bfloat16 for the middle of the network, from the first residual block to ``condy`` (86% of the
  multiply-adds), float32 at both ends. The ends are where bfloat16 hurts: the input convolution sees 8-bit pixel
  values that bfloat16 cannot hold exactly, and the rounding errors of the last five convolutions reach the
  illumination map directly and are amplified by ``I / L`` where ``L`` is small (the dark subject). Measured on the
  six real photos of the shared data: at most 0.61 grey levels from fp32, so the 8-bit output is within one grey
  level of the fp32 output (the tolerance of the parity with the official outputs) at nearly bf16 speed.
- ``fp16``: float16 autocast, CUDA only (CPUs have no fast float16; it falls back to fp32 there with a warning).

``I / L`` is always computed in float32 from the float32 image.
"""
import copy
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from rave_basicsr.archs.backlit_unet_arch import BacklitUNet
from rave_basicsr.utils.errors import RaveError

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'mixed': None, 'fp16': torch.float16}
#: the contiguous run of layers (in forward order) that the ``mixed`` precision computes in bfloat16
MIXED_BF16_LAYERS = ('ResidualBlock1', 'ResidualBlock2', 'PPM1', 'condx', 'ResidualBlock3', 'ResidualBlock4',
                     'condy')


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device`` (None: no autocast; ``mixed`` uses a network copy).

    fp16 autocast is a GPU feature; on the CPU it falls back to float32 with a warning (use bf16 or mixed there).
    """
    if precision not in PRECISIONS:
        raise RaveError(f'--precision {precision!r}: use one of {", ".join(PRECISIONS)}.')
    if precision == 'fp16' and device.type == 'cpu':
        warnings.warn('--precision fp16 is not supported on the CPU; computing in fp32 (bf16 and mixed are the fast '
                      'reduced precisions on CPUs).', stacklevel=2)
        return None
    return PRECISIONS[precision]


def _inputs_to_bf16(module: nn.Module, inputs: tuple) -> tuple:
    return tuple(value.to(torch.bfloat16) for value in inputs)


def _output_to_fp32(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def mixed_precision_copy(network: BacklitUNet) -> BacklitUNet:
    """A copy of ``network`` whose :data:`MIXED_BF16_LAYERS` hold bfloat16 weights, with one cast to bfloat16 where
    that run begins and one back to float32 where it ends (forward hooks, so that whole-image and tiled inference,
    which call the layers in pieces, both see the same precisions)."""
    mixed = copy.deepcopy(network)
    for name in MIXED_BF16_LAYERS:
        getattr(mixed, name).to(torch.bfloat16)
    getattr(mixed, MIXED_BF16_LAYERS[0]).register_forward_pre_hook(_inputs_to_bf16)
    getattr(mixed, MIXED_BF16_LAYERS[-1]).register_forward_hook(_output_to_fp32)
    return mixed


def prepare_network(network: BacklitUNet, precision: str = 'fp32') -> Tuple[BacklitUNet, Optional[torch.dtype]]:
    """The network as it runs fastest for ``precision`` on its device, and the autocast dtype to use.

    Always channels-last (converted in place; oneDNN and cuDNN convolutions avoid layout reorders then). bf16 on
    the CPU: a bfloat16 copy of the network (measured faster than autocast, which re-casts weights and keeps some
    ops in float32); on CUDA: autocast bf16/fp16. mixed: :func:`mixed_precision_copy` on any device.
    """
    device = next(network.parameters()).device
    dtype = autocast_dtype(precision, device)
    network = network.to(memory_format=torch.channels_last)
    if precision == 'mixed':
        return mixed_precision_copy(network), None
    if dtype is torch.bfloat16 and device.type == 'cpu':
        return copy.deepcopy(network).to(torch.bfloat16), None
    return network, dtype
