"""On an NVIDIA GPU, what tests/test_gpu_path.py can only simulate on the CPU (issue #12, the one-shot GPU check).

Run by ``scripts/gpu_check.sh`` (``pytest -m cuda tests/test_cuda.py``); without CUDA every test is skipped, so CI
stays green. Each test writes what it measured (grey-level differences, weight differences, wall times) as JSON into
``$RAVE_GPU_REPORT_DIR`` when that is set, also when its assertion fails; ``bench/gpu_report.py`` puts them into
``bench/results/gpu.json`` and ``gpu.md``. Over 400 lines because it is the GPU check's whole test list, in one file
so that ``scripts/gpu_check.sh`` runs one module.

- ``rave enhance --device cuda`` with the released ``rave_unpaired`` weights on the six shared photos: fp32 within one
  grey level of the CPU and of the official outputs, and really float32 (TF32 off); mixed, tf32, bf16 and fp16 with
  their measured differences; exact tiling on the GPU; ``--precision auto`` picks ``mixed`` on GPUs with native
  bfloat16.
- ``basicsr train`` of RAVE and CLIP-LIT-Latent (tiny encoders, 20 iterations) on one GPU in fp32, fp16 and bf16,
  interrupted and resumed with ``--auto_resume``, then ``basicsr test`` on the result; single-rank ``torchrun``
  runs of both with nccl, and two ranks where two GPUs exist. The training runs are independent processes, so they
  all start at once in the background when the first test of this module runs and the tests collect them.
"""
import inspect
import json
import math
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest
import torch

from rave_basicsr.cli.rave_cli import main as rave_main
from rave_basicsr.inference.enhancer import Enhancer
from rave_basicsr.inference.precision import resolve_precision
from rave_basicsr.inference.weights import load_enhancement_network
from rave_basicsr.utils.hardware import device_description, native_bf16
from rave_basicsr.utils.image_io import read_image
from tests.clip_lit_helpers import clip_lit_options
from tests.pipeline_helpers import read_log, run_basicsr, run_torchrun, single_thread_env, write_options
from tests.rave_helpers import demo_data, rave_options

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs an NVIDIA GPU (torch.cuda)')]
REPO = Path(__file__).resolve().parents[1]

#: one grey level of an 8-bit image, in float
GREY = 1 / 255
#: float32 on the GPU against float32 on the CPU, in grey levels. Float32 rounding alone moves the released
#: network's output by < 0.0005 grey levels on these photos (measured against float64 on the CPU); cuDNN's float32
#: algorithms (Winograd, FFT) round differently, by up to tens of times more; TF32 (10-bit mantissa products),
#: emulated on the CPU, moves it by 0.06-0.09.
FP32_VS_CPU_MAX_GREY = 0.1
#: bounds of each precision against fp32 on the same GPU (max over every pixel of the six photos, grey levels).
#: Measured on the CPU: mixed 0.61, bf16 1.65; emulated: TF32 0.09, fp16 convolutions 0.23.
PRECISION_MAX_GREY = {'mixed': 1.0, 'tf32': 1.0, 'bf16': 3.0, 'fp16': 3.0}
#: exact tiling against the whole image on the GPU (float; 1.6e-6 measured on the CPU)
TILED_FP32_MAX = 1e-4
#: timeout of one `basicsr` process (the whole check has a few minutes)
PROCESS_TIMEOUT = 120


@pytest.fixture
def report(request) -> Dict:
    """What this test measured: written to ``$RAVE_GPU_REPORT_DIR/<test>.json`` at teardown (pass or fail)."""
    values: Dict = {}
    yield values
    folder = os.environ.get('RAVE_GPU_REPORT_DIR')
    if folder and values:
        Path(folder).mkdir(parents=True, exist_ok=True)
        name = re.sub(r'[^A-Za-z0-9_.-]+', '_', request.node.name).strip('_')
        (Path(folder) / f'{name}.json').write_text(json.dumps({'test': request.node.nodeid, 'values': values},
                                                              indent=2, default=float))


