"""Enhancement-network weights by name, by official file or by BasicSR checkpoint.

The eight released networks are known by name and downloaded on first use from their public addresses into a
cache folder (``$RAVE_CACHE_DIR``, else ``~/.cache/rave_basicsr``), verified by SHA-256 so that a corrupted or
substituted file is never used. Everything is read with ``weights_only=True`` (:func:`torch_load_safe`).
"""
import os
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.checkpoint import state_dict_from_checkpoint, torch_load_safe
from rave_basicsr.utils.file_io import file_sha256, rave_cache_dir

_RAVE_URL = 'https://github.com/Atmyre/RAVE/raw/main/pretrained_models/{}'
_CLIP_LIT_URL = 'https://github.com/ZhexinLiang/CLIP-LIT/raw/main/pretrained_models/enhancement_model.pth'

#: the weights ``rave enhance`` uses when none are given
DEFAULT_WEIGHTS = 'rave_unpaired'
#: seconds to wait for the download server before giving up (offline machines fail fast)
DOWNLOAD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class OfficialWeights:
    """A released enhancement network: where it is published and its SHA-256."""
    name: str
    url: str
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return f'{self.name}.pth'


OFFICIAL_WEIGHTS: Dict[str, OfficialWeights] = OrderedDict((w.name, w) for w in [
    OfficialWeights('rave_unpaired', _RAVE_URL.format('rave_unpaired.pth'),
                    '21fb43004af7de2e1782b5799fbaa91dc62ca2730134229323bceab53370742c', 'RAVE, unpaired training'),
    OfficialWeights('rave_paired', _RAVE_URL.format('rave_paired.pth'),
                    '3d4e27eecbde9b55d2ef96afadc8cf4c2d0927fb8780ce1df6508d01a7ef811f', 'RAVE, paired training'),
    OfficialWeights('rave_unpaired_shifted', _RAVE_URL.format('rave_unpaired_shifted.pth'),
                    '5bcf3feff7dcc4891be878721c2defba0305e343c6b3821f9e88a9950c06ae5e',
                    'RAVE, unpaired, residual shifted (bias-corrected)'),
    OfficialWeights('clip_lit_latent_unpaired', _RAVE_URL.format('clip_lit_latent_unpaired.pth'),
                    '931966b5cbc3320d90a62c9ee7c820e0d291d7abfb85989b8296458e2354f94e',
                    'CLIP-LIT-Latent, unpaired training'),
    OfficialWeights('clip_lit_latent_paired', _RAVE_URL.format('clip_lit_latent_paired.pth'),
                    '8bc9d8882837dbee3d266f4407478f63220174cd5838fbcadf2f4b2c070146ec',
                    'CLIP-LIT-Latent, paired training'),
    OfficialWeights('clip_lit_unpaired', _RAVE_URL.format('clip_lit_unpaired.pth'),
                    '7b16e3815c1380138ada75ca5000f818db4462c27f4522a1de46023d96c09d0d',
                    'CLIP-LIT retrained by the RAVE authors, unpaired'),
    OfficialWeights('clip_lit_paired', _RAVE_URL.format('clip_lit_paired.pth'),
                    '5c3e14b3674d516190e77e54614476fe19ac91b9d8419c0c25533e573ff65d2d',
                    'CLIP-LIT retrained by the RAVE authors, paired'),
    OfficialWeights('clip_lit_official', _CLIP_LIT_URL,
                    '67aa1bdbac345842670e494b02953f299e5088bcb3f98a18bd60b06fef48b5c9',
                    'CLIP-LIT as released by its authors (enhancement_model.pth)'),
])


def cache_dir() -> Path:
    """Where downloaded weights are kept: ``$RAVE_CACHE_DIR``, else ``~/.cache/rave_basicsr``."""
    return rave_cache_dir()


