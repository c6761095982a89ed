"""The enhancement network: structure, official parity, finite division, every way of loading weights."""
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rave_basicsr.archs import backlit_unet_arch as arch_module
from rave_basicsr.archs.backlit_unet_arch import BacklitUNet, PaddedConv2d, divide_by_illumination
from rave_basicsr.inference import weights as weights_module
from rave_basicsr.inference.weights import OFFICIAL_WEIGHTS, load_enhancement_network, load_enhancement_state_dict
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.checkpoint import torch_save_atomic
from rave_basicsr.utils.image_io import read_image

REPO_ROOT = Path(__file__).resolve().parents[1]
torch_pad = F.pad  # the real one, for spies that wrap it


def test_parameter_count_and_official_module_names():
    network = BacklitUNet()
    assert sum(p.numel() for p in network.parameters()) == 278790
    names = set(network.state_dict())
    assert {'cond1.weight', 'cond_add1.bias', 'PPM1.features.3.1.weight', 'PPM1.features.3.2.weight',
            'PPM1.fuse.0.weight', 'PPM1.fuse.1.weight', 'ResidualBlock6.conv2.weight'} <= names


def test_padding_modes_follow_the_spec():
    network = BacklitUNet(outer_padding='reflect')
    for name in ('cond1', 'condx', 'condy', 'cond_add1'):
        assert getattr(network, name).padding_mode == 'reflect'
        assert getattr(BacklitUNet(), name).padding_mode == 'zeros'
    assert network.ResidualBlock1.conv1.padding_mode == 'reflect'
    assert network.PPM1.fuse[0].padding_mode == 'zeros'
    with pytest.raises(ValueError, match="outer_padding must be 'zeros' or 'reflect', got 'circular'"):
        BacklitUNet(outer_padding='circular')


def test_official_initialisation_std():
    torch.manual_seed(0)
    weight = BacklitUNet().ResidualBlock3.conv1.weight
    assert abs(weight.std().item() - 0.02) < 0.001
    assert abs(weight.mean().item()) < 0.001


def test_reset_parameters_draws_a_whole_new_network():
    torch.manual_seed(0)
    network = BacklitUNet()
    with torch.no_grad():
        network.cond_add1.bias.fill_(-1.0)
        network.PPM1.fuse[1].weight.fill_(3.0)
        network.condx.weight.fill_(1.0)
    network.reset_parameters()
    assert abs(float(network.cond_add1.bias)) <= 1 / (32 * 9) ** 0.5  # PyTorch's default bias range, drawn again
    assert float(network.PPM1.fuse[1].weight) == 0.25
    assert abs(network.condx.weight.std().item() - 0.02) < 0.002


def test_official_initialisation_saturates_a_veiled_image_and_passes_no_gradient():
    # why illumination_bias_init exists: L starts at about the bias (≤ 0.06), so an image whose darkest pixel is
    # brighter than that comes out white with a zero gradient, for every seed
    veiled = torch.rand(1, 3, 32, 32) * 0.5 + 0.3
    for seed in range(4):
        torch.manual_seed(seed)
        network = BacklitUNet()
        out = network(veiled)
        out.sum().backward()
        assert torch.equal(out, torch.ones_like(out))
        assert all(p.grad is None or not p.grad.any() for p in network.parameters())


@pytest.mark.parametrize('seed', range(6))
def test_illumination_bias_init_starts_every_draw_at_the_identity(seed):
    veiled = torch.rand(1, 3, 32, 32) * 0.5 + 0.3
    torch.manual_seed(seed)
    official = BacklitUNet()
    torch.manual_seed(seed)
    network = BacklitUNet(illumination_bias_init=1.0)
    # only that bias differs: every other parameter is the same draw as the official initialisation
    changed = [k for k, v in network.state_dict().items() if not torch.equal(v, official.state_dict()[k])]
    assert changed == ['cond_add1.bias'] and float(network.cond_add1.bias) == 1.0
    out = network(veiled)
    assert (out - veiled).abs().max() < 0.05
    out.sum().backward()
    assert network.cond_add1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        network.cond_add1.bias.fill_(-5.0)
    network.reset_parameters()  # the warm-up guard's re-initialisation keeps the option
    assert float(network.cond_add1.bias) == 1.0


