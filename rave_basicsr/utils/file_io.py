"""Atomic checkpoint writing and safe checkpoint reading.

Every checkpoint the plugin writes goes through :func:`torch_save_atomic` (temporary file in the same folder,
fsync, rename), so an interrupted save never leaves a truncated file under the final name. Every checkpoint it
reads goes through :func:`torch_load_safe`, which uses ``weights_only=True`` and turns the refusal of a pickled
object into a message that says what to do.
"""
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

from rave_basicsr.utils.errors import RaveError


def torch_save_atomic(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` to ``path`` atomically (the parent folder is created)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(handle, 'wb') as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def torch_load_safe(path: Union[str, os.PathLike], map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors for missing, corrupt or pickled files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RaveError(f'checkpoint {path!r} does not exist.')
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


def rave_cache_dir() -> Path:
    """The plugin's download and embedding cache: ``$RAVE_CACHE_DIR``, else ``~/.cache/rave_basicsr``."""
    root = os.environ.get('RAVE_CACHE_DIR')
    return Path(root).expanduser() if root else Path.home() / '.cache' / 'rave_basicsr'


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()
