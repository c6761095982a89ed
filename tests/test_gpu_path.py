"""The CUDA / nccl / reduced-precision paths, checked on the CPU.

CI has no GPU, so each defect class that would only show on one is provoked here: ``torch.cuda`` availability,
device counts and bfloat16 support are monkeypatched, autocast runs on the CPU, and the fp16 GradScaler path runs
with CPU autocast. Factory calls without ``device=`` are caught by ``tests/test_default_device.py``. Over 400 lines:
one test (or two) per defect of the GPU path, kept together so that the list of defects reads in one place.
"""
import copy
import datetime
import math
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from basicsr.data import build_dataset
from basicsr.models import build_model

from rave_basicsr.archs.backlit_unet_arch import BacklitUNet
from rave_basicsr.cli.rave_cli import main as rave_main
from rave_basicsr.inference import enhancer as enhancer_module
from rave_basicsr.inference.enhance import enhance_files
from rave_basicsr.inference.enhancer import Enhancer
from rave_basicsr.inference.precision import mixed_precision_copy, resolve_precision
from rave_basicsr.losses.clip_guidance_loss import (CLIPIdentityLoss, PromptGuidanceLoss, PromptInitLoss,
                                                    PromptRankingLoss, ResidualTranslationLoss,
                                                    ResidualVectorLoss)
from rave_basicsr.models import backlit_base_model, training_state
from rave_basicsr.utils import distributed, hardware
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.checkpoint import torch_save_atomic
from rave_basicsr.utils.options import OptionError
from rave_basicsr.compat.basicsr_pipelines import load_resume_state
from tests.pipeline_helpers import free_port, subprocess_env, train_interrupted_and_reference, write_options
from tests.rave_helpers import demo_data, model_options, rave_options
from tests.weights_helpers import save_live_network


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp('demo'), size=48, n_train=4, n_welllit=4, n_val=2)


