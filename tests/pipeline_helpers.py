"""Small generated datasets and option files for end-to-end tests of the BasicSR pipelines."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np
import yaml


def write_paired_pngs(root: Path, count: int = 4, size: int = 32, seed: int = 0) -> tuple:
    """Write ``count`` random lq/gt PNG pairs (same names) and return the two folders."""
    rng = np.random.default_rng(seed)
    lq_dir, gt_dir = root / 'lq', root / 'gt'
    lq_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        gt = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        lq = (gt.astype(np.float32) * 0.5).astype(np.uint8)
        cv2.imwrite(str(gt_dir / f'img{index:02d}.png'), gt)
        cv2.imwrite(str(lq_dir / f'img{index:02d}.png'), lq)
    return lq_dir, gt_dir


def sr_training_options(name: str, lq_dir: Path, gt_dir: Path, total_iter: int = 4, save_freq: int = 2) -> dict:
    """Options for a tiny BasicSR SRModel run on the CPU (network from BasicSR itself)."""
    dataset = {'type': 'PairedImageDataset', 'dataroot_gt': str(gt_dir), 'dataroot_lq': str(lq_dir),
               'io_backend': {'type': 'disk'}, 'filename_tmpl': '{}'}
    return {
        'name': name, 'model_type': 'SRModel', 'scale': 1, 'num_gpu': 0, 'manual_seed': 10,
        'datasets': {
            'train': dict(dataset, name='train', gt_size=16, use_hflip=True, use_rot=False,
                          num_worker_per_gpu=0, batch_size_per_gpu=2, dataset_enlarge_ratio=1),
            'val': dict(dataset, name='val'),
        },
        'network_g': {'type': 'SRVGGNetCompact', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 4, 'num_conv': 1,
                      'upscale': 1, 'act_type': 'prelu'},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'total_iter': total_iter,
                  'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5}},
        'val': {'val_freq': save_freq, 'save_img': True,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': save_freq, 'use_tb_logger': False},
        'dist_params': {'backend': 'gloo', 'port': 29500},
    }


def write_options(path: Path, options: dict) -> Path:
    """Dump options as YAML (floats stay floats: PyYAML writes 0.001 with a dot)."""
    path.write_text(yaml.safe_dump(options, sort_keys=False))
    return path


def subprocess_env() -> dict:
    """Environment for child processes: offline hub, this repository importable first."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
    repo = str(Path(__file__).resolve().parents[1])
    env['PYTHONPATH'] = repo + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    return env


def single_thread_env() -> dict:
    """:func:`subprocess_env` with one OpenMP thread (the training runs: steadier timings, 2 ranks on 2 cores)."""
    return dict(subprocess_env(), OMP_NUM_THREADS='1')


def run_basicsr(args, cwd: Path, env: Optional[dict] = None, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run the `basicsr` command in a child process (a fresh root logger per run, as on the command line); ``env``
    defaults to :func:`single_thread_env`."""
    command = [sys.executable, '-m', 'rave_basicsr.cli.basicsr_cli'] + list(args)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env=single_thread_env() if env is None else env, timeout=timeout)


def write_demo_data(cwd: Path, backlight: str = 'demo') -> Path:
    """``rave demo-data demo/data --backlight NAME`` in ``cwd``, as a user writes a demo's data; returns the folder."""
    command = [sys.executable, '-m', 'rave_basicsr.cli.rave_cli', 'demo-data', 'demo/data', '--backlight', backlight]
    demo = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=single_thread_env(), timeout=120)
    assert demo.returncode == 0, demo.stderr[-3000:]
    return cwd / 'demo' / 'data'


def train_shipped_demo(option_file: str, experiment: str, cwd: Path, backlight: str = 'demo') -> dict:
    """As a user runs a demo: ``rave demo-data demo/data --backlight NAME``, ``basicsr train`` on the shipped
    ``option_file`` (under ``options/demo``) unchanged, then ``rave enhance`` (fp32) of the validation images with
    the final checkpoint. Returns the per-image PSNR (8-bit RGB, against the ground truth) of the inputs and
    outputs as arrays, under ``before`` and ``after``."""
    from basicsr.metrics.psnr_ssim import calculate_psnr
    from rave_basicsr.utils.image_io import read_image

    val = write_demo_data(cwd, backlight)
    options = Path(__file__).resolve().parents[1] / 'options' / 'demo' / option_file
    result = run_basicsr(['train', '-opt', str(options), '--force_yml', 'logger:use_tb_logger=false'], cwd=cwd,
                         timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    command = [sys.executable, '-m', 'rave_basicsr.cli.rave_cli', 'enhance', str(val / 'val_backlit'), '-o', 'out',
               '--weights', f'experiments/{experiment}/models/net_g_latest.pth', '--precision', 'fp32']
    enhanced = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=single_thread_env(), timeout=300)
    assert enhanced.returncode == 0, enhanced.stderr[-3000:]

    def load(path: Path) -> np.ndarray:
        return np.round(read_image(str(path)).rgb * 255)

    gt_paths = sorted((val / 'val_gt').iterdir())
    return {'before': np.array([calculate_psnr(load(val / 'val_backlit' / p.name), load(p), 0) for p in gt_paths]),
            'after': np.array([calculate_psnr(load(cwd / 'out' / p.name), load(p), 0) for p in gt_paths])}


