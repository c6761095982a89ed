"""One way to read an image set, whether it is a folder or an LMDB: datasets and the residual toolkit use it.

Bytes come through BasicSR's :class:`~basicsr.utils.FileClient` (``disk`` or ``lmdb``) and are decoded with
:func:`rave_basicsr.utils.image_io.decode_image`, so every format OpenCV reads, grey, palette, alpha and 16-bit
images come out the same way: float32 RGB in [0, 1] with alpha apart.

An LMDB is BasicSR's layout: PNG values, ``meta_info.txt`` with one ``{key}.png (h,w,c) level`` line per image,
plus (when built by :mod:`rave_basicsr.data.lmdb_util`) ``key_names.tsv`` mapping keys back to the original
file names. LMDBs built by BasicSR's own tools have no table; their images are then named ``{key}.png``.
"""
import os
from typing import Dict, List, Optional

from basicsr.utils import FileClient

from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.image_io import IMAGE_EXTENSIONS, DecodedImage, decode_image, is_image_file

META_INFO_FILE = 'meta_info.txt'
KEY_NAMES_FILE = 'key_names.tsv'

#: open LMDB clients of this process, by real path: the ``lmdb`` package refuses to open one database twice
#: in a process, so every source of the same LMDB shares one client
_LMDB_CLIENTS: Dict[str, object] = {}


def lmdb_client(dataroot: str, backend_opt: Optional[dict] = None):
    """This process's BasicSR ``FileClient`` for an LMDB (client key ``default``), opened on first use."""
    key = os.path.realpath(dataroot)
    client = _LMDB_CLIENTS.get(key)
    if client is None:
        client = FileClient('lmdb', db_paths=[dataroot], client_keys=['default'], **(backend_opt or {}))
        _LMDB_CLIENTS[key] = client
    return client


def close_lmdb(dataroot: Optional[str] = None) -> None:
    """Close this process's client of one LMDB (all when ``dataroot`` is None), e.g. before replacing it."""
    keys = list(_LMDB_CLIENTS) if dataroot is None else [os.path.realpath(dataroot)]
    for key in keys:
        client = _LMDB_CLIENTS.pop(key, None)
        if client is not None:
            for env in client.client._client.values():
                env.close()


_DISK_CLIENT = FileClient('disk')  # stateless


# A forked data-loader worker must not use its parent's environments (LMDB forbids it), and the lmdb package
# would refuse to open them again while the inherited handles exist: the child closes its copies first.
os.register_at_fork(after_in_child=close_lmdb)


def is_lmdb_root(dataroot: str, io_backend: Optional[dict] = None) -> bool:
    """An LMDB is a path ending in ``.lmdb`` or one named with ``io_backend: {type: lmdb}``."""
    backend = (io_backend or {}).get('type', 'disk')
    return backend == 'lmdb' or str(dataroot).rstrip('/\\').endswith('.lmdb')


def list_image_files(folder: str, recursive: bool = False) -> List[str]:
    """Paths relative to ``folder`` (``/``-separated) of its image files, sorted; hidden files are skipped."""
    if not os.path.isdir(folder):
        raise RaveError(f'{folder}: image folder not found (check the dataroot option or the path).')
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.')) if recursive else []
        for name in files:
            if not name.startswith('.') and is_image_file(name):
                names.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/'))
    return sorted(names)


def read_lmdb_keys(lmdb_root: str) -> List[str]:
    """Keys listed in an LMDB's ``meta_info.txt``, in file order (BasicSR's rule: the part before the first dot)."""
    meta_path = os.path.join(lmdb_root, META_INFO_FILE)
    if not os.path.isdir(lmdb_root):
        raise RaveError(f'{lmdb_root}: LMDB folder not found (build it with `rave prepare-lmdb`).')
    if not os.path.isfile(meta_path):
        raise RaveError(f'{lmdb_root}: no {META_INFO_FILE}; this is not a complete LMDB image set '
                        '(an interrupted build?). Rebuild it with `rave prepare-lmdb --overwrite`.')
    with open(meta_path, encoding='utf-8') as handle:
        keys = [line.split()[0].split('.')[0] for line in handle if line.strip()]
    return keys


