"""Files the plugin keeps: its cache folder, and the SHA-256 that identifies a weights file."""
import hashlib
import os
from pathlib import Path
from typing import Dict, Tuple, Union

_SHA256_CACHE: Dict[Tuple[str, int, int], str] = {}


def rave_cache_dir() -> Path:
    """The plugin's download and embedding cache: ``$RAVE_CACHE_DIR``, else ``~/.cache/rave_basicsr``."""
    root = os.environ.get('RAVE_CACHE_DIR')
    return Path(root).expanduser() if root else Path.home() / '.cache' / 'rave_basicsr'


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks; remembered per path, size and modification time
    (encoder identities hash the same weights file many times)."""
    path = os.path.realpath(os.fspath(path))
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, 'rb') as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b''):
                digest.update(chunk)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]
