"""Option parsing and weights loading shared by the encoder sources (open_clip, timm, ARCH_REGISTRY modules)."""
import difflib
import os
from typing import Any, Callable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from rave_basicsr.guidance.frozen_encoder import PRECISIONS
from rave_basicsr.utils.checkpoint import read_state_dict
from rave_basicsr.utils.errors import RaveError

WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth')


def close_matches(name: str, choices: Sequence[str], n: int = 5) -> List[str]:
    """Up to ``n`` of ``choices`` that look like ``name`` (case-insensitive), for "did you mean" messages."""
    lowered = {c.lower(): c for c in choices}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[m] for m in matches]


def build_seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Build (on the CPU) under a fixed seed without disturbing the caller's random state: only the CPU generator
    is seeded and restored (``torch.manual_seed`` would also reseed every GPU's generator, which ``fork_rng``
    does not restore here, and a distributed run would lose its per-rank seeds)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build()


def parse_seed(opt: Mapping[str, Any], where: str) -> int:
    """Option ``seed`` (default 0): the seed of a random-init encoder, part of its identity."""
    seed = opt.get('seed', 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RaveError(f'{where}: option "seed" (random-init seed) must be an integer, got {seed!r}.')
    return seed


def parse_precision(opt: Mapping[str, Any], where: str) -> str:
    """Option ``precision`` (fp32, fp16 or bf16; default fp32): the dtype the frozen encoder runs in."""
    precision = opt.get('precision', 'fp32')
    if precision not in PRECISIONS:
        raise RaveError(f'{where}: option "precision" must be one of {list(PRECISIONS)}, got {precision!r}.')
    return precision


def looks_like_path(value: str) -> bool:
    """Whether an option value was meant as a file (then a missing file is reported as such, not as a bad tag)."""
    return os.sep in value or '/' in value or value.lower().endswith(WEIGHT_SUFFIXES)


def _mismatch_summary(model_state: Mapping[str, torch.Tensor], file_state: Mapping[str, torch.Tensor]) -> str:
    shapes = [k for k in model_state if k in file_state and tuple(model_state[k].shape) != tuple(file_state[k].shape)]
    missing = [k for k in model_state if k not in file_state]
    unexpected = [k for k in file_state if k not in model_state]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f'{len(shapes)} tensor(s) have other shapes (e.g. {k!r}: file {list(file_state[k].shape)}, '
                     f'model {list(model_state[k].shape)})')
    if missing:
        parts.append(f'{len(missing)} tensor(s) the model needs are missing (e.g. {missing[0]!r})')
    if unexpected:
        parts.append(f'{len(unexpected)} tensor(s) are not part of the model (e.g. {unexpected[0]!r})')
    return '; '.join(parts) or 'the tensors do not load'


def load_checked(module: nn.Module, path: str, what: str, loader: Optional[Callable[[], Any]] = None) -> None:
    """Load the weights file strictly; a misfit becomes a one-line RaveError naming the file, not a shape dump."""
    try:
        if loader is not None:
            loader()
        else:
            module.load_state_dict(read_state_dict(path), strict=True)
    except RaveError:
        raise
    except Exception:  # torch/open_clip raise RuntimeError, KeyError, UnpicklingError... for files that do not fit
        state = read_state_dict(path)  # a RaveError of its own when the file cannot be read at all
        raise RaveError(f'weights file {path!r} does not fit {what}: {_mismatch_summary(module.state_dict(), state)}. '
                        'Name the architecture these weights were trained for in the "model" option '
                        '(or the "network" block).') from None


def probe_embed_dim(net: nn.Module, size: int, dtype: torch.dtype, where: str) -> int:
    with torch.no_grad():
        out = net(torch.zeros(1, 3, size, size, dtype=dtype))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RaveError(f'{where}: the encoder network must map [B, 3, H, W] images to [B, D] embeddings, '
                        f'but it returned {shape} for a [1, 3, {size}, {size}] input.')
    return int(out.shape[1])