@pytest.mark.parametrize('value', [True, 'one', float('nan')])
def test_illumination_bias_init_rejects_non_numbers(value):
    with pytest.raises(ValueError, match='illumination_bias_init must be'):
        BacklitUNet(illumination_bias_init=value)


def test_forward_shapes_and_illumination():
    torch.manual_seed(0)
    network = BacklitUNet().eval()
    x = torch.rand(2, 3, 19, 23)
    with torch.no_grad():
        enhanced, light = network.forward_with_illumination(x)
        assert torch.equal(enhanced, network(x))
    assert enhanced.shape == x.shape and light.shape == (2, 1, 19, 23)
    assert light.min() >= 0 and 0 <= enhanced.min() and enhanced.max() <= 1


@pytest.mark.parametrize('eps', [0.0, 1e-9])
def test_division_never_nan_or_inf(eps):
    image = torch.tensor([0.0, 0.5, 0.0, 0.2, 1.0]).view(1, 1, 1, 5)
    light = torch.tensor([0.0, 0.0, 0.5, 0.4, 2.0]).view(1, 1, 1, 5)
    out = divide_by_illumination(image, light, eps)
    assert torch.isfinite(out).all()
    # 0/0 -> 0 (black stays black), x/0 -> 1 (saturates as the original's inf clamps), else clamp(x / L)
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 1.0, 0.0, 0.5, 0.5]), atol=1e-6)


def test_zero_illumination_network_output_is_finite_and_gradients_too():
    network = BacklitUNet(division_eps=0.0)
    with torch.no_grad():
        network.cond_add1.weight.zero_()
        network.cond_add1.bias.fill_(-1.0)  # ReLU -> L == 0 everywhere
    x = torch.rand(1, 3, 8, 8)
    x[..., :2, :2] = 0
    x.requires_grad_(True)
    enhanced, light = network.forward_with_illumination(x)
    assert (light == 0).all() and torch.isfinite(enhanced).all()
    assert (enhanced[..., :2, :2] == 0).all() and (enhanced[..., 4:, 4:] == 1).all()
    enhanced.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_one_pixel_image_with_reflect_padding():
    network = BacklitUNet(outer_padding='reflect').eval()
    with torch.no_grad():
        for shape in ((1, 3, 1, 1), (1, 3, 1, 9), (1, 3, 7, 1)):
            out = network(torch.rand(shape))
            assert out.shape == shape and torch.isfinite(out).all()


@pytest.mark.parametrize('shape', [(2, 5, 7, 9), (1, 4, 2, 2), (1, 4, 3, 2), (1, 4, 2, 6), (1, 3, 1, 4)])
def test_reflect_convolution_equals_the_padded_reference(shape, monkeypatch):
    """The border-recomputing reflect convolution (inference) equals ``conv2d(pad(x, reflect))`` (replicate below
    2 px); with gradients (training) the padded copy runs, and its gradients match too."""
    monkeypatch.setattr(arch_module, 'BORDER_RECOMPUTE_MIN_PIXELS', 1)  # the fast path at these small sizes
    torch.manual_seed(0)
    conv = PaddedConv2d(shape[1], 6, 3, 1, 1, bias=True, padding_mode='reflect').double()
    image = torch.randn(shape, dtype=torch.float64)
    mode = 'reflect' if min(shape[-2:]) >= 2 else 'replicate'
    reference = F.conv2d(F.pad(image, (1, 1, 1, 1), mode=mode), conv.weight, conv.bias)
    spy = []
    monkeypatch.setattr(F, 'pad', lambda *args, **kwargs: spy.append(args[0].shape) or torch_pad(*args, **kwargs))
    with torch.no_grad():
        assert (conv(image) - reference).abs().max() < 1e-12
    if min(shape[-2:]) >= 2:
        assert all(min(padded[-2:]) <= 2 for padded in spy)  # only 2-pixel strips were padded
    trained_input = image.clone().requires_grad_(True)
    trained = conv(trained_input)
    assert (trained - reference).abs().max() < 1e-12
    trained.sum().backward()
    assert trained_input.grad is not None and torch.isfinite(trained_input.grad).all()