class FakeCuda:
    """Monkeypatches ``torch.cuda`` into a machine with ``count`` GPUs (nothing runs on them)."""

    def __init__(self, monkeypatch, count=1, native_bf16=True, current=0):
        self.rng_states = {index: torch.full((16,), index, dtype=torch.uint8) for index in range(count)}
        self.restored = []
        self.current = current
        for name, value in {
            'is_available': lambda: True, 'is_initialized': lambda: True, 'device_count': lambda: count,
            'current_device': lambda: self.current,
            'is_bf16_supported': lambda including_emulation=True: native_bf16 or including_emulation,
            'get_rng_state': lambda device='cuda': self.rng_states[self.current].clone(),
            'get_rng_state_all': lambda: [state.clone() for state in self.rng_states.values()],
            'set_rng_state': lambda state, device='cuda': self.restored.append((self.current, state)),
            'set_rng_state_all': self.set_all, 'set_device': self.set_device,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def set_all(self, states):
        for index, state in enumerate(states):
            if index not in self.rng_states:
                raise IndexError(f'list index out of range (no GPU {index})')  # as torch does with fewer GPUs
            self.restored.append((index, state))

    def set_device(self, index):
        if index not in self.rng_states:
            raise RuntimeError(f'invalid device ordinal {index}')
        self.current = index


# ---------------------------------------------------------------------------------------------- 1. resume on a GPU
def test_training_state_is_loaded_onto_the_cpu_when_the_run_uses_a_gpu(tmp_path, monkeypatch):
    FakeCuda(monkeypatch)
    path = tmp_path / '4.state'
    torch_save_atomic({'epoch': 1, 'iter': 4, 'optimizers': [{'state': {0: {'step': torch.tensor(4.0)}}}],
                       'backlit': {'rng': [{'torch': torch.get_rng_state()}]}}, path)
    torch_save_atomic({'params': BacklitUNet().state_dict()}, tmp_path / 'net_g_4.pth')
    opt = {'auto_resume': False, 'num_gpu': 1, 'name': 'x', 'network_g': {'type': 'BacklitUNet'},
           'path': {'resume_state': str(path), 'models': str(tmp_path)}}
    state = load_resume_state(opt)
    assert state['optimizers'][0]['state'][0]['step'].device.type == 'cpu'
    assert state['backlit']['rng'][0]['torch'].device.type == 'cpu'


class DeviceTensorStandIn:
    """A NumPy-key tensor that lives on a GPU: ``.numpy()`` fails until ``.cpu()`` is called, as on CUDA."""

    def __init__(self, tensor):
        self.tensor = tensor

    def cpu(self):
        return self.tensor

    def numpy(self):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")


def test_rng_state_restores_from_tensors_on_any_device():
    state = training_state.rng_state()
    expected = np.random.random()
    state['numpy'][1] = DeviceTensorStandIn(state['numpy'][1])
    training_state.set_rng_state(state)
    assert np.random.random() == expected


# ---------------------------------------------------------------------------------------------- 2. losses in fp32
def _loss_cases():
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    pair, embeds = randn(2, 64), randn(6, 64)
    features = [randn(6, 8, 5, 5) for _ in range(5)]
    return [
        ('identity', CLIPIdentityLoss(), (features, [f + 0.1 * randn(*f.shape) for f in features])),
        ('prompt guidance', PromptGuidanceLoss(), (embeds, pair)),
        ('prompt init', PromptInitLoss(), (embeds, pair, torch.tensor([0, 1, 0, 1, 0, 1]))),
        ('ranking', PromptRankingLoss(), (pair, embeds, randn(6, 64), randn(6, 64), randn(6, 64))),
        ('residual', ResidualVectorLoss(), (embeds, randn(64), 0.05)),
        ('residual translation', ResidualTranslationLoss(), (embeds, randn(6, 64), randn(64), 0.2)),
    ]


@pytest.mark.parametrize('name, loss, args', _loss_cases(), ids=[case[0] for case in _loss_cases()])
def test_every_loss_is_float32_inside_bf16_autocast(name, loss, args):
    reference = loss(*args)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = loss(*args)
    assert mixed.dtype == torch.float32
    assert float(mixed) == pytest.approx(float(reference), rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize('precision', ['bf16 autocast', 'bf16 network', 'fp16 network', 'mixed'])
def test_pyramid_pooling_averages_in_float32_in_every_precision(precision, monkeypatch):
    """CUDA's float16 adaptive pooling returned zeros for the 2×2, 3×3 and 6×6 bins of a 4000×3000 image on an
    H200 (13 grey levels off); the network pools in float32 whatever it computes in, as the exact tiling does."""
    network = BacklitUNet().eval()
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    pooled_dtypes = []
    original = F.adaptive_avg_pool2d

    def recording_pool(input, output_size):
        pooled_dtypes.append(input.dtype)
        return original(input, output_size)
    monkeypatch.setattr(F, 'adaptive_avg_pool2d', recording_pool)
    with torch.no_grad():
        reference = network.illumination(image)
        pooled_dtypes.clear()
        if precision == 'bf16 autocast':
            with torch.autocast('cpu', dtype=torch.bfloat16):
                light = network.illumination(image)
        elif precision == 'mixed':
            light = mixed_precision_copy(network).illumination(image)
        else:
            dtype = torch.bfloat16 if precision == 'bf16 network' else torch.float16
            light = copy.deepcopy(network).to(dtype).illumination(image.to(dtype))
    assert pooled_dtypes == [torch.float32] * 4, pooled_dtypes
    torch.testing.assert_close(light.float(), reference, rtol=0, atol=0.02)


# ------------------------------------------------------------------------------ 4. validation tiles large images
def test_validation_tiles_exactly_and_automatically_above_a_pixel_count(data, tmp_path, monkeypatch):
    options = rave_options('tiledval', data)
    model = build_model(model_options(options, tmp_path))
    calls = []
    original = enhancer_module.tiled_forward

    def spy(network, image, tile, **kwargs):
        calls.append(tile)
        return original(network, image, tile, **kwargs)

    monkeypatch.setattr(enhancer_module, 'tiled_forward', spy)
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    model.feed_data({'lq': image})
    model.opt['val']['tile'] = 0
    model.test()
    whole, whole_light = model.output.clone(), model.illumination.clone()
    assert calls == []
    model.opt['val']['tile'] = 16
    model.test()
    assert calls == [16]
    torch.testing.assert_close(model.output, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.illumination, whole_light, atol=1e-5, rtol=0)
    model.opt['val']['tile'] = None  # automatic: above AUTO_TILE_PIXELS, as rave enhance
    monkeypatch.setattr(enhancer_module, 'AUTO_TILE_PIXELS', 40 * 40)
    monkeypatch.setattr(enhancer_module, 'AUTO_TILE', 24)
    model.test()
    assert calls == [16, 24]
    torch.testing.assert_close(model.output, whole, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- 5. out of memory: retry with smaller tiles
def test_enhance_retries_an_image_that_runs_out_of_memory_with_smaller_tiles(tmp_path, monkeypatch):
    import cv2

    weights = save_live_network(tmp_path / 'net.pth')
    (tmp_path / 'in').mkdir()
    rng = np.random.default_rng(0)
    for name in ('a', 'b', 'c'):
        cv2.imwrite(str(tmp_path / 'in' / f'{name}.png'), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    reference = enhance_files([tmp_path / 'in'], tmp_path / 'ref', weights=str(weights), device='cpu',
                              precision='fp32', progress=False, echo=lambda text: None)
    original = Enhancer.enhance
    tiles_tried = []

    def enhance_with_little_memory(self, image, tile=None, return_illumination=False):
        tiles_tried.append(tile)
        if tile == 0 or tile > 30:  # the device holds at most 30-px tiles
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return original(self, image, tile, return_illumination)

    monkeypatch.setattr(Enhancer, 'enhance', enhance_with_little_memory)
    monkeypatch.setattr('rave_basicsr.inference.enhance.MIN_RETRY_TILE', 16)  # these test images are small
    summary = enhance_files([tmp_path / 'in'], tmp_path / 'out', weights=str(weights), device='cpu', precision='fp32',
                            progress=False, echo=lambda text: None)
    assert summary.ok and len(summary.written) == 3 and len(summary.retried) == 3
    assert tiles_tried[:4] == [0, 40, 20, 0] and '20-px tiles' in summary.retried[0][1]
    assert 'ran out of memory' in summary.describe()
    for name in ('a', 'b', 'c'):
        ours, ref = (cv2.imread(str(tmp_path / folder / f'{name}.png')).astype(int) for folder in ('out', 'ref'))
        assert np.abs(ours - ref).max() <= 1, name  # exact tiling: the same image
    assert reference.ok


def test_enhance_reports_an_image_that_never_fits_and_goes_on(tmp_path, monkeypatch):
    import cv2

    weights = save_live_network(tmp_path / 'net.pth')
    (tmp_path / 'in').mkdir()
    cv2.imwrite(str(tmp_path / 'in' / 'big.png'), np.zeros((300, 300, 3), np.uint8))
    cv2.imwrite(str(tmp_path / 'in' / 'small.png'), np.zeros((20, 20, 3), np.uint8))
    original = Enhancer.enhance

    def enhance_with_little_memory(self, image, tile=None, return_illumination=False):
        if image.shape[-1] > 100:
            raise torch.OutOfMemoryError('CUDA out of memory.')
        return original(self, image, tile, return_illumination)

    monkeypatch.setattr(Enhancer, 'enhance', enhance_with_little_memory)
    summary = enhance_files([tmp_path / 'in'], tmp_path / 'out', weights=str(weights), device='cpu', precision='fp32',
                            progress=False, echo=lambda text: None)
    assert [w[0] for w in summary.written] == [str(tmp_path / 'in' / 'small.png')]
    assert len(summary.failed) == 1 and 'even with 64-px tiles' in summary.failed[0][1]


# --------------------------------------------------------------------- 6. collective timeout and prompt failure end
def test_collective_timeout_is_generous_and_configurable(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, 'init_process_group', lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed, 'watch_for_failures', lambda: None)
    for key, value in {'RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '1'}.items():
        monkeypatch.setenv(key, value)
    distributed.init_distributed('pytorch', 0)
    distributed.init_distributed('pytorch', 0, {'timeout': 60})
    assert [call['timeout'] for call in calls] == [datetime.timedelta(seconds=7200), datetime.timedelta(seconds=60)]
    with pytest.raises(OptionError, match='dist_params:timeout'):
        distributed.init_distributed('pytorch', 0, {'timeout': 'long'})


FAILING_RANK = textwrap.dedent('''
    import sys, time
    from rave_basicsr.utils import distributed
    from rave_basicsr.cli.basicsr_cli import end_distributed_run_on_error
    from rave_basicsr.utils.errors import RaveError
    distributed.FAILURE_POLL_SECONDS = 0.2
    distributed.init_distributed('pytorch', 0)
    import torch.distributed as dist
    if dist.get_rank() == 1:
        time.sleep(1)
        end_distributed_run_on_error('train', RaveError('the residual images are unreadable'))
    time.sleep(120)  # rank 0: long rank-0-only work (validation), outside any collective
    print('rank 0 was never stopped')
''')


def test_an_error_on_one_rank_ends_every_rank_within_seconds(tmp_path):
    """Rank 1 fails while rank 0 validates: rank 0 stops within seconds (not at the end of its work or at the
    collective timeout), naming the failed rank and its message; both exit non-zero. Started without torchrun, whose
    agent would otherwise end the ranks itself (slurm and hand-started runs have no such agent)."""
    script = tmp_path / 'rank.py'
    script.write_text(FAILING_RANK)
    port = str(free_port())
    started = time.monotonic()
    processes = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=dict(subprocess_env(), RANK=str(rank), LOCAL_RANK=str(rank),
                                                      WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=port))
                 for rank in (0, 1)]
    outputs = [process.communicate(timeout=100) for process in processes]
    elapsed = time.monotonic() - started
    assert elapsed < 60, outputs
    assert processes[1].returncode == 2 and 'rank 1: error: the residual images are unreadable' in outputs[1][1]
    assert processes[0].returncode == 1, outputs[0]
    assert 'rank 0: stopping because rank 1 failed: the residual images are unreadable' in outputs[0][1]


def test_a_finished_run_stops_the_failure_watch_and_destroys_the_process_group():
    """After a normal end every rank leaves with no live process group and no watch thread inside a store call
    (a rank that tore those down at interpreter exit could abort a finished run)."""
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        thread = distributed.watch_for_failures(poll_seconds=0.05)
        assert thread is not None and thread.is_alive()
        distributed.end_distributed_run()
        assert not thread.is_alive() and not dist.is_initialized()
        distributed.end_distributed_run()  # outside a distributed run: nothing to do
    finally:  # a failed assertion must not leave the group to the tests that follow
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ 7. CUDA RNG states
def test_cuda_rng_state_is_the_current_devices_and_resumes_with_fewer_gpus(monkeypatch):
    fake = FakeCuda(monkeypatch, count=2, current=1)
    state = training_state.rng_state()
    assert torch.equal(state['cuda'], fake.rng_states[1])  # this rank's generator only
    FakeCuda(monkeypatch, count=1)  # resumed on a machine (or CUDA_VISIBLE_DEVICES) with one GPU
    restorer = FakeCuda(monkeypatch, count=1)
    training_state.set_rng_state(state)
    assert len(restorer.restored) == 1 and torch.equal(restorer.restored[0][1], fake.rng_states[1])


# ----------------------------------------------------------------------------------------------- 8. bfloat16 guards
class _FakeModel:
    def __init__(self, device):
        self.device = torch.device(device)
        self.scaler = None
        self.warnings = []
        self.logger = type('Logger', (), {'warning': lambda _, message: self.warnings.append(message)})()


def test_bf16_training_needs_native_bfloat16_on_a_gpu(monkeypatch):
    FakeCuda(monkeypatch, native_bf16=False)  # pre-Ampere: emulated bfloat16 only
    with pytest.raises(RaveError, match='no native bfloat16'):
        backlit_base_model.BacklitBaseModel.setup_precision(_FakeModel('cuda'), {'mixed_precision': 'bf16'})
    FakeCuda(monkeypatch, native_bf16=True)
    model = _FakeModel('cuda')
    backlit_base_model.BacklitBaseModel.setup_precision(model, {'mixed_precision': 'bf16'})
    assert model.autocast_dtype is torch.bfloat16


def test_bf16_training_on_a_cpu_without_native_bfloat16_warns(monkeypatch):
    monkeypatch.setattr(hardware, 'cpu_has_native_bf16', lambda: False)
    model = _FakeModel('cpu')
    backlit_base_model.BacklitBaseModel.setup_precision(model, {'mixed_precision': 'bf16'})
    assert model.autocast_dtype is torch.bfloat16 and 'emulated' in model.warnings[0]


@pytest.mark.parametrize('native, expected', [(True, 'mixed'), (False, 'fp32')])
def test_auto_precision_follows_native_bfloat16_support(monkeypatch, native, expected):
    FakeCuda(monkeypatch, native_bf16=native)
    monkeypatch.setattr(hardware, 'cpu_has_native_bf16', lambda: native)
    for device in ('cuda', 'cpu'):
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            assert resolve_precision('auto', torch.device(device)) == expected


@pytest.mark.parametrize('precision', ['mixed', 'bf16'])
def test_forcing_an_emulated_precision_warns(monkeypatch, precision):
    FakeCuda(monkeypatch, native_bf16=False)
    monkeypatch.setattr(hardware, 'cpu_has_native_bf16', lambda: False)
    for device in ('cuda', 'cpu'):
        with pytest.warns(UserWarning, match='no native bfloat16'):
            assert resolve_precision(precision, torch.device(device)) == precision


def test_rave_enhance_defaults_to_auto_precision(tmp_path, monkeypatch):
    import cv2

    monkeypatch.setattr(hardware, 'cpu_has_native_bf16', lambda: False)
    chosen = []
    original = Enhancer.__init__

    def recording_init(self, network, precision='auto', prepare=True):
        original(self, network, precision, prepare)
        chosen.append((precision, self.precision))

    monkeypatch.setattr(Enhancer, '__init__', recording_init)
    cv2.imwrite(str(tmp_path / 'p.png'), np.zeros((8, 8, 3), np.uint8))
    assert rave_main(['enhance', str(tmp_path / 'p.png'), '-o', str(tmp_path / 'o'), '--weights',
                      str(save_live_network(tmp_path / 'net.pth')), '--device', 'cpu', '--quiet']) == 0
    assert chosen == [('auto', 'fp32')]


# ----------------------------------------------------------------------------------------- 9. one GPU per local rank
def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    fake = FakeCuda(monkeypatch, count=2)
    monkeypatch.setattr(dist, 'init_process_group', lambda **kwargs: None)
    monkeypatch.setattr(distributed, 'watch_for_failures', lambda: None)
    for key, value in {'RANK': '2', 'WORLD_SIZE': '3', 'LOCAL_RANK': '2', 'MASTER_ADDR': '127.0.0.1',
                       'MASTER_PORT': '1'}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(OptionError, match='local rank 2 has no GPU of its own: 2 GPU'):
        distributed.init_distributed('pytorch', 1)
    assert fake.current == 0  # no second rank was put on GPU 0
    monkeypatch.setenv('LOCAL_RANK', '1')
    distributed.init_distributed('pytorch', 1)
    assert fake.current == 1


# ------------------------------------------------------------------------- 10. encoders do not reseed the GPUs
def test_building_an_encoder_leaves_every_cuda_generator_alone(monkeypatch):
    from rave_basicsr.guidance.encoders import build_image_encoder

    reseeded = []
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, 'manual_seed', lambda seed: reseeded.append(seed))
    before = torch.get_rng_state()
    build_image_encoder({'type': 'open_clip', 'model': 'rave-test-tiny-vit', 'pretrained': None})
    assert reseeded == [] and torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------------------------- 11. --device checks
@pytest.mark.parametrize('name, message', [('cuda:1', 'has 1 visible GPU'), ('cuda:x', "'cuda:x'"),
                                           ('cuda:-1', "'cuda:-1'"), ('gpu', "'gpu'")])
def test_bad_device_names_are_clear_errors(monkeypatch, tmp_path, capsys, name, message):
    FakeCuda(monkeypatch, count=1)
    with pytest.raises(RaveError, match=message):
        hardware.select_device(name)
    assert rave_main(['enhance', str(tmp_path), '-o', str(tmp_path / 'o'), '--device', name, '--quiet']) == 2
    assert message.strip("'") in capsys.readouterr().err
    assert hardware.select_device('cuda:0') == torch.device('cuda', 0)


# -------------------------------------------------------------------------------------------------- 12. fp32 is fp32
@pytest.mark.parametrize('precision, expected', [('fp32', 'ieee'), ('tf32', 'tf32')])
def test_fp32_inference_switches_tf32_off(monkeypatch, precision, expected):
    seen = []
    network = BacklitUNet()
    network.cond1.register_forward_hook(lambda *args: seen.append(torch.backends.cudnn.conv.fp32_precision))
    monkeypatch.setattr(enhancer_module, 'resolve_precision', lambda precision, device, **_: precision)  # tf32 kept on CPU
    before = torch.backends.cudnn.conv.fp32_precision
    Enhancer(network, precision).enhance(torch.rand(1, 3, 16, 16))
    Enhancer(network, precision).enhance(torch.rand(1, 3, 40, 40), tile=16)
    assert set(seen) == {expected}
    assert torch.backends.cudnn.conv.fp32_precision == before


@pytest.mark.parametrize('allow_tf32', [False, True])
def test_tf32_settings_stay_consistent_for_cublas(allow_tf32):
    """cuBLAS asks ``allowTF32CuBLAS()`` before every CUDA matrix product (exact tiling runs ``mm``/``bmm``), and
    since PyTorch 2.9 that check raises when the legacy matmul precision and the new ``fp32_precision`` flag
    disagree: with only the new flag set, ``--precision tf32`` failed on every tiled photo on a GPU. The public
    getter below makes the same check."""
    before = torch.backends.cuda.matmul.allow_tf32
    with hardware.float32_math(allow_tf32):
        assert torch.backends.cuda.matmul.allow_tf32 is allow_tf32
        assert torch.backends.cudnn.conv.fp32_precision == ('tf32' if allow_tf32 else 'ieee')
    assert torch.backends.cuda.matmul.allow_tf32 is before


# --------------------------------------------------------------------------------- the fp16 GradScaler path (CPU)
def test_fp16_training_with_a_grad_scaler_resumes_exactly(data, tmp_path):
    """Scale, unscale, the NaN check, step and update with a GradScaler under fp16 autocast (CPU), interrupted and
    resumed: the scaler's state is part of the training state and the weights equal an uninterrupted run's."""
    options = rave_options('fp16', data, total_iter=4, warmup_iters=2, save_freq=2)
    options['train']['mixed_precision'] = 'fp16'
    options['val']['val_freq'] = 100
    option_file = write_options(tmp_path / 'fp16.yml', options)
    reference_dir, resumed_dir = train_interrupted_and_reference(option_file, tmp_path, stop_at=2)
    final = [torch.load(folder / 'experiments/fp16/models/net_g_latest.pth', weights_only=True)['params']
             for folder in (reference_dir, resumed_dir)]
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), key
    state = torch.load(resumed_dir / 'experiments/fp16/training_states/2.state', weights_only=True)
    assert state['backlit']['scaler']['scale'] > 0 and '_growth_tracker' in state['backlit']['scaler']


def test_fp16_grad_scaler_skips_overflowing_steps_and_stops_on_a_nan_loss(data, tmp_path):
    options = rave_options('fp16nan', data, warmup_iters=1)
    options['train']['mixed_precision'] = 'fp16'
    torch.manual_seed(0)  # a live network (some seeds draw L = 0 everywhere, whose zero gradients cannot overflow)
    model = build_model(model_options(options, tmp_path))
    assert model.scaler is not None and model.scaler.is_enabled()
    dataset = build_dataset(dict(options['datasets']['train'], phase='train'))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    scaler_state = model.scaler.state_dict()
    scaler_state['scale'] = 2.0 ** 120  # a scale whose scaled gradients overflow fp16: the step is skipped
    model.scaler.load_state_dict(scaler_state)
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    model.feed_data(batch)
    model.optimize_parameters(1)
    assert all(torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())
    assert model.scaler.get_scale() < 2.0 ** 120
    model.net_g.cond1.weight.data.fill_(math.nan)  # gradients overflow at every step from now on
    for it in range(2, 4):  # skipped steps while the scale is still usable
        model.feed_data(batch)
        model.optimize_parameters(it)
    assert model.scaler.get_scale() < 2.0 ** 118
    scaler_state['scale'] = backlit_base_model.FP16_MIN_LOSS_SCALE / 2
    model.scaler.load_state_dict(scaler_state)
    model.feed_data(batch)
    with pytest.raises(backlit_base_model.TrainingDivergedError, match='NaN/Inf.*fp16 loss scale'):
        model.optimize_parameters(4)
