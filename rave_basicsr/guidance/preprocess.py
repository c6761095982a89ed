"""Differentiable preprocessing of [0, 1] image tensors for frozen image encoders.

The losses feed *enhanced* images to CLIP, so the preprocessing must be a tensor operation that gradients flow
through. The default reproduces the originals' loss path (``clip_score.py`` of both codes): squash-resize to the
encoder's input size, bilinear, ``align_corners=False``, no antialiasing, then CLIP's mean/std.
``resize: shorter_side_center_crop`` with ``interpolation: bicubic`` and ``antialias: true`` approximates the
standard CLIP PIL preprocess (bicubic resize of the shorter side + centre crop) that RAVE uses for its residual
embeddings. ``gamma`` (not in the originals, default 1) raises the resized images to that power before the
normalisation: above 1 a feature loss on the encoder prices a change of the highlights more and one of the shadows
less (on the identity encoder, docs/clip_lit.md, "Where the contrast push lands").
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from rave_basicsr.utils.errors import RaveError

#: OpenAI CLIP normalisation constants (open_clip.constants.OPENAI_DATASET_MEAN / _STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ('squash', 'shorter_side_center_crop')
INTERPOLATIONS = ('bilinear', 'bicubic')


@dataclass(frozen=True)
class PreprocessConfig:
    """How images in [0, 1] are turned into encoder input; see the module docstring for the defaults."""

    size: int = 224
    resize: str = 'squash'
    interpolation: str = 'bilinear'
    antialias: bool = False
    gamma: float = 1.0
    mean: Tuple[float, float, float] = field(default=CLIP_MEAN)
    std: Tuple[float, float, float] = field(default=CLIP_STD)

    def to_dict(self) -> Dict[str, Any]:
        """Plain, JSON-serialisable form (for logs and option round trips)."""
        return {'size': self.size, 'resize': self.resize, 'interpolation': self.interpolation,
                'antialias': self.antialias, 'gamma': self.gamma, 'mean': list(self.mean), 'std': list(self.std)}


def _triple(value: Any, key: str, where: str) -> Tuple[float, float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise RaveError(f'{where}: option {key!r} must be a list of three numbers (R, G, B), got {value!r}.')
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise RaveError(f'{where}: option {key!r} must be a list of three numbers (R, G, B), got {value!r}.') from None


def parse_preprocess(opt: Union[None, Mapping, PreprocessConfig], default_size: int = 224,
                     default_mean: Sequence[float] = CLIP_MEAN, default_std: Sequence[float] = CLIP_STD,
                     where: str = 'preprocess') -> PreprocessConfig:
    """Validate a ``preprocess`` option block; unspecified keys take the originals' loss-path defaults."""
    if isinstance(opt, PreprocessConfig):
        return opt
    opt = dict(opt or {})
    known = {'size', 'resize', 'interpolation', 'antialias', 'gamma', 'mean', 'std'}
    unknown = sorted(set(opt) - known)
    if unknown:
        raise RaveError(f'{where}: unknown option(s) {unknown}; known options are {sorted(known)}.')
    size = opt.get('size', default_size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise RaveError(f'{where}: option "size" must be a positive integer (pixels), got {size!r}.')
    resize = opt.get('resize', 'squash')
    if resize not in RESIZE_MODES:
        raise RaveError(f'{where}: option "resize" must be one of {list(RESIZE_MODES)}, got {resize!r}.')
    interpolation = opt.get('interpolation', 'bilinear')
    if interpolation not in INTERPOLATIONS:
        raise RaveError(f'{where}: option "interpolation" must be one of {list(INTERPOLATIONS)}, '
                        f'got {interpolation!r}.')
    antialias = opt.get('antialias', False)
    if not isinstance(antialias, bool):
        raise RaveError(f'{where}: option "antialias" must be true or false, got {antialias!r}.')
    gamma = opt.get('gamma', 1.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 1.0:
        raise RaveError(f'{where}: option "gamma" must be a number of at least 1 (below 1 the power\'s gradient at '
                        f'black is infinite), got {gamma!r}.')
    mean = _triple(opt.get('mean', default_mean), 'mean', where)
    std = _triple(opt.get('std', default_std), 'std', where)
    if min(std) <= 0:
        raise RaveError(f'{where}: option "std" must be positive, got {list(std)}.')
    return PreprocessConfig(size=size, resize=resize, interpolation=interpolation, antialias=antialias,
                            gamma=float(gamma), mean=mean, std=std)


def _resize(images: torch.Tensor, size: Tuple[int, int], cfg: PreprocessConfig) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    out = F.interpolate(images, size=size, mode=cfg.interpolation, align_corners=False, antialias=cfg.antialias)
    if cfg.interpolation == 'bicubic':
        # bicubic overshoots; PIL (which this mode approximates) stores uint8 and so clips to the valid range
        out = out.clamp(0.0, 1.0)
    return out


def preprocess_images(images01: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Resize and normalise ``[B, 3, H, W]`` images in [0, 1] for an encoder; differentiable w.r.t. the images."""
    if images01.dim() != 4 or images01.shape[1] != 3:
        raise RaveError(f'images for the encoder must be a [B, 3, H, W] tensor, got shape {list(images01.shape)}.')
    if not images01.is_floating_point():
        raise RaveError(f'images for the encoder must be a float tensor in [0, 1], got dtype {images01.dtype}.')
    height, width = images01.shape[-2:]
    if cfg.resize == 'squash':
        out = _resize(images01, (cfg.size, cfg.size), cfg)
    else:
        # torchvision Resize(int): the shorter side becomes `size`, the longer one int(size * long / short)
        if height <= width:
            new_hw = (cfg.size, int(cfg.size * width / height))
        else:
            new_hw = (int(cfg.size * height / width), cfg.size)
        out = _resize(images01, new_hw, cfg)
        # torchvision center_crop offsets: int(round((dim - size) / 2))
        top = int(round((new_hw[0] - cfg.size) / 2.0))
        left = int(round((new_hw[1] - cfg.size) / 2.0))
        out = out[..., top:top + cfg.size, left:left + cfg.size]
    if cfg.gamma != 1.0:
        out = out.clamp(0.0, 1.0).pow(cfg.gamma)
    mean = torch.tensor(cfg.mean, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
    return (out - mean) / std