def test_parity_with_official_reference_outputs(shared_data):
    """rave_unpaired.pth on backlit_{1,2,3}: every pixel within one grey level of the official outputs."""
    network = load_enhancement_network(shared_data / 'official_checkpoints' / 'rave_unpaired.pth',
                                       outer_padding='reflect', division_eps=0.0)
    for index in (1, 2, 3):
        rgb = read_image(str(shared_data / 'backlit_samples' / f'backlit_{index}.png')).rgb
        with torch.no_grad():
            out = network(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
        ours = np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)  # torchvision save_image's rounding
        reference = (read_image(str(shared_data / 'reference_outputs' / f'rave_unpaired__backlit_{index}.png')).rgb
                     * 255).round().astype(np.int16)
        assert ours.shape == reference.shape
        assert np.abs(ours.astype(np.int16) - reference).max() <= 1


def test_all_official_checkpoints_load_and_match_their_digests(released_weights):
    for name, weights in OFFICIAL_WEIGHTS.items():
        path = released_weights(name)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == weights.sha256, name
        network = load_enhancement_network(path)
        assert sum(p.numel() for p in network.parameters()) == 278790
        with torch.no_grad():
            assert torch.isfinite(network(torch.rand(1, 3, 16, 16))).all()


def test_weights_by_name_from_the_cache(released_weights, tmp_path, monkeypatch):
    """Verified files in the cache are used by name without any download (all 8); a damaged one is
    re-downloaded (here: fails, offline)."""
    sources = {name: released_weights(name) for name in OFFICIAL_WEIGHTS}
    monkeypatch.setenv('RAVE_CACHE_DIR', str(tmp_path))
    for name, weights in OFFICIAL_WEIGHTS.items():
        source = sources[name]
        (tmp_path / weights.filename).write_bytes(source.read_bytes())
        state = load_enhancement_state_dict(name)
        assert len(state) == 30 and not any(k.startswith('module.') for k in state)
        assert torch.equal(state['cond1.weight'], torch.load(source, map_location='cpu')['module.cond1.weight'])
    (tmp_path / 'clip_lit_official.pth').write_bytes(b'damaged')
    monkeypatch.setitem(weights_module.OFFICIAL_WEIGHTS, 'clip_lit_official', weights_module.OfficialWeights(
        'clip_lit_official', 'http://127.0.0.1:9/enhancement_model.pth', OFFICIAL_WEIGHTS['clip_lit_official'].sha256,
        ''))
    with pytest.raises(RaveError, match=r'--weights /path/to/clip_lit_official\.pth'):
        load_enhancement_state_dict('clip_lit_official')


def test_offline_download_fails_fast_with_a_hint(tmp_path, monkeypatch):
    import time
    monkeypatch.setenv('RAVE_CACHE_DIR', str(tmp_path))
    monkeypatch.setitem(weights_module.OFFICIAL_WEIGHTS, 'rave_paired', weights_module.OfficialWeights(
        'rave_paired', 'http://127.0.0.1:9/rave_paired.pth', OFFICIAL_WEIGHTS['rave_paired'].sha256, ''))
    started = time.perf_counter()
    with pytest.raises(RaveError, match='offline.*--weights /path/to/rave_paired.pth'):
        load_enhancement_state_dict('rave_paired')
    assert time.perf_counter() - started < 15


class _BrokenDownload:
    """A response that delivers one chunk, then loses the connection."""

    def __init__(self, *args, **kwargs):
        self.chunks = [b'the first megabyte']

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, size):
        if self.chunks:
            return self.chunks.pop()
        raise ConnectionResetError(104, 'Connection reset by peer')


def test_a_download_broken_off_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv('RAVE_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setattr(weights_module.urllib.request, 'urlopen', _BrokenDownload)
    with pytest.raises(RaveError, match=r"cannot download the 'rave_paired' weights \(.*Connection reset by peer\); "
                                        r'this machine may be offline'):
        load_enhancement_state_dict('rave_paired')
    assert list((tmp_path / 'cache').iterdir()) == []  # the partial download was removed


def test_digest_mismatch_is_refused(tmp_path, monkeypatch):
    served = tmp_path / 'served.pth'
    served.write_bytes(b'not the released file')
    monkeypatch.setenv('RAVE_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setitem(weights_module.OFFICIAL_WEIGHTS, 'rave_paired', weights_module.OfficialWeights(
        'rave_paired', served.as_uri(), OFFICIAL_WEIGHTS['rave_paired'].sha256, ''))
    digest = hashlib.sha256(b'not the released file').hexdigest()
    with pytest.raises(RaveError, match=f"the download of 'rave_paired' from .*served.pth has SHA-256 {digest}, "
                                        f"expected {OFFICIAL_WEIGHTS['rave_paired'].sha256}; it was discarded"):
        load_enhancement_state_dict('rave_paired')
    assert list((tmp_path / 'cache').iterdir()) == []  # neither the file nor its partial download is kept


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(RaveError, match=r"weights 'rave_unpaired_v2': no such file, and not a known name "
                                        r"\(rave_unpaired, "):
        load_enhancement_state_dict('rave_unpaired_v2')
    missing = tmp_path / 'net_g_latest.pth'
    with pytest.raises(RaveError, match=f"weights '{re.escape(str(missing))}': no such file"):
        load_enhancement_state_dict(missing)


