"""RAVEModel in-process: stages, losses, residual handling, bad input, saving and the training state."""
import math
import random
import re

import pytest
import torch
from basicsr.data import build_dataset
from basicsr.metrics.psnr_ssim import calculate_psnr_pt
from basicsr.models import build_model
from basicsr.models.lr_scheduler import MultiStepRestartLR

from rave_basicsr.guidance.encoders import build_image_encoder
from rave_basicsr.models.backlit_base_model import TrainingDivergedError
from rave_basicsr.residual.compute import compute_residual
from rave_basicsr.utils.errors import RaveError
from tests.rave_helpers import demo_data, model_options, rave_options


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp('demo'), size=48, n_train=4, n_welllit=4, n_val=2)


def build(options, root, **overrides):
    torch.manual_seed(0)
    return build_model(model_options(options, root, **overrides))


def train_batch(opt, count=2):
    """The first ``count`` training items, cropped the same way whatever ran before (the crops draw from Python's
    global ``random``; a 32-px crop decides how fast the warm-up can reach the identity)."""
    random.seed(0)
    dataset = build_dataset(dict(opt['datasets']['train'], phase='train'))
    return torch.utils.data.default_collate([dataset[i] for i in range(count)])


def warnings_of(model, monkeypatch):
    """The warnings the model logs from now on (its BasicSR logger's handlers and propagation vary with what ran
    before in the same process, so neither caplog nor capfd sees them reliably)."""
    messages = []
    monkeypatch.setattr(model.logger, 'warning', lambda message, *args, **kwargs: messages.append(message % args))
    return messages


def val_loader(options):
    dataset = build_dataset(dict(options['datasets']['val'], phase='val'))
    return torch.utils.data.DataLoader(dataset, batch_size=1)


def test_stage_switch_at_configured_iteration(data, tmp_path):
    options = rave_options('switch', data, warmup_iters=3, crop=32)
    model = build(options, tmp_path)
    batch = train_batch(options)
    stages = []
    for it in range(1, 6):
        model.feed_data(batch)
        model.optimize_parameters(it)
        stages.append(sorted(model.get_current_log()))
    assert stages[:3] == [['warmup/l_id', 'warmup/l_total']] * 3
    assert stages[3:] == [['guided/l_id', 'guided/l_rave', 'guided/l_total']] * 2
    assert model.schedule.name == 'guided' and model.schedule.iter_in_stage == 2


def test_warmup_length_zero_trains_guided_from_the_start(data, tmp_path):
    model = build(rave_options('nowarm', data, warmup_iters=0, crop=32), tmp_path)
    assert model.schedule.name == 'guided'
    model.feed_data(train_batch(rave_options('nowarm', data)))
    model.optimize_parameters(1)
    assert 'guided/l_rave' in model.get_current_log()


def test_translation_loss_moves_each_input_by_the_residual_and_needs_the_mean_distance(data, tmp_path):
    options = rave_options('translate', data, warmup_iters=0, crop=32)
    options['train']['guidance_opt'] = {'type': 'ResidualTranslationLoss', 'loss_weight': 50.0}
    model = build(options, tmp_path)
    encoder = model.encoder('guidance_encoder')
    vector = compute_residual(encoder, data['outdir'] + '/train_welllit', data['outdir'] + '/train_backlit',
                              batch_size=4, progress=False)
    assert model.mean_distance == pytest.approx(vector.mean_distance, abs=1e-6)  # the property: test_residual
    model.feed_data(train_batch(options))
    loss, parts = model.stage_loss(model.schedule.current)
    with torch.no_grad():
        unit = torch.nn.functional.normalize
        target = unit(encoder.encode_image(model.lq), dim=-1) + model.mean_distance * vector.residual
        by_hand = 50.0 * (unit(encoder.encode_image(model.output), dim=-1) - target).pow(2).sum(1).mean()
    assert float(parts['l_rave']) == pytest.approx(float(by_hand), rel=1e-5)
    state = model.guidance_state_dict()
    assert state['mean_distance'] == model.mean_distance
    del state['mean_distance']  # a training state written before the loss existed
    model.load_guidance_state_dict(state)
    with pytest.raises(RaveError, match='ResidualTranslationLoss needs the residual\'s mean distance'):
        model.stage_loss(model.schedule.current)


