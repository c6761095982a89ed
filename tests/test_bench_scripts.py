"""Every benchmark script under bench/ still starts: its imports resolve and its command line parses (``--help``).

The benchmarks are not run by the suite (they measure, and take minutes), so a moved helper would otherwise only
show when someone next runs one. One child process runs them all (the scripts set thread counts and ``sys.path``).
"""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.pipeline_helpers import subprocess_env
from tests.shared_data import REPO_ROOT

SCRIPTS = sorted((REPO_ROOT / 'bench').glob('*.py'))

DRIVER = textwrap.dedent('''
    import contextlib, io, runpy, sys
    failures = []
    for path in sys.argv[1:]:
        sys.argv = [path, '--help']
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_path(path, run_name='__main__')
            failures.append(f'{path}: --help returned without exiting')
        except SystemExit as stop:
            if stop.code not in (0, None) or 'usage:' not in out.getvalue():
                failures.append(f'{path}: exit {stop.code!r}, output {out.getvalue()[:200]!r}')
        except Exception as error:  # an import or a name that moved
            failures.append(f'{path}: {type(error).__name__}: {error}')
    print('\\n'.join(failures) or 'all started')
    sys.exit(1 if failures else 0)
''')


def test_every_benchmark_script_starts():
    assert len(SCRIPTS) >= 8, SCRIPTS
    result = subprocess.run([sys.executable, '-c', DRIVER, *map(str, SCRIPTS)], cwd=REPO_ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().endswith('all started'), result.stdout[-3000:]


def test_candidate_recipes_kept_for_the_benchmark_load_and_build_their_guidance():
    """bench/options holds recipes tried through bench_demo_robustness and not shipped; they must stay runnable."""
    import torch

    from rave_basicsr.guidance.encoders import build_image_encoder
    from rave_basicsr.utils.options import load_option_file

    candidates = sorted((REPO_ROOT / 'bench' / 'options').glob('*.yml'))
    assert candidates
    for path in candidates:
        opt = load_option_file(str(path))
        assert opt['model_type'] in ('RAVEModel', 'CLIPLITModel'), path.name
        assert opt['datasets']['train']['dataroot_backlit'].startswith('demo/'), path.name
        encoder = build_image_encoder(opt['guidance_encoder'], role='guidance')
        embeds = encoder.encode_image(torch.rand(2, 3, 32, 32))
        assert embeds.shape[0] == 2 and torch.isfinite(embeds).all(), path.name
        identity = build_image_encoder(opt['identity_encoder'], role='identity')  # its preprocess options too
        assert all(torch.isfinite(f).all() for f in identity.encode_image_features(torch.rand(2, 3, 32, 32)))


def test_robustness_sweep_reuses_runs_by_training_options_not_file_bytes(tmp_path):
    """bench_demo_robustness keeps earlier runs when the options that decide a run are the same: a comment or the
    experiment name must not discard them, a changed training option must."""
    import runpy

    from rave_basicsr.utils.options import load_option_file

    options_digest = runpy.run_path(str(REPO_ROOT / 'bench' / 'bench_demo_robustness.py'),
                                    run_name='bench_demo_robustness')['options_digest']
    shipped = (REPO_ROOT / 'options' / 'demo' / 'train_rave_demo.yml').read_text()
    renamed = tmp_path / 'renamed.yml'
    renamed.write_text('# a comment\n' + shipped.replace('name: RAVE_demo\n', 'name: RAVE_demo_copy\n', 1))
    changed = tmp_path / 'changed.yml'
    changed.write_text(shipped.replace('total_iter: ', 'total_iter: 1', 1))
    digests = [options_digest(load_option_file(str(path)))
               for path in (REPO_ROOT / 'options' / 'demo' / 'train_rave_demo.yml', renamed, changed)]
    assert 'RAVE_demo_copy' in renamed.read_text() and digests[0] == digests[1]
    assert digests[0] != digests[2] and len(digests[0]) == 64


def test_robustness_sweep_reuses_runs_only_on_the_same_data(tmp_path):
    """bench_demo_robustness keeps a set's runs only on the data they were made on: regenerated, the set is the same;
    one pixel off by one level (another CPU's rounding) is still the same; a set made by a changed backlight model
    (here: a patch brightened) is not, so its runs are made again."""
    import runpy

    import cv2
    import numpy as np

    from rave_basicsr.data.demo_data import make_demo_data

    bench = runpy.run_path(str(REPO_ROOT / 'bench' / 'bench_demo_robustness.py'), run_name='bench_demo_robustness')
    fingerprint, same_data = bench['data_fingerprint'], bench['same_data']
    first, second = tmp_path / 'first', tmp_path / 'second'
    for folder in (first, second):
        make_demo_data(str(folder), seed=0, size=32, n_train=2, n_welllit=2, n_val=1, backlight='mild')
    reference = fingerprint(first)
    assert len(reference) == 8 and same_data(reference, fingerprint(second))
    assert not same_data(None, reference)
    image_path = second / 'val_backlit' / 'val_000.png'
    image = cv2.imread(str(image_path))
    image[0, 0, 0] = image[0, 0, 0] + 1 if image[0, 0, 0] < 255 else 254
    cv2.imwrite(str(image_path), image)
    assert fingerprint(second) != reference and same_data(reference, fingerprint(second))
    image[:8, :8] = np.clip(image[:8, :8].astype(int) + 20, 0, 255).astype(np.uint8)
    cv2.imwrite(str(image_path), image)
    assert not same_data(reference, fingerprint(second))


def test_robustness_report_names_the_machine_of_each_run():
    """A sweep made in parts may span machines (CPU figures differ between them): the report names each CPU and
    tags the runs made on the second and later ones."""
    import runpy

    bench = runpy.run_path(str(REPO_ROOT / 'bench' / 'bench_demo_robustness.py'), run_name='bench_demo_robustness')
    one = {'a': {'processor': 'Xeon, AVX512'}, 'b': {'processor': 'Xeon, AVX512'}}
    assert bench['machines_text'](one) == 'Machine: Xeon, AVX512'
    two = dict(one, c={'processor': 'EPYC, AVX2'})
    assert bench['machines_text'](two) == 'Machines (the tag after each seed): A: Xeon, AVX512; B: EPYC, AVX2'
    assert [bench['machine_tag'](two, run) for run in two.values()] == ['A', 'A', 'B']


def test_illumination_texture_and_rescoring_kept_runs(tmp_path):
    """The illumination texture is about 0 for an exposure change (a smooth L) and grows for an L that follows the
    image's texture; a kept run is scored again from its outputs only when they are that run's (same PSNRs)."""
    import runpy

    import cv2
    import numpy as np

    from rave_basicsr.data.demo_data import make_demo_data

    bench = runpy.run_path(str(REPO_ROOT / 'bench' / 'bench_demo_robustness.py'), run_name='bench_demo_robustness')
    texture = bench['illumination_texture']
    rng = np.random.default_rng(0)
    image = np.clip(128 + 60 * rng.standard_normal((64, 64, 3)), 0, 255)
    exposure = np.linspace(0.5, 1.0, 64)[None, :, None]  # a smooth lift from left to right
    assert texture(image, np.clip(image / exposure, 0, 255)) < 0.01
    tone_curve = 255 * np.power(image / 255, 0.5)  # a per-pixel tone curve: L follows the texture
    assert texture(image, tone_curve) > 0.1

    data = tmp_path / 'data'
    make_demo_data(str(data), seed=0, size=32, n_train=1, n_welllit=1, n_val=2, backlight='mild')
    enhanced = tmp_path / 'enhanced' / 'mild_x1_s0'
    (enhanced / 'val').mkdir(parents=True)
    for path in (data / 'val_backlit').iterdir():
        cv2.imwrite(str(enhanced / 'val' / path.name), np.clip(cv2.imread(str(path)).astype(int) + 10, 0, 255))
    rows = bench['score_validation'](data, enhanced / 'val')
    run = {'images': [{k: v for k, v in r.items() if not k.startswith('texture')} for r in rows]}
    assert bench['rescore'](run, data, enhanced, None)
    assert 'texture_out' in run['summary'] and run['images'] == rows
    cv2.imwrite(str(enhanced / 'val' / 'val_000.png'), cv2.imread(str(data / 'val_backlit' / 'val_000.png')))
    other = {'images': rows}
    assert not bench['rescore'](other, data, enhanced, None) and 'summary' not in other


def test_robustness_highlight_rule_forbids_a_grey_veil_and_a_blow_out_not_a_kept_over_exposure():
    """The highlights criterion on the synthetic sets: an output may darken the brightest fifth less than the ground
    truth does (a synthetic over-exposure left in place costs PSNR, which the gain criterion counts), but not more
    than 10 grey levels further (a grey veil), nor brighten it by more than 10 (a blow-out)."""
    import runpy

    bench = runpy.run_path(str(REPO_ROOT / 'bench' / 'bench_demo_robustness.py'), run_name='bench_demo_robustness')
    kept = bench['highlights_kept']
    assert kept(-117.0, -121.8) and kept(-12.4, -29.5) and kept(0.0, -121.8) and kept(9.9, -29.5)
    assert not kept(-40.0, -29.5) and not kept(10.5, -29.5)
    assert kept(19.0, 10.0) and not kept(20.5, 10.0) and not kept(-0.5, 10.0)
    summary = {'gain': 5.0, 'improved': 1.0, 'bright_out': -45.0, 'bright_gt': -29.5}
    results = {'runs': {'mild_x1_s0': {'summary': summary}}, 'settings': {'models': ['mild'], 'seeds': [0],
                                                                           'lengths': [1]}}
    assert bench['verdicts'](results)['mild']['seeds']['0']['checks'] == {'gain': True, 'improved': True,
                                                                          'highlights': False}


def test_trace_script_sets_nested_options_and_reads_the_losses_of_a_basicsr_log(tmp_path):
    """trace_demo_run's --set changes one nested option (YAML value) and refuses a path the file does not have; the
    losses it reports are those BasicSR logged at each iteration."""
    import runpy

    import pytest

    trace = runpy.run_path(str(REPO_ROOT / 'bench' / 'trace_demo_run.py'), run_name='trace_demo_run')
    options = {'train': {'warmup': {'optim': {'type': 'Adam', 'weight_decay': 0.001}}}}
    trace['set_option'](options, 'train:warmup:optim:weight_decay=0')
    trace['set_option'](options, 'train:warmup:optim:betas=[0.9, 0.99]')
    assert options['train']['warmup']['optim'] == {'type': 'Adam', 'weight_decay': 0, 'betas': [0.9, 0.99]}
    with pytest.raises(SystemExit, match='no block'):
        trace['set_option'](options, 'train:guided:lr=1')
    with pytest.raises(SystemExit, match='KEY=VALUE'):
        trace['set_option'](options, 'train:warmup')
    log = tmp_path / 'train.log'
    log.write_text(
        '2026-12-03 03:12:30,691 INFO: [hazy_..][epoch: 16, iter:     100, lr:(3.000e-04,)] [eta: 0:02:18, time '
        '(data): 0.473 (0.007)] warmup/l_id: 1.1091e-06 warmup/l_total: 1.1091e-06 \n'
        '2026-12-03 03:12:40,000 INFO: Validation demo_val\n'
        '2026-12-03 03:12:49,000 INFO: [hazy_..][epoch: 19, iter:     120, lr:(3.000e-04,)] [eta: 0:02:00, time '
        '(data): 0.470 (0.007)] guided/l_rave: 8.3984e+00 guided/l_id: 6.5504e-03 guided/l_total: 8.4087e+00 \n')
    assert trace['logged_losses'](log) == {
        100: {'warmup/l_id': 1.1091e-06, 'warmup/l_total': 1.1091e-06},
        120: {'guided/l_rave': 8.3984, 'guided/l_id': 6.5504e-03, 'guided/l_total': 8.4087}}


def test_trace_script_moving_average_of_checkpoints_updates_once_per_checkpoint_with_decay_to_the_interval():
    """trace_demo_run --ema: checkpoints 2 iterations apart and a per-iteration decay of 0.5 keep 0.5 ** 2 = 0.25
    of the average at each checkpoint (hand-computed: 0, then 0.25 * 0 + 0.75 * 1, then 0.25 * 0.75 + 0.75 * 1);
    the checkpoints themselves are not changed."""
    import runpy

    import torch

    trace = runpy.run_path(str(REPO_ROOT / 'bench' / 'trace_demo_run.py'), run_name='trace_demo_run')
    states = [{'w': torch.tensor([0.0, 4.0])}, {'w': torch.tensor([1.0, 0.0])}, {'w': torch.tensor([1.0, 0.0])}]
    rows = trace['ema_rows'](states, 2, [0.5, 0.0])
    assert list(rows) == ['0.5', '0']
    assert [r['w'].tolist() for r in rows['0.5']] == [[0.0, 4.0], [0.75, 1.0], [0.9375, 0.25]]
    assert [r['w'].tolist() for r in rows['0']] == [s['w'].tolist() for s in states]  # no averaging at decay 0
    assert states[0]['w'].tolist() == [0.0, 4.0]


def test_drift_checks_split_each_ground_truth_move_along_and_off_the_residual(tmp_path):
    """demo_drift_checks' steps: the constant step is the residual's mean distance; each ground truth's move is split
    into a part along the residual and one off it (Pythagoras), and the errors are the mean gaps to each step."""
    import runpy

    import numpy as np
    import pytest
    import torch
    import torch.nn.functional as F

    from rave_basicsr.data.demo_data import make_demo_data
    from rave_basicsr.guidance.encoders import build_image_encoder
    from rave_basicsr.utils.options import load_option_file

    checks = runpy.run_path(str(REPO_ROOT / 'bench' / 'demo_drift_checks.py'), run_name='demo_drift_checks')
    make_demo_data(str(tmp_path / 'data' / 'mild'), size=32, backlight='mild', n_train=6, n_welllit=6, n_val=3)
    options = load_option_file(str(REPO_ROOT / 'options' / 'demo' / 'train_rave_demo.yml'))
    result = checks['steps_check'](checks['GuidanceSpace'](options, tmp_path), ['mild'])['mild']
    assert len(result['images']) == 3 and result['constant_step'] > 0
    along = np.array([row['gt_along'] for row in result['images']])
    adaptive = np.array([row['adaptive'] for row in result['images']])
    assert result['error_constant'] == pytest.approx(np.abs(along - result['constant_step']).mean())
    assert result['error_adaptive'] == pytest.approx(np.abs(along - adaptive).mean())
    encoder = build_image_encoder(options['guidance_encoder'], role='guidance')
    size = options['datasets']['train']['resize']
    data = tmp_path / 'data' / 'mild'
    with torch.no_grad():
        for row in result['images']:
            paths = (data / 'val_backlit' / f'{row["image"]}.png', data / 'val_gt' / f'{row["image"]}.png')
            inp, truth = (F.normalize(encoder.encode_image(checks['as_batch'](checks['load_at'](path, size))), dim=-1)
                          for path in paths)
            move = float((truth - inp).norm())
            assert row['gt_along'] ** 2 + row['gt_off_axis'] ** 2 == pytest.approx(move ** 2, rel=1e-4)


def test_one_run_per_seed_scores_the_same_networks_as_runs_of_their_own(tmp_path):
    """bench_demo_robustness --one-run-per-seed scores a shorter length with the longer run's checkpoint at its
    iteration: that network must be the shorter run's own, bit for bit, weights and their moving average (the shipped
    demo options, shortened)."""
    import runpy

    import torch

    from rave_basicsr.data.demo_data import make_demo_data
    from rave_basicsr.utils.options import load_option_file

    bench = runpy.run_path(str(REPO_ROOT / 'bench' / 'bench_demo_robustness.py'), run_name='bench_demo_robustness')
    data, work = tmp_path / 'data' / 'mild', tmp_path / 'work'
    make_demo_data(str(data), seed=0, size=32, n_train=4, n_welllit=4, n_val=2, backlight='mild')
    base = load_option_file(str(REPO_ROOT / 'options' / 'demo' / 'train_rave_demo.yml'))
    base['train']['total_iter'] = 5
    base['train']['warmup'].update(iters=2, reinit_after=1, reinit_window=1, reinit_extend=1)
    alone = bench['train_and_score'](base, data, work, 'mild', [1], 0, None)
    own = torch.load(work / 'experiments' / 'mild_x1_s0' / 'models' / 'net_g_latest.pth', weights_only=True)
    both = bench['train_and_score'](base, data, work, 'mild', [1, 2], 0, None)
    models = work / 'experiments' / 'mild_x2_s0' / 'models'
    part = torch.load(models / 'net_g_5.pth', weights_only=True)
    assert sorted(both) == ['mild_x1_s0', 'mild_x2_s0'] and both['mild_x1_s0']['part_of'] == 'mild_x2_s0'
    assert sorted(own) == sorted(part) == ['params', 'params_ema']  # the shipped demo averages its weights
    assert all(torch.equal(own[key][name], part[key][name]) for key in own for name in own[key])
    final = torch.load(models / 'net_g_latest.pth', weights_only=True)
    assert not all(torch.equal(final[key][name], part[key][name]) for key in final for name in final[key])  # trained on
    assert both['mild_x1_s0']['images'] == alone['mild_x1_s0']['images']
    assert 0 < both['mild_x1_s0']['train_seconds'] < both['mild_x2_s0']['train_seconds']


STOP_DRIVER = textwrap.dedent('''
    import runpy, signal, sys, threading, time
    bench = runpy.run_path(sys.argv[1], run_name='bench_demo_robustness')
    signal.signal(signal.SIGTERM, bench['stop_on_signal'])
    children = bench['CHILDREN']
    sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']
    threading.Thread(target=children.run, args=(sleeper,), daemon=True).start()
    while not children.running:
        time.sleep(0.05)
    print(next(iter(children.running)).pid, flush=True)
    time.sleep(120)
''')


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a killed child that nobody has reaped yet (a zombie) counts as ended."""
    try:
        with open(f'/proc/{pid}/stat') as stat:
            return stat.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_a_terminated_sweep_ends_its_trainings_and_starts_no_more():
    """SIGTERM to bench_demo_robustness (a sweep stopped with kill / pkill) ends its child processes too: they used
    to train on, orphaned, taking the cores of the next sweep; and a stopped sweep starts no new child."""
    import runpy

    bench_path = str(REPO_ROOT / 'bench' / 'bench_demo_robustness.py')
    driver = subprocess.Popen([sys.executable, '-c', STOP_DRIVER, bench_path], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env())
    try:
        child_pid = int(driver.stdout.readline())
        assert process_alive(child_pid)
        driver.terminate()
        assert driver.wait(timeout=30) == 128 + 15
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process_alive(child_pid):
            time.sleep(0.1)
        if process_alive(child_pid):
            raise AssertionError(f'the child {child_pid} outlived its terminated sweep')
    finally:
        driver.kill()
        driver.wait()

    children = runpy.run_path(bench_path, run_name='bench_demo_robustness')['ChildProcesses']()
    assert children.run([sys.executable, '-c', 'print(6 * 7)']).stdout.strip() == '42'
    children.stop()
    with pytest.raises(RuntimeError, match='the sweep is stopping'):
        children.run([sys.executable, '-c', 'pass'])


def test_gpu_benchmark_builds_every_method_at_the_originals_prompt_batch(tmp_path):
    """bench_gpu.py times CLIP-LIT at the originals' prompt batch (16), whose prompt stage draws that many
    backlit/well-lit pairs: its data must hold that many of each (an H200 run failed there). Built on the CPU with
    the tiny encoders; only the crop and batch are small."""
    sys.path.insert(0, str(REPO_ROOT / 'bench'))
    try:
        import bench_gpu
        import bench_methods
    finally:
        sys.path.remove(str(REPO_ROOT / 'bench'))
    import argparse

    import torch
    from tests.rave_helpers import demo_data

    schedule = bench_methods.default_schedule()
    sizes = argparse.Namespace(crop=32, batch=2, prompt_batch=schedule['prompt_batch'], best_events=10,
                               rave_guided=schedule['rave_guided'])
    counts = bench_methods.training_image_counts(sizes.prompt_batch)
    assert min(counts.values()) >= sizes.prompt_batch == 16
    data = demo_data(tmp_path / 'data', size=48, n_val=1, **counts)
    encoders = bench_gpu.encoders_for(torch.device('cpu'), quick=True)
    for method in ('rave', 'clip_lit', 'clip_lit_latent'):
        assert bench_gpu.build(method, data, tmp_path / method, encoders, sizes, torch.device('cpu'), {}) is not None