@pytest.fixture
def ema_checkpoints(tmp_path):
    """Two BasicSR checkpoints of different networks: net_g.pth with params and params_ema, net_g_plain.pth with params
    alone; returns (plain, ema) state dicts."""
    torch.manual_seed(0)
    plain, ema = BacklitUNet().state_dict(), BacklitUNet().state_dict()
    torch_save_atomic({'params': plain, 'params_ema': ema}, tmp_path / 'net_g.pth')
    torch_save_atomic({'params': plain}, tmp_path / 'net_g_plain.pth')
    return plain, ema


def test_basicsr_checkpoints_prefer_params_ema(tmp_path, ema_checkpoints):
    plain, ema = ema_checkpoints
    loaded = load_enhancement_state_dict(tmp_path / 'net_g.pth')
    assert torch.equal(loaded['cond1.weight'], ema['cond1.weight'])
    loaded = load_enhancement_state_dict(str(tmp_path / 'net_g_plain.pth'))
    assert torch.equal(loaded['cond1.weight'], plain['cond1.weight'])


def test_wrong_shape_checkpoint_names_the_keys(tmp_path):
    state = BacklitUNet().state_dict()
    state['condx.weight'] = torch.zeros(48, 32, 3, 3)
    state['extra.weight'] = torch.zeros(1)
    del state['cond1.bias']
    torch_save_atomic(state, tmp_path / 'wrong.pth')
    with pytest.raises(RaveError) as info:
        load_enhancement_network(tmp_path / 'wrong.pth')
    message = str(info.value)
    assert 'condx.weight (48, 32, 3, 3) (expected (64, 32, 3, 3))' in message
    assert 'missing: cond1.bias' in message and 'unexpected: extra.weight' in message


class _Pickled:
    pass


def test_pickle_checkpoint_is_refused_clearly(tmp_path):
    torch.save({'params': BacklitUNet().state_dict(), 'note': _Pickled()}, tmp_path / 'pickled.pth')
    with pytest.raises(RaveError, match='pickled Python objects'):
        load_enhancement_state_dict(tmp_path / 'pickled.pth')


def _srmodel(path, param_key):
    """BasicSR's SRModel holding a BacklitUNet loaded by BasicSR's own load_network."""
    from basicsr.models import build_model

    opt = {'name': 'load_test', 'model_type': 'SRModel', 'scale': 1, 'num_gpu': 0, 'is_train': False, 'dist': False,
           'network_g': {'type': 'BacklitUNet', 'outer_padding': 'reflect', 'division_eps': 0},
           'path': {'pretrain_network_g': str(path), 'param_key_g': param_key, 'strict_load_g': True},
           'val': {'save_img': False}}
    return build_model(opt)


def test_shipped_test_options_evaluate_the_weights_rave_enhance_uses(tmp_path, ema_checkpoints):
    """options/test_rave.yml and test_clip_lit.yml load a checkpoint's moving average when it has one (a run with
    train:ema_decay > 0, as the RAVE demo) and its params otherwise, as rave enhance does: `basicsr test` must score
    the network users enhance with."""
    import yaml

    plain, ema = ema_checkpoints
    for option_file in ('test_rave.yml', 'test_clip_lit.yml'):
        param_key = yaml.safe_load((REPO_ROOT / 'options' / option_file).read_text())['path']['param_key_g']
        for checkpoint, expected in (('net_g.pth', ema), ('net_g_plain.pth', plain)):
            loaded = _srmodel(tmp_path / checkpoint, param_key).net_g.state_dict()
            assert torch.equal(loaded['cond1.weight'], expected['cond1.weight']), (option_file, checkpoint)
            assert torch.equal(load_enhancement_state_dict(tmp_path / checkpoint)['cond1.weight'],
                               expected['cond1.weight'])