def test_smoothness_loss_joins_the_guided_loss_of_the_network_illumination(data, tmp_path):
    options = rave_options('smooth', data, warmup_iters=0, crop=32)
    options['train']['smoothness_opt'] = {'type': 'IlluminationSmoothnessLoss', 'loss_weight': 5.0}
    model = build(options, tmp_path)
    model.feed_data(train_batch(options))
    loss, parts = model.stage_loss(model.schedule.current)
    assert list(parts) == ['l_rave', 'l_id', 'l_smooth']
    with torch.no_grad():
        light = model.net_g.illumination(model.lq)
        by_hand = 5.0 * model.cri_smoothness.__class__()(light)
    assert float(parts['l_smooth']) == pytest.approx(float(by_hand), rel=1e-5) and float(by_hand) > 0
    assert float(loss) == pytest.approx(sum(float(v) for v in parts.values()), rel=1e-6)
    model.optimize_parameters(1)
    assert 'guided/l_smooth' in model.get_current_log()
    # a network that does not return its illumination map is named in the error
    model.net_g = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(RaveError, match='train:smoothness_opt needs a network that returns its illumination map.*'
                                        'Conv2d does not'):
        model.stage_loss(model.schedule.current)


def test_guided_loss_decreases_on_fixed_data(data, tmp_path):
    options = rave_options('decrease', data, warmup_iters=30, crop=32)
    options['train']['warmup'].update(optim={'type': 'Adam', 'lr': 1e-3}, reinit_psnr=None)
    options['train']['optim_g']['lr'] = 1e-4
    model = build(options, tmp_path)
    batch = train_batch(options)
    losses = []
    for it in range(1, 51):
        model.feed_data(batch)
        model.optimize_parameters(it)
        if it > 30:
            losses.append(model.get_current_log()['guided/l_total'])
    assert losses[-1] < 0.7 * losses[0], losses


def test_warmup_makes_the_network_close_to_identity(data, tmp_path):
    options = rave_options('identity', data, warmup_iters=1000, crop=32, batch=4)
    options['train']['warmup'].update(optim={'type': 'Adam', 'lr': 1e-3}, reinit_psnr=None)
    model = build(options, tmp_path)
    batch = train_batch(options, count=4)
    for it in range(1, 81):
        model.feed_data(batch)
        model.optimize_parameters(it)
    psnrs = []
    for val_data in val_loader(options):
        model.feed_data(val_data)
        model.test()
        psnrs.append(float(calculate_psnr_pt(model.output, model.lq, crop_border=0)))
    assert min(psnrs) >= 30.0, psnrs


def build_with_dead_network(name, data, root, **train_overrides):
    """A model whose network is dead (``L`` = 0 everywhere: a negative ``cond_add1`` bias, EMA copy included) and
    whose warm-up guard fires after the second iteration (the PSNR of a white output is below 40 dB)."""
    options = rave_options(name, data, warmup_iters=50, crop=32)
    options['train']['warmup'].update(reinit_psnr=40.0, reinit_after=1, reinit_window=1)
    options['train'].update(train_overrides)
    model = build(options, root)
    with torch.no_grad():
        model.get_bare_model(model.net_g).cond_add1.bias.fill_(-1.0)
    if hasattr(model, 'net_g_ema'):
        model.model_ema(0)
    return model, options


def test_warmup_guard_revives_a_dead_network(data, tmp_path):
    """A network whose L is 0 everywhere (negative ``cond_add1`` bias, about half of all random draws) has no
    gradient; the guard re-creates it with every parameter drawn again, as the originals re-create the network."""
    model, options = build_with_dead_network('revive', data, tmp_path)
    net = model.get_bare_model(model.net_g)
    batch = train_batch(options)
    with torch.no_grad():
        assert (net.illumination(batch['lq']) == 0).all()
    key = model.schedule.current.optimizer
    optimizer = model.optimizer_by_name[key]
    model.feed_data(batch)
    model.optimize_parameters(1)
    model.feed_data(batch)
    model.optimize_parameters(2)  # the guard fires after this iteration (PSNR of a white output is below 40 dB)
    assert model.warmup_guard.count >= 1 and model.optimizer_by_name[key] is not optimizer
    bound = 1 / math.sqrt(32 * 9)  # PyTorch's default bias range for cond_add1
    assert -bound <= float(net.cond_add1.bias) <= bound


def test_reinitialisation_restarts_the_ema_copy(data, tmp_path):
    """With ``ema_decay`` the averaged network must follow the re-initialised one, not keep the dead one's weights
    (validation and ``rave enhance`` use the EMA copy)."""
    model, options = build_with_dead_network('revive_ema', data, tmp_path, ema_decay=0.999)
    net = model.get_bare_model(model.net_g)
    batch = train_batch(options)
    for it in (1, 2):
        model.feed_data(batch)
        model.optimize_parameters(it)
    assert model.warmup_guard.count >= 1
    ema = dict(model.net_g_ema.named_parameters())
    for name, value in net.named_parameters():
        assert torch.allclose(ema[name], value), name  # the restart copies; decay 0.999 would leave ~the dead weights


