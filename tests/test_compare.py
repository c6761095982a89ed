"""`rave compare`: released networks on the shared photos, metrics checked against `basicsr test`, bad input.

The fidelity tests use four of the six shared photos, downscaled to a short side of 160 px (NIQE needs two 96-px
blocks), and a pseudo ground truth written by the test: each photo brightened by the gamma curve ``x ** 0.6``. The
guidance score uses the CLIP-free ImageStatsEncoder with a residual computed from those two sets. `basicsr test`
runs in subprocesses with an option file written here (``RAVEModel``, one dataset per image, so that its log holds
per-image values) on the same files.
"""
import contextlib
import csv
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from urllib.parse import unquote

import cv2
import numpy as np
import pytest
import torch

from rave_basicsr.archs.backlit_unet_arch import BacklitUNet
from rave_basicsr.cli.rave_cli import main as rave_main
from rave_basicsr.inference import compare
from rave_basicsr.inference.compare import usable_metrics
from rave_basicsr.inference.compare_plan import assign_labels, resolve_model_spec, split_label
from rave_basicsr.metrics.rave_protocol_metric import lpips_unavailable_reason
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.checkpoint import torch_save_atomic
from tests.pipeline_helpers import single_thread_env, write_options
from tests.weights_helpers import save_live_network

PHOTOS = ('backlit_1', 'backlit_3', 'backlit_5', 'backlit_6')  # two landscape, two portrait
MODELS = ('rave_unpaired', 'clip_lit_latent_unpaired')
STATS = {'type': 'arch', 'network': {'type': 'ImageStatsEncoder'}}
#: compare's outputs vs basicsr test's: the same network, channels-last vs NCHW, so a few pixels differ by one grey
#: level; PSNR and SSIM hardly move, NIQE (block statistics) a little more. The guidance score of `basicsr test` is
#: computed on the float output, compare's on the saved 8-bit output. Measured worst cases (2-core CPU): PSNR 4e-5 dB,
#: SSIM 5e-5, NIQE 0.0064, guidance 9e-5; reading the images as RGB instead of BGR moves PSNR by up to 1.1 dB and
#: NIQE by 0.09.
TOLERANCE = {'psnr': 0.005, 'ssim': 1e-4, 'lpips': 1e-3, 'niqe': 0.02, 'guidance': 1e-3}
#: on the same output files only the 4 decimals of BasicSR's log remain (and the 8-bit quantisation for guidance)
SAME_FILES_TOLERANCE = {'psnr': 5.1e-5, 'ssim': 5.1e-5, 'niqe': 5.1e-5, 'guidance': 1e-3}
LOG_NAMES = {'psnr': 'rave_psnr', 'ssim': 'rave_ssim', 'lpips': 'rave_lpips', 'niqe': 'niqe', 'guidance': 'guidance'}


