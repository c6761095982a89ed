"""What a long run meets, injected: the process killed at random moments (during checkpoint writes too), a full
disk while saving, one rank of a distributed run killed, and interrupted ``rave prepare-lmdb`` / ``rave enhance``
runs. Nothing already saved may be lost, and every rerun picks up where the last one stopped."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.pipeline_helpers import free_port, single_thread_env, write_options
from tests.rave_helpers import demo_data, rave_options
from tests.weights_helpers import save_live_network

pytestmark = pytest.mark.slow

#: `basicsr train` with torch.save instrumented by the environment: RAVE_TEST_SAVE_LOG gets a line when a save
#: starts and the save then pauses RAVE_TEST_SAVE_PAUSE seconds after writing (a window to kill it in);
#: RAVE_TEST_ENOSPC_AT=N makes the N-th save fail as a full disk does; RAVE_TEST_PID_DIR receives rank<R>.pid.
FAULT_DRIVER = textwrap.dedent('''
    import errno, os, sys, time
    import torch
    import rave_basicsr  # noqa: F401
    from rave_basicsr.cli import basicsr_cli

    original_save, saves = torch.save, []

    def instrumented_save(obj, f, *args, **kwargs):
        saves.append(1)
        if os.environ.get('RAVE_TEST_ENOSPC_AT') == str(len(saves)):
            f.write(b'x' * 100)
            raise OSError(errno.ENOSPC, 'No space left on device')
        if os.environ.get('RAVE_TEST_SAVE_LOG'):
            with open(os.environ['RAVE_TEST_SAVE_LOG'], 'a') as log:
                log.write(f'{len(saves)}\\n')
        original_save(obj, f, *args, **kwargs)
        time.sleep(float(os.environ.get('RAVE_TEST_SAVE_PAUSE', 0)))

    torch.save = instrumented_save
    if os.environ.get('RAVE_TEST_PID_DIR'):
        with open(os.path.join(os.environ['RAVE_TEST_PID_DIR'], f'rank{os.environ.get("RANK", 0)}.pid'), 'w') as f:
            f.write(str(os.getpid()))
    sys.exit(basicsr_cli.main(sys.argv[1:]))
''')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp('demo'), size=40, n_train=4, n_welllit=4, n_val=1)


def train_command(cwd: Path, option_file: Path, *extra: str) -> list:
    (cwd / 'fault_driver.py').write_text(FAULT_DRIVER)
    return [sys.executable, 'fault_driver.py', 'train', '-opt', str(option_file), *extra]


def final_weights(root: Path, name: str) -> dict:
    return torch.load(root / 'experiments' / name / 'models' / 'net_g_latest.pth', weights_only=True)['params']


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        if path.is_file() and len(path.read_text().split()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f'no save number {count} within {limit} s (exit code {process.poll()})')


def test_killed_at_random_moments_and_while_saving_resumes_to_the_same_weights(data, tmp_path):
    """Four SIGKILLs in one run, two of them inside checkpoint writes: each --auto_resume continues, and with
    checkpoints at epoch ends (4 images, batch 2: 2 iterations per epoch) the final weights equal an uninterrupted
    run's, bit for bit."""
    options = rave_options('killed', data, total_iter=12, warmup_iters=2, save_freq=2)
    options['train']['optim_g']['lr'] = 1e-3
    options['val']['val_freq'] = 1000
    option_file = write_options(tmp_path / 'killed.yml', options)
    reference_dir, faulted_dir = tmp_path / 'reference', tmp_path / 'faulted'
    reference_dir.mkdir()
    faulted_dir.mkdir()
    env = single_thread_env()
    done = subprocess.run(train_command(reference_dir, option_file), cwd=reference_dir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rng = random.Random(20261201)
    log = faulted_dir / 'saves.log'
    kills = ['save:2', f'time:{rng.uniform(3, 7):.2f}', 'save:3', f'time:{rng.uniform(3, 7):.2f}']
    states_seen = []
    for kill in kills:
        log.unlink(missing_ok=True)
        process = subprocess.Popen(train_command(faulted_dir, option_file, '--auto_resume'), cwd=faulted_dir,
                                   env=dict(env, RAVE_TEST_SAVE_LOG=str(log), RAVE_TEST_SAVE_PAUSE='1.0'),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        kind, value = kill.split(':')
        if kind == 'save':  # inside the value-th save of this process (after writing, before the rename)
            wait_for_lines(log, int(value), process)
        else:
            time.sleep(float(value))
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode in (-signal.SIGKILL, 0), stderr[-3000:]
        states = sorted(int(p.stem) for p in (faulted_dir / 'experiments' / 'killed' / 'training_states').glob('*.state'))
        states_seen.append(states[-1] if states else 0)
    finished = subprocess.run(train_command(faulted_dir, option_file, '--auto_resume'), cwd=faulted_dir, env=env,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert states_seen == sorted(states_seen) and states_seen[-1] > 0  # every restart got further
    reference, faulted = final_weights(reference_dir, 'killed'), final_weights(faulted_dir, 'killed')
    for key in reference:
        assert torch.equal(reference[key], faulted[key]), key


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(data, tmp_path):
    options = rave_options('full', data, total_iter=6, warmup_iters=2, save_freq=2)
    options['val']['val_freq'] = 1000
    option_file = write_options(tmp_path / 'full.yml', options)
    # saves: net_g_2, state 2, net_g_4 (the 3rd) fails
    result = subprocess.run(train_command(tmp_path, option_file), cwd=tmp_path, capture_output=True, text=True,
                            env=dict(single_thread_env(), RAVE_TEST_ENOSPC_AT='3'), timeout=300)
    assert result.returncode == 2
    assert 'net_g_4.pth (the disk is full); it was not written and nothing saved before was changed' in result.stderr
    assert '--auto_resume' in result.stderr and 'Traceback' not in result.stderr
    experiment = tmp_path / 'experiments' / 'full'
    assert not (experiment / 'models' / 'net_g_4.pth').exists()
    assert not [p for p in (experiment / 'models').iterdir() if p.name.endswith('.tmp')]  # no partial file left
    state = torch.load(experiment / 'training_states' / '2.state', weights_only=True)
    assert state['iter'] == 2 and torch.load(experiment / 'models' / 'net_g_2.pth', weights_only=True)['params']
    resumed = subprocess.run(train_command(tmp_path, option_file, '--auto_resume'), cwd=tmp_path,
                             capture_output=True, text=True, env=single_thread_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (experiment / 'models' / 'net_g_latest.pth').is_file()


def test_one_rank_killed_ends_the_other_within_seconds_naming_it(data, tmp_path):
    options = rave_options('rankkill', data, total_iter=400, warmup_iters=2, save_freq=1000)
    options['val']['val_freq'] = 1000
    option_file = write_options(tmp_path / 'rankkill.yml', options)
    (tmp_path / 'fault_driver.py').write_text(FAULT_DRIVER)
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
               'fault_driver.py', 'train', '-opt', str(option_file), '--launcher', 'pytorch']
    process = subprocess.Popen(command, cwd=tmp_path, env=dict(single_thread_env(), RAVE_TEST_PID_DIR=str(tmp_path)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    experiment_logs = tmp_path / 'experiments' / 'rankkill'
    while time.monotonic() < deadline and not (list(experiment_logs.glob('train_*.log'))
                                                 and 'iter:' in list(experiment_logs.glob('train_*.log'))[0].read_text()):
        time.sleep(0.2)  # until training runs
    os.kill(int((tmp_path / 'rank1.pid').read_text()), signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = process.communicate(timeout=180)
    assert time.monotonic() - killed_at < 60, output[-3000:]
    assert process.returncode != 0
    assert 'rank      : 1' in output and 'SIGKILL' in output


def kill_when(command: list, ready, limit: float = 120) -> None:
    """Start ``command`` and SIGKILL it as soon as ``ready()`` is true (or after ``limit`` seconds)."""
    process = subprocess.Popen(command, env=single_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not ready():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)


def write_noise_images(folder: Path, stems: list, size: tuple) -> Path:
    """Write a uniform-noise PNG of `size` (height, width) per stem into a new `folder` and return it."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for stem in stems:
        cv2.imwrite(str(folder / f'{stem}.png'), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return folder


def test_interrupted_prepare_lmdb_then_rerun(tmp_path):
    source = write_noise_images(tmp_path / 'images', [f'{index:03d}' for index in range(60)], (160, 160))
    target = tmp_path / 'set.lmdb'
    command = [sys.executable, '-m', 'rave_basicsr.cli.rave_cli', 'prepare-lmdb', str(source), str(target)]
    kill_when(command, lambda: (tmp_path / 'set.lmdb.partial' / 'data.mdb').exists())
    assert not target.exists()  # an interrupted build never looks complete
    rerun = subprocess.run(command + ['--verify'], env=single_thread_env(), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert '60 images' in rerun.stdout and 'verified' in rerun.stdout
    assert not (tmp_path / 'set.lmdb.partial').exists()
    assert len((target / 'meta_info.txt').read_text().splitlines()) == 60


def test_interrupted_enhance_then_rerun(tmp_path):
    from rave_basicsr.utils.image_io import read_image

    save_live_network(tmp_path / 'net.pth')
    photos = write_noise_images(tmp_path / 'photos', [str(index) for index in range(8)], (600, 800))
    out = tmp_path / 'out'
    command = [sys.executable, '-m', 'rave_basicsr.cli.rave_cli', 'enhance', str(photos), '-o', str(out),
               '--weights', str(tmp_path / 'net.pth'), '--device', 'cpu', '--precision', 'fp32', '--quiet']
    kill_when(command, lambda: len(list(out.glob('*.png'))) >= 2)
    finished = sorted(p.name for p in out.glob('*.png'))
    assert 2 <= len(finished) < 8
    for name in finished:  # every output under its final name is complete
        assert read_image(str(out / name)).rgb.shape == (600, 800, 3)
    mtimes = {name: (out / name).stat().st_mtime_ns for name in finished}
    rerun = subprocess.run(command, env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f'{8 - len(finished)} enhanced, {len(finished)} skipped, 0 failed' in rerun.stdout
    assert all((out / name).stat().st_mtime_ns == mtimes[name] for name in finished)
    assert sorted(p.name for p in out.glob('*.png')) == [f'{i}.png' for i in range(8)]