def test_loading_through_basicsr_srmodel(released_weights, tmp_path):
    """BasicSR's own load_network with param_key_g: ~ loads each official file; with params a BasicSR one."""
    for name in OFFICIAL_WEIGHTS:
        official = released_weights(name)
        model = _srmodel(official, None)
        # the file's tensors, saved from DataParallel: every key carries the "module." prefix
        saved = torch.load(official, map_location='cpu', weights_only=True)
        expected = {key.removeprefix('module.'): value for key, value in saved.items()}
        assert len(expected) == len(saved) == 30 and all(key.startswith('module.') for key in saved), name
        assert model.net_g.state_dict().keys() == expected.keys(), name
        assert all(torch.equal(model.net_g.state_dict()[k], v) for k, v in expected.items()), name
    torch_save_atomic({'params': expected}, tmp_path / 'net_g_1.pth')
    model = _srmodel(tmp_path / 'net_g_1.pth', 'params')
    assert torch.equal(model.net_g.state_dict()['condy.weight'], expected['condy.weight'])


def _write_png(path, array):
    import cv2
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array)


@pytest.mark.slow
def test_basicsr_test_pipeline_official_options(shared_data, tmp_path, monkeypatch):
    """`basicsr test -opt options/test_official.yml` reproduces the reference outputs."""
    from rave_basicsr.cli.basicsr_cli import main
    from tests.shared_data import REPO_ROOT

    samples = tmp_path / 'samples'
    samples.mkdir()
    for index in (1, 2):
        (samples / f'backlit_{index}.png').write_bytes(
            (shared_data / 'backlit_samples' / f'backlit_{index}.png').read_bytes())
    monkeypatch.chdir(tmp_path)
    code = main(['test', '-opt', str(REPO_ROOT / 'options' / 'test_official.yml'), '--force_yml', 'num_gpu=0',
                 f'datasets:test_1:dataroot_lq={samples}',
                 f'path:pretrain_network_g={shared_data / "official_checkpoints" / "rave_unpaired.pth"}'])
    assert code == 0
    folder = tmp_path / 'results' / 'rave_unpaired_official' / 'visualization' / 'backlit_samples'
    for index in (1, 2):
        ours = read_image(str(folder / f'backlit_{index}_rave_unpaired_official.png')).rgb
        reference = read_image(str(shared_data / 'reference_outputs' / f'rave_unpaired__backlit_{index}.png')).rgb
        assert np.abs(ours - reference).max() <= 1 / 255 + 1e-6


@pytest.mark.slow
def test_basicsr_test_pipeline_paired_metrics(shared_data, tmp_path, python_executable):
    """The paired option file computes PSNR/SSIM (a fresh process, so BasicSR's logger writes its log file).
    With the official outputs as ground truth, PSNR is far above what any other image would reach."""
    import subprocess
    from tests.shared_data import REPO_ROOT

    lq, gt = tmp_path / 'lq', tmp_path / 'gt'
    lq.mkdir()
    gt.mkdir()
    (lq / 'backlit_1.png').write_bytes((shared_data / 'backlit_samples' / 'backlit_1.png').read_bytes())
    (gt / 'backlit_1.png').write_bytes((shared_data / 'reference_outputs' / 'rave_unpaired__backlit_1.png')
                                       .read_bytes())
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE='1')
    result = subprocess.run(
        [python_executable, '-m', 'rave_basicsr.cli.basicsr_cli', 'test', '-opt',
         str(REPO_ROOT / 'options' / 'test_official_paired.yml'), '--force_yml', 'num_gpu=0',
         f'datasets:test_1:dataroot_lq={lq}', f'datasets:test_1:dataroot_gt={gt}',
         f'path:pretrain_network_g={shared_data / "official_checkpoints" / "rave_unpaired.pth"}'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    results = tmp_path / 'results' / 'rave_unpaired_official_paired'
    assert (results / 'visualization' / 'backlit_paired' / 'backlit_1_rave_unpaired_official_paired.png').is_file()
    text = next(results.glob('test_*.log')).read_text()
    psnr = float(re.search(r'# psnr: ([0-9.]+)', text).group(1))
    ssim = float(re.search(r'# ssim: ([0-9.]+)', text).group(1))
    assert psnr > 50 and ssim > 0.999