def read_log(experiment: Path) -> str:
    """All training logs of an experiment folder, oldest first (a resumed run writes a second one)."""
    return '\n'.join(path.read_text() for path in sorted(experiment.glob('train_*.log')))


def train_interrupted_and_reference(option_file: Path, root: Path, stop_at: int) -> Tuple[Path, Path]:
    """Train ``option_file`` uninterrupted in ``root/reference``, and in ``root/resumed`` stopped at ``stop_at`` then
    auto-resumed to the end; returns the two folders."""
    reference_dir, resumed_dir = root / 'reference', root / 'resumed'
    reference_dir.mkdir()
    resumed_dir.mkdir()
    reference = run_basicsr(['train', '-opt', str(option_file)], cwd=reference_dir)
    assert reference.returncode == 0, reference.stderr[-3000:]
    first = run_basicsr(['train', '-opt', str(option_file), '--force_yml', f'train:total_iter={stop_at}'],
                        cwd=resumed_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_basicsr(['train', '-opt', str(option_file), '--auto_resume'], cwd=resumed_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    return reference_dir, resumed_dir


TORCHRUN_DRIVER = textwrap.dedent('''
    """Run `basicsr train` under torchrun and dump this rank's final network (and residual, guidance pair and
    feature bank), the process group's backend, whether the run closed its process group, plus every tensor
    collective the run made and those whose tensors were not on the model's device (which nccl would reject on
    GPUs). ``reduce`` behaves as nccl's: only the destination's tensor changes (gloo's leaves the full sum on the
    other ranks too, which hides code that reads a reduced value on them)."""
    import functools, os, sys
    import torch
    import torch.distributed as dist
    import rave_basicsr  # noqa: F401
    import basicsr.train
    from rave_basicsr.cli import basicsr_cli

    models, collectives, misplaced, backends = [], [], [], []
    original_build_model = basicsr.train.build_model

    def checking(name, function, device):
        @functools.wraps(function)
        def wrapper(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            collectives.append(name)
            misplaced.extend(f'{name}: {t.device}' for t in tensors if t.device.type != device.type)
            return function(tensor, *args, **kwargs)
        return wrapper

    def reduce_as_nccl(function):
        @functools.wraps(function)
        def wrapper(tensor, dst, *args, **kwargs):
            kept = tensor.clone()
            result = function(tensor, dst, *args, **kwargs)
            if dist.get_rank() != dst:
                tensor.copy_(kept)
            return result
        return wrapper

    def capturing_build_model(opt):
        device = torch.device('cuda' if opt['num_gpu'] != 0 else 'cpu')
        backends.append(dist.get_backend())
        dist.reduce = reduce_as_nccl(dist.reduce)
        for name in ('all_reduce', 'broadcast', 'reduce', 'all_gather', 'all_gather_into_tensor', 'reduce_scatter'):
            setattr(dist, name, checking(name, getattr(dist, name), device))
        models.append(original_build_model(opt))
        return models[-1]

    basicsr.train.build_model = capturing_build_model
    code = basicsr_cli.main(sys.argv[1:])
    model = models[0]
    dump = {'net': model.get_bare_model(model.net_g).state_dict(), 'collectives': collectives,
            'misplaced': misplaced, 'backend': backends[0], 'closed': not dist.is_initialized()}
    if getattr(model, 'residual', None) is not None:
        dump.update(residual=model.residual.cpu(), threshold=model.threshold, mean_distance=model.mean_distance)
    if getattr(model, 'pair_param', None) is not None:
        dump.update(pair=model.pair_param.detach().cpu(), bank=dict(model.bank.rounds))
    torch.save(dump, f'rank{os.environ["RANK"]}.pt')
    sys.exit(code)
''')


def free_port() -> int:
    """A TCP port nobody listens on now (fixed ports collide with runs still closing theirs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def run_torchrun(option_file: Path, cwd: Path, env: dict, nproc: int = 2, timeout: int = 400,
                 extra_args: tuple = ()) -> tuple:
    """`basicsr train --launcher pytorch` (plus ``extra_args``) in ``nproc`` processes on a free port (CPU or one
    GPU each, as the option file says); returns the ranks' dumps (see TORCHRUN_DRIVER, tensors on the CPU) after
    checking that every tensor collective had its tensors on the model's device and that every rank closed its
    process group at the end (a rank that tears down a live one can abort after a finished run)."""
    import torch

    port = free_port()

    (cwd / 'driver.py').write_text(TORCHRUN_DRIVER)
    command = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={port}',
               'driver.py', 'train', '-opt', str(option_file), '--launcher', 'pytorch', *extra_args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    dumps = tuple(torch.load(cwd / f'rank{rank}.pt', map_location='cpu') for rank in range(nproc))
    for dump in dumps:
        assert dump['collectives'] and dump['misplaced'] == [], dump['misplaced']
        assert dump['closed'], 'a rank ended its run with the process group still initialised'
    return dumps


def run_two_process_torchrun(option_file: Path, cwd: Path, env: dict, timeout: int = 400,
                             extra_args: tuple = ()) -> tuple:
    """:func:`run_torchrun` with 2 processes."""
    return run_torchrun(option_file, cwd, env, nproc=2, timeout=timeout, extra_args=extra_args)
