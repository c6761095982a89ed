"""Robustness of an offline demo recipe: does it enhance backlit sets it was not tuned on, whatever the
training length and the seed, and does it leave well-exposed regions as they were?

For every backlight model of ``rave_basicsr.data.backlight_models`` a demo set is written (``rave demo-data``'s
function, data seed 0) into the work folder; for every length factor (``total_iter`` × 1, 2, 4; the warm-up keeps its
length) and training seed (``manual_seed``) a copy of the option file, with the data paths, name, seed and length
overridden, is trained by the real ``basicsr train`` in a child process (one OpenMP thread, as the tests run it);
the validation images, and the real backlit sample photos when the shared data folder has them, are enhanced with
the final checkpoint by ``rave enhance`` (fp32, as ``scripts/demo.sh`` does otherwise) and scored:

* PSNR of input and output against the ground truth per image (8-bit RGB, BasicSR's ``calculate_psnr``), the mean
  gain and the share of images improved;
* the change of the mean luminance (0-255, 0.299 R + 0.587 G + 0.114 B) over each input's brightest and darkest
  fifth of pixels, output minus input; on the synthetic sets the ground truth's own change is the reference (the
  backlight models brighten the background, so the right answer there is a darkening), on the real photos the
  released RAVE weights' (measured here too: about -3 grey levels);
* the illumination texture (:func:`illumination_texture`): how much fine structure the map ``L = input / output``
  has, which an exposure change does not need and which makes an output look over-processed; on the synthetic sets
  the ground truth's own, on the photos the released weights';
* for CLIP-LIT and CLIP-LIT-Latent option files, the final pair's mean well-lit probability (the guidance score)
  of the validation inputs, outputs and ground truths: does the pair separate the sets, does the network raise it.

The robustness criteria, per backlight model and seed, then over seeds: gain >= 2 dB and >= 80 % of the images improved
at 1×; the gain at every longer length within 1 dB of the 1× gain; at 1× the highlights kept (:func:`highlights_kept`:
the brightest-fifth change no more than 10 grey levels darker than the ground truth's, and no more than 10 brighter
than the input, or than the ground truth where it brightens); all seeds pass. For the demo's own set (the checkpoint ``scripts/demo.sh``
ships) also the real photos' brightest-fifth change within 10 grey levels of the released weights' and their
illumination texture at most 1.5 times the released weights'; a network trained on another set is held to that
set's ground truth, and its photo figures are reported, not judged.

Results go to ``bench/results/<name>.json`` and ``.md`` after every run; runs already there for the same training
options are reused (:func:`options_digest`: the parsed options without ``name``, so comments and the experiment name
do not count) on the same data (:func:`same_data`; every set is regenerated first), so a sweep can be run in parts
(``--fresh`` starts over). Each run records its CPU (figures differ between CPUs; the report names every one) and,
as training seconds are wall time on a possibly shared machine, the 1-minute load average before and after it.
``--one-run-per-seed`` trains each set and seed once, at the longest length, and scores its checkpoints at the shorter
lengths as their runs (:func:`train_and_score`: the same networks, bit for bit, for 4 instead of 7 times the 1×
training of a 1×/2×/4× sweep). Stopped with SIGTERM (``kill``), a sweep ends its running trainings and
enhancements with it and starts no more; the runs finished until then are in the results file.

    python bench/bench_demo_robustness.py [--opt options/demo/train_rave_demo.yml] [--models demo mild ...]
        [--lengths 1 2 4] [--seeds 0 1 2] [--quick] [--fresh] [--rescore] [--jobs 2] [--one-run-per-seed]
"""
import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import rave_basicsr  # noqa: E402,F401
from basicsr.metrics.psnr_ssim import calculate_psnr  # noqa: E402
from rave_basicsr.archs.image_stats_encoder_arch import LUMA_WEIGHTS  # noqa: E402
from rave_basicsr.data.backlight_models import BACKLIGHT_MODELS, DEFAULT_BACKLIGHT  # noqa: E402
from rave_basicsr.data.demo_data import make_demo_data  # noqa: E402
from rave_basicsr.utils.hardware import cpu_capability  # noqa: E402
from rave_basicsr.utils.image_io import read_image  # noqa: E402
from rave_basicsr.utils.options import load_option_file  # noqa: E402
from tests.clip_lit_helpers import well_lit_probabilities  # noqa: E402
from tests.pipeline_helpers import single_thread_env  # noqa: E402
from tests.shared_data import shared_data_dir  # noqa: E402

