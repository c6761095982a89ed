"""The enhancement network ready for inference: one object for ``rave enhance``, validation and ``basicsr test``.

An :class:`Enhancer` holds the network as it runs (prepared for its precision: channels-last, bfloat16 copies),
the precision and the device. :meth:`Enhancer.enhance` takes an N×3×H×W float image anywhere (host memory for
large photos), moves it tile by tile to the device and returns the float32 result where the image is. Large images
are tiled *exactly* (:mod:`rave_basicsr.inference.tiling`), so the result does not depend on the tile size.
"""
import contextlib
import math
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rave_basicsr.archs.backlit_unet_arch import BacklitUNet, divide_by_illumination
from rave_basicsr.inference.precision import DEFAULT_PRECISION, prepare_network, resolve_precision
from rave_basicsr.inference.tiling import HALO_FULL, overlapping_tiled_forward, tiled_forward
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.hardware import float32_math

#: images with more pixels than this are tiled when no tile size is given (bounds peak memory to about 1.5 GB)
AUTO_TILE_PIXELS = 1024 * 1024
AUTO_TILE = 1024 - 2 * HALO_FULL
#: the margin (px) of real neighbouring pixels around each tile of a network other than BacklitUNet
GENERIC_TILE_OVERLAP = 32


def resolve_tile(tile: Optional[int], height: int, width: int) -> int:
    """Tile size for an image: ``None`` picks :data:`AUTO_TILE` for images above :data:`AUTO_TILE_PIXELS`; 0 (or
    a tile covering the image) means one whole-image pass."""
    if tile is None:
        tile = AUTO_TILE if height * width > AUTO_TILE_PIXELS else 0
    if tile < 0:
        raise RaveError(f'--tile {tile}: must be 0 (no tiling) or a positive number of pixels.')
    return 0 if tile == 0 or (tile >= height and tile >= width) else tile


def size_multiple(network: nn.Module) -> int:
    """What the input's height and width must be a multiple of: the least common multiple of the ``window_size``
    of the network's modules (window attention: SwinIR, HAT), else 1."""
    sizes = []
    for module in network.modules():
        value = getattr(module, 'window_size', None)
        sizes += [int(v) for v in (value if isinstance(value, (tuple, list)) else [value]) if isinstance(v, int)]
    return math.lcm(*sizes) if sizes else 1


class Enhancer:
    """An enhancement network on a device at a compute precision (see :mod:`rave_basicsr.inference.precision`).

    ``Enhancer(network, precision)`` prepares the network for speed (it may convert it to channels-last in place
    or copy it); :meth:`for_model` wraps a network that is being trained as it is, in fp32. ``BacklitUNet`` is
    tiled exactly; any other network that maps an image to an image of the same size (a BasicSR arch) runs with
    overlapping tiles, its input padded to a multiple of its window size when it has one (SwinIR, HAT).
    """

    def __init__(self, network: nn.Module, precision: str = DEFAULT_PRECISION, prepare: bool = True) -> None:
        self.device = next(network.parameters()).device
        self.exact_tiling = isinstance(network, BacklitUNet)
        self.precision = resolve_precision(precision, self.device, backlit_unet=self.exact_tiling)
        self.size_multiple = size_multiple(network)
        if not prepare and self.precision not in ('fp32', 'tf32'):
            raise RaveError('an unprepared network runs in fp32 or tf32 only.')
        if not prepare:
            self.network, self.autocast_dtype = network, None
        elif self.exact_tiling:
            self.network, self.autocast_dtype = prepare_network(network.eval(), self.precision)
        else:
            self.network = network.eval()
            self.autocast_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(self.precision)

    @classmethod
    def for_model(cls, network: nn.Module) -> 'Enhancer':
        """The network a model trains, unchanged (no copy, no layout change), in fp32: for validation."""
        return cls(network, 'fp32', prepare=False)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def enhance(self, image: torch.Tensor, tile: Optional[int] = None, return_illumination: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Enhance an N×3×H×W float tensor in [0, 1]: float32 result (and illumination map, None for networks
        that have none) on the image's device.

        ``tile``: see :func:`resolve_tile`; for ``BacklitUNet`` tiling gives the whole-image result exactly. Float32
        means float32 on GPUs too (TF32 only with precision ``tf32``).
        """
        network = self.network
        was_training = network.training
        network.eval()
        try:
            tile = resolve_tile(tile, image.shape[-2], image.shape[-1])
            with float32_math(allow_tf32=self.precision == 'tf32'):
                if not self.exact_tiling:
                    enhanced = (overlapping_tiled_forward(self._run_generic, image, tile, GENERIC_TILE_OVERLAP,
                                                          align=self.size_multiple)
                                if tile else self._run_generic(image))
                    return (enhanced, None) if return_illumination else enhanced
                if tile:
                    return tiled_forward(network, image.float(), tile, device=self.device,
                                         autocast_dtype=self.autocast_dtype, return_illumination=return_illumination)
                source = image.to(device=self.device, dtype=torch.float32)
                compute = source.to(network.cond1.weight.dtype).contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    light = network.illumination(compute).float()
            enhanced = divide_by_illumination(source, light, network.division_eps).to(image.device)
            return (enhanced, light.to(image.device)) if return_illumination else enhanced
        finally:
            network.train(was_training)

    def _run_generic(self, region: torch.Tensor) -> torch.Tensor:
        """A network other than BacklitUNet on one region: padded to its size multiple, clamped to [0, 1]."""
        source = region.to(device=self.device, dtype=torch.float32)
        height, width = source.shape[-2:]
        pad_h, pad_w = -height % self.size_multiple, -width % self.size_multiple
        if pad_h or pad_w:
            source = F.pad(source, (0, pad_w, 0, pad_h), mode='replicate')
        with self._autocast():
            output = self.network(source)
        if output.shape[-2:] != source.shape[-2:]:
            raise RaveError(f'network {type(self.network).__name__} maps a {source.shape[-2]}x{source.shape[-1]} image '
                            f'to {output.shape[-2]}x{output.shape[-1]}; an enhancement network must keep the size '
                            '(e.g. upscale: 1).')
        return output[..., :height, :width].float().clamp(0, 1).to(region.device)

    def enhance_array(self, rgb: np.ndarray, tile: Optional[int] = None) -> np.ndarray:
        """Enhance an H×W×3 float array (RGB in [0, 1]); returns an H×W×3 float32 array."""
        array = np.asarray(rgb, dtype=np.float32)
        if array.ndim != 3 or array.shape[2] != 3:
            raise RaveError(f'expected an H×W×3 RGB array, got shape {array.shape}.')
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
        return self.enhance(tensor, tile)[0].permute(1, 2, 0).cpu().numpy()