def _download(weights: OfficialWeights, target: Path, timeout: float) -> None:
    """Download to a temporary file beside ``target``, check the digest, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f'.{target.name}.{os.getpid()}.part')
    hint = (f'Download {weights.url} yourself and pass the file with --weights /path/to/{weights.filename} (or put '
            f'it at {target}).')
    try:
        with urllib.request.urlopen(weights.url, timeout=timeout) as response, open(temporary, 'wb') as handle:
            for chunk in iter(lambda: response.read(1 << 20), b''):
                handle.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        if temporary.exists():
            temporary.unlink()
        reason = getattr(exc, 'reason', None) or exc
        raise RaveError(f'cannot download the {weights.name!r} weights ({reason}); this machine may be offline. '
                        + hint) from None
    digest = file_sha256(temporary)
    if digest != weights.sha256:
        temporary.unlink()
        raise RaveError(f'the download of {weights.name!r} from {weights.url} has SHA-256 {digest}, expected '
                        f'{weights.sha256}; it was discarded. ' + hint)
    os.replace(temporary, target)


def resolve_weights(name: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The local path of official weights ``name``, downloaded into :func:`cache_dir` when missing or damaged."""
    if name not in OFFICIAL_WEIGHTS:
        raise RaveError(f'unknown weights name {name!r}; known names: {", ".join(OFFICIAL_WEIGHTS)}, or a path to '
                        'a .pth file.')
    weights = OFFICIAL_WEIGHTS[name]
    target = cache_dir() / weights.filename
    if target.is_file() and file_sha256(target) == weights.sha256:
        return target
    _download(weights, target, timeout)
    return target


def load_enhancement_state_dict(spec: Union[str, os.PathLike]) -> 'OrderedDict[str, torch.Tensor]':
    """The enhancement network's state dict from an official name, an official ``.pth`` or a BasicSR checkpoint."""
    text = os.fspath(spec)
    path = Path(text)
    if text in OFFICIAL_WEIGHTS and not path.is_file():
        path = resolve_weights(text)
    elif not path.is_file():
        raise RaveError(f'weights {text!r}: no such file, and not a known name ({", ".join(OFFICIAL_WEIGHTS)}).')
    return state_dict_from_checkpoint(torch_load_safe(path), str(path))


def check_state_dict_matches(network: torch.nn.Module, state: dict, source: str) -> None:
    """Raise a :class:`RaveError` naming the missing, unexpected and wrongly shaped keys, if any."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f'{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})' for k in expected
             if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (('wrong shape', wrong), ('missing', missing), ('unexpected', unexpected)):
            if keys:
                shown = ', '.join(keys[:6]) + (f' and {len(keys) - 6} more' if len(keys) > 6 else '')
                parts.append(f'{label}: {shown}')
        hint = (' If it was trained with another network_g, pass that option file with --network FILE.'
                if isinstance(network, _backlit_unet()) else '')
        raise RaveError(f'{source} does not fit the enhancement network ({type(network).__name__}): '
                        f'{"; ".join(parts)}.{hint}')


def _backlit_unet():
    from rave_basicsr.archs.backlit_unet_arch import BacklitUNet

    return BacklitUNet


def experiment_network(spec: Union[str, os.PathLike]) -> Optional[dict]:
    """The ``network_g`` block of the BasicSR experiment a checkpoint belongs to (``experiments/<name>/models/
    net_g_*.pth``: BasicSR copies the option file to ``experiments/<name>/``), or None."""
    from rave_basicsr.utils.options import load_option_file

    path = Path(os.fspath(spec))
    if path.parent.name != 'models' or not path.is_file():
        return None
    option_files = sorted(path.parent.parent.glob('*.yml'), key=lambda p: p.stat().st_mtime)
    if not option_files:
        return None
    block = load_option_file(str(option_files[-1])).get('network_g')
    return dict(block) if isinstance(block, dict) else None


def load_enhancement_network(spec: Union[str, os.PathLike], outer_padding: str = 'reflect', division_eps: float = 0.0,
                             device: Optional[Union[str, torch.device]] = None,
                             network_opt: Optional[dict] = None) -> torch.nn.Module:
    """The enhancement network in eval mode with weights ``spec``: a :class:`BacklitUNet` (defaults reproduce the
    official inference), or the network a ``network_g`` block describes (``network_opt``; by default the one of
    the BasicSR experiment ``spec`` comes from), for any other registered arch."""
    from basicsr.archs import build_network

    network_opt = network_opt if network_opt is not None else experiment_network(spec)
    if network_opt is None or network_opt.get('type') == 'BacklitUNet':
        network = _backlit_unet()(outer_padding=outer_padding, division_eps=division_eps)
    else:
        try:
            network = build_network(dict(network_opt))
        except (KeyError, TypeError) as exc:
            raise RaveError(f'network_g {network_opt}: cannot be built ({exc}); check the option file that '
                            'describes it (--network).') from None
    state = load_enhancement_state_dict(spec)
    check_state_dict_matches(network, state, f'weights {os.fspath(spec)!r}')
    network.load_state_dict(state)
    network.eval().requires_grad_(False)
    return network.to(device) if device is not None else network
