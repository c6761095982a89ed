"""`basicsr train` / `basicsr test` end to end on the CPU: validation, auto-resume, 2-process torchrun."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import pipeline_helpers
from tests.pipeline_helpers import (read_log, run_two_process_torchrun, sr_training_options, subprocess_env,
                                    write_options, write_paired_pngs)

pytestmark = pytest.mark.slow


def run_basicsr(args, cwd: Path, timeout: int = 300):
    """:func:`tests.pipeline_helpers.run_basicsr` with the default thread count (these runs are single-process)."""
    return pipeline_helpers.run_basicsr(args, cwd, env=subprocess_env(), timeout=timeout)


@pytest.fixture
def workdir(tmp_path):
    lq, gt = write_paired_pngs(tmp_path / 'data')
    return tmp_path, lq, gt


def test_train_end_to_end_with_validation_in_current_directory(workdir):
    root, lq, gt = workdir
    opt = write_options(root / 'train.yml', sr_training_options('e2e', lq, gt, total_iter=4, save_freq=2))
    result = run_basicsr(['train', '-opt', str(opt)], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = root / 'experiments' / 'e2e'
    assert (experiment / 'models' / 'net_g_4.pth').is_file()
    assert (experiment / 'models' / 'net_g_latest.pth').is_file()
    assert (experiment / 'training_states' / '4.state').is_file()
    assert list((experiment / 'visualization').rglob('*.png'))
    assert re.search(r'psnr: \d+\.\d+', read_log(experiment))
    # checkpoints and training states are written through temporary files (.NAME.XXXX.tmp beside them): none is left
    assert (experiment / 'training_states' / '2.state').is_file() and (experiment / 'models' / 'net_g_2.pth').is_file()
    assert list(root.rglob('*.tmp')) == []


def test_auto_resume_continues_from_saved_iteration_on_cpu(workdir):
    root, lq, gt = workdir
    opt = write_options(root / 'train.yml', sr_training_options('resume', lq, gt, total_iter=8, save_freq=2))
    # an interrupted run: it stops at iteration 4 (as if killed after its checkpoint at iteration 4)
    first = run_basicsr(['train', '-opt', str(opt), '--force_yml', 'train:total_iter=4'], cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_basicsr(['train', '-opt', str(opt), '--auto_resume'], cwd=root)
    assert second.returncode == 0, second.stderr[-3000:]
    log = read_log(root / 'experiments' / 'resume')
    assert 'Resuming training from epoch' in log and 'iter: 4' in log
    assert 'Start training from epoch: ' in log and re.search(r'Start training from epoch: \d+, iter: 4', log)
    assert (root / 'experiments' / 'resume' / 'training_states' / '8.state').is_file()
    state = torch.load(root / 'experiments' / 'resume' / 'training_states' / '8.state', weights_only=False)
    assert state['iter'] == 8


def test_auto_resume_skips_damaged_newest_states_and_keeps_them(workdir):
    """A truncated newest training state, then a state whose network file is gone: --auto_resume continues from
    the newest state that loads with its networks, names what it skipped, and deletes nothing."""
    root, lq, gt = workdir
    opt = write_options(root / 'train.yml', sr_training_options('damaged', lq, gt, total_iter=8, save_freq=2))
    first = run_basicsr(['train', '-opt', str(opt), '--force_yml', 'train:total_iter=6'], cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    experiment = root / 'experiments' / 'damaged'
    newest = experiment / 'training_states' / '6.state'
    newest.write_bytes(newest.read_bytes()[:len(newest.read_bytes()) // 2])  # a partial copy
    (experiment / 'models' / 'net_g_4.pth').unlink()
    second = run_basicsr(['train', '-opt', str(opt), '--auto_resume'], cwd=root)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'skipped 2 newer training state(s)' in second.stderr
    assert '6.state' in second.stderr and 'net_g_4.pth' in second.stderr
    assert 'Resuming from ' + str(experiment / 'training_states' / '2.state') in second.stderr
    assert re.search(r'Start training from epoch: \d+, iter: 2', read_log(experiment))
    assert newest.is_file() and (experiment / 'training_states' / '8.state').is_file()


def test_auto_resume_with_no_loadable_state_is_a_clear_error(workdir):
    root, lq, gt = workdir
    opt = write_options(root / 'train.yml', sr_training_options('ruined', lq, gt, total_iter=4, save_freq=2))
    assert run_basicsr(['train', '-opt', str(opt)], cwd=root).returncode == 0
    for state in (root / 'experiments' / 'ruined' / 'training_states').glob('*.state'):
        state.write_bytes(b'')
    result = run_basicsr(['train', '-opt', str(opt), '--auto_resume'], cwd=root)
    assert result.returncode == 2
    assert 'none of the 2 training state(s)' in result.stderr and 'Move the experiment folder away' in result.stderr
    assert 'Traceback' not in result.stderr


def run_module(module: str, args, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m rave_basicsr.train|test ...``: the HAT / Real-ESRGAN-style entry points."""
    return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)


def test_basicsr_test_writes_results_and_metrics(workdir):
    """Through the module entry points ``python -m rave_basicsr.train`` / ``rave_basicsr.test``."""
    root, lq, gt = workdir
    train_opt = write_options(root / 'train.yml', sr_training_options('fortest', lq, gt, total_iter=2, save_freq=2))
    trained = run_module('rave_basicsr.train', ['-opt', str(train_opt)], cwd=root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    options = sr_training_options('testrun', lq, gt)
    options['datasets'] = {'test_1': dict(options['datasets']['val'], name='tiny')}
    options['path'] = {'pretrain_network_g': str(root / 'experiments/fortest/models/net_g_latest.pth'),
                       'strict_load_g': True}
    options['val'].pop('val_freq')
    options['val']['suffix'] = None
    for key in ('train', 'logger'):
        options.pop(key)
    test_opt = write_options(root / 'test.yml', options)
    result = run_module('rave_basicsr.test', ['-opt', str(test_opt)], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    results = root / 'results' / 'testrun'
    assert len(list((results / 'visualization' / 'tiny').glob('*.png'))) == 4
    logs = ''.join(path.read_text() for path in results.glob('test_*.log'))
    assert re.search(r'# psnr: \d+\.\d+', logs)


def test_two_process_cpu_torchrun_ends_with_identical_weights(workdir):
    root, lq, gt = workdir
    options = sr_training_options('ddp', lq, gt, total_iter=4, save_freq=4)
    options['datasets']['train']['use_hflip'] = True  # ranks draw different samples and flips
    opt = write_options(root / 'ddp.yml', options)
    rank0, rank1 = (dump['net'] for dump in run_two_process_torchrun(opt, root, subprocess_env(), 300))
    saved = torch.load(root / 'experiments/ddp/models/net_g_4.pth')['params']
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
        torch.testing.assert_close(rank0[key], saved[key], rtol=0, atol=0)
    assert 'world_size: 2' in read_log(root / 'experiments' / 'ddp')