def _rave(args):
    """Run `rave` in-process; (exit code, stdout)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = rave_main(args)
    return code, buffer.getvalue()


def _read_csv(path):
    with open(path, newline='') as handle:
        return list(csv.DictReader(handle))


def _per_image(out_dir):
    """{(model, image): {metric: value}} from per_image.csv."""
    return {(row['model'], row['image']): {k: float(v) for k, v in row.items() if k not in ('model', 'image', 'file')
                                           and v != ''}
            for row in _read_csv(out_dir / 'per_image.csv')}


def _basicsr_log_values(log_text):
    """{dataset name: {metric: value}} from a `basicsr test` log."""
    values = {}
    for name, block in re.findall(r'Validation (\S+)\n((?:\t # \w+: -?[\d.]+\n?)+)', log_text):
        values[name] = {metric: float(v) for metric, v in re.findall(r'# (\w+): (-?[\d.]+)', block)}
    return values


def _basicsr_options(name, weights, folders, residual):
    """`basicsr test` options as options/test_rave.yml, with one single-image dataset per photo."""
    datasets = {f'test_{i}': {'name': image, 'type': 'PairedBacklitDataset', 'dataroot_lq': str(lq),
                              'dataroot_gt': str(gt), 'io_backend': {'type': 'disk'}}
                for i, (image, (lq, gt)) in enumerate(folders.items(), 1)}
    return {'name': name, 'model_type': 'RAVEModel', 'num_gpu': 0, 'manual_seed': 0, 'datasets': datasets,
            'network_g': {'type': 'BacklitUNet', 'outer_padding': 'reflect', 'division_eps': 0},
            'guidance_encoder': dict(STATS), 'residual': {'path': str(residual)},
            'path': {'pretrain_network_g': str(weights), 'param_key_g': None, 'strict_load_g': True},
            'val': {'save_img': True, 'suffix': None,
                    'metrics': {'rave_psnr': {'type': 'calculate_rave_psnr'},
                                'rave_ssim': {'type': 'calculate_rave_ssim'},
                                'rave_lpips': {'type': 'calculate_rave_lpips', 'better': 'lower'},
                                'niqe': {'type': 'calculate_niqe', 'crop_border': 0, 'better': 'lower'},
                                'guidance': {'type': 'calculate_guidance_score'}}}}


@pytest.fixture(scope='module')
def photo_set(shared_data, tmp_path_factory):
    """Downscaled photos, their pseudo ground truth, per-photo folders for `basicsr test` and a residual."""
    from rave_basicsr.residual.compute import compute_residual
    from rave_basicsr.residual.encoder_spec import build_encoder_from_spec

    root = tmp_path_factory.mktemp('photos')
    inputs, gts = root / 'in', root / 'gt'
    inputs.mkdir()
    gts.mkdir()
    singles = {}
    for name in PHOTOS:
        image = cv2.imread(str(shared_data / 'backlit_samples' / f'{name}.png'))
        h, w = image.shape[:2]
        scale = 160 / min(h, w)
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        truth = np.round(255 * (image / 255.0) ** 0.6).astype(np.uint8)
        cv2.imwrite(str(inputs / f'{name}.png'), image)
        cv2.imwrite(str(gts / f'{name}.png'), truth)
        lq, gt = root / 'single' / name / 'lq', root / 'single' / name / 'gt'
        lq.mkdir(parents=True)
        gt.mkdir()
        (lq / f'{name}.png').symlink_to(inputs / f'{name}.png')
        (gt / f'{name}.png').symlink_to(gts / f'{name}.png')
        singles[name] = (lq, gt)
    residual = root / 'residual.safetensors'
    compute_residual(build_encoder_from_spec('arch:ImageStatsEncoder'), gts, inputs, progress=False).save(residual)
    weights = {model: shared_data / 'official_checkpoints' / f'{model}.pth' for model in MODELS}
    return {'root': root, 'inputs': inputs, 'gt': gts, 'singles': singles, 'residual': residual, 'weights': weights}


@pytest.fixture(scope='module')
def fidelity(photo_set):
    """`rave compare` of the two released networks (in-process, while `basicsr test` runs on the same files in
    two subprocesses)."""
    root = photo_set['root']
    runs = {}
    for model in MODELS:
        option_file = write_options(root / f'{model}.yml', _basicsr_options(
            f'fidelity_{model}', photo_set['weights'][model], photo_set['singles'], photo_set['residual']))
        command = [sys.executable, '-m', 'rave_basicsr.cli.basicsr_cli', 'test', '-opt', str(option_file)]
        runs[model] = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, env=single_thread_env())
    out_dir = root / 'compare'
    code, stdout = _rave(['compare', str(photo_set['inputs']), '--gt', str(photo_set['gt']), '--weights',
                          *[str(photo_set['weights'][m]) for m in MODELS], '-o', str(out_dir), '--residual',
                          str(photo_set['residual']), '--include-input', '--device', 'cpu', '--quiet'])
    logs = {}
    for model, process in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
        results = root / 'results' / f'fidelity_{model}'
        logs[model] = _basicsr_log_values(''.join(p.read_text() for p in results.glob('test_*.log')))
    return {'code': code, 'stdout': stdout, 'out': out_dir, 'logs': logs, **photo_set}


def test_metrics_equal_those_of_basicsr_test(fidelity):
    assert fidelity['code'] == 0, fidelity['stdout']
    values = _per_image(fidelity['out'])
    for model in MODELS:
        log = fidelity['logs'][model]
        assert set(log) == set(PHOTOS)
        for image in PHOTOS:
            ours = values[(model, image)]
            assert set(ours) >= {'psnr', 'ssim', 'niqe', 'guidance'}
            assert {LOG_NAMES[metric] for metric in ours} == set(log[image])  # LPIPS: both skip it, or both run it
            for metric in ours:
                assert ours[metric] == pytest.approx(log[image][LOG_NAMES[metric]], abs=TOLERANCE[metric]), (
                    model, image, metric)
    # the outputs are those of basicsr test, to one grey level
    for model in MODELS:
        for image in PHOTOS:
            ours = cv2.imread(str(fidelity['out'] / model / f'{image}.png')).astype(int)
            theirs = cv2.imread(str(fidelity['root'] / 'results' / f'fidelity_{model}' / 'visualization' / image /
                                    f'{image}_fidelity_{model}.png')).astype(int)
            assert np.abs(ours - theirs).max() <= 1
    # the two networks do differ, and both brighten the photos towards the pseudo ground truth
    rows = {row['model']: row for row in _read_csv(fidelity['out'] / 'results.csv')}
    assert float(rows['input']['psnr']) + 3 < float(rows['rave_unpaired']['psnr'])
    assert float(rows['rave_unpaired']['psnr']) != pytest.approx(float(rows['clip_lit_latent_unpaired']['psnr']),
                                                               abs=0.1)


def test_metrics_on_the_same_files_match_to_the_logged_digits(fidelity, tmp_path):
    """Reusing `basicsr test`'s own outputs as compare's outputs leaves only the log's rounding."""
    out_dir = tmp_path / 'same'
    for model in MODELS:
        (out_dir / model).mkdir(parents=True)
        for image in PHOTOS:
            source = fidelity['root'] / 'results' / f'fidelity_{model}' / 'visualization' / image
            (out_dir / model / f'{image}.png').write_bytes((source / f'{image}_fidelity_{model}.png').read_bytes())
    code, stdout = _rave(['compare', str(fidelity['inputs']), '--gt', str(fidelity['gt']), '--weights',
                          *[str(fidelity['weights'][m]) for m in MODELS], '-o', str(out_dir), '--residual',
                          str(fidelity['residual']), '--metrics', 'psnr', 'ssim', 'niqe', 'guidance', '--quiet'])
    assert code == 0, stdout
    assert 'weights.json is missing' in stdout  # reused outputs that compare did not make are pointed out
    values = _per_image(out_dir)
    for model in MODELS:
        for image in PHOTOS:
            for metric, tolerance in SAME_FILES_TOLERANCE.items():
                expected = fidelity['logs'][model][image][LOG_NAMES[metric]]
                assert values[(model, image)][metric] == pytest.approx(expected, abs=tolerance), (model, image, metric)
    # and the means in results.csv are the means of the per-image values
    rows = {row['model']: row for row in _read_csv(out_dir / 'results.csv')}
    for model in MODELS:
        mean = np.mean([values[(model, image)]['psnr'] for image in PHOTOS])
        assert float(rows[model]['psnr']) == pytest.approx(mean, abs=1e-9)
        assert float(rows[model][f'psnr[{PHOTOS[0]}]']) == pytest.approx(values[(model, PHOTOS[0])]['psnr'])


