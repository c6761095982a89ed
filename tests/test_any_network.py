"""Any BasicSR network as the enhancer (``network_g: {type: <arch>}``): a tiny SwinIR (``upscale: 1``) trained by
RAVE, CLIP-LIT and CLIP-LIT-Latent, tested by ``basicsr test`` and used by ``rave enhance``. What is specific to
BacklitUNet degrades: no illumination map, overlapping instead of exact tiles, input padded to SwinIR's window."""
import cv2
import numpy as np
import pytest
import torch

from rave_basicsr.cli.rave_cli import main as rave_main
from rave_basicsr.inference.enhancer import Enhancer
from tests.clip_lit_helpers import clip_lit_options
from tests.pipeline_helpers import read_log, run_basicsr, write_options
from tests.rave_helpers import demo_data, rave_options

pytestmark = pytest.mark.slow

TINY_SWINIR = {'type': 'SwinIR', 'upscale': 1, 'in_chans': 3, 'img_size': 32, 'window_size': 4, 'img_range': 1.0,
               'depths': [1], 'embed_dim': 8, 'num_heads': [1], 'mlp_ratio': 2, 'upsampler': '',
               'resi_connection': '1conv'}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp('demo'), size=36, n_train=2, n_welllit=2, n_val=1)


def with_swinir(options: dict) -> dict:
    options['network_g'] = dict(TINY_SWINIR)
    options['val']['tile'] = 24  # overlapping tiles on the 36-px validation image: exercised, not only whole images
    return options


@pytest.mark.parametrize('method', ['rave', 'clip_lit_latent', 'clip_lit'])
def test_each_method_trains_a_swinir(data, tmp_path, method):
    if method == 'rave':
        options = rave_options('swinir_rave', data, total_iter=4, warmup_iters=2, save_freq=4)
    else:
        options = clip_lit_options(f'swinir_{method}', data, guidance='prompt' if method == 'clip_lit' else 'latent',
                                   total_iter=4, stages=(1, 1, 1, 1), save_freq=4, prompt_batch=2)
    options['train']['warmup']['reinit_psnr'] = 99.0  # the guard fires: SwinIR has no reset_parameters of its own
    options['train']['warmup'].update(reinit_after=0, reinit_window=1, reinit_extend=0)
    option_file = write_options(tmp_path / 'train.yml', with_swinir(options))
    result = run_basicsr(['train', '-opt', str(option_file)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = tmp_path / 'experiments' / options['name']
    log = read_log(experiment)
    assert 'Network [SwinIR] is created' in log and 'network re-initialised' in log
    assert 'stage "warmup" ended' in log
    weights = torch.load(experiment / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert any(key.startswith('layers.0.') for key in weights)


def test_basicsr_test_and_rave_enhance_use_the_trained_swinir(data, tmp_path):
    options = with_swinir(rave_options('swinir', data, total_iter=2, warmup_iters=1, save_freq=2))
    assert run_basicsr(['train', '-opt', str(write_options(tmp_path / 'train.yml', options))],
                       cwd=tmp_path).returncode == 0
    checkpoint = tmp_path / 'experiments' / 'swinir' / 'models' / 'net_g_latest.pth'
    test_options = {'name': 'swinir_test', 'model_type': 'RAVEModel', 'num_gpu': 0,
                    'datasets': {'test_1': dict(options['datasets']['val'], name='val')},
                    'network_g': dict(TINY_SWINIR), 'path': {'pretrain_network_g': str(checkpoint),
                                                             'strict_load_g': True},
                    'val': {'save_img': True, 'suffix': None, 'tile': 24,
                            'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}}}
    result = run_basicsr(['test', '-opt', str(write_options(tmp_path / 'test.yml', test_options))], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / 'results' / 'swinir_test' / 'visualization' / 'val').glob('*.png'))
    photo = (np.random.default_rng(0).random((37, 45, 3)) * 255).astype(np.uint8)  # not a multiple of the window
    cv2.imwrite(str(tmp_path / 'photo.png'), photo)
    code = rave_main(['enhance', str(tmp_path / 'photo.png'), '-o', str(tmp_path / 'out'), '--weights',
                      str(checkpoint), '--device', 'cpu', '--quiet'])
    assert code == 0
    enhanced = cv2.imread(str(tmp_path / 'out' / 'photo.png'))
    assert enhanced.shape == photo.shape
    for precision in ('mixed',):
        assert rave_main(['enhance', str(tmp_path / 'photo.png'), '-o', str(tmp_path / precision), '--weights',
                          str(checkpoint), '--device', 'cpu', '--quiet', '--precision', precision]) == 2


def test_overlapping_tiles_equal_the_whole_image_for_a_local_network():
    """Networks whose receptive field fits in the overlap give the whole image's result: a small convolutional
    network, and the one-block SwinIR when the tiles start on its window grid (else its windows would differ)."""
    torch.manual_seed(0)
    local = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3,
                                                                                                      padding=1))
    image = torch.rand(1, 3, 50, 70)
    enhancer = Enhancer(local, 'fp32')
    torch.testing.assert_close(enhancer.enhance(image, tile=16), enhancer.enhance(image, tile=0), atol=1e-6, rtol=0)
    from basicsr.archs import build_network
    swinir = Enhancer(build_network(dict(TINY_SWINIR)), 'fp32')
    whole, tiled = swinir.enhance(image, tile=0), swinir.enhance(image, tile=24)
    assert whole.shape == image.shape and swinir.size_multiple == 4
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
