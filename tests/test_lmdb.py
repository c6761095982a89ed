"""LMDB building (single and paired), its safety rules, verification, and the prepare-lmdb command."""
import os
import subprocess

import cv2
import lmdb
import numpy as np
import pytest

from rave_basicsr.cli.rave_cli import main as rave_main
from rave_basicsr.data import lmdb_util
from rave_basicsr.data.image_source import ImageSource, close_lmdb, read_key_names, read_lmdb_keys
from rave_basicsr.data.lmdb_util import make_lmdb, make_paired_lmdb, safe_key, verify_lmdb
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.image_io import read_image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buffer = cv2.imencode(path.suffix, array)
    assert ok
    path.write_bytes(buffer.tobytes())


def noise(h, w, seed=0, c=3, dtype=np.uint8):
    top = 65535 if dtype == np.uint16 else 255
    return np.random.default_rng(seed).integers(0, top + 1, (h, w, c) if c > 1 else (h, w)).astype(dtype)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / 'images'
    write(root / 'plain.png', noise(20, 30, seed=1))
    write(root / 'photo.v2.jpg', noise(25, 16, seed=2))
    write(root / 'Ärger über.png', noise(9, 11, seed=3))
    write(root / 'deep.png', noise(12, 10, seed=4, dtype=np.uint16))
    write(root / 'grey.bmp', noise(7, 8, seed=5, c=1))
    return root


def test_safe_keys():
    assert safe_key('plain') == 'plain'
    assert safe_key('sub/dir-1_x') == 'sub/dir-1_x'
    assert safe_key('photo.v2') != safe_key('photo_v2') and safe_key('photo.v2').startswith('photo_v2_')
    assert safe_key('Ärger über').isascii() and '.' not in safe_key('Ärger über')
    # stable across runs and versions (existing LMDBs are read by these keys): the readable part plus the first 12
    # hex digits of the name's SHA-1, written out here
    assert safe_key('Ärger über') == 'rger_ber_8433c895d380' and safe_key('photo.v2') == 'photo_v2_32a65a463d5b'


def test_lmdb_round_trip_basicsr_layout(folder, tmp_path):
    target = tmp_path / 'deep' / 'parents' / 'set.lmdb'  # parent folders are created
    summary = make_lmdb(str(folder), str(target), verify=True)
    assert summary == {'lmdb_path': str(target), 'images': 5, 'renamed_keys': 2}
    meta = (target / 'meta_info.txt').read_text().splitlines()
    assert len(meta) == 5 and 'plain.png (20,30,3) 1' in meta
    keys = read_lmdb_keys(str(target))
    assert all(key.isascii() and '.' not in key for key in keys)
    assert sorted(read_key_names(str(target)).values()) == sorted(os.listdir(folder))
    source, lmdb_source = ImageSource(str(folder)), ImageSource(str(target))
    assert lmdb_source.keys == source.keys
    for i in range(len(source)):
        a, b = source.read(i), lmdb_source.read(i)
        assert a.bit_depth == b.bit_depth and np.array_equal(a.rgb, b.rgb)
    assert ImageSource(str(folder)).read(source.keys.index('deep.png')).bit_depth == 16
    # BasicSR's own reader sees the same keys and PNG values
    from basicsr.data.data_util import paths_from_lmdb
    from basicsr.utils import FileClient, imfrombytes

    assert sorted(paths_from_lmdb(str(target))) == sorted(keys)
    close_lmdb(str(target))  # the lmdb package allows one open environment per database and process
    client = FileClient('lmdb', db_paths=[str(target)], client_keys=['default'])
    img = imfrombytes(client.get('plain', 'default'), float32=False)
    assert np.array_equal(img, noise(20, 30, seed=1))


def test_target_exists_and_overwrite(folder, tmp_path):
    target = tmp_path / 'set.lmdb'
    make_lmdb(str(folder), str(target))
    with pytest.raises(RaveError, match='already exists.*--overwrite'):
        make_lmdb(str(folder), str(target))
    ImageSource(str(target)).read(0)  # an open reader in this process must not keep serving the old data
    (folder / 'plain.png').unlink()
    make_lmdb(str(folder), str(target), overwrite=True)
    assert len(ImageSource(str(target))) == 4 and 'plain.png' not in ImageSource(str(target)).keys
    user_folder = tmp_path / 'mine.lmdb'
    user_folder.mkdir()
    (user_folder / 'thesis.tex').write_text('precious')
    with pytest.raises(RaveError, match='not an LMDB folder'):
        make_lmdb(str(folder), str(user_folder), overwrite=True)
    assert (user_folder / 'thesis.tex').exists()
    with pytest.raises(RaveError, match='must end with ".lmdb"'):
        make_lmdb(str(folder), str(tmp_path / 'set.db'))