def grey_levels(difference: np.ndarray) -> float:
    return float(np.abs(difference).max() / GREY)


# ------------------------------------------------------------------------------------------------ enhancement
#: the GPU under test (the option builders and helpers below take other devices for dry runs of the harness)
CUDA = torch.device('cuda')


@pytest.fixture(scope='module')
def weights(shared_data) -> Path:
    return shared_data / 'official_checkpoints' / 'rave_unpaired.pth'


@pytest.fixture(scope='module')
def photos(shared_data) -> Dict[str, np.ndarray]:
    return {path.stem: read_image(str(path)).rgb for path in sorted((shared_data / 'backlit_samples').glob('*.png'))}


def released(weights: Path, device) -> torch.nn.Module:
    """The released network as the official inference runs it (reflect padding, no epsilon)."""
    return load_enhancement_network(weights, outer_padding='reflect', division_eps=0.0, device=device)


def enhance_all(weights: Path, photos: Dict[str, np.ndarray], device, precision: str, tile: int = 0
                ) -> Dict[str, np.ndarray]:
    enhancer = Enhancer(released(weights, device), precision)
    return {name: enhancer.enhance_array(rgb, tile) for name, rgb in photos.items()}


@pytest.fixture(scope='module')
def fp32_outputs(weights, photos) -> Dict[str, Dict[str, np.ndarray]]:
    """Float outputs of the released network in fp32 on the GPU and on the CPU."""
    return {'gpu': enhance_all(weights, photos, CUDA, 'fp32'), 'cpu': enhance_all(weights, photos, 'cpu', 'fp32')}


def rave_enhance(shared_data: Path, out: Path, weights: Path, device: str, precision: str) -> Dict[str, np.ndarray]:
    """`rave enhance` on the shared photos; the 8-bit outputs as integer arrays by photo name."""
    code = rave_main(['enhance', str(shared_data / 'backlit_samples'), '-o', str(out), '--weights', str(weights),
                      '--device', device, '--precision', precision, '--quiet'])
    assert code == 0, f'rave enhance --device {device} --precision {precision} exited with {code}'
    return {path.stem: np.round(read_image(str(path)).rgb * 255).astype(np.int16) for path in sorted(out.iterdir())}


