"""Options that are present but empty (``~``): each one either switches something off, as BasicSR users expect,
or is a clear error naming the key (``utils/options.py``: ``settle_empty_options``; docs/training.md lists them).
Every key of a RAVE and a CLIP-LIT-Latent option file is set to ``~`` in turn and the model is built, trained for a
step and validated: nothing may end in a raw exception."""
import copy

import pytest
import torch
from basicsr.data import build_dataset
from basicsr.models import build_model

from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.options import apply_overrides, settle_empty_options
from tests.clip_lit_helpers import clip_lit_options
from tests.pipeline_helpers import run_basicsr, write_options
from tests.rave_helpers import demo_data, model_options, rave_options

pytestmark = pytest.mark.slow

#: keys whose ``~`` means "off": the run goes on without them
SWITCHED_OFF = {'val:metrics:psnr', 'val:metrics:ssim', 'val:metrics', 'val', 'datasets:val', 'train:scheduler',
                'train:ema_decay', 'logger:wandb'}
#: keys that are not the plugin's to judge (BasicSR's identifiers and the distributed block)
SKIPPED = {'name', 'model_type', 'num_gpu', 'manual_seed', 'dist_params'}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp('demo'), size=32, n_train=2, n_welllit=2, n_val=1)


def full_options(options: dict) -> dict:
    options['val']['metrics']['ssim'] = {'type': 'calculate_ssim', 'crop_border': 0}
    options['train']['scheduler'] = {'type': 'MultiStepLR', 'milestones': [10], 'gamma': 0.5}
    options['train']['warmup']['optim'] = {'type': 'Adam', 'lr': 1e-3}
    options['logger']['wandb'] = {'project': None}
    return options


def key_paths(block: dict, prefix: tuple = ()):
    for key, value in block.items():
        if prefix or key not in SKIPPED:
            yield prefix + (key,)
            if isinstance(value, dict):
                yield from key_paths(value, prefix + (key,))


def run_with_empty(options: dict, keys: tuple, root) -> dict:
    """Set ``keys`` to ~ as --force_yml does, settle the options, build the model, train one step, validate."""
    opt = copy.deepcopy(options)
    apply_overrides(opt, [':'.join(keys) + '=~'])
    settle_empty_options(opt, is_train=True)
    opt = model_options(opt, root)
    torch.manual_seed(0)
    model = build_model(opt)
    dataset = build_dataset(dict(opt['datasets']['train'], phase='train'))
    model.feed_data(torch.utils.data.default_collate([dataset[0], dataset[1]]))
    model.optimize_parameters(1)
    if opt.get('val') is not None and 'val' in opt['datasets']:
        loader = torch.utils.data.DataLoader(build_dataset(dict(opt['datasets']['val'], phase='val')))
        model.nondist_validation(loader, 1, None, False)
    return opt


@pytest.mark.parametrize('method', ['rave', 'clip_lit_latent'])
def test_every_empty_option_is_off_or_a_clear_error(data, tmp_path, method):
    options = full_options(rave_options('empty', data, total_iter=2, warmup_iters=1) if method == 'rave' else
                           clip_lit_options('empty', data, total_iter=2, stages=(1, 1, 1, 1), prompt_batch=2))
    outcomes = {}
    for keys in key_paths(options):
        name = ':'.join(keys)
        try:
            run_with_empty(options, keys, tmp_path)
            outcomes[name] = 'ok'
        except RaveError as exc:
            outcomes[name] = str(exc)
        except Exception as exc:  # noqa: BLE001  (what this test exists to catch)
            pytest.fail(f'{name}: ~ ends in {type(exc).__name__}: {exc}')
    for name in SWITCHED_OFF:
        assert outcomes[name] == 'ok', (name, outcomes[name])
    for name in ('datasets', 'datasets:train', 'network_g', 'path', 'train', 'train:optim_g',
                 'train:optim_g:lr', 'val:metrics:psnr:crop_border', 'val:metrics:psnr:type', 'network_g:type'):
        assert outcomes[name].startswith(f'option {name} is empty (~)'), (name, outcomes[name])


def test_switched_off_metric_is_not_computed(data, tmp_path):
    opt = run_with_empty(full_options(rave_options('off', data, total_iter=2, warmup_iters=1)),
                         ('val', 'metrics', 'ssim'), tmp_path)
    assert 'ssim' not in opt['val']['metrics'] and 'psnr' in opt['val']['metrics']


def test_empty_metric_through_the_command_line(data, tmp_path):
    """The reported case: ``--force_yml val:metrics:ssim=~`` ended in AttributeError."""
    option_file = write_options(tmp_path / 'rave.yml', full_options(rave_options('cli', data, total_iter=2,
                                                                                 warmup_iters=1)))
    result = run_basicsr(['train', '-opt', str(option_file), '--force_yml', 'val:metrics:ssim=~'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_basicsr(['train', '-opt', str(option_file), '--force_yml', 'train:optim_g:lr=~'], cwd=tmp_path)
    assert result.returncode == 2 and 'option train:optim_g:lr is empty (~)' in result.stderr
    assert 'Traceback' not in result.stderr