DEFAULT_OPT = REPO / 'options' / 'demo' / 'train_rave_demo.yml'
DEMO_DATA = 'demo/data/'
#: the robustness criteria (module docstring); ``bright_tolerance``: grey levels between the brightest-fifth change
#: and its reference; ``texture_factor``: how many times the released weights' illumination texture on the photos
#: the demo checkpoint's may reach
CRITERIA = {'min_gain_db': 2.0, 'min_improved': 0.8, 'max_drift_db': 1.0, 'bright_tolerance': 10.0,
            'texture_factor': 1.5}
RELEASED_WEIGHTS = 'rave_unpaired.pth'
#: grey levels by which an image's channel mean may differ on the same data (:func:`same_data`)
DATA_TOLERANCE = 0.01
#: the report's tags for the CPUs of a sweep made on several machines (:func:`machines_text`)
MACHINE_TAGS = 'ABCDEFGHIJ'


def _shown_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (reports name no machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return Path(path).name


def _with_data(value, data_dir: Path):
    """``value`` with every ``demo/data/...`` path of the option file moved to ``data_dir``."""
    if isinstance(value, dict):
        return {key: _with_data(item, data_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_data(item, data_dir) for item in value]
    if isinstance(value, str) and value.startswith(DEMO_DATA):
        return str(data_dir / value[len(DEMO_DATA):])
    return value


def run_options(base: dict, data_dir: Path, name: str, factor: int, seed: int,
                checkpoint_every: Optional[int] = None) -> dict:
    """A copy of the option file's options for one run: data in ``data_dir``, ``total_iter`` × ``factor``, seed
    ``seed``, one validation at the end, no TensorBoard; a checkpoint at the end, or every ``checkpoint_every``
    iterations (the shorter lengths of a :func:`train_and_score` run)."""
    options = _with_data(copy.deepcopy(base), data_dir)
    total = int(base['train']['total_iter']) * factor
    options.update(name=name, manual_seed=seed)
    options['train']['total_iter'] = total
    options['val']['val_freq'] = total
    options['logger'].update(save_checkpoint_freq=checkpoint_every or total, use_tb_logger=False)
    return options


def options_digest(options: dict) -> str:
    """sha256 of what decides a run: the parsed options except ``name`` (which every run overrides), in canonical
    JSON. Comments, layout and the experiment name do not change it, so a recipe moved between files (a candidate
    shipped, say) keeps its runs."""
    content = {key: value for key, value in options.items() if key != 'name'}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(data_dir: Path) -> Dict[str, List[float]]:
    """Each generated image's mean R, G, B (grey levels, 4 decimals), by path: what :func:`same_data` compares, so
    that a run is kept only for the data it was made on and a changed backlight model reruns that set's runs.
    Means, not a hash of the pixels: the sets are float computations rounded to 8 bits, and another CPU's kernels
    move a few pixels by one level (the window set between an AVX-512 and an AVX2 machine)."""
    return {str(path.relative_to(data_dir)): [round(float(v), 4) for v in cv2.imread(str(path))[..., ::-1]
                                              .reshape(-1, 3).mean(0)]
            for path in sorted(data_dir.rglob('*.png'))}


def same_data(first: Optional[dict], second: dict) -> bool:
    """Whether two :func:`data_fingerprint` results are one set: the same files, every mean within 0.01 grey levels
    (a one-level change of 1 % of a 128-px image's pixels moves its mean by 0.01)."""
    return (first is not None and first.keys() == second.keys()
            and all(abs(a - b) <= DATA_TOLERANCE for name in first for a, b in zip(first[name], second[name])))


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Luminance in grey levels of an 8-bit-valued float RGB image."""
    return rgb @ np.array(LUMA_WEIGHTS)


def fifth_masks(luma: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The brightest and the darkest fifth of an image's pixels by luminance, as boolean masks."""
    return luma >= np.quantile(luma, 0.8), luma <= np.quantile(luma, 0.2)


def fifth_changes(inp: np.ndarray, out: np.ndarray) -> Dict[str, float]:
    """Mean luminance change (out - in, grey levels) over the input's brightest and darkest fifth of pixels."""
    luma_in, luma_out = luminance(inp), luminance(out)
    bright, dark = fifth_masks(luma_in)
    return {'bright': float(luma_out[bright].mean() - luma_in[bright].mean()),
            'dark': float(luma_out[dark].mean() - luma_in[dark].mean())}


def illumination_texture(inp: np.ndarray, out: np.ndarray) -> float:
    """The fine structure of the illumination map an output implies, ``L = input / output``: the mean absolute
    difference of log2 L (averaged over the channels) from its Gaussian blur (sigma 1 % of the width), in stops, over
    the pixels that are neither near black nor clipped (the blur, too, averages those only: a clipped output says
    nothing about L). An exposure change needs a smooth L (about 0); an L that follows the image's own texture is a
    local tone curve, which amplifies textures, noise and the colour casts of shadows (the over-processed "HDR
    look")."""
    usable = ((inp.min(-1) > 8) & (out.max(-1) < 247) & (out.min(-1) > 2)).astype(np.float32)
    if not usable.any():
        return 0.0
    log_l = (np.log2(inp + 0.5) - np.log2(out + 0.5)).mean(-1).astype(np.float32) * usable
    sigma = max(1.0, 0.01 * inp.shape[1])

    def blur(values: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(values, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)

    smooth = blur(log_l) / np.maximum(blur(usable), 1e-6)
    return float(np.abs(log_l - smooth)[usable > 0].mean())


class ChildProcesses:
    """The sweep's running children (trainings and enhancements), so that a stopped sweep ends them too: Python's
    default SIGTERM exit would leave them running, competing for the cores with whatever runs next."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running: set = set()
        self.stopping = False

    def run(self, command: List[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run(command, capture_output=True, text=True, **kwargs)`` that :meth:`stop` can end."""
        with self._lock:
            if self.stopping:
                raise RuntimeError(f'the sweep is stopping; not starting {command[:4]}')
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
            self.running.add(process)
        try:
            stdout, stderr = process.communicate()
        finally:
            with self._lock:
                self.running.discard(process)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def stop(self) -> None:
        """Start no more children and kill the running ones (their runs fail; finished runs are already saved)."""
        with self._lock:
            self.stopping = True
            for process in self.running:
                process.kill()


CHILDREN = ChildProcesses()


def stop_on_signal(signum: int, frame) -> None:
    """The SIGTERM handler of a sweep: end its children, then exit with the signal's status."""
    CHILDREN.stop()
    sys.exit(128 + signum)


def load8(path: Path) -> np.ndarray:
    """An image as 8-bit-valued float64 RGB (as ``scripts/demo.sh`` scores it)."""
    return np.round(read_image(str(path)).rgb * 255).astype(np.float64)


def enhance(inputs: Path, out_dir: Path, weights: Path) -> None:
    """``rave enhance`` in a child process, fp32, replacing earlier outputs."""
    command = [sys.executable, '-m', 'rave_basicsr.cli.rave_cli', 'enhance', str(inputs), '-o', str(out_dir),
               '--weights', str(weights), '--precision', 'fp32', '--overwrite']
    done = CHILDREN.run(command, env=single_thread_env())
    if done.returncode != 0:
        raise RuntimeError(f'rave enhance failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}')


def score_validation(data_dir: Path, out_dir: Path) -> List[dict]:
    """Per-image PSNR (input, output, against the ground truth) and fifth changes (output's, ground truth's)."""
    rows = []
    for gt_path in sorted((data_dir / 'val_gt').iterdir()):
        inp, out, gt = (load8(folder / gt_path.name) for folder in (data_dir / 'val_backlit', out_dir, gt_path.parent))
        rows.append({'image': gt_path.stem, 'psnr_in': calculate_psnr(inp, gt, 0),
                     'psnr_out': calculate_psnr(out, gt, 0),
                     **{f'{key}_out': value for key, value in fifth_changes(inp, out).items()},
                     **{f'{key}_gt': value for key, value in fifth_changes(inp, gt).items()},
                     'texture_out': illumination_texture(inp, out), 'texture_gt': illumination_texture(inp, gt)})
    return rows


def score_photos(photos: Path, out_dir: Path) -> List[dict]:
    """Per-photo fifth changes and illumination texture of real backlit photos (no ground truth)."""
    rows = []
    for path in sorted(photos.iterdir()):
        if path.is_file():
            inp, out = load8(path), load8(out_dir / path.name)
            rows.append({'image': path.stem, **fifth_changes(inp, out), 'texture': illumination_texture(inp, out)})
    return rows


def mean_fifths(rows: List[dict]) -> Dict[str, float]:
    """The brightest- and darkest-fifth changes and the illumination texture of :func:`score_photos` rows, averaged
    over the photos."""
    return {key: float(np.mean([r[key] for r in rows])) for key in ('bright', 'dark', 'texture')}


def score_photo_outputs(photos: Path, out_dir: Path) -> Tuple[List[dict], Dict[str, float]]:
    """A run's per-photo rows (:func:`score_photos`) and their means as ``photos_*`` summary entries."""
    rows = score_photos(photos, out_dir)
    return rows, {f'photos_{key}': value for key, value in mean_fifths(rows).items()}


def ceiling_psnr(data_dir: Path) -> float:
    """The best mean validation PSNR any network of the ``clamp(I / L)`` form can reach on a set: per pixel, the
    single-channel ``L`` (of 200 values, log-spaced over [0.05, 4]) nearest the ground truth. A set whose ceiling is
    close to its input PSNR cannot show a gain, whatever the recipe."""
    levels = np.exp(np.linspace(np.log(0.05), np.log(4.0), 200))
    scores = []
    for gt_path in sorted((data_dir / 'val_gt').iterdir()):
        inp, gt = load8(data_dir / 'val_backlit' / gt_path.name) / 255, load8(gt_path) / 255
        errors = np.stack([((np.clip(inp / level, 0, 1) - gt) ** 2).sum(-1) for level in levels])
        best = levels[errors.argmin(0)][..., None]
        scores.append(calculate_psnr(np.round(np.clip(inp / best, 0, 1) * 255), gt * 255, 0))
    return float(np.mean(scores))


def summarise(rows: List[dict]) -> dict:
    psnr_in, psnr_out = np.array([r['psnr_in'] for r in rows]), np.array([r['psnr_out'] for r in rows])
    return {'psnr_in': float(psnr_in.mean()), 'psnr_out': float(psnr_out.mean()),
            'gain': float((psnr_out - psnr_in).mean()), 'improved': float((psnr_out > psnr_in).mean()),
            **{key: float(np.mean([r[key] for r in rows])) for key in ('bright_out', 'dark_out', 'bright_gt',
                                                                       'dark_gt', 'texture_out', 'texture_gt')}}


def train_copy(options: dict, work: Path) -> Path:
    """``basicsr train`` on a copy of ``options`` (written to ``work/options``) in a child process with one OpenMP
    thread, from ``work``; returns the experiment folder (an earlier one of the same name is removed first)."""
    name = options['name']
    shutil.rmtree(work / 'experiments' / name, ignore_errors=True)
    option_file = work / 'options' / f'{name}.yml'
    option_file.parent.mkdir(parents=True, exist_ok=True)
    option_file.write_text(yaml.safe_dump(options, sort_keys=False))
    done = CHILDREN.run([sys.executable, '-m', 'rave_basicsr.cli.basicsr_cli', 'train', '-opt', str(option_file)],
                        cwd=work, env=single_thread_env())
    if done.returncode != 0:
        raise RuntimeError(f'basicsr train failed for {name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}')
    return work / 'experiments' / name


def score_checkpoint(base: dict, options: dict, experiment: Path, iteration: Optional[int], data_dir: Path,
                     enhanced: Path, photos: Optional[Path]) -> dict:
    """Enhance and score the validation images (and the photos) with one checkpoint of a run: ``net_g_{iteration}``,
    or ``net_g_latest`` for ``None``."""
    label = 'latest' if iteration is None else str(iteration)
    weights = experiment / 'models' / f'net_g_{label}.pth'
    enhance(data_dir / 'val_backlit', enhanced / 'val', weights)
    rows = score_validation(data_dir, enhanced / 'val')
    result = {'summary': summarise(rows), 'images': rows}
    if base.get('model_type') == 'CLIPLITModel':
        result['well_lit'] = well_lit_probabilities(
            options, experiment, {'input': data_dir / 'val_backlit', 'output': enhanced / 'val',
                                  'gt': data_dir / 'val_gt'}, checkpoint=label)
    if photos is not None:
        enhance(photos, enhanced / 'photos', weights)
        result['photos'], photo_summary = score_photo_outputs(photos, enhanced / 'photos')
        result['summary'].update(photo_summary)
    return result


def seconds_to_checkpoints(log_file: Path) -> List[float]:
    """Seconds from the start of training to each checkpoint save, in order, from a BasicSR training log."""
    stamps = []
    for line in log_file.read_text().splitlines():
        if 'Start training from' in line or 'Saving models and training states' in line:
            stamps.append(datetime.strptime(line[:23], '%Y-%m-%d %H:%M:%S,%f'))
    return [(stamp - stamps[0]).total_seconds() for stamp in stamps[1:]]


def train_and_score(base: dict, data_dir: Path, work: Path, model: str, factors: List[int], seed: int,
                    photos: Optional[Path]) -> Dict[str, dict]:
    """The runs of one set and seed at the lengths ``factors``, by run key, from one ``basicsr train`` (in a child
    process, on the copied options): the longest length is trained with a checkpoint at every multiple of the 1×
    ``total_iter``, and each length is scored (enhanced by ``rave enhance``) with its checkpoint. Exact, not an
    approximation: the run options change only ``total_iter`` (and the validation and checkpoint cadence), nothing
    in training depends on it (the warm-up keeps its length, a scheduler's milestones are iterations), and the final
    validation of a shorter run comes after its last step, so a shorter run is the first part of a longer one
    (checked by a test, bit for bit). A shorter run's train s is its part of the longer run's log (from the start of
    training to its checkpoint)."""
    longest = max(factors)
    unit = int(base['train']['total_iter'])
    name = run_key(model, longest, seed)
    options = run_options(base, data_dir, name, longest, seed, checkpoint_every=unit)
    load_before, started = os.getloadavg()[0], time.perf_counter()
    experiment = train_copy(options, work)
    train_seconds = time.perf_counter() - started
    load = [load_before, os.getloadavg()[0]]
    to_checkpoint = seconds_to_checkpoints(next(experiment.glob(f'train_{name}_*.log')))
    results = {}
    for factor in sorted(factors):
        key = run_key(model, factor, seed)
        iteration = None if factor == longest else unit * factor
        seconds = train_seconds if factor == longest else to_checkpoint[factor - 1]
        results[key] = {'model': model, 'factor': factor, 'seed': seed, 'train_seconds': seconds,
                        'load_average': load, 'total_iter': unit * factor,
                        **({} if factor == longest else {'part_of': name}),
                        **score_checkpoint(base, options, experiment, iteration, data_dir, work / 'enhanced' / key,
                                           photos)}
    return results


def rescore(run: dict, data_dir: Path, enhanced: Path, photos: Optional[Path]) -> bool:
    """Score a kept run again from its outputs in the work folder (a metric added since it ran, no retraining).
    Only when every output is there and the validation PSNRs come out as stored (the same outputs, not those of
    another recipe's run under the same key); returns whether the run was rescored."""
    names = [path.name for path in sorted((data_dir / 'val_gt').iterdir())]
    if not all((enhanced / 'val' / name).is_file() for name in names):
        return False
    rows = score_validation(data_dir, enhanced / 'val')
    if [round(r['psnr_out'], 2) for r in rows] != [round(r['psnr_out'], 2) for r in run['images']]:
        return False
    summary = summarise(rows)
    if photos is not None and 'photos' in run:
        if not all((enhanced / 'photos' / path.name).is_file() for path in photos.iterdir() if path.is_file()):
            return False
        run['photos'], photo_summary = score_photo_outputs(photos, enhanced / 'photos')
        summary.update(photo_summary)
    run['images'], run['summary'] = rows, summary
    return True


def released_reference(photos: Path, work: Path) -> Optional[dict]:
    """The released RAVE weights' fifth changes on the real photos (the reference of the bright criterion)."""
    weights = shared_data_dir() / 'official_checkpoints' / RELEASED_WEIGHTS
    if not weights.is_file():
        return None
    enhance(photos, work / 'enhanced' / 'released', weights)
    rows = score_photos(photos, work / 'enhanced' / 'released')
    return {'weights': RELEASED_WEIGHTS, 'photos': rows, **mean_fifths(rows)}


def default_work(opt_path: Path) -> Path:
    """The work folder of an option file's sweep (data, experiments, enhanced outputs), under the system temp folder."""
    return Path(tempfile.gettempdir()) / 'rave_bench_demo_robustness' / Path(opt_path).stem


def run_key(model: str, factor: int, seed: int) -> str:
    return f'{model}_x{factor}_s{seed}'


def highlights_kept(change: float, truth: float, tolerance: float = CRITERIA['bright_tolerance']) -> bool:
    """Whether a brightest-fifth ``change`` (grey levels, output − input) keeps the highlights as the ground truth's
    ``truth`` asks: no darker than the truth by more than ``tolerance`` (no grey veil) and no brighter than the input,
    or than the truth where that brightens, by more than ``tolerance`` (no blow-out). Darkening a synthetic
    over-exposure less than the truth does is allowed: it costs PSNR, which the gain criterion counts."""
    return truth - tolerance <= change <= max(truth, 0.0) + tolerance


def verdicts(results: dict) -> dict:
    """The robustness criteria per backlight model and seed (from the runs present), and over seeds."""
    runs, reference = results['runs'], results.get('released')
    out = {}
    for model in results['settings']['models']:
        per_seed = {}
        for seed in results['settings']['seeds']:
            base = runs.get(run_key(model, 1, seed))
            if base is None:
                continue
            s = base['summary']
            checks = {'gain': s['gain'] >= CRITERIA['min_gain_db'],
                      'improved': s['improved'] >= CRITERIA['min_improved'],
                      'highlights': highlights_kept(s['bright_out'], s['bright_gt'])}
            if reference is not None and 'photos_bright' in s and model == DEFAULT_BACKLIGHT:
                checks['bright_photos'] = abs(s['photos_bright'] - reference['bright']) <= CRITERIA['bright_tolerance']
                if 'photos_texture' in s and 'texture' in reference:
                    checks['texture_photos'] = s['photos_texture'] <= CRITERIA['texture_factor'] * reference['texture']
            for factor in results['settings']['lengths']:
                longer = runs.get(run_key(model, factor, seed))
                if factor != 1 and longer is not None:
                    drift = longer['summary']['gain'] - s['gain']
                    checks[f'drift_x{factor}'] = abs(drift) <= CRITERIA['max_drift_db']
            per_seed[str(seed)] = {'checks': checks, 'pass': all(checks.values())}
        if per_seed:
            out[model] = {'seeds': per_seed, 'all_seeds_pass': all(v['pass'] for v in per_seed.values()),
                          'seeds_measured': len(per_seed)}
    return out


def processors(runs: dict) -> List[str]:
    """The CPUs the runs were made on, in order of first appearance (a sweep made in parts may span machines)."""
    return list(dict.fromkeys(run['processor'] for run in runs.values()))


def machine_tag(runs: dict, run: dict) -> str:
    return MACHINE_TAGS[processors(runs).index(run['processor'])]


def machines_text(runs: dict) -> str:
    """The report's machine line: one CPU, or each CPU with the tag its runs carry after the seed."""
    names = processors(runs)
    if len(names) <= 1:
        return f'Machine: {names[0] if names else "no runs yet"}'
    tags = '; '.join(f'{tag}: {name}' for tag, name in zip(MACHINE_TAGS, names))
    return f'Machines (the tag after each seed): {tags}'


def markdown(results: dict) -> str:
    s, runs = results['settings'], results['runs']
    lines = ['# Demo recipe robustness (`bench/bench_demo_robustness.py`)', '',
             f'Option file `{s["opt"]}` (options sha256 {results["options_sha256"][:12]}), {results["label"]}. '
             f'{machines_text(runs)}; training in a child process with 1 OpenMP thread '
             '(train s: wall time, on a shared machine where the runs record a load average). Data: '
             f'`rave demo-data --backlight NAME` (seed 0, {s["size"]} px, {s["n_val"]} validation images); '
             'lengths are total_iter × factor (the warm-up keeps its length); enhancement by `rave enhance` '
             '(fp32) with the final checkpoint; a run marked "in 4× run" is that longer run\'s checkpoint at its '
             'length (the same network as a run of its own: `--one-run-per-seed`), its train s the longer run\'s '
             'time to it.', '',
             'PSNR is the mean over the validation images against the ground truth (dB); bright / dark: mean '
             'luminance change (grey levels, output − input) over the input\'s brightest / darkest fifth of pixels, '
             'the ground truth\'s own change in brackets (the right answer on these synthetic sets); texture: the '
             'fine structure of the illumination map `input / output` (`illumination_texture`, stops; smooth, about 0, '
             'for an exposure change; large for a local tone curve that amplifies textures and noise).']
    if results.get('released'):
        r = results['released']
        lines += ['', f'Real backlit sample photos ({len(r["photos"])}): the released weights ({r["weights"]}) '
                      f'change the brightest fifth by {r["bright"]:+.1f} and the darkest by {r["dark"]:+.1f} grey '
                      'levels on average' + (f', with a texture of {r["texture"]:.3f} stops' if 'texture' in r else '')
                  + '; the "photos" columns give each run\'s figures on the same photos.']
    if results.get('ceilings'):
        lines += ['', 'Ceiling per set (`ceiling_psnr`: the mean PSNR reachable by `clamp(I / L)` with the best '
                      'single-channel L per pixel): ' + ', '.join(f'{model} {value:.1f} dB' for model, value
                                                                  in results['ceilings'].items()) + '.']
    with_pair = all('well_lit' in run for run in runs.values()) and bool(runs)
    if with_pair:
        lines += ['', 'well-lit p: the final pair\'s mean probability of the well-lit member (the guidance score) for '
                      'the validation inputs → outputs, the ground truth in brackets: the pair separates the sets '
                      'when the ground truth scores above the inputs.']
    lines += ['', '| set | length | seed | iters | train s | PSNR in → out | gain | improved | bright (gt) | '
                  'dark (gt) | texture (gt) | photos bright / dark / texture |' + (' well-lit p |' if with_pair else '')
              + ' per-image out PSNR |', '|---' * (14 if with_pair else 13) + '|']
    order = list(BACKLIGHT_MODELS)
    tagged = len(processors(runs)) > 1
    for run in sorted(runs.values(), key=lambda r: (order.index(r['model']), r['factor'], r['seed'])):
        m = run['summary']
        photos = f'{m["photos_bright"]:+.1f} / {m["photos_dark"]:+.1f}' if 'photos_bright' in m else '—'
        if 'photos_texture' in m:
            photos += f' / {m["photos_texture"]:.3f}'
        texture = f'{m["texture_out"]:.3f} ({m["texture_gt"]:.3f})' if 'texture_out' in m else '—'
        well_lit = '' if not with_pair else ' {input:.2f} → {output:.2f} ({gt:.2f}) |'.format(**run['well_lit'])
        per_image = ' '.join(f'{r["psnr_out"]:.1f}' for r in run['images'])
        load = '' if 'load_average' not in run else ' (load {:.1f}/{:.1f})'.format(*run['load_average'])
        if 'part_of' in run:
            load = f' (in {runs[run["part_of"]]["factor"]}× run)' if run['part_of'] in runs else ' (in a longer run)'
        seed = f'{run["seed"]} ({machine_tag(runs, run)})' if tagged else run['seed']
        lines.append(f'| {run["model"]} | {run["factor"]}× | {seed} | {run["total_iter"]} | '
                     f'{run["train_seconds"]:.0f}{load} | {m["psnr_in"]:.2f} → {m["psnr_out"]:.2f} | '
                     f'{m["gain"]:+.2f} | {100 * m["improved"]:.0f} % | '
                     f'{m["bright_out"]:+.1f} ({m["bright_gt"]:+.1f}) | '
                     f'{m["dark_out"]:+.1f} ({m["dark_gt"]:+.1f}) | {texture} | {photos} |{well_lit} {per_image} |')
    c = CRITERIA
    lines += ['', f'Criteria, per set and seed: gain ≥ {c["min_gain_db"]} dB and ≥ '
                  f'{100 * c["min_improved"]:.0f} % improved at 1×; every longer length\'s gain within '
                  f'{c["max_drift_db"]} dB of 1×; at 1× the highlights kept (brightest-fifth change no more than '
                  f'{c["bright_tolerance"]:.0f} grey levels darker than the ground truth\'s, nor that much brighter '
                  'than the input, or than the ground truth where it brightens); for the demo\'s own set (the '
                  'checkpoint `scripts/demo.sh` ships) also the photos\' brightest-fifth change within '
                  f'{c["bright_tolerance"]:.0f} grey levels of the released weights\' and their illumination texture '
                  f'at most {c["texture_factor"]:g}× the released weights\'; then all seeds pass. A '
                  'criterion is listed only when its runs were made.', '',
              '| set | seed | checks (✓ pass, ✗ fail) | pass |', '|---|---|---|---|']
    for model, verdict in results['verdicts'].items():
        for seed, entry in verdict['seeds'].items():
            checks = ', '.join(f'{name} {"✓" if ok else "✗"}' for name, ok in entry['checks'].items())
            lines.append(f'| {model} | {seed} | {checks} | {"yes" if entry["pass"] else "no"} |')
    lines += ['', 'All seeds pass: ' + ', '.join(
        f'{model} {"yes" if v["all_seeds_pass"] else "no"} ({v["seeds_measured"]} seed(s) measured)'
        for model, v in results['verdicts'].items()), '']
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--opt', default=str(DEFAULT_OPT), help='demo option file (never edited; copies are run)')
    parser.add_argument('--models', nargs='+', default=list(BACKLIGHT_MODELS), choices=list(BACKLIGHT_MODELS))
    parser.add_argument('--lengths', nargs='+', type=int, default=[1, 2, 4], help='total_iter factors')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2], help='training seeds (manual_seed)')
    parser.add_argument('--quick', action='store_true', help='smoke run: the mild set, 1×, seed 0')
    parser.add_argument('--size', type=int, default=128, help='demo image side (rave demo-data --size)')
    parser.add_argument('--photos', default=None,
                        help='folder of real backlit photos (default: the shared data folder\'s backlit_samples '
                             'when present; "" for none)')
    parser.add_argument('--label', default='the shipped recipe', help='what the option file is, for the report')
    parser.add_argument('--name', default=None, help='results file stem (default demo_robustness, or '
                                                     'demo_robustness_<option file stem> for another file)')
    parser.add_argument('--work', default=None, help='work folder (default: under the system temp folder)')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    parser.add_argument('--fresh', action='store_true', help='ignore runs already in the results file')
    parser.add_argument('--rescore', action='store_true',
                        help='score the kept runs again from their outputs in the work folder (after a metric was '
                             'added); runs whose outputs are gone or differ keep their scores')
    parser.add_argument('--jobs', type=int, default=1,
                        help='runs at once (each trains with one thread; train s then counts a shared machine)')
    parser.add_argument('--one-run-per-seed', action='store_true',
                        help='train only the longest length per set and seed, and score its checkpoints at the '
                             'shorter lengths as their runs (the same networks: train_and_score)')
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop_on_signal)  # a stopped sweep ends its trainings too
    if args.quick:
        args.models, args.lengths, args.seeds = ['mild'], [1], [0]
    torch.set_num_threads(1)
    opt_path = Path(args.opt).resolve()
    stem = opt_path.stem
    name = args.name or ('demo_robustness' if opt_path == DEFAULT_OPT.resolve() else f'demo_robustness_{stem}')
    work = Path(args.work or default_work(opt_path)).resolve()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_option_file(str(opt_path))
    options_sha = options_digest(base)
    if args.photos is None:
        default = shared_data_dir() / 'backlit_samples'
        photos = default if default.is_dir() else None
    else:
        photos = Path(args.photos) if args.photos else None

    previous = out / f'{name}.json'
    earlier = json.loads(previous.read_text()) if previous.is_file() and not args.fresh else {}
    runs = dict(earlier.get('runs', {})) if earlier.get('options_sha256') == options_sha else {}

    def reported_models() -> List[str]:
        """The sets of this part of the sweep and of the runs kept from earlier parts (the report covers both)."""
        return [m for m in BACKLIGHT_MODELS if m in args.models or any(r['model'] == m for r in runs.values())]

    # every set is written afresh (seconds), so the data always comes from the backlight models as they are now
    fingerprints = {}
    for model in reported_models():
        make_demo_data(str(work / 'data' / model), seed=0, size=args.size, backlight=model, overwrite=True)
        fingerprints[model] = data_fingerprint(work / 'data' / model)
    made_on = earlier.get('data', {})
    for key in [key for key, run in runs.items()
                if not same_data(made_on.get(run['model']), fingerprints[run['model']])]:
        print(f'{key}: its data has changed since it ran (dropped; rerun when this part of the sweep includes it)')
        del runs[key]
    results = {'options_sha256': options_sha, 'label': args.label,
               'machine': {'processor': cpu_capability(), 'platform': platform.platform(),
                           'cpu_count': os.cpu_count(), 'torch': torch.__version__, 'train_threads': 1},
               'settings': {'opt': _shown_path(opt_path), 'models': args.models, 'lengths': args.lengths,
                            'seeds': args.seeds, 'size': args.size, 'n_val': 6,
                            'photos': None if photos is None else photos.name},
               'criteria': CRITERIA, 'runs': runs, 'data': fingerprints}
    if photos is not None:
        results['released'] = released_reference(photos, work)

    def save() -> None:
        """Write the results; the runs kept from earlier parts of the sweep count in the settings and verdicts."""
        merged = dict(results, settings=dict(results['settings']))
        merged['settings'].update(
            models=reported_models(),
            lengths=sorted({*args.lengths, *(r['factor'] for r in runs.values())}),
            seeds=sorted({*args.seeds, *(r['seed'] for r in runs.values())}))
        merged['verdicts'] = verdicts(merged)
        previous.write_text(json.dumps(merged, indent=2))
        (out / f'{name}.md').write_text(markdown(merged))

    if args.rescore:
        for key, run in runs.items():
            done = rescore(run, work / 'data' / run['model'], work / 'enhanced' / key, photos)
            print(f'{key}: ' + ('rescored' if done else 'kept as it was (its outputs are missing from the work '
                                                        'folder, or are not this run\'s)'))
    results['ceilings'] = {model: ceiling_psnr(work / 'data' / model) for model in reported_models()}
    missing = {(model, seed): [factor for factor in args.lengths if run_key(model, factor, seed) not in runs]
               for seed in args.seeds for model in args.models}
    # one training per set and seed when --one-run-per-seed, otherwise one per length
    todo = [(model, group, seed) for (model, seed), factors in missing.items()
            for group in ([factors] if args.one_run_per_seed else [[factor] for factor in factors]) if group]
    # each training is a child process with one thread: --jobs runs that many at once (results are saved in the main
    # thread as each finishes, so an interrupted sweep keeps what has finished)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in as_completed([pool.submit(train_and_score, base, work / 'data' / model, work, model, factors,
                                                seed, photos) for model, factors, seed in todo]):
            for key, result in future.result().items():
                runs[key] = {**result, 'processor': results['machine']['processor']}
                m = result['summary']
                print(f'{key}: {m["psnr_in"]:.2f} -> {m["psnr_out"]:.2f} dB, {100 * m["improved"]:.0f} % improved, '
                      f'bright {m["bright_out"]:+.1f} (gt {m["bright_gt"]:+.1f}), {result["train_seconds"]:.0f} s',
                      flush=True)
            save()
    save()
    print((out / f'{name}.md').read_text())


if __name__ == '__main__':
    main()
