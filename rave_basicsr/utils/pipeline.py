"""Run BasicSR's own ``train_pipeline`` / ``test_pipeline`` safely, on CPU as on CUDA, alone or distributed.

BasicSR 1.4.2's pipelines assume CUDA in three places and trust their option files completely. Rather than edit
site-packages, :func:`patch_basicsr_pipelines` swaps these functions for the ones below, inside this process only:

- ``parse_options``: same command line and option semantics, but a safe YAML loader, ``--force_yml`` without
  ``exec``, registry names checked up front (with close matches), and distributed initialisation that picks nccl
  on GPUs and gloo on CPU-only runs, with a clear message when ``torchrun``'s environment is missing;
- ``load_resume_state``: loads the saved state onto the CPU (BasicSR maps it to ``torch.cuda.current_device()``);
  every consumer moves its own tensors there, and optimiser step counters stay on the CPU as PyTorch expects;
- ``BaseModel.model_to_device``: wraps CPU models in DDP without ``device_ids`` (CUDA: the local device);
- ``BaseModel.save_network`` / ``save_training_state``: atomic writes that raise on failure (BasicSR's retry loop
  ends by ignoring the error, which loses work silently).
"""
import argparse
import random
from os import path as osp
from typing import List, Optional, Tuple

import torch

from rave_basicsr.utils.distributed import init_distributed
from rave_basicsr.utils.checkpoint import torch_save_atomic
from rave_basicsr.utils.options import OptionError, apply_overrides, close_matches_hint, load_option_file

def build_argument_parser(is_train: bool, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The flags of BasicSR's ``train.py`` / ``test.py``, with help texts."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=('Train a model with BasicSR\'s training loop.' if is_train else
                     'Test a model with BasicSR\'s test pipeline (writes results/<name>/).'),
        epilog='Experiments, results and tensorboard logs are written under the current directory.')
    parser.add_argument('-opt', required=True, metavar='FILE', help='path to the option YAML file')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='job launcher: none (single process), pytorch (started by torchrun) or slurm (srun)')
    parser.add_argument('--auto_resume', action='store_true',
                        help='resume from the newest training state in experiments/<name>/training_states')
    parser.add_argument('--debug', action='store_true',
                        help='debug mode: name prefixed by debug_, print/save/validate every few iterations')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help='accepted for torch.distributed.launch; torchrun passes LOCAL_RANK instead')
    parser.add_argument('--force_yml', nargs='+', default=None, metavar='KEY:KEY=VALUE',
                        help='override options, e.g. train:ema_decay=0.999 (values are parsed as YAML)')
    return parser


def check_registered_types(opt: dict) -> None:
    """Fail before any work when a ``type`` / ``model_type`` names nothing registered, listing close matches."""
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

    def check(registry, name, where):
        if name is None:
            return
        if name not in registry and f'{name}_basicsr' not in registry:
            raise OptionError(f'{where}: {name!r} is not in BasicSR\'s {registry._name} registry'
                              f'{close_matches_hint(name, registry.keys())} '
                              '(run `basicsr list` to see every registered name; is the plugin installed?)')

    check(MODEL_REGISTRY, opt.get('model_type', 'SRModel'), 'model_type')
    for key, value in opt.items():
        if key.startswith('network_') and isinstance(value, dict):
            check(ARCH_REGISTRY, value.get('type'), f'{key}:type')
    for phase, dataset_opt in (opt.get('datasets') or {}).items():
        if isinstance(dataset_opt, dict):
            check(DATASET_REGISTRY, dataset_opt.get('type'), f'datasets:{phase}:type')
    for key, value in (opt.get('train') or {}).items():
        if key.endswith('_opt') and isinstance(value, dict) and 'type' in value:
            check(LOSS_REGISTRY, value['type'], f'train:{key}:type')
    for name, metric_opt in ((opt.get('val') or {}).get('metrics') or {}).items():
        if isinstance(metric_opt, dict):
            check(METRIC_REGISTRY, metric_opt.get('type'), f'val:metrics:{name}:type')