@pytest.fixture(scope='module')
def cli_fp32(shared_data, weights, tmp_path_factory) -> Dict[str, Dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp('enhance')
    return {'gpu': rave_enhance(shared_data, root / 'gpu', weights, str(CUDA), 'fp32'),
            'cpu': rave_enhance(shared_data, root / 'cpu', weights, 'cpu', 'fp32')}


def test_rave_enhance_fp32_on_cuda_matches_the_cpu_and_the_official_outputs(shared_data, cli_fp32, report):
    gpu, cpu = cli_fp32['gpu'], cli_fp32['cpu']
    assert sorted(gpu) == sorted(cpu) and len(gpu) == 6
    report['gpu'] = device_description(CUDA)
    report['max_8bit_diff_vs_cpu'] = {name: int(np.abs(gpu[name] - cpu[name]).max()) for name in gpu}
    references = {}
    for path in sorted((shared_data / 'reference_outputs').glob('rave_unpaired__*.png')):
        name = path.stem.split('__')[1]
        reference = np.round(read_image(str(path)).rgb * 255).astype(np.int16)
        references[name] = int(np.abs(gpu[name] - reference).max())
    report['max_8bit_diff_vs_official'] = references
    assert len(references) == 3
    assert max(report['max_8bit_diff_vs_cpu'].values()) <= 1, report
    assert max(references.values()) <= 1, report


def test_fp32_on_cuda_is_true_float32(weights, photos, fp32_outputs, report):
    """fp32 on the GPU equals the CPU's float32 output up to float32 rounding, and is not TF32: the same photos in
    tf32 give a different output (identical outputs would mean TF32 leaked into fp32, or that cuDNN never uses
    TF32 for this network; the tf32 row of the precision test tells which)."""
    tf32 = enhance_all(weights, photos, CUDA, 'tf32')
    gpu, cpu = fp32_outputs['gpu'], fp32_outputs['cpu']
    report['max_grey_diff_vs_cpu'] = {name: grey_levels(gpu[name] - cpu[name]) for name in gpu}
    report['max_grey_diff_tf32_vs_cpu'] = max(grey_levels(tf32[name] - cpu[name]) for name in gpu)
    report['max_grey_diff_fp32_vs_tf32'] = max(grey_levels(tf32[name] - gpu[name]) for name in gpu)
    report['bound'] = FP32_VS_CPU_MAX_GREY
    assert max(report['max_grey_diff_vs_cpu'].values()) < FP32_VS_CPU_MAX_GREY, report
    assert report['max_grey_diff_fp32_vs_tf32'] > 0, f'fp32 and tf32 gave identical outputs: {report}'


@pytest.mark.parametrize('precision', ['mixed', 'tf32', 'bf16', 'fp16'])
def test_reduced_precisions_on_cuda_against_fp32(shared_data, weights, photos, fp32_outputs, cli_fp32, tmp_path,
                                                 precision, report):
    """Float outputs against fp32 on the same GPU (and on the CPU), and the 8-bit files `rave enhance` writes.
    mixed, bf16 and fp16 must differ from fp32 (else they did not engage); whether TF32 changes anything is
    recorded (cuDNN may run these small-channel convolutions without tensor cores)."""
    report['precision'] = precision
    report['resolved'] = resolve_precision(precision, CUDA)
    outputs = enhance_all(weights, photos, CUDA, precision)
    reference = fp32_outputs['gpu']
    report['max_grey_diff_vs_fp32'] = {name: grey_levels(outputs[name] - reference[name]) for name in outputs}
    report['mean_grey_diff_vs_fp32'] = {name: float(np.abs(outputs[name] - reference[name]).mean() / GREY)
                                        for name in outputs}
    report['max_grey_diff_vs_cpu_fp32'] = max(grey_levels(outputs[name] - fp32_outputs['cpu'][name])
                                              for name in outputs)
    files = rave_enhance(shared_data, tmp_path / precision, weights, str(CUDA), precision)
    report['max_8bit_diff_vs_fp32_files'] = max(int(np.abs(files[name] - cli_fp32['gpu'][name]).max())
                                                for name in files)
    worst = max(report['max_grey_diff_vs_fp32'].values())
    report.update(worst=worst, bound=PRECISION_MAX_GREY[precision], engaged=worst > 0)
    assert report['resolved'] == precision
    assert worst < PRECISION_MAX_GREY[precision], report
    assert report['max_8bit_diff_vs_fp32_files'] <= int(np.ceil(PRECISION_MAX_GREY[precision])), report
    if precision != 'tf32':
        assert worst > 0, f'{precision} gave exactly the fp32 output: the reduced precision did not engage'


@pytest.mark.parametrize('precision', ['fp32', 'tf32', 'mixed'])
def test_tiled_equals_whole_on_cuda(weights, photos, precision, report):
    """Exact tiling on the GPU: 128-px tiles (which divide none of the photos) against the whole image. Tiling runs
    matrix products (cuBLAS), which refuse to run when the TF32 settings disagree (see ``float32_math``)."""
    whole = enhance_all(weights, photos, CUDA, precision)
    tiled = enhance_all(weights, photos, CUDA, precision, tile=128)
    report['max_abs_diff'] = {name: float(np.abs(tiled[name] - whole[name]).max()) for name in whole}
    worst = max(report['max_abs_diff'].values())
    report['worst_grey'] = worst / GREY
    if precision == 'fp32':
        assert worst <= TILED_FP32_MAX, report
    else:  # TF32 and bfloat16 rounding depend on the algorithm cuDNN picks for each tile shape
        assert worst < GREY, report


#: the large photo of :func:`test_reduced_precisions_on_a_12_megapixel_photo_in_one_pass`, and the GPU memory its
#: one-pass fp32 reference needs (20.8 GB measured on an H200)
LARGE_PHOTO = (3000, 4000)
LARGE_PHOTO_MIN_GPU_GB = 32


@pytest.mark.parametrize('precision', ['mixed', 'bf16', 'fp16'])
def test_reduced_precisions_on_a_12_megapixel_photo_in_one_pass(shared_data, weights, precision, report):
    """A 4000×3000 photo in one pass (``--tile 0``) against fp32: the pyramid pooling averages millions of pixels
    per bin, and CUDA's float16 pooling returned zeros for most bins at this size (13 grey levels off) until the
    network pooled in float32."""
    total_gb = torch.cuda.get_device_properties(CUDA).total_memory / 2 ** 30
    if total_gb < LARGE_PHOTO_MIN_GPU_GB:
        pytest.skip(f'a one-pass fp32 reference of a 4000x3000 photo needs about {LARGE_PHOTO_MIN_GPU_GB} GB; this '
                    f'GPU has {total_gb:.0f} GB')
    import cv2
    small = read_image(str(shared_data / 'backlit_samples' / 'backlit_1.png')).rgb
    photo = cv2.resize(small, LARGE_PHOTO[::-1], interpolation=cv2.INTER_CUBIC).clip(0, 1)
    network = released(weights, CUDA)
    reference = Enhancer(network, 'fp32').enhance_array(photo, 0)
    output = Enhancer(network, precision).enhance_array(photo, 0)
    report.update(precision=precision, size=f'{LARGE_PHOTO[1]}x{LARGE_PHOTO[0]}', bound=PRECISION_MAX_GREY[precision],
                  max_grey_diff_vs_fp32=grey_levels(output - reference),
                  mean_grey_diff_vs_fp32=float(np.abs(output - reference).mean() / GREY))
    assert report['max_grey_diff_vs_fp32'] < PRECISION_MAX_GREY[precision], report


def test_auto_precision_is_mixed_on_a_gpu_with_native_bfloat16(weights, report):
    capability = torch.cuda.get_device_capability(CUDA)
    expected = 'mixed' if capability >= (8, 0) else 'fp32'
    report.update(gpu=device_description(CUDA), capability=list(capability), native_bf16=native_bf16(CUDA),
                  resolved=resolve_precision('auto', CUDA), enhancer=Enhancer(released(weights, CUDA)).precision)
    assert report['native_bf16'] == (capability >= (8, 0)), report
    assert report['resolved'] == report['enhancer'] == expected, report


# --------------------------------------------------------------------------------------------------- training
METHODS = ('rave', 'clip_lit_latent')
TRAIN_PRECISIONS = ('fp32', 'fp16', 'bf16')
TOTAL_ITER = 20
#: where the first run stops: epoch ends (4 images, batch 2), RAVE in the guided stage, CLIP-LIT-Latent in the
#: middle of its prompt stage
STOP_AT = {'rave': 10, 'clip_lit_latent': 14}
#: GPUs per run and backend; the module's tests need CUDA, but the option builders take other values for dry runs
NUM_GPU = 1
BACKEND = 'nccl'


def training_options(method: str, precision: str, data: dict) -> dict:
    """20 iterations of RAVE (6 warm-up, 14 guided) or CLIP-LIT-Latent (4 prompt init, 4 warm-up, 4 network,
    4 prompt, 4 network) with the tiny encoders, random augmentation, checkpoints at the interruption."""
    name = f'{method}_{precision}'
    if method == 'rave':
        options = rave_options(name, data, total_iter=TOTAL_ITER, warmup_iters=6, save_freq=STOP_AT[method], crop=32)
        options['datasets']['train']['augment'] = 'official'
        options['train']['optim_g']['lr'] = 1e-4  # 1e-3 drives L up and the output to black within 10 iterations
    else:
        options = clip_lit_options(name, data, guidance='latent', total_iter=TOTAL_ITER, stages=(4, 4, 4, 4),
                                   save_freq=STOP_AT[method])
        options['train']['optim_g']['lr'] = 1e-4
        options['train']['optim_guidance']['lr'] = 1e-2
    options['num_gpu'] = NUM_GPU
    options['dist_params'] = {'backend': BACKEND, 'port': 29500}
    options['train']['mixed_precision'] = None if precision == 'fp32' else precision
    return options


def basicsr_test_args(method: str, experiment: Path, data: dict) -> List[str]:
    """`basicsr test` arguments for a finished run with the shipped test option file."""
    val = Path(data['outdir'])
    models = experiment / 'models'
    overrides = [f'num_gpu={NUM_GPU}', 'guidance_encoder={type: arch, network: {type: ImageStatsEncoder}}',
                 f'path:pretrain_network_g={models / "net_g_latest.pth"}',
                 f'datasets:test_1:dataroot_lq={val / "val_backlit"}', f'datasets:test_1:dataroot_gt={val / "val_gt"}',
                 'datasets:test_1:metrics=[psnr, ssim, rave_psnr, rave_ssim, guidance]',
                 f'datasets:test_2:dataroot_lq={val / "val_backlit"}', 'datasets:test_2:metrics=[guidance]']
    if method == 'rave':
        option_file = REPO / 'options' / 'test_rave.yml'
        overrides.append(f'residual:path={experiment / "residual.safetensors"}')
    else:
        option_file = REPO / 'options' / 'test_clip_lit.yml'
        overrides += ['guidance=latent', f'path:pretrain_network_guidance={models / "guidance_latest.pth"}']
    return ['test', '-opt', str(option_file), '--force_yml', *overrides]


#: the last iteration of the torchrun runs
TORCHRUN_ITER = {'rave': 4, 'clip_lit_latent': 11}


def torchrun_options(method: str, ranks: int, data: dict) -> dict:
    """A short distributed run: RAVE 2 warm-up + 2 guided iterations; CLIP-LIT-Latent 1 prompt init, 1 warm-up, 8
    network (with best-model events that fill the rank-consistent feature bank) and 1 prompt iteration."""
    name = f'torchrun_{method}_{ranks}'
    if method == 'rave':
        options = rave_options(name, data, total_iter=4, warmup_iters=2, save_freq=4, crop=32)
    else:
        options = clip_lit_options(name, data, guidance='latent', total_iter=11, stages=(1, 1, 8, 1), save_freq=11,
                                   batch=1)
        options['val']['val_freq'] = 1000
    options.update(num_gpu=NUM_GPU, dist_params={'backend': BACKEND, 'port': 29500})
    return options


def run_steps(cwd: Path, steps: List) -> Dict[str, dict]:
    """Run `basicsr` commands one after the other in ``cwd`` until one fails; exit code, stderr tail and seconds
    of each."""
    results = {}
    for label, args in steps:
        started = time.monotonic()
        try:
            completed = run_basicsr(args, cwd=cwd, timeout=PROCESS_TIMEOUT)
            code, stderr = completed.returncode, completed.stderr[-4000:]
        except Exception as exc:  # a timeout: reported by the test that reads this step
            code, stderr = None, f'{type(exc).__name__}: {exc}'
        results[label] = {'returncode': code, 'stderr': stderr, 'seconds': round(time.monotonic() - started, 1)}
        if code != 0:
            break
    return results


def training_jobs(root: Path, data: dict) -> Dict[tuple, Callable]:
    """Every training run of this module as an independent job: interrupted + resumed + tested runs per method
    and precision, two uninterrupted fp32 runs per method (the second measures the GPU's own nondeterminism),
    torchrun per method with one rank, and with two where two GPUs exist."""
    jobs = {}
    for method in METHODS:
        for precision in TRAIN_PRECISIONS:
            cwd = root / f'{method}_{precision}'
            cwd.mkdir(parents=True)
            options = training_options(method, precision, data)
            option_file = write_options(cwd / 'train.yml', options)
            experiment = cwd / 'experiments' / options['name']
            steps = [('interrupted', ['train', '-opt', str(option_file), '--force_yml',
                                      f'train:total_iter={STOP_AT[method]}']),
                     ('resumed', ['train', '-opt', str(option_file), '--auto_resume']),
                     ('test', basicsr_test_args(method, experiment, data))]
            jobs[(method, precision)] = lambda cwd=cwd, steps=steps: run_steps(cwd, steps)
        for run in ('reference', 'reference2') if 'fp32' in TRAIN_PRECISIONS else ():
            cwd = root / f'{method}_{run}'
            cwd.mkdir(parents=True)
            option_file = write_options(cwd / 'train.yml', training_options(method, 'fp32', data))
            jobs[(method, run)] = lambda cwd=cwd, option_file=option_file: run_steps(
                cwd, [('train', ['train', '-opt', str(option_file)])])
    available = torch.cuda.device_count() if NUM_GPU else 1
    for method in METHODS:
        for ranks in (1, 2):
            if ranks > available:
                continue
            cwd = root / f'torchrun_{method}_{ranks}'
            cwd.mkdir(parents=True)
            option_file = write_options(cwd / 'train.yml', torchrun_options(method, ranks, data))
            jobs[('torchrun', method, ranks)] = lambda cwd=cwd, option_file=option_file, ranks=ranks: run_torchrun(
                option_file, cwd, single_thread_env(), nproc=ranks, timeout=PROCESS_TIMEOUT)
    return jobs


@dataclass
class TrainingRuns:
    """The module's training jobs, running in the background: folder and future result of each."""
    root: Path
    futures: Dict[tuple, Future]

    def experiment(self, method: str, run: str) -> Path:
        """The experiment folder of a run of :func:`training_jobs` (reference runs train the fp32 options)."""
        name = f'{method}_{"fp32" if run.startswith("reference") else run}'
        return self.root / f'{method}_{run}' / 'experiments' / name

    def wait(self, key: tuple, report: Dict, required=('train',)) -> Dict[str, dict]:
        """The results of a job's steps (see :func:`run_steps`), checking that ``required`` ones exited with 0."""
        results = self.futures[key].result()
        report.setdefault('seconds', {}).update({f'{"/".join(map(str, key))} {label}': step['seconds']
                                                 for label, step in results.items()})
        for label in required:
            assert label in results, f'{key}: {label} did not run; {results}'
            assert results[label]['returncode'] == 0, f'{key} {label} failed:\n{results[label]["stderr"]}'
        return results


def start_jobs(root: Path, jobs: Dict[tuple, Callable]) -> TrainingRuns:
    """Start every job at once (separate processes; the GPU and the cores have room for all of them)."""
    pool = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix='train')
    runs = TrainingRuns(root, {key: pool.submit(job) for key, job in jobs.items()})
    pool.shutdown(wait=False)
    return runs