def test_learning_rate_schedule_goes_on_after_a_reinitialisation(data, tmp_path):
    """The re-initialised network gets a fresh optimiser; the configured scheduler must drive that one (it used
    to keep stepping the discarded optimiser, so the schedule silently stopped)."""
    model, options = build_with_dead_network(
        'resched', data, tmp_path, scheduler={'type': 'MultiStepLR', 'milestones': [3, 4], 'gamma': 0.5})
    batch = train_batch(options)
    lrs = []
    for it in range(1, 6):
        model.update_learning_rate(it)
        model.feed_data(batch)
        model.optimize_parameters(it)
        lrs.append(model.optimizer_by_name['net_g'].param_groups[0]['lr'])
    assert model.warmup_guard.count >= 1
    assert lrs == pytest.approx([2e-5, 2e-5, 2e-5, 1e-5, 5e-6])  # BasicSR steps schedulers from iteration 2
    assert model.schedulers[0].optimizer is model.optimizer_by_name['net_g']


def test_nan_loss_stops_before_touching_the_weights(data, tmp_path, monkeypatch):
    options = rave_options('nan', data, warmup_iters=0, crop=32)
    model = build(options, tmp_path)
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    original = type(model).stage_loss

    def nan_loss(self, stage):
        loss, parts = original(self, stage)
        return loss * float('nan'), parts

    monkeypatch.setattr(type(model), 'stage_loss', nan_loss)
    model.feed_data(train_batch(options))
    with pytest.raises(TrainingDivergedError, match='NaN/Inf.*last good checkpoint'):
        model.optimize_parameters(7)
    for key, value in model.net_g.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_residual_file_from_another_encoder_is_refused(data, tmp_path):
    other = build_image_encoder({'type': 'arch', 'network': {'type': 'ImageStatsEncoder', 'grid_size': 2}})
    path = tmp_path / 'other.safetensors'
    compute_residual(other, data['outdir'] + '/train_welllit', data['outdir'] + '/train_backlit',
                     progress=False).save(str(path))
    options = rave_options('otherenc', data)
    options['residual'] = {'path': str(path)}
    with pytest.raises(RaveError, match=r'the residual has 19-dimensional embeddings, but the encoder .*"type":'
                                        r'"arch"\} produces 31-dimensional ones'):
        build(options, tmp_path)


def test_residual_file_from_the_same_encoder_is_used(data, tmp_path):
    encoder = build_image_encoder({'type': 'arch', 'network': {'type': 'ImageStatsEncoder'}})
    vector = compute_residual(encoder, data['outdir'] + '/train_welllit', data['outdir'] + '/train_backlit',
                              progress=False)
    path = tmp_path / 'same.safetensors'
    vector.save(str(path))
    options = rave_options('sameenc', data)
    options['residual'] = {'path': str(path)}
    model = build(options, tmp_path)
    torch.testing.assert_close(model.residual, vector.residual)
    assert model.threshold == pytest.approx(vector.threshold)


def test_empty_well_lit_set_is_refused(data, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    options = rave_options('empty', data)
    options['residual']['well_lit'] = str(empty)
    with pytest.raises(RaveError, match=f'^{re.escape(str(empty))}: the folder is empty'):
        build(options, tmp_path)


def test_paired_validation_without_ground_truth_is_refused(data, tmp_path):
    options = rave_options('nogt', data)
    options['datasets']['val'].pop('dataroot_gt')
    model = build(options, tmp_path)
    with pytest.raises(RaveError, match='need ground truth.*dataroot_gt'):
        model.validation(val_loader(options), 1, None, False)
    # no-reference metrics run on the same set
    options['val']['metrics'] = {'guidance': {'type': 'calculate_guidance_score'}}
    model = build(options, tmp_path)
    model.validation(val_loader(options), 1, None, False)
    assert -1.0 <= model.validation_results['guidance'] <= 1.0


def test_validation_metrics_and_missing_lpips(data, tmp_path, monkeypatch, lpips_package):
    lpips_package(installed=False)
    metrics = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
               'psnr_y': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': True},
               'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False},
               'rave_psnr': {'type': 'calculate_rave_psnr'}, 'rave_ssim': {'type': 'calculate_rave_ssim'},
               'lpips': {'type': 'calculate_rave_lpips'}, 'guidance': {'type': 'calculate_guidance_score'}}
    options = rave_options('metrics', data, metrics=metrics)
    model = build(options, tmp_path)
    warnings = warnings_of(model, monkeypatch)
    model.validation(val_loader(options), 3, None, True)
    results = model.validation_results
    assert set(results) == {'psnr', 'psnr_y', 'ssim', 'rave_psnr', 'rave_ssim', 'guidance'}  # lpips skipped
    assert all(math.isfinite(v) for v in results.values())
    lpips_warnings = [w for w in warnings if 'lpips' in w.lower()]
    assert len(lpips_warnings) == 1
    assert lpips_warnings[0].startswith('metric "lpips" (LPIPS) skipped: LPIPS is unavailable (ModuleNotFoundError: ')
    assert lpips_warnings[0].endswith('install the optional `lpips` package on a machine that can fetch its AlexNet '
                                      'weights once.')
    pngs = list((tmp_path / 'experiments' / 'metrics' / 'visualization').rglob('*_3.png'))
    assert len(pngs) == 2