class _References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.references = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ('src', 'href', 'value', 'data-full') and value and '.' in value:
                self.references.append(value)


def test_report_files(fidelity):
    out = fidelity['out']
    rows = _read_csv(out / 'results.csv')
    assert [row['model'] for row in rows] == ['input', *MODELS]
    assert all(row['images'] == str(len(PHOTOS)) for row in rows)
    assert set(rows[0]) >= {'psnr', 'ssim', 'niqe', 'guidance'} | {f'niqe[{image}]' for image in PHOTOS}
    markdown = (out / 'results.md').read_text()
    for model in MODELS:
        assert f'| {model} |' in markdown
    reason = lpips_unavailable_reason()  # LPIPS runs where the optional package (and its weights) can
    if reason is None:
        assert all(row['lpips'] != '' for row in rows) and 'lpips skipped' not in fidelity['stdout']
        assert markdown.count('| backlit_5 |') == 5  # one per-image table per metric
    else:
        assert 'lpips' not in rows[0] and f'lpips skipped: {reason}' in fidelity['stdout']
        assert f'lpips skipped: {reason}' in markdown
        assert markdown.count('| backlit_5 |') == 4
    # grid: a title row and one row per photo, columns input, the two models, ground truth
    grid = cv2.imread(str(out / 'grid.png'))
    assert grid.shape[1] == 6 + 4 * (160 + 6) and grid.shape[0] > len(PHOTOS) * 100
    # the page only refers to files inside OUTDIR, all present
    page = (out / 'index.html').read_text()
    parser = _References()
    parser.feed(page)
    assert parser.references and not [r for r in parser.references if r.startswith(('/', '..'))]
    assert all((out / unquote(reference)).is_file() for reference in parser.references), parser.references
    for image in PHOTOS:
        assert f'previews/input/{image}.jpg' in page and f'previews/rave_unpaired/{image}.jpg' in page
        assert f'previews/gt/{image}.jpg' in page
    manifest = json.loads((out / 'rave_unpaired' / 'weights.json').read_text())
    assert manifest['precision'] == 'fp32' and len(manifest['sha256']) == 64


