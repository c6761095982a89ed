"""The offline demo set: layout, backlight model, determinism, speed, safety, command."""
import hashlib
import os
import time

import cv2
import numpy as np
import pytest

from rave_basicsr.cli.rave_cli import main as rave_main
from rave_basicsr.data.backlight_models import DEMO_LIGHTING, hazy_backlight, synthesize_backlight
from rave_basicsr.data.demo_data import DEMO_FOLDERS, bundled_photos, make_demo_data, random_square_crop
from rave_basicsr.data.image_source import ImageSource
from rave_basicsr.utils.errors import RaveError

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def digest(folder):
    sha = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            sha.update(name.encode())
            with open(os.path.join(root, name), 'rb') as handle:
                sha.update(handle.read())
    return sha.hexdigest()


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp('demo') / 'data')
    start = time.perf_counter()
    result = make_demo_data(outdir, seed=0)
    return result, time.perf_counter() - start


def test_layout_and_counts(demo):
    result, _ = demo
    outdir = result['outdir']
    assert sorted(os.listdir(outdir)) == sorted(DEMO_FOLDERS + ('README.txt',))
    sources = {folder: ImageSource(os.path.join(outdir, folder)) for folder in DEMO_FOLDERS}
    assert [len(sources[f]) for f in DEMO_FOLDERS] == [24, 16, 24, 6, 6]
    assert sources['train_backlit'].keys == sources['train_gt'].keys
    assert sources['val_backlit'].keys == sources['val_gt'].keys
    assert sources['val_gt'].read(0).rgb.shape == (128, 128, 3)
    gts = {sources['train_gt'].read(i).rgb.tobytes() for i in range(24)}
    assert not any(sources['train_welllit'].read(i).rgb.tobytes() in gts for i in range(16))
    readme = open(os.path.join(outdir, 'README.txt')).read()
    assert 'backlight model' in readme.lower()
    # the ranges it states are the model's own (they once disagreed)
    for low, high in (DEMO_LIGHTING.gamma, DEMO_LIGHTING.exposure):
        assert f'{low:g}-{high:g}' in readme


def test_backlit_is_far_from_ground_truth(demo):
    outdir = demo[0]['outdir']
    backlit, gt = ImageSource(os.path.join(outdir, 'val_backlit')), ImageSource(os.path.join(outdir, 'val_gt'))
    psnrs = []
    for i in range(len(gt)):
        mse = np.mean((backlit.read(i).rgb.astype(np.float64) - gt.read(i).rgb) ** 2)
        psnrs.append(10 * np.log10(1 / mse))
    assert max(psnrs) < 20.0, psnrs


def test_backlight_model_darkens_subject_and_keeps_highlights():
    """The demo model under-exposes the subject and leaves the background and the bright regions as they were (a
    network trained on it learns to leave a real photo's sky alone)."""
    photos = bundled_photos()
    rng = np.random.default_rng(1)
    for i in range(10):
        gt = random_square_crop(photos[i % len(photos)], 96, rng)
        backlit, mask = synthesize_backlight(gt, rng)
        assert backlit.shape == gt.shape and backlit.dtype == np.float32 and 0 <= backlit.min() <= backlit.max() <= 1
        subject, background = mask > 0.7, mask < 0.01
        assert subject.mean() > 0.05 and background.mean() > 0.03
        luma_b, luma_g = backlit @ LUMA, gt @ LUMA
        assert luma_b[subject].mean() < 0.7 * luma_g[subject].mean()
        assert np.abs(backlit[background] - gt[background]).max() < 0.01
        # bright regions (luma above 0.7 at the model's 2 %-of-width blur) are out of the mask
        bright = cv2.GaussianBlur(luma_g, (0, 0), sigmaX=0.02 * 96, borderType=cv2.BORDER_REFLECT) > 0.7
        assert np.abs(backlit[bright] - gt[bright]).max(initial=0) < 0.01


def test_hazy_model_darkens_subject_and_brightens_background():
    """The demo's model until 2026-12-02, kept as a robustness set: a veil over the background."""
    photos = bundled_photos()
    rng = np.random.default_rng(1)
    for i in range(10):
        gt = random_square_crop(photos[i % len(photos)], 96, rng)
        backlit, mask = hazy_backlight(gt, rng)
        subject, background = mask > 0.7, mask < 0.3
        assert subject.mean() > 0.1 and background.mean() > 0.05
        luma_b, luma_g = backlit @ LUMA, gt @ LUMA
        assert luma_b[subject].mean() < 0.7 * luma_g[subject].mean()
        assert luma_b[background].mean() > luma_g[background].mean() + 0.1
        assert luma_b[background].mean() - luma_b[subject].mean() > 0.3  # bright behind, dark in front


def test_deterministic_by_seed_and_fast(demo, tmp_path):
    result, seconds = demo
    assert seconds < 20.0  # seconds, not minutes, on 2 CPU cores (typically well under 2 s)
    again = make_demo_data(str(tmp_path / 'again'), seed=0)
    other = make_demo_data(str(tmp_path / 'other'), seed=1)
    assert digest(result['outdir']) == digest(again['outdir'])
    assert digest(result['outdir']) != digest(other['outdir'])


def test_existing_outdir_needs_overwrite(tmp_path):
    outdir = tmp_path / 'data'
    make_demo_data(str(outdir), size=48, n_train=2, n_welllit=1, n_val=1)
    (outdir / 'notes.txt').write_text('mine')
    with pytest.raises(RaveError, match='not empty.*--overwrite'):
        make_demo_data(str(outdir), size=48)
    make_demo_data(str(outdir), size=48, n_train=3, n_welllit=1, n_val=1, overwrite=True)
    assert len(os.listdir(outdir / 'train_backlit')) == 3 and (outdir / 'notes.txt').read_text() == 'mine'
    with pytest.raises(RaveError, match='at least 32'):
        make_demo_data(str(tmp_path / 'tiny'), size=8)


def test_command(tmp_path, capsys):
    assert rave_main(['demo-data', str(tmp_path / 'cli'), '--seed', '3', '--size', '96']) == 0
    assert 'wrote 24 train, 16 well-lit and 6 validation images' in capsys.readouterr().out
    assert ImageSource(str(tmp_path / 'cli' / 'val_gt')).read(0).rgb.shape == (96, 96, 3)
    assert rave_main(['demo-data', str(tmp_path / 'cli')]) == 2
    assert 'not empty' in capsys.readouterr().err