def parse_options(root_path: str, is_train: bool = True, argv: Optional[List[str]] = None) -> Tuple[dict, argparse.Namespace]:
    """Drop-in replacement for ``basicsr.utils.options.parse_options`` (same arguments, same resulting dict)."""
    from basicsr.utils import set_random_seed
    from basicsr.utils.dist_util import get_dist_info

    args = build_argument_parser(is_train).parse_args(argv)
    opt = load_option_file(args.opt)
    apply_overrides(opt, args.force_yml)
    for key in ('name', 'num_gpu', 'datasets', 'path'):
        if key not in opt:
            raise OptionError(f'{args.opt}: the required option {key!r} is missing.')
    if opt['num_gpu'] == 'auto':
        opt['num_gpu'] = torch.cuda.device_count()
    if opt['num_gpu'] and not torch.cuda.is_available():
        raise OptionError(f'{args.opt}: num_gpu is {opt["num_gpu"]} but no CUDA device is available; '
                          'use --force_yml num_gpu=0 to run on the CPU.')
    check_registered_types(opt)

    if args.launcher == 'none':
        opt['dist'] = False
    else:
        opt['dist'] = True
        init_distributed(args.launcher, opt['num_gpu'], opt.get('dist_params'))
    opt['rank'], opt['world_size'] = get_dist_info()

    seed = opt.get('manual_seed')
    if seed is None:
        seed = random.randint(1, 10000)
        opt['manual_seed'] = seed
    set_random_seed(seed + opt['rank'])

    opt['auto_resume'] = args.auto_resume
    opt['is_train'] = is_train
    if args.debug and not opt['name'].startswith('debug'):
        opt['name'] = 'debug_' + opt['name']

    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase.split('_')[0]
        if 'scale' in opt:
            dataset['scale'] = opt['scale']
        for key in ('dataroot_gt', 'dataroot_lq'):
            if dataset.get(key) is not None:
                dataset[key] = osp.expanduser(dataset[key])
    for key, val in opt['path'].items():
        if val is not None and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = osp.expanduser(val)

    if is_train:
        experiments_root = osp.join(root_path, 'experiments', opt['name'])
        opt['path'].update(experiments_root=experiments_root, models=osp.join(experiments_root, 'models'),
                           training_states=osp.join(experiments_root, 'training_states'), log=experiments_root,
                           visualization=osp.join(experiments_root, 'visualization'))
        if 'debug' in opt['name']:
            if 'val' in opt:
                opt['val']['val_freq'] = 8
            opt['logger']['print_freq'] = 1
            opt['logger']['save_checkpoint_freq'] = 8
    else:
        results_root = osp.join(root_path, 'results', opt['name'])
        opt['path'].update(results_root=results_root, log=results_root,
                           visualization=osp.join(results_root, 'visualization'))
    return opt, args


def load_resume_state(opt: dict) -> Optional[dict]:
    """BasicSR's resume-state lookup, loading onto the CPU with weights_only (the model moves what it needs)."""
    from basicsr.utils import check_resume, scandir

    resume_state_path = None
    if opt['auto_resume']:
        state_path = osp.join('experiments', opt['name'], 'training_states')
        if osp.isdir(state_path):
            states = [name for name in scandir(state_path, suffix='state', recursive=False, full_path=False)]
            if states:
                newest = max(float(name.split('.state')[0]) for name in states)
                resume_state_path = osp.join(state_path, f'{newest:.0f}.state')
                opt['path']['resume_state'] = resume_state_path
    elif opt['path'].get('resume_state'):
        resume_state_path = opt['path']['resume_state']
    if resume_state_path is None:
        return None
    resume_state = load_training_state(resume_state_path)
    check_resume(opt, resume_state['iter'])
    return resume_state


def load_training_state(path: str) -> dict:
    """Load a ``.state`` file onto the CPU with ``weights_only=True`` (BasicSR's schedulers store a Counter,
    allowed here). The CPU, not the run's GPU: optimisers move their state to their parameters' device themselves
    (keeping Adam's ``step`` on the CPU, where PyTorch wants it), and RNG states must be CPU tensors."""
    from collections import Counter

    with torch.serialization.safe_globals([Counter]):
        return torch.load(path, map_location='cpu', weights_only=True)


def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
    """``BaseModel.model_to_device`` that also works for CPU DDP (gloo): no ``device_ids`` there."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    net = net.to(self.device)
    if self.opt['dist']:
        find_unused = self.opt.get('find_unused_parameters', False)
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        net = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)
    elif self.opt['num_gpu'] > 1:
        net = DataParallel(net)
    return net


def save_network(self, net, net_label: str, current_iter: int, param_key='params') -> None:
    """``BaseModel.save_network`` (same file name and layout), written atomically by rank 0 only."""
    from basicsr.utils.dist_util import get_dist_info

    if get_dist_info()[0] != 0:
        return
    nets = net if isinstance(net, list) else [net]
    param_keys = param_key if isinstance(param_key, list) else [param_key]
    if len(nets) != len(param_keys):
        raise ValueError('save_network needs one param_key per network.')
    save_dict = {}
    for net_, key in zip(nets, param_keys):
        state_dict = self.get_bare_model(net_).state_dict()
        save_dict[key] = {(name[7:] if name.startswith('module.') else name): value.cpu().contiguous()
                          for name, value in state_dict.items()}
    label = 'latest' if current_iter == -1 else current_iter
    torch_save_atomic(save_dict, osp.join(self.opt['path']['models'], f'{net_label}_{label}.pth'))


def save_training_state(self, epoch: int, current_iter: int) -> None:
    """``BaseModel.save_training_state`` (same content), written atomically by rank 0 only."""
    from basicsr.utils.dist_util import get_dist_info

    if current_iter == -1 or get_dist_info()[0] != 0:
        return
    state = {'epoch': epoch, 'iter': current_iter,
             'optimizers': [optimizer.state_dict() for optimizer in self.optimizers],
             'schedulers': [scheduler.state_dict() for scheduler in self.schedulers]}
    torch_save_atomic(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))


def patch_basicsr_pipelines() -> None:
    """Install the functions above into BasicSR's train / test modules and BaseModel (this process only)."""
    import basicsr.test
    import basicsr.train
    from basicsr.models.base_model import BaseModel

    basicsr.train.parse_options = parse_options
    basicsr.test.parse_options = parse_options
    basicsr.train.load_resume_state = load_resume_state
    BaseModel.model_to_device = model_to_device
    BaseModel.save_network = save_network
    BaseModel.save_training_state = save_training_state
