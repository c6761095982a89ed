"""Patches of BasicSR 1.4.2's training and test pipelines, and running them (see :mod:`rave_basicsr.compat`).

BasicSR's ``train_pipeline`` / ``test_pipeline`` assume CUDA in several places and trust their option files
completely. Rather than edit site-packages, :func:`patch_basicsr_pipelines` swaps the functions below into
BasicSR's modules, inside this process only; :func:`run_basicsr_pipeline` applies them and runs a pipeline.
"""
import argparse
import os
import random
import sys
from os import path as osp
from typing import List, Optional, Tuple

import torch

from rave_basicsr.utils.checkpoint import save_basicsr_network, torch_load_safe, torch_save_atomic
from rave_basicsr.utils.distributed import end_distributed_run, init_distributed, wrap_for_device
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.options import (OptionError, apply_overrides, build_argument_parser, check_registered_types,
                                        load_option_file, settle_empty_options)


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
    settle_empty_options(opt, is_train)
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
    """BasicSR's resume-state lookup, loading onto the CPU with weights_only (the model moves what it needs).

    ``--auto_resume`` takes the newest training state that loads and whose network files load too; damaged newer
    ones (a partial copy, a full disk) are named in a warning and kept. An explicit ``path: resume_state`` that does
    not load is an error naming the file.
    """
    from basicsr.utils import check_resume

    if opt['auto_resume']:
        resume_state = newest_resumable_state(opt)
    elif opt['path'].get('resume_state'):
        path = opt['path']['resume_state']
        resume_state = load_training_state(path)
        problem = damaged_network_file(opt, resume_state['iter'])
        if problem:
            raise OptionError(f'path:resume_state {path}: {problem}')
    else:
        return None
    if resume_state is not None:
        check_resume(opt, resume_state['iter'])
    return resume_state


def newest_resumable_state(opt: dict) -> Optional[dict]:
    """The newest loadable training state of ``experiments/<name>`` with loadable network files (None: none
    saved yet); sets ``path: resume_state`` to it."""
    folder = opt['path']['training_states']
    states = sorted(((int(name[:-len('.state')]), osp.join(folder, name)) for name in
                     (os.listdir(folder) if osp.isdir(folder) else [])
                     if name.endswith('.state') and name[:-len('.state')].isdigit()), reverse=True)
    damaged = []
    for iteration, path in states:
        try:
            state = load_training_state(path)
        except RaveError as exc:
            damaged.append(str(exc))
            continue
        problem = damaged_network_file(opt, iteration)
        if problem:
            damaged.append(f'{path}: {problem}')
            continue
        if damaged:
            print(f'WARNING: --auto_resume skipped {len(damaged)} newer training state(s) that cannot be resumed '
                  '(the files are kept):\n  ' + '\n  '.join(damaged) + f'\nResuming from {path} (iteration '
                  f'{iteration}).', file=sys.stderr, flush=True)
        opt['path']['resume_state'] = path
        return state
    if damaged:
        raise OptionError(f'--auto_resume: none of the {len(damaged)} training state(s) in {folder} can be resumed:'
                          '\n  ' + '\n  '.join(damaged) + '\nMove the experiment folder away to start afresh, or '
                          'restore the files from a copy.')
    return None


def damaged_network_file(opt: dict, iteration: int) -> Optional[str]:
    """What is wrong with the network files a resume at ``iteration`` loads (``models/net_<x>_<iter>.pth`` for
    every ``network_<x>``, as BasicSR's ``check_resume`` sets them), or None."""
    ignored = opt['path'].get('ignore_resume_networks') or []
    for key in opt:
        if key.startswith('network_') and key not in ignored:
            path = osp.join(opt['path']['models'], f'net_{key[len("network_"):]}_{iteration}.pth')
            try:
                torch_load_safe(path)
            except RaveError as exc:
                return f'its network file cannot be loaded: {exc}'
    return None


def load_training_state(path: str) -> dict:
    """Load a ``.state`` file onto the CPU with ``weights_only=True`` (BasicSR's schedulers store a Counter,
    allowed here). The CPU, not the run's GPU: optimisers move their state to their parameters' device themselves
    (keeping Adam's ``step`` on the CPU, where PyTorch wants it), and RNG states must be CPU tensors."""
    from collections import Counter

    with torch.serialization.safe_globals([Counter]):
        return torch_load_safe(path)


def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
    """``BaseModel.model_to_device`` that also works for CPU DDP (gloo): see :func:`wrap_for_device`."""
    return wrap_for_device(net, self.device, self.opt)


def save_network(self, net, net_label: str, current_iter: int, param_key='params') -> None:
    """``BaseModel.save_network`` (same file name and layout), written atomically by rank 0 only."""
    save_basicsr_network(self, net, net_label, current_iter, param_key)


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


def run_basicsr_pipeline(command: str, argv: List[str]) -> None:
    """Run BasicSR's ``train`` or ``test`` pipeline with ``argv`` as its command line, rooted at the current
    directory, with every installed plugin loaded and the patches above applied; a distributed run that finishes
    is closed on every rank (:func:`end_distributed_run`)."""
    from rave_basicsr.utils.plugins import load_plugins

    build_argument_parser(is_train=command == 'train', prog=f'basicsr {command}').parse_args(argv)  # --help, errors
    load_plugins()
    patch_basicsr_pipelines()
    import basicsr.test
    import basicsr.train

    sys.argv = [f'basicsr {command}'] + list(argv)
    pipeline = basicsr.train.train_pipeline if command == 'train' else basicsr.test.test_pipeline
    pipeline(os.getcwd())
    end_distributed_run()