def test_existing_outputs_are_reused_and_never_mixed(fidelity, monkeypatch, capsys):
    out = fidelity['out']
    before = {p: p.stat().st_mtime_ns for p in out.glob('*/*.png')}

    def no_enhancement(*args, **kwargs):
        raise AssertionError('existing outputs must be reused')

    monkeypatch.setattr('rave_basicsr.inference.enhance.enhance_files', no_enhancement)
    weights = [str(fidelity['weights'][m]) for m in MODELS]
    code, stdout = _rave(['compare', str(fidelity['inputs']), '--weights', *weights, '-o', str(out),
                          '--metrics', 'niqe', '--quiet'])
    assert code == 0, stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob('*/*.png')} == before
    # the same label with other weights is refused, naming the way out
    code, stdout = _rave(['compare', str(fidelity['inputs']), '--weights',
                          f'rave_unpaired={fidelity["weights"]["clip_lit_latent_unpaired"]}', '-o', str(out),
                          '--quiet'])
    assert code == 2
    assert re.search(r'holds outputs of .*rave_unpaired\.pth.*--overwrite', capsys.readouterr().err)
    assert {p: p.stat().st_mtime_ns for p in out.glob('*/*.png')} == before


# ------------------------------------------------------------------------------------ without the shared data
@pytest.fixture(scope='module')
def experiment(tmp_path_factory):
    """A BasicSR experiment folder holding a small random network (its checkpoint as `basicsr train` writes it)."""
    folder = tmp_path_factory.mktemp('experiments') / 'my_run'
    save_live_network(folder / 'models' / 'net_g_latest.pth')
    return folder


