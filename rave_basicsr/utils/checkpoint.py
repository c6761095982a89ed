"""Checkpoints: atomic writes, safe reads, and the one reader of network weights files.

Every checkpoint the plugin writes goes through :func:`torch_save_atomic` (temporary file in the same folder,
fsync, rename), so an interrupted save never leaves a truncated file under the final name; networks are saved in
BasicSR's layout by :func:`save_networks`. Every checkpoint it reads goes through :func:`torch_load_safe`, which
uses ``weights_only=True`` and turns the refusal of a pickled object into a message that says what to do. Weights
files of any origin (official ``.pth``, BasicSR checkpoints, timm / open_clip ``.safetensors``) become a plain
state dict through :func:`read_state_dict`.
"""
import errno
import os
import tempfile
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Union

import torch

from rave_basicsr.utils.errors import RaveError

#: how a torch.save file begins: a zip archive (PyTorch >= 1.6) or a pickle (older files)
TORCH_ZIP_MAGIC, PICKLE_MAGIC = b'PK\x03\x04', b'\x80'
#: the first bytes of PNG, JPEG, TIFF and WebP/RIFF files (for the message when an image is given as weights)
IMAGE_MAGICS = (b'\x89PNG', b'\xff\xd8\xff\xe0', b'\xff\xd8\xff\xe1', b'\xff\xd8\xff\xdb', b'II*\x00', b'MM\x00*',
                b'RIFF')
#: where checkpoints nest their state dict, in the order they are preferred (BasicSR prefers the EMA weights)
STATE_DICT_KEYS = ('params_ema', 'params', 'state_dict', 'model')


class CheckpointWriteError(RaveError):
    """A checkpoint could not be written (disk full, no permission...); nothing that was saved before changed."""


def torch_save_atomic(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` to ``path`` atomically (the parent folder is created). A failed write (a full disk) removes
    its temporary file and raises :class:`CheckpointWriteError`: ``path`` and every earlier file stay as they were."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
    except OSError as exc:
        raise CheckpointWriteError(f'cannot write {path}: {exc.strerror or exc}.') from None
    try:
        with os.fdopen(handle, 'wb') as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        reason = 'the disk is full' if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CheckpointWriteError(f'cannot write {path} ({reason}); it was not written and nothing saved before '
                                   'was changed.') from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def torch_load_safe(path: Union[str, os.PathLike], map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors for missing, corrupt or pickled files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RaveError(f'checkpoint {path!r} does not exist.')
    with open(path, 'rb') as stream:
        head = stream.read(4)
    if not (head.startswith(TORCH_ZIP_MAGIC) or head[:1] == PICKLE_MAGIC):
        kind = 'an empty file' if not head else 'an image' if head[:4] in IMAGE_MAGICS else 'some other file'
        raise RaveError(f'{path!r} is not a PyTorch checkpoint (it is {kind}); give a .pth / .pt file written by '
                        'torch.save (a released network, or experiments/<name>/models/net_g_*.pth).')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        text = str(exc)
        if 'Weights only load failed' in text or 'weights_only' in text:
            raise RaveError(f'checkpoint {path!r} contains pickled Python objects, which are refused for safety '
                            '(torch.load with weights_only=True). If you trust its source, re-save only its '
                            'tensors: torch.save(state_dict, "clean.pth") from a trusted session.') from None
        raise RaveError(f'checkpoint {path!r} cannot be read ({type(exc).__name__}): it is corrupt, truncated or '
                        'not a PyTorch checkpoint.') from None


def strip_module_prefix(state: Mapping[str, Any]) -> 'OrderedDict[str, Any]':
    """Keys without the ``module.`` prefix that DataParallel / DistributedDataParallel add."""
    return OrderedDict((key[7:] if key.startswith('module.') else key, value) for key, value in state.items())


def state_dict_from_checkpoint(checkpoint: Any, source: str) -> 'OrderedDict[str, torch.Tensor]':
    """The network state dict inside a loaded checkpoint: a raw state dict, or the first of
    :data:`STATE_DICT_KEYS` that holds one; non-tensor entries dropped, ``module.`` stripped."""
    if not isinstance(checkpoint, Mapping):
        raise RaveError(f'{source}: expected a state dict or a BasicSR checkpoint, found {type(checkpoint).__name__}.')
    for key in STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise RaveError(f'{source}: contains no tensors (keys: {", ".join(map(str, list(checkpoint)[:8]))}); '
                        'expected a state dict or a BasicSR checkpoint with "params".')
    return strip_module_prefix(tensors)


def read_state_dict(path: Union[str, os.PathLike]) -> 'OrderedDict[str, torch.Tensor]':
    """A state dict from a ``.safetensors`` or torch file (``weights_only``), unwrapped and without ``module.``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RaveError(f'weights file {path!r} does not exist.')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            loaded = load_file(path, device='cpu')
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise RaveError(f'weights file {path!r} cannot be read as safetensors ({exc}).') from None
        return state_dict_from_checkpoint(loaded, f'weights file {path!r}')
    return state_dict_from_checkpoint(torch_load_safe(path), f'weights file {path!r}')


def save_networks(path: Union[str, os.PathLike], networks: Dict[str, torch.nn.Module]) -> None:
    """Save ``{param_key: network}`` in BasicSR's checkpoint layout (``{'params': state_dict, ...}``), atomically,
    with CPU tensors and no ``module.`` prefix (loadable anywhere, with or without DDP)."""
    torch_save_atomic({key: strip_module_prefix({name: value.cpu().contiguous()
                                                 for name, value in network.state_dict().items()})
                       for key, network in networks.items()}, path)


def save_basicsr_network(model: Any, net: Union[torch.nn.Module, List[torch.nn.Module]], net_label: str,
                         current_iter: int, param_key: Union[str, List[str]] = 'params') -> None:
    """BasicSR's ``BaseModel.save_network`` (``models/{label}_{iter|latest}.pth``, same layout), written atomically by
    rank 0 only and raising on failure (BasicSR's own retries end by ignoring the error, which loses work)."""
    from basicsr.utils.dist_util import get_dist_info

    if get_dist_info()[0] != 0:
        return
    nets = net if isinstance(net, list) else [net]
    keys = param_key if isinstance(param_key, list) else [param_key]
    if len(nets) != len(keys):
        raise ValueError('save_network needs one param_key per network.')
    label = 'latest' if current_iter == -1 else current_iter
    save_networks(os.path.join(model.opt['path']['models'], f'{net_label}_{label}.pth'),
                  {key: model.get_bare_model(one) for key, one in zip(keys, nets)})