def test_lpips_runs_when_the_package_is_there(data, tmp_path, monkeypatch, lpips_package):
    from tests.conftest import FakeLPIPS

    lpips_package(installed=True)
    options = rave_options('lpips', data, metrics={'lpips': {'type': 'calculate_rave_lpips'}})
    model = build(options, tmp_path)
    warnings = warnings_of(model, monkeypatch)
    model.validation(val_loader(options), 1, None, False)
    assert len(FakeLPIPS.values) == 2  # one call per validation image
    assert model.validation_results['lpips'] == pytest.approx(sum(FakeLPIPS.values) / 2)
    assert warnings == []


def test_training_state_is_complete_and_weights_only(data, tmp_path):
    options = rave_options('state', data, warmup_iters=1, crop=32)
    model = build(options, tmp_path)
    model.feed_data(train_batch(options))
    model.optimize_parameters(1)
    model.save(0, 1)
    state = torch.load(tmp_path / 'experiments/state/training_states/1.state', weights_only=True)
    extra = state['backlit']
    assert extra['stages']['names'] == ['warmup', 'guided'] and extra['stages']['index'] == 1
    torch.testing.assert_close(extra['guidance']['residual'], model.residual.cpu())
    assert extra['guidance']['info']['encoder_identity'] == model.encoder('guidance_encoder').identity
    assert set(extra['encoders']) == {'identity_encoder', 'guidance_encoder'}
    weights = torch.load(tmp_path / 'experiments/state/models/net_g_1.pth', weights_only=True)
    assert set(weights) == {'params'} and not any('encoder' in k for k in weights['params'])
    assert len(list(weights['params'])) == len(model.net_g.state_dict())


def test_bf16_autocast_and_channels_last_train_on_cpu(data, tmp_path):
    options = rave_options('amp', data, warmup_iters=1, crop=32)
    options['train'].update(mixed_precision='bf16', channels_last=True)
    model = build(options, tmp_path)
    batch = train_batch(options)
    assert model.autocast_dtype is torch.bfloat16
    net = model.get_bare_model(model.net_g)
    assert net.cond1.weight.is_contiguous(memory_format=torch.channels_last)
    before = net.cond1.weight.detach().clone()
    for it in (1, 2):
        model.feed_data(batch)
        model.optimize_parameters(it)
    assert all(math.isfinite(v) for v in model.get_current_log().values())
    assert not torch.equal(net.cond1.weight, before)  # the steps were taken
    assert net.cond1.weight.dtype == torch.float32  # autocast leaves the weights in float32


def test_no_scheduler_and_a_basicsr_scheduler(data, tmp_path):
    options = rave_options('sched', data)
    assert build(options, tmp_path).schedulers == []
    options['train']['scheduler'] = {'type': 'MultiStepLR', 'milestones': [10], 'gamma': 0.5}
    model = build(options, tmp_path)
    assert len(model.schedulers) == 1 and isinstance(model.schedulers[0], MultiStepRestartLR)
    assert model.schedulers[0].optimizer is model.optimizers[0]
    assert (dict(model.schedulers[0].milestones), model.schedulers[0].gamma) == ({10: 1}, 0.5)
    # BasicSR pops "type" from the block it builds from; the model's options keep it (a resumed run rebuilds them)
    assert model.opt['train']['scheduler'] == {'type': 'MultiStepLR', 'milestones': [10], 'gamma': 0.5}


def test_shifted_residual_option_uses_the_toolkit(data, tmp_path):
    options = rave_options('shifted', data)
    options['guidance_encoder'] = {'type': 'open_clip', 'model': 'rave-test-tiny-vit', 'pretrained': None,
                                   'preprocess': {'size': 32, 'resize': 'squash'}}
    plain = build(options, tmp_path)
    options['residual']['shifted'] = {'remove_top': 2, 'remove_bottom': 2, 'limit': 300}
    shifted = build(options, tmp_path)
    assert abs(float(shifted.residual @ plain.residual)) < 0.9999
    assert float(shifted.residual.norm()) == pytest.approx(1.0, abs=1e-5)
    assert [step['step'] for step in shifted.residual_info['history']][-1] == 'remove_tokens'