def _images(folder, names, size=(40, 56), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        cv2.imwrite(str(folder / name), (rng.random((*size, 3)) * 160).astype(np.uint8))
    return folder


@pytest.fixture
def small_residual(tmp_path):
    from rave_basicsr.residual.compute import compute_residual
    from rave_basicsr.residual.encoder_spec import build_encoder_from_spec

    well, back = _images(tmp_path / 'well', ['w1.png', 'w2.png'], seed=1), _images(tmp_path / 'back', ['b.png'])
    path = tmp_path / 'residual.safetensors'
    compute_residual(build_encoder_from_spec('arch:ImageStatsEncoder'), well, back, progress=False).save(path)
    return path


def test_bad_image_and_missing_ground_truth_are_reported_and_skipped(experiment, small_residual, tmp_path):
    inputs = _images(tmp_path / 'in', ['a.png', 'b.png', 'c.png'])
    (inputs / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    gts = _images(tmp_path / 'gt', ['a.png', 'c.png'], seed=3)
    (gts / 'c.png').write_bytes(b'')  # an empty ground truth
    out = tmp_path / 'out'
    code, stdout = _rave(['compare', str(inputs), '--gt', str(gts), '--weights', str(experiment), 'plain=' +
                          str(experiment / 'models' / 'net_g_latest.pth'), '-o', str(out), '--residual',
                          str(small_residual), '--metrics', 'psnr', 'ssim', 'niqe', 'guidance', '--device', 'cpu',
                          '--quiet'])
    assert code == 1
    assert 'FAILED  broken.jpg: not a readable image' in stdout
    assert stdout.count('broken.jpg') == 1  # one problem, not one per model and stage
    assert 'FAILED  b.png: no ground truth named b.* in' in stdout
    assert 'FAILED  c.png: ground truth' in stdout and 'empty' in stdout
    assert 'niqe skipped for images smaller than two 96x96 blocks' in stdout
    values = _per_image(out)
    assert set(values) == {(label, image) for label in ('my_run', 'plain') for image in 'abc'}
    assert set(values[('my_run', 'a')]) == {'psnr', 'ssim', 'guidance'}
    assert set(values[('my_run', 'b')]) == set(values[('my_run', 'c')]) == {'guidance'}
    assert values[('my_run', 'a')] == values[('plain', 'a')]  # the same checkpoint, by folder and by file
    for label in ('my_run', 'plain'):
        assert sorted(p.name for p in (out / label).glob('*.png')) == ['a.png', 'b.png', 'c.png']
    assert (out / 'grid.png').is_file() and (out / 'index.html').is_file()
    assert 'broken.jpg' in (out / 'results.md').read_text()
    rows = {row['model']: row for row in _read_csv(out / 'results.csv')}
    assert rows['my_run']['images'] == '3' and rows['my_run']['psnr[b]'] == ''
    assert float(rows['my_run']['psnr']) == pytest.approx(values[('my_run', 'a')]['psnr'])


def test_bad_arguments_exit_2_before_any_weights_are_loaded(experiment, tmp_path, capsys, monkeypatch):
    inputs = _images(tmp_path / 'in', ['a.png'])
    empty = tmp_path / 'empty'
    empty.mkdir()
    out = str(tmp_path / 'out')

    def no_loading(*args, **kwargs):
        raise AssertionError('no weights may be loaded for bad arguments')

    monkeypatch.setattr(compare, 'load_enhancement_state_dict', no_loading)
    cases = [
        ([str(empty), '--weights', 'rave_unpaired'], 'INPUT_DIR .*empty: no images found'),
        ([str(inputs), '--weights', 'rave_unpiared'], "not a released name.*did you mean 'rave_unpaired'"),
        ([str(inputs), '--weights', str(tmp_path)], r'not a BasicSR experiment with a checkpoint: .*net_g_latest'),
        ([str(inputs), '--gt', str(tmp_path / 'nowhere'), '--weights', 'rave_unpaired'], '--gt .*no such folder'),
        ([str(inputs), '--gt', str(empty), '--weights', 'rave_unpaired'], '--gt .*no images found'),
        ([str(inputs), '--weights', str(experiment), '--encoder', 'arch:ImageStatsEncoder'], '--encoder needs'),
        ([str(inputs), '--weights', str(experiment), '--residual', 'nothing.safetensors'], '--residual .*no such'),
        ([str(inputs), '--weights', f'gt={experiment}'], "label 'gt' is reserved"),
        (['--weights', str(experiment), str(inputs)], 'INPUT_DIR is missing; give it before --weights'),
    ]
    for args, message in cases:
        assert rave_main(['compare', *args, '-o', out, '--quiet']) == 2, args
        assert re.search(message, capsys.readouterr().err), (args, message)
    assert not (tmp_path / 'out').exists()
    # ground truth that matches no input
    _images(tmp_path / 'other', ['z.png'])
    assert rave_main(['compare', str(inputs), '--gt', str(tmp_path / 'other'), '--weights', str(experiment), '-o',
                      out, '--quiet']) == 2
    assert 'matched to inputs by file name' in capsys.readouterr().err
    # the report written into the test set would be read as test images next time
    assert rave_main(['compare', str(inputs), '--weights', str(experiment), '-o', str(inputs), '--quiet']) == 2
    assert 'is INPUT_DIR; the report' in capsys.readouterr().err


def test_a_checkpoint_that_does_not_fit_exits_2_before_enhancing(tmp_path, capsys):
    inputs = _images(tmp_path / 'in', ['a.png'])
    state = BacklitUNet().state_dict()
    state['cond1.weight'] = torch.zeros(32, 4, 3, 3)
    torch_save_atomic(state, tmp_path / 'wrong.pth')
    code = rave_main(['compare', str(inputs), '--weights', str(tmp_path / 'wrong.pth'), '-o', str(tmp_path / 'out'),
                      '--quiet'])
    assert code == 2 and 'cond1.weight (32, 4, 3, 3)' in capsys.readouterr().err
    assert not list((tmp_path / 'out').glob('*/*.png'))


def test_labels_from_names_paths_and_experiments(experiment, tmp_path):
    checkpoint = experiment / 'models' / 'net_g_latest.pth'
    other = experiment / 'models' / 'net_g_5000.pth'
    other.write_bytes(checkpoint.read_bytes())
    odd = tmp_path / 'my weights (v2).pth'
    odd.write_bytes(checkpoint.read_bytes())
    arguments = ['rave_unpaired', str(experiment), str(checkpoint), str(other), str(odd), 'mine=rave_paired',
                 'rave_unpaired']
    models, explicit = [], []
    for argument in arguments:
        label, spec = split_label(argument)
        models.append(resolve_model_spec(spec))
        explicit.append(label)
    assign_labels(models, explicit)
    assert [m.label for m in models] == ['rave_unpaired', 'my_run', 'my_run-2', 'my_run_net_g_5000',
                                         'my_weights_v2', 'mine', 'rave_unpaired-2']
    assert [m.source for m in models] == ['released', 'experiment', 'file', 'file', 'file', 'released', 'released']
    assert models[1].path == checkpoint
    with pytest.raises(RaveError, match='given twice'):
        assign_labels([resolve_model_spec('rave_paired'), resolve_model_spec('rave_unpaired')], ['x', 'x'])


@pytest.mark.parametrize('installed', [False, True])
def test_lpips_runs_exactly_when_the_package_is_there(lpips_package, installed):
    lpips_package(installed)
    usable, notes = usable_metrics(['psnr', 'lpips', 'niqe'], have_ground_truth=True, have_guidance=False)
    if installed:
        assert (usable, notes) == (['psnr', 'lpips', 'niqe'], [])
    else:
        assert usable == ['psnr', 'niqe'] and len(notes) == 1
        assert notes[0].startswith('lpips skipped: LPIPS is unavailable (ModuleNotFoundError: ')
    # without ground truth LPIPS (a full-reference metric) is skipped whatever is installed
    usable, notes = usable_metrics(['lpips', 'niqe'], have_ground_truth=False, have_guidance=False)
    assert usable == ['niqe'] and notes == ['lpips skipped: it needs ground truth (--gt GT_DIR).']
