"""Image folders to LMDB in BasicSR's on-disk layout, without the traps of ``basicsr.utils.lmdb_util``.

Layout (BasicSR's, so its readers work too): every image PNG-encoded under an ASCII key, and ``meta_info.txt``
with one ``{key}.png (h,w,c) {compress_level}`` line per image. Added: ``key_names.tsv`` (``key<TAB>file name``)
so that names which cannot be keys (non-ASCII, dots, spaces) map back to the original file names.

Compared with BasicSR's ``make_lmdb_from_imgs``: an existing target is an error (or replaced with
``overwrite=True``) instead of ``sys.exit``; parent folders are created; the map size is bounded from every
image's size, not guessed from the first; unsafe names get safe keys; paired LMDBs share one key set by
construction; 16-bit images stay 16-bit and EXIF orientation is applied before re-encoding.

A build writes into ``<target>.partial`` and writes ``meta_info.txt`` last, then renames the folder to the
target: an interrupted build never leaves a folder that looks like a complete LMDB (a leftover ``.partial`` is
removed by the next build).
"""
import hashlib
import os
import re
import shutil
from collections import Counter
from typing import Dict, List, Sequence

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from rave_basicsr.data.image_source import KEY_NAMES_FILE, META_INFO_FILE, ImageSource, close_lmdb, \
    read_key_names, read_lmdb_keys
from rave_basicsr.data.paired_backlit_dataset import match_by_stem
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.image_io import DecodedImage

PARTIAL_SUFFIX = '.partial'
_SAFE_KEY = re.compile(r'^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$')


def safe_key(name: str) -> str:
    """``name`` itself when it is a safe LMDB key (ASCII letters, digits, ``_``, ``-``, ``/``), else an ASCII
    rendering of it plus a hash of the full name (stable across runs, distinct for distinct names)."""
    if _SAFE_KEY.match(name):
        return name
    readable = re.sub(r'[^A-Za-z0-9_\-]+', '_', name).strip('_')[:60] or 'image'
    return f'{readable}_{hashlib.sha1(name.encode("utf-8")).hexdigest()[:12]}'


def assign_keys(names: Sequence[str]) -> List[str]:
    """One key per file name: its safe stem, or its safe full name when two files share a stem."""
    stems = [os.path.splitext(name)[0] for name in names]
    counts = Counter(stems)
    keys = [safe_key(stem if counts[stem] == 1 else name) for stem, name in zip(stems, names)]
    _check_unique(keys, names)
    return keys


def _check_unique(keys: Sequence[str], names: Sequence[str]) -> None:
    seen = {}
    for key, name in zip(keys, names):
        if key in seen:
            raise RaveError(f'"{seen[key]}" and "{name}" map to the same LMDB key "{key}"; rename one of them.')
        seen[key] = name


def png_bytes(image: DecodedImage, compress_level: int) -> bytes:
    """PNG bytes of a decoded image at its own bit depth, alpha kept (BGR[A] order, as BasicSR stores)."""
    scale, dtype = (65535.0, np.uint16) if image.bit_depth == 16 else (255.0, np.uint8)
    planes = image.rgb[:, :, ::-1]
    if image.alpha is not None:
        planes = np.concatenate([planes, image.alpha[:, :, None]], axis=2)
    array = np.round(np.clip(planes, 0, 1) * scale).astype(dtype)
    ok, buffer = cv2.imencode('.png', array, [cv2.IMWRITE_PNG_COMPRESSION, int(compress_level)])
    if not ok:
        raise RaveError('cannot encode an image as PNG.')
    return buffer.tobytes()


def _size_bound(path: str) -> int:
    """An upper bound of one image's PNG size: 4 channels of 16 bits plus filter bytes and zlib overhead."""
    try:
        with Image.open(path) as image:
            w, h = image.size
    except Exception:  # a format PIL cannot open: OpenCV's decoder is used when writing; bound by file size
        return os.path.getsize(path) * 64 + (1 << 20)
    return int(h * w * 8 * 1.01) + h + (1 << 16)


