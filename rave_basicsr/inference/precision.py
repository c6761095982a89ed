"""Compute precisions of the enhancement network at inference, and the network copies that implement them.

- ``auto`` (default): ``mixed`` where the device computes bfloat16 natively (CPUs with AVX512_BF16 or AMX, Arm
  CPUs with BF16, Ampere and newer GPUs), ``fp32`` elsewhere: on an AVX2 CPU bfloat16 is emulated, and ``mixed``
  was measured 8x *slower* than fp32 there (1024x768 on 2 cores: 43.2 s against 5.2 s).
- ``fp32``: true float32 throughout (the reference). On GPUs TF32 is switched off for it: cuDNN convolutions default
  to TF32 on Ampere and newer, which keeps 10 mantissa bits.
- ``tf32``: float32 storage with TF32 tensor-core arithmetic (GPUs from Ampere on; on the CPU the same as fp32).
- ``bf16``: bfloat16 throughout (a bfloat16 copy of the network on the CPU, autocast on CUDA). The fastest, but
  the output moves by up to about 1.7 grey levels (of 255) from fp32.
- ``mixed``: bfloat16 for the middle of the network, from the first residual block to ``condy`` (86% of the
  multiply-adds), float32 at both ends. The ends are where bfloat16 hurts: the input convolution sees 8-bit pixel
  values that bfloat16 cannot hold exactly, and the rounding errors of the last five convolutions reach the
  illumination map directly and are amplified by ``I / L`` where ``L`` is small (the dark subject). Measured on the
  six real photos of the shared data: at most 0.61 grey levels from fp32, so the 8-bit output is within one grey
  level of the fp32 output (the tolerance of the parity with the official outputs) at nearly bf16 speed.
- ``fp16``: float16 autocast, CUDA only (CPUs have no fast float16; it falls back to fp32 there with a warning).

In every precision the network's pyramid pooling averages in float32 (see ``PyramidPooling``).

A precision the hardware only emulates (bf16 or mixed without native bfloat16) still runs, with a warning.
``I / L`` is always computed in float32 from the float32 image.
"""
import copy
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from rave_basicsr.archs.backlit_unet_arch import BacklitUNet
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.hardware import native_bf16

PRECISIONS = ('auto', 'fp32', 'tf32', 'mixed', 'bf16', 'fp16')
#: the precision of ``rave enhance`` and :class:`~rave_basicsr.inference.enhancer.Enhancer` when none is given
DEFAULT_PRECISION = 'auto'
#: the contiguous run of layers (in forward order) that the ``mixed`` precision computes in bfloat16
MIXED_BF16_LAYERS = ('ResidualBlock1', 'ResidualBlock2', 'PPM1', 'condx', 'ResidualBlock3', 'ResidualBlock4',
                     'condy')


def resolve_precision(precision: str, device: torch.device, backlit_unet: bool = True) -> str:
    """The precision to run: ``auto`` becomes ``mixed`` or ``fp32`` (see the module docstring); fp16 on the CPU
    becomes fp32; emulated bfloat16 and CPU TF32 are run as asked, with a warning. ``mixed`` is defined for
    ``BacklitUNet`` only (``backlit_unet=False``: other networks, whose ``auto`` is fp32)."""
    if precision not in PRECISIONS:
        raise RaveError(f'--precision {precision!r}: use one of {", ".join(PRECISIONS)}.')
    if precision == 'auto':
        return 'mixed' if backlit_unet and native_bf16(device) else 'fp32'
    if precision == 'mixed' and not backlit_unet:
        raise RaveError('--precision mixed is defined for BacklitUNet (bfloat16 in the middle of its layers); use '
                        'fp32, tf32, bf16 or fp16 for other networks.')
    if precision == 'fp16' and device.type == 'cpu':
        warnings.warn('--precision fp16 is not supported on the CPU; computing in fp32 (bf16 and mixed are the fast '
                      'reduced precisions on CPUs that have native bfloat16).', stacklevel=2)
        return 'fp32'
    if precision in ('bf16', 'mixed') and not native_bf16(device):
        hardware = 'this GPU' if device.type == 'cuda' else 'this CPU'
        warnings.warn(f'--precision {precision}: {hardware} has no native bfloat16 and emulates it, which is several '
                      'times slower than fp32; --precision auto picks fp32 on such hardware.', stacklevel=2)
    if precision == 'tf32' and device.type != 'cuda':
        warnings.warn('--precision tf32 is a GPU mode (Ampere and newer); computing in fp32 on the CPU.', stacklevel=2)
        return 'fp32'
    return precision


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


def prepare_network(network: BacklitUNet, precision: str) -> Tuple[BacklitUNet, Optional[torch.dtype]]:
    """The network as it runs fastest for a resolved ``precision`` (not ``auto``) on its device, and the autocast
    dtype to use.

    Channels-last (oneDNN and cuDNN convolutions avoid layout reorders then; converted in place). bf16 on the CPU:
    a bfloat16 copy of the network (measured faster than autocast, which re-casts weights and keeps some ops in
    float32); on CUDA: autocast bf16/fp16. mixed: :func:`mixed_precision_copy` on any device.
    """
    device = next(network.parameters()).device
    network = network.to(memory_format=torch.channels_last)
    if precision == 'mixed':
        return mixed_precision_copy(network), None
    if precision == 'bf16':
        if device.type == 'cpu':
            return copy.deepcopy(network).to(torch.bfloat16), None
        return network, torch.bfloat16
    if precision == 'fp16':
        return network, torch.float16
    return network, None