def test_interrupted_build_never_looks_complete(folder, tmp_path, monkeypatch):
    target = tmp_path / 'set.lmdb'
    calls = []
    real_png_bytes = lmdb_util.png_bytes

    def failing(image, level):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressing Ctrl-C in the middle of a build
        return real_png_bytes(image, level)

    monkeypatch.setattr(lmdb_util, 'png_bytes', failing)
    with pytest.raises(KeyboardInterrupt):
        make_lmdb(str(folder), str(target))
    assert not target.exists() and not (tmp_path / 'set.lmdb.partial').exists()
    # a hard kill leaves the .partial folder, without meta_info.txt: readers reject it, the next build replaces it
    partial = tmp_path / 'set.lmdb.partial'
    partial.mkdir()
    (partial / 'data.mdb').write_bytes(b'junk')
    with pytest.raises(RaveError, match='interrupted build'):
        ImageSource(str(partial), {'type': 'lmdb'})
    monkeypatch.setattr(lmdb_util, 'png_bytes', real_png_bytes)
    make_lmdb(str(folder), str(target))
    assert not partial.exists() and verify_lmdb(str(target)) == 5


def test_corrupt_image_stops_build_naming_it(folder, tmp_path):
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
    with pytest.raises(RaveError, match='broken.jpg'):
        make_lmdb(str(folder), str(tmp_path / 'set.lmdb'))
    assert not (tmp_path / 'set.lmdb').exists()


def test_missing_key_detected(folder, tmp_path):
    target = tmp_path / 'set.lmdb'
    make_lmdb(str(folder), str(target))
    env = lmdb.open(str(target))
    with env.begin(write=True) as txn:
        assert txn.delete(b'plain')
    env.close()
    source = ImageSource(str(target))
    with pytest.raises(RaveError, match='key "plain" .*missing'):
        source.read(source.keys.index('plain.png'))
    with pytest.raises(RaveError, match=r'(?s)1 problem.*plain'):
        verify_lmdb(str(target), progress=False)


def test_paired_lmdb_identical_keys_and_missing_counterparts(tmp_path):
    lq, gt = tmp_path / 'input', tmp_path / 'gt'
    for i, name in enumerate(('a', 'b.c', 'ü')):
        write(lq / f'{name}.jpg', noise(10, 10, seed=i))
        write(gt / f'{name}.png', noise(10, 10, seed=9 + i))
    make_paired_lmdb(str(lq), str(gt), str(tmp_path / 'o' / 'lq.lmdb'), str(tmp_path / 'o' / 'gt.lmdb'),
                     verify=True)
    assert read_lmdb_keys(str(tmp_path / 'o' / 'lq.lmdb')) == read_lmdb_keys(str(tmp_path / 'o' / 'gt.lmdb'))
    assert read_key_names(str(tmp_path / 'o' / 'gt.lmdb'))[safe_key('b.c')] == 'b.c.png'
    write(gt / 'extra.png', noise(10, 10))
    (lq / 'a.jpg').unlink()
    with pytest.raises(RaveError) as info:
        make_paired_lmdb(str(lq), str(gt), str(tmp_path / 'lq2.lmdb'), str(tmp_path / 'gt2.lmdb'))
    assert 'a.png' in str(info.value) and 'extra.png' in str(info.value)
    assert not (tmp_path / 'lq2.lmdb').exists()


def test_empty_folder_rejected(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(RaveError, match='empty: the folder is empty'):
        make_lmdb(str(tmp_path / 'empty'), str(tmp_path / 'x.lmdb'))
    (tmp_path / 'empty' / 'list.csv').write_text('a,b')
    with pytest.raises(RaveError, match='no image files'):
        make_lmdb(str(tmp_path / 'empty'), str(tmp_path / 'x.lmdb'))
    assert not (tmp_path / 'x.lmdb').exists()


def test_cli_and_script(folder, tmp_path, capsys, python_executable):
    target = tmp_path / 'cli' / 'set.lmdb'
    assert rave_main(['prepare-lmdb', str(folder), str(target), '--verify', '--compress-level', '3']) == 0
    assert 'set.lmdb: 5 images, 2 names mapped to safe keys' in capsys.readouterr().out
    assert (target / 'meta_info.txt').read_text().splitlines()[0].endswith(' 3')
    assert rave_main(['prepare-lmdb', str(folder), str(target)]) == 2
    assert 'already exists' in capsys.readouterr().err
    assert rave_main(['prepare-lmdb', str(folder), str(target), '--gt', str(folder)]) == 2
    script = subprocess.run([python_executable, os.path.join(REPO_ROOT, 'scripts', 'prepare_lmdb.py'), str(folder),
                             str(tmp_path / 'script.lmdb'), '--overwrite'], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert script.returncode == 0, script.stderr
    assert verify_lmdb(str(tmp_path / 'script.lmdb'), progress=False) == 5
    assert np.array_equal(ImageSource(str(tmp_path / 'script.lmdb')).read(0).rgb,
                          read_image(str(folder / ImageSource(str(folder)).keys[0])).rgb)