def _prepare_target(lmdb_path: str, overwrite: bool) -> str:
    """Check the target name and existence; remove a stale ``.partial``; return the partial folder's path."""
    lmdb_path = str(lmdb_path).rstrip('/\\')
    if not lmdb_path.endswith('.lmdb'):
        raise RaveError(f'{lmdb_path}: an LMDB path must end with ".lmdb" (BasicSR and the datasets detect LMDBs '
                        'by that suffix).')
    if os.path.lexists(lmdb_path):
        if not overwrite:
            raise RaveError(f'{lmdb_path} already exists; choose another path or pass --overwrite to replace it.')
        is_lmdb = os.path.isdir(lmdb_path) and (not os.listdir(lmdb_path) or any(
            os.path.exists(os.path.join(lmdb_path, f)) for f in ('data.mdb', META_INFO_FILE)))
        if not is_lmdb:
            raise RaveError(f'{lmdb_path} exists and is not an LMDB folder; it is not replaced even with '
                            '--overwrite. Remove it yourself or choose another path.')
    partial = lmdb_path + PARTIAL_SUFFIX
    if os.path.isdir(partial):
        shutil.rmtree(partial)  # our own leftover from an interrupted build
    os.makedirs(os.path.dirname(os.path.abspath(lmdb_path)), exist_ok=True)
    return partial


def _write_partial(source: ImageSource, indices: Sequence[int], keys: Sequence[str], partial: str,
                   compress_level: int, batch: int, desc: str) -> None:
    """Write the images into ``partial``; ``meta_info.txt`` and the key table come last."""
    import lmdb

    map_size = sum(_size_bound(source.path(i)) for i in indices) + (16 << 20)
    env = lmdb.open(partial, map_size=map_size)
    meta_lines, txn = [], env.begin(write=True)
    try:
        for count, (index, key) in enumerate(tqdm(list(zip(indices, keys)), desc=desc, unit='img'), start=1):
            image = source.read(index)
            txn.put(key.encode('ascii'), png_bytes(image, compress_level))
            channels = 3 if image.alpha is None else 4
            meta_lines.append(f'{key}.png ({image.rgb.shape[0]},{image.rgb.shape[1]},{channels}) {compress_level}')
            if count % batch == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
    except BaseException:
        txn.abort()
        raise
    finally:
        env.close()
    with open(os.path.join(partial, KEY_NAMES_FILE), 'w', encoding='utf-8') as handle:
        handle.write('key\tname\n')
        for index, key in zip(indices, keys):
            handle.write(f'{key}\t{source.name(index)}\n')
    with open(os.path.join(partial, META_INFO_FILE), 'w', encoding='utf-8') as handle:
        handle.write('\n'.join(meta_lines) + '\n')


def _finish(partial: str, lmdb_path: str) -> None:
    lmdb_path = str(lmdb_path).rstrip('/\\')
    if os.path.isdir(lmdb_path):
        close_lmdb(lmdb_path)  # a reader of the old database in this process would go on reading it
        shutil.rmtree(lmdb_path)
    os.replace(partial, lmdb_path)


def _check_names(source: ImageSource) -> None:
    bad = [name for name in source.keys if '\t' in name or '\n' in name]
    if bad:
        raise RaveError(f'{source.dataroot}: file names with tabs or line breaks cannot be stored: {bad[:5]}; '
                        'rename them.')


def _build(jobs: List[tuple], overwrite: bool, compress_level: int, batch: int, verify: bool) -> List[Dict]:
    """Write every (source, indices, keys, lmdb_path) job to its partial folder, then rename them all."""
    if not 0 <= int(compress_level) <= 9:
        raise RaveError(f'compress level must be 0..9, got {compress_level}.')
    partials = [_prepare_target(job[3], overwrite) for job in jobs]
    try:
        for (source, indices, keys, lmdb_path), partial in zip(jobs, partials):
            _write_partial(source, indices, keys, partial, compress_level, batch, os.path.basename(lmdb_path))
    except BaseException:
        for partial in partials:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    for (_, _, _, lmdb_path), partial in zip(jobs, partials):
        _finish(partial, lmdb_path)
    summaries = []
    for source, indices, keys, lmdb_path in jobs:
        renamed = sum(key != source.stem(index) for index, key in zip(indices, keys))
        summaries.append({'lmdb_path': str(lmdb_path), 'images': len(indices), 'renamed_keys': renamed})
        if verify:
            verify_lmdb(lmdb_path)
    return summaries


