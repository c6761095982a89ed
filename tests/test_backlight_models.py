"""Synthetic backlight models: determinism, ranges, a darker subject, the stated input PSNR, the command."""
import os

import numpy as np
import pytest

from rave_basicsr.cli.rave_cli import main as rave_main
from rave_basicsr.data.backlight_models import BACKLIGHT_MODELS, DEFAULT_BACKLIGHT, LUMA, get_backlight_model
from rave_basicsr.data.demo_data import bundled_photos, make_demo_data, random_square_crop
from rave_basicsr.data.image_source import ImageSource
from rave_basicsr.utils.errors import RaveError


@pytest.fixture(scope='module')
def crops():
    photos, rng = bundled_photos(), np.random.default_rng(7)
    return [random_square_crop(photos[i % len(photos)], 96, rng) for i in range(12)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(1 / np.mean((a.astype(np.float64) - b) ** 2))


def test_at_least_four_models_besides_the_demo():
    assert DEFAULT_BACKLIGHT == 'demo'
    assert {'hazy', 'subject', 'mild', 'silhouette', 'window'} <= set(BACKLIGHT_MODELS) - {'demo'}


@pytest.mark.parametrize('name', list(BACKLIGHT_MODELS))
def test_deterministic_from_the_rng(name, crops):
    synthesize = get_backlight_model(name).synthesize
    first = synthesize(crops[0], np.random.default_rng(3))
    again = synthesize(crops[0], np.random.default_rng(3))
    other = synthesize(crops[0], np.random.default_rng(4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize('name', list(BACKLIGHT_MODELS))
def test_ranges_darker_subject_and_stated_psnr(name, crops):
    model, rng = get_backlight_model(name), np.random.default_rng(0)
    low, high = model.psnr_range
    for gt in crops:
        backlit, mask = model.synthesize(gt, rng)
        assert backlit.shape == gt.shape and backlit.dtype == np.float32 and mask.shape == gt.shape[:2]
        assert 0 <= backlit.min() <= backlit.max() <= 1 and 0 <= mask.min() <= mask.max() <= 1
        subject = mask > 0.5
        assert subject.mean() > 0.05
        assert (backlit @ LUMA)[subject].mean() < 0.9 * (gt @ LUMA)[subject].mean()
        assert low <= psnr(backlit, gt) <= high, (name, psnr(backlit, gt))


def test_models_differ_in_strength(crops):
    """demo (the subject only, gently) is the lightest, then mild; silhouette the most severe, on the same crops."""
    mean_psnr = {name: np.mean([psnr(model.synthesize(gt, np.random.default_rng(i))[0], gt)
                                for i, gt in enumerate(crops)]) for name, model in BACKLIGHT_MODELS.items()}
    ranked = sorted(mean_psnr, key=mean_psnr.get, reverse=True)
    assert ranked[:2] == ['demo', 'mild'] and ranked[-1] == 'silhouette'


def test_unknown_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(RaveError, match='unknown backlight model .nope.*demo, hazy, subject, mild, silhouette, window'):
        get_backlight_model('nope')
    with pytest.raises(RaveError, match='unknown backlight model'):
        make_demo_data(str(tmp_path / 'data'), backlight='nope')
    assert not (tmp_path / 'data').exists()


def test_demo_data_command_with_another_model(tmp_path, capsys):
    assert rave_main(['demo-data', str(tmp_path / 'mild'), '--backlight', 'mild', '--size', '48']) == 0
    assert 'backlight mild' in capsys.readouterr().out
    assert "'mild'" in (tmp_path / 'mild' / 'README.txt').read_text()
    backlit, gt = ImageSource(str(tmp_path / 'mild' / 'val_backlit')), ImageSource(str(tmp_path / 'mild' / 'val_gt'))
    assert 13 <= np.mean([psnr(backlit.read(i).rgb, gt.read(i).rgb) for i in range(len(gt))]) <= 19
    assert rave_main(['demo-data', str(tmp_path / 'bad'), '--backlight', 'nope']) == 2
    assert 'silhouette' in capsys.readouterr().err and not os.path.exists(tmp_path / 'bad')