@pytest.fixture(scope='module', autouse=True)
def training(request, tmp_path_factory) -> TrainingRuns:
    """The module's training runs, started when its first test starts (they overlap the enhancement tests); none
    when no selected test reads them (``-k`` on the enhancement tests)."""
    root = tmp_path_factory.mktemp('train')
    if not any('training' in inspect.signature(item.function).parameters for item in request.session.items
               if isinstance(item, pytest.Function)):
        yield TrainingRuns(root, {})
        return
    data = demo_data(root / 'data', size=48, n_train=4, n_welllit=4, n_val=2)
    runs = start_jobs(root, training_jobs(root, data))
    yield runs
    for future in runs.futures.values():
        future.cancel()


def load_params(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location='cpu', weights_only=True)['params']


def max_difference(first: Dict[str, torch.Tensor], second: Dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(float((first[key].float() - second[key].float()).abs().max()) for key in first)


def l2_distance(first: Dict[str, torch.Tensor], second: Dict[str, torch.Tensor]) -> float:
    """Euclidean distance between two sets of weights, all parameters taken as one vector."""
    assert first.keys() == second.keys()
    return math.sqrt(sum(float((first[key].double() - second[key].double()).square().sum()) for key in first))


@pytest.mark.parametrize('precision', TRAIN_PRECISIONS)
@pytest.mark.parametrize('method', METHODS)
def test_training_on_cuda_interrupted_and_resumed_reaches_the_end(training, method, precision, report):
    training.wait((method, precision), report, required=('interrupted', 'resumed'))
    experiment = training.experiment(method, precision)
    logs = sorted(experiment.glob('train_*.log'))
    assert len(logs) == 2, logs
    resumed_log = logs[-1].read_text()
    resumed_in = re.search(r'Resumed in stage "\w+"[^\n]*', resumed_log)
    assert resumed_in, resumed_log[-3000:]
    report['resumed_in'] = resumed_in.group(0)
    assert re.search(rf'iter:\s*{TOTAL_ITER},', resumed_log) and 'End of training' in resumed_log, resumed_log[-3000:]
    params = load_params(experiment / 'models' / 'net_g_latest.pth')
    assert all(torch.isfinite(value).all() for value in params.values())
    state = torch.load(experiment / 'training_states' / f'{STOP_AT[method]}.state', map_location='cpu',
                       weights_only=True)['backlit']
    if NUM_GPU:
        assert 'cuda' in state['rng'][0], 'the run never initialised CUDA'
    if precision == 'fp16':
        assert state['scaler'].get('scale', 0) > 0, state['scaler']
        report['fp16_loss_scale_at_interruption'] = float(state['scaler']['scale'])
    else:
        assert state['scaler'] == {}
    losses = [float(value) for value in re.findall(r'l_total: ([-+0-9.e]+)', resumed_log)]
    assert losses and all(np.isfinite(losses)), losses
    report['last_logged_total_loss'] = losses[-1]


#: a resumed fp32 run may differ from an uninterrupted one by this fraction of how far the weights moved after the
#: interruption, or by this multiple of the difference between two uninterrupted runs if that is larger (distances
#: over all weights as one vector). GPU kernels that add with atomics (pooling and upsampling backward) and the
#: algorithms cuDNN's autotuning picks (BasicSR turns it on) make GPU training nondeterministic, so bit-identical
#: resumes cannot be asked for there. The largest single-weight difference is no measure of that noise: Adam moves
#: every weight by about the learning rate per step whatever its gradient's size, so a weight whose gradient is
#: close to zero takes full steps in directions that the noise decides (on an H200, two uninterrupted RAVE runs
#: differed in one weight by 66 % of the largest change after the interruption).
RESUME_GAP_MAX_FRACTION = 0.01
RESUME_GAP_MAX_NOISE_FACTOR = 10
#: the comparison only tells a resume that loses state (optimiser moments, RNG, stage counter: each moves the weights
#: about as far as training does) from GPU noise while the noise stays below this fraction of that change
RESUME_NOISE_MAX_FRACTION = 0.25


@pytest.mark.parametrize('method', METHODS)
def test_fp32_resume_on_cuda_matches_an_uninterrupted_run(training, method, report):
    """A lost optimiser state, RNG state or stage counter would move the weights about as far as training does; GPU
    nondeterminism (measured between two uninterrupted runs) moves them much less. Whether the resume is
    bit-identical, as it is on the CPU, is recorded."""
    training.wait((method, 'fp32'), report, required=('interrupted', 'resumed'))
    training.wait((method, 'reference'), report)
    training.wait((method, 'reference2'), report)
    resumed = load_params(training.experiment(method, 'fp32') / 'models' / 'net_g_latest.pth')
    at_stop = load_params(training.experiment(method, 'fp32') / 'models' / f'net_g_{STOP_AT[method]}.pth')
    reference = load_params(training.experiment(method, 'reference') / 'models' / 'net_g_latest.pth')
    reference2 = load_params(training.experiment(method, 'reference2') / 'models' / 'net_g_latest.pth')
    report['max_diff_resumed_vs_uninterrupted'] = max_difference(resumed, reference)
    report['max_diff_between_uninterrupted_runs'] = max_difference(reference, reference2)
    report['max_change_after_interruption'] = max_difference(reference, at_stop)
    report['l2_resumed_vs_uninterrupted'] = gap = l2_distance(resumed, reference)
    report['l2_between_uninterrupted_runs'] = noise = l2_distance(reference, reference2)
    report['l2_change_after_interruption'] = progress = l2_distance(reference, at_stop)
    report['deterministic'] = noise == 0
    report['bit_identical_resume'] = gap == 0
    if method == 'clip_lit_latent':
        pairs = [torch.load(training.experiment(method, run) / 'models' / 'guidance_latest.pth', map_location='cpu',
                            weights_only=True)['pair'] for run in ('fp32', 'reference')]
        report['max_diff_guidance_pair'] = float((pairs[0] - pairs[1]).abs().max())
    report['allowed'] = allowed = max(RESUME_GAP_MAX_FRACTION * progress, RESUME_GAP_MAX_NOISE_FACTOR * noise)
    assert progress > 0, 'training did not move the weights after the interruption'
    assert noise < RESUME_NOISE_MAX_FRACTION * progress, (
        f'two uninterrupted runs differ by {noise / progress:.0%} of the change after the interruption: too noisy to '
        f'tell a resume that loses state from GPU nondeterminism; {report}')
    assert gap <= allowed and gap < 0.5 * progress, report


@pytest.mark.parametrize('precision', TRAIN_PRECISIONS)
@pytest.mark.parametrize('method', METHODS)
def test_basicsr_test_on_the_resumed_checkpoint_on_cuda(training, method, precision, report):
    training.wait((method, precision), report, required=('interrupted', 'resumed', 'test'))
    results = training.root / f'{method}_{precision}' / 'results'
    logs = ''.join(path.read_text() for path in results.glob('*/test_*.log'))
    metrics = {name: float(value) for name, value in re.findall(r'# (\w+): (-?\d+\.\d+)', logs)}
    report['metrics'] = metrics
    assert {'psnr', 'ssim', 'rave_psnr', 'rave_ssim', 'guidance'} <= set(metrics), logs[-3000:]
    assert all(np.isfinite(value) for value in metrics.values()), metrics
    assert len(list(results.glob('*/visualization/BAID_test/*.png'))) == 2


@pytest.mark.parametrize('ranks', [1, 2])
@pytest.mark.parametrize('method', METHODS)
def test_torchrun_on_cuda_uses_nccl(training, method, ranks, report):
    """`torchrun --nproc_per_node=N ... --launcher pytorch`: nccl, every collective on the GPU, every rank ends with
    the saved network (and CLIP-LIT-Latent with the same learned pair)."""
    key = ('torchrun', method, ranks)
    if key not in training.futures:
        pytest.skip(f'{ranks} ranks need {ranks} GPUs; {torch.cuda.device_count()} visible')
    started = time.monotonic()
    dumps = training.futures[key].result()
    report['seconds_waited'] = round(time.monotonic() - started, 1)
    report['backend'] = [dump['backend'] for dump in dumps]
    report['collectives'] = sorted(set(dumps[0]['collectives']))
    assert report['backend'] == [BACKEND] * ranks
    name = f'torchrun_{method}_{ranks}'
    experiment = training.root / name / 'experiments' / name
    assert f'world_size: {ranks}' in read_log(experiment)
    saved = load_params(experiment / 'models' / f'net_g_{TORCHRUN_ITER[method]}.pth')
    for dump in dumps:
        for key in saved:
            torch.testing.assert_close(dump['net'][key], saved[key], rtol=0, atol=0)
        if method == 'clip_lit_latent':
            torch.testing.assert_close(dump['pair'], dumps[0]['pair'], rtol=0, atol=0)