def make_lmdb(folder: str, lmdb_path: str, overwrite: bool = False, compress_level: int = 1,
              recursive: bool = False, batch: int = 1000, verify: bool = False) -> Dict:
    """Pack the images of ``folder`` into ``lmdb_path`` (must end with ``.lmdb``); returns a short summary."""
    source = ImageSource(folder, recursive=recursive)
    _check_names(source)
    indices = list(range(len(source)))
    return _build([(source, indices, assign_keys(source.keys), lmdb_path)], overwrite, compress_level, batch,
                  verify)[0]


def make_paired_lmdb(lq_folder: str, gt_folder: str, lq_lmdb: str, gt_lmdb: str, overwrite: bool = False,
                     compress_level: int = 1, recursive: bool = False, batch: int = 1000,
                     verify: bool = False) -> List[Dict]:
    """Pack input and ground-truth folders (matched by file name without extension) into two LMDBs with the
    same key set; images without counterpart are listed in the error."""
    lq, gt = ImageSource(lq_folder, recursive=recursive), ImageSource(gt_folder, recursive=recursive)
    _check_names(lq)
    _check_names(gt)
    pairs = match_by_stem(lq, gt)
    keys = [safe_key(lq.stem(i)) for i, _ in pairs]
    _check_unique(keys, [lq.name(i) for i, _ in pairs])
    if os.path.abspath(lq_lmdb) == os.path.abspath(gt_lmdb):
        raise RaveError(f'input and ground-truth LMDBs must be different paths (both are {lq_lmdb}).')
    summaries = _build([(lq, [i for i, _ in pairs], keys, lq_lmdb), (gt, [j for _, j in pairs], keys, gt_lmdb)],
                       overwrite, compress_level, batch, verify=False)
    if verify:
        verify_paired_lmdb(lq_lmdb, gt_lmdb)
    return summaries


def verify_lmdb(lmdb_path: str, progress: bool = True) -> int:
    """Read back and decode every key of ``meta_info.txt``, check sizes and the key table; returns the count.

    Raises :class:`RaveError` listing every missing, undecodable or mis-sized image.
    """
    keys = read_lmdb_keys(lmdb_path)
    table = read_key_names(lmdb_path)
    problems = []
    if table and set(table) != set(keys):
        problems.append(f'{KEY_NAMES_FILE} and {META_INFO_FILE} list different keys')
    with open(os.path.join(lmdb_path, META_INFO_FILE), encoding='utf-8') as handle:
        shapes = {line.split()[0].split('.')[0]: line.split()[1] for line in handle if line.strip()}
    source = ImageSource(lmdb_path)
    for index in tqdm(range(len(source)), desc=f'verify {os.path.basename(lmdb_path)}', unit='img',
                      disable=not progress):
        try:
            image = source.read(index)
        except RaveError as exc:
            problems.append(str(exc))
            continue
        key = source.lmdb_key(index)
        shape = f'({image.rgb.shape[0]},{image.rgb.shape[1]},{3 if image.alpha is None else 4})'
        if shapes.get(key) != shape:
            problems.append(f'key "{key}": stored image is {shape}, {META_INFO_FILE} says {shapes.get(key)}')
    if problems:
        raise RaveError(f'{lmdb_path}: {len(problems)} problem(s) found:\n  ' + '\n  '.join(problems) +
                        '\nRebuild it with `rave prepare-lmdb --overwrite`.')
    return len(keys)


def verify_paired_lmdb(lq_lmdb: str, gt_lmdb: str) -> int:
    """Verify both LMDBs and that they hold the same key set."""
    verify_lmdb(lq_lmdb)
    verify_lmdb(gt_lmdb)
    lq_keys, gt_keys = set(read_lmdb_keys(lq_lmdb)), set(read_lmdb_keys(gt_lmdb))
    if lq_keys != gt_keys:
        raise RaveError(f'{lq_lmdb} and {gt_lmdb} hold different keys (only in input: '
                        f'{sorted(lq_keys - gt_keys)[:20]}, only in ground truth: {sorted(gt_keys - lq_keys)[:20]}).')
    return len(lq_keys)