def read_key_names(lmdb_root: str) -> Dict[str, str]:
    """The key-to-file-name table of an LMDB (empty when it has none)."""
    path = os.path.join(lmdb_root, KEY_NAMES_FILE)
    if not os.path.isfile(path):
        return {}
    table = {}
    with open(path, encoding='utf-8') as handle:
        for number, line in enumerate(handle):
            line = line.rstrip('\n')
            if number == 0 or not line:
                continue  # header
            key, sep, name = line.partition('\t')
            if not sep:
                raise RaveError(f'{path}: line {number + 1} is not "key<TAB>name"; rebuild the LMDB.')
            table[key] = name
    return table


class ImageSource:
    """The images of a folder or an LMDB, in a stable sorted order, read and decoded on demand.

    Folder names are paths relative to the folder; LMDB names are the original file names from the key table.
    The LMDB environment opens lazily in the process that reads (one per data-loader worker), as BasicSR does.
    """

    def __init__(self, dataroot: str, io_backend: Optional[dict] = None, recursive: bool = False):
        self.dataroot = str(dataroot)
        self.is_lmdb = is_lmdb_root(self.dataroot, io_backend)
        self._backend_opt = {k: v for k, v in (io_backend or {}).items() if k != 'type'}
        if self.is_lmdb:
            self._lmdb_keys = read_lmdb_keys(self.dataroot)
            table = read_key_names(self.dataroot)
            names = [table.get(key, f'{key}.png') for key in self._lmdb_keys]
            order = sorted(range(len(names)), key=lambda i: names[i])
            self._lmdb_keys = [self._lmdb_keys[i] for i in order]
            self.keys = [names[i] for i in order]
        else:
            self.keys = list_image_files(self.dataroot, recursive=recursive)
        if not self.keys:
            if self.is_lmdb:
                what = 'the LMDB lists no images in its meta_info.txt'
            elif not os.listdir(self.dataroot):
                what = 'the folder is empty'
            else:
                what = f'the folder has no image files ({", ".join(IMAGE_EXTENSIONS)}' + \
                    ('; sub-folders searched)' if recursive else '; sub-folders need the recursive option)')
            raise RaveError(f'{self.dataroot}: {what}. Point the option at a folder of images.')

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, index: int) -> str:
        """The image's file name (relative to the folder, or its original name in the LMDB)."""
        return self.keys[index]

    def stem(self, index: int) -> str:
        """The name without its extension: what paired sets match on."""
        return os.path.splitext(self.keys[index])[0]

    def path(self, index: int) -> str:
        """A path naming the image: the file itself, or ``<lmdb>/<original name>`` for an LMDB."""
        return os.path.join(self.dataroot, self.keys[index])

    def lmdb_key(self, index: int) -> str:
        """The LMDB key of an image (LMDB sources only)."""
        if not self.is_lmdb:
            raise RaveError(f'{self.dataroot} is a folder, not an LMDB: its images have no keys.')
        return self._lmdb_keys[index]

    def read_bytes(self, index: int) -> bytes:
        """The encoded bytes of one image; a key missing from the LMDB raises :class:`RaveError`."""
        if self.is_lmdb:
            key = self._lmdb_keys[index]
            data = lmdb_client(self.dataroot, self._backend_opt).get(key, 'default')
            if data is None:
                raise RaveError(f'{self.dataroot}: key "{key}" ({self.keys[index]}) is listed in '
                                f'{META_INFO_FILE} but missing from the database; rebuild it with '
                                '`rave prepare-lmdb --overwrite` (and check it with --verify).')
            return bytes(data)
        try:
            return _DISK_CLIENT.get(self.path(index))
        except OSError as exc:
            raise RaveError(f'{self.path(index)}: cannot be read ({exc.strerror}).') from None

    def read(self, index: int) -> DecodedImage:
        """Decode one image; errors name the file (or the LMDB and key)."""
        return self.decode(index, self.read_bytes(index))

    def decode(self, index: int, data: bytes) -> DecodedImage:
        """Decode the bytes :meth:`read_bytes` returned for image ``index`` (thread-safe: no I/O, and OpenCV
        releases the interpreter lock while it decodes)."""
        label = self.path(index) if not self.is_lmdb else f'{self.dataroot} [key {self._lmdb_keys[index]}: ' \
            f'{self.keys[index]}]'
        return decode_image(data, name=label)

    def check_all(self) -> None:
        """Read every image and raise one :class:`RaveError` listing all that cannot be decoded."""
        problems = []
        for index in range(len(self)):
            try:
                self.read(index)
            except RaveError as exc:
                problems.append(str(exc))
        if problems:
            raise RaveError(f'{len(problems)} of {len(self)} images in {self.dataroot} cannot be read:\n  ' +
                            '\n  '.join(problems) + '\nRemove or replace them.')

