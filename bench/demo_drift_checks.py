"""Why a demo run trained longer can score lower: three checks that need no training.

``bench_demo_robustness.py`` finds the RAVE demo's gain on ``mild`` 0.6-1.3 dB lower at 4× its length than at 1×.
Two explanations, and what the loss's target does, can be checked from what a sweep leaves behind:

* ``scale``: the demo trains on whole images squash-resized to 64 px and is validated at the sets' 128 px, so a
  network that learns a size-specific local curve would lose at 128 px what it gains at 64. The sweep's final
  checkpoints (its ``--work`` folder) are scored on the validation images squash-resized to each ``--sizes`` side
  (Lanczos, as the training loader resizes): a drop that shrinks at 64 px is the size split's; a drop that stays is
  the training's.
* ``steps``: ``ResidualTranslationLoss`` moves every image along the residual by one constant step (the distance of
  the two set means). Per validation image, in the guidance encoder's space (normalised embeddings, images at the
  training size): the ground truth's move along the residual and off it, against that constant step and against an
  adaptive step (the residual's threshold minus the input's projection: what would bring the input to the well-lit
  mean along the residual). If the ground truth's steps differ from image to image and the adaptive step follows
  them, a constant step is the cause, and the adaptive one the fix.
* ``targets``: per checkpoint, the mean distance (same space) of the outputs' embeddings to the loss's targets
  (input + constant step along the residual) and to the ground truths', and how far along the residual the outputs
  moved: whether longer runs get nearer the targets while moving away from the ground truths.

    python bench/demo_drift_checks.py --work /tmp/sweep [--opt options/demo/train_rave_demo.yml]
                                      [--runs mild_x1_s1 mild_x4_s1 ...] [--models mild demo hazy]
                                      [--target-runs mild_x1_s0 mild_x2_s0 ...]

Writes ``bench/results/demo_drift_checks.json`` and ``.md``.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_demo_robustness as robustness  # noqa: E402
from basicsr.metrics.psnr_ssim import calculate_psnr  # noqa: E402
from rave_basicsr.data.transforms import resize_squash  # noqa: E402
from rave_basicsr.guidance.encoders import build_image_encoder  # noqa: E402
from rave_basicsr.inference.enhancer import Enhancer  # noqa: E402
from rave_basicsr.inference.weights import load_enhancement_network  # noqa: E402
from rave_basicsr.residual.compute import compute_residual  # noqa: E402
from rave_basicsr.utils.hardware import cpu_capability  # noqa: E402
from rave_basicsr.utils.image_io import read_image  # noqa: E402
from rave_basicsr.utils.options import load_option_file  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'


def load_at(path: Path, size: int) -> np.ndarray:
    """An image as float RGB in [0, 1], squash-resized to ``size``² (Lanczos, as the training loader)."""
    return resize_squash(read_image(str(path)).rgb.astype(np.float32), size)


def as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()


def as_8bit(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.float64)


class GuidanceSpace:
    """The demo's guidance encoder at its training size, with each set's residual computed once (as the demo's
    model computes it: its ``residual`` block's preprocessing and batch size)."""

    def __init__(self, options: dict, work: Path) -> None:
        self.encoder = build_image_encoder(options['guidance_encoder'], role='guidance', where='guidance_encoder')
        self.size = int(options['datasets']['train']['resize'])
        self.residual_opt = options.get('residual') or {}
        self.work = work
        self.residuals = {}

    def residual(self, model: str):
        """The ``ResidualVector`` of the set ``model`` in the work folder."""
        if model not in self.residuals:
            data = self.work / 'data' / model
            self.residuals[model] = compute_residual(
                self.encoder, str(data / 'train_welllit'), str(data / 'train_backlit'),
                preprocess=self.residual_opt.get('preprocess'),
                batch_size=int(self.residual_opt.get('batch_size', 16)), progress=False)
        return self.residuals[model]

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The normalised embedding ``[D]`` of one image ``[1, 3, H, W]``."""
        with torch.no_grad():
            return F.normalize(self.encoder.encode_image(image).float(), dim=-1)[0]


def run_enhancer(work: Path, run: str) -> Tuple[Path, Enhancer]:
    """A sweep run's data folder and its final checkpoint as an fp32 enhancer."""
    weights = work / 'experiments' / run / 'models' / 'net_g_latest.pth'
    if not weights.is_file():
        raise SystemExit(f'run {run}: no checkpoint at {weights} (is --work the sweep\'s work folder?)')
    return work / 'data' / run.split('_x')[0], Enhancer(load_enhancement_network(str(weights)), 'fp32')


def scale_check(work: Path, runs: Sequence[str], sizes: Sequence[int]) -> Dict[str, dict]:
    """Per run and size: mean PSNR of input and output against the ground truth, and the per-image output PSNR."""
    results = {}
    for run in runs:
        data, enhancer = run_enhancer(work, run)
        results[run] = {}
        for size in sizes:
            rows = []
            for truth_path in sorted((data / 'val_gt').iterdir()):
                inp = load_at(data / 'val_backlit' / truth_path.name, size)
                truth = as_8bit(load_at(truth_path, size))
                out = enhancer.enhance(as_batch(inp), 0)[0].permute(1, 2, 0).numpy()
                rows.append((calculate_psnr(as_8bit(inp), truth, 0), calculate_psnr(as_8bit(out), truth, 0)))
            rows = np.array(rows)
            results[run][str(size)] = {'psnr_in': float(rows[:, 0].mean()), 'psnr_out': float(rows[:, 1].mean()),
                                       'per_image_out': rows[:, 1].round(2).tolist()}
        print(run, {size: round(r['psnr_out'] - r['psnr_in'], 2) for size, r in results[run].items()}, flush=True)
    return results


def steps_check(space: GuidanceSpace, models: Sequence[str]) -> Dict[str, dict]:
    """Per set: the residual's constant step and threshold, and per validation image the ground truth's move along
    the residual and off it, with the adaptive step."""
    results = {}
    for model in models:
        data = space.work / 'data' / model
        vector = space.residual(model)
        direction, threshold = vector.residual.float(), float(vector.threshold)
        images = []
        for truth_path in sorted((data / 'val_gt').iterdir()):
            inp, truth = (space.embed(as_batch(load_at(path, space.size)))
                          for path in (data / 'val_backlit' / truth_path.name, truth_path))
            move = truth - inp
            along = float(move @ direction)
            images.append({'image': truth_path.stem, 'gt_along': along,
                           'gt_off_axis': float((move - along * direction).norm()),
                           'adaptive': max(0.0, threshold - float(inp @ direction))})
        along = np.array([r['gt_along'] for r in images])
        adaptive = np.array([r['adaptive'] for r in images])
        constant = float(vector.mean_distance)
        results[model] = {'constant_step': constant, 'threshold': threshold, 'images': images,
                          'error_constant': float(np.abs(along - constant).mean()),
                          'error_adaptive': float(np.abs(along - adaptive).mean()),
                          'correlation_adaptive': float(np.corrcoef(along, adaptive)[0, 1])}
        print(model, {k: round(v, 4) for k, v in results[model].items() if isinstance(v, float)}, flush=True)
    return results


def targets_check(space: GuidanceSpace, runs: Sequence[str]) -> Dict[str, dict]:
    """Per run: mean |output - target|, |output - ground truth|, |target - ground truth| and the output's move along
    the residual (normalised guidance embeddings at the training size; target = input + constant step · residual)."""
    results = {}
    for run in runs:
        data, enhancer = run_enhancer(space.work, run)
        vector = space.residual(data.name)
        direction, step = vector.residual.float(), float(vector.mean_distance)
        rows = []
        for truth_path in sorted((data / 'val_gt').iterdir()):
            inp = as_batch(load_at(data / 'val_backlit' / truth_path.name, space.size))
            truth, out = as_batch(load_at(truth_path, space.size)), enhancer.enhance(inp, 0)
            e_in, e_gt, e_out = (space.embed(x) for x in (inp, truth, out))
            target = e_in + step * direction
            rows.append([float((e_out - target).norm()), float((e_out - e_gt).norm()),
                         float((target - e_gt).norm()), float((e_out - e_in) @ direction),
                         float((e_gt - e_in) @ direction)])
        means = np.array(rows).mean(0)
        results[run] = dict(zip(('out_to_target', 'out_to_gt', 'target_to_gt', 'out_along', 'gt_along'),
                                means.tolist()))
        print(run, {k: round(v, 3) for k, v in results[run].items()}, flush=True)
    return results


def markdown(results: dict) -> str:
    lines = ['# Why longer demo runs can score lower (`bench/demo_drift_checks.py`)', '',
             f'Option file `{results["opt"]}`; sweep work folder of `bench_demo_robustness.py` (its data and final '
             f'checkpoints). Machine: {results["processor"]}; fp32.', '',
             '## Size: the checkpoints scored at the training size and beyond', '',
             'Gain (dB, mean output PSNR − mean input PSNR against the ground truth) on the validation images '
             'squash-resized to each side (Lanczos); the demo trains at 64 px, the benchmark scores at 128.', '']
    sizes = results['sizes']
    lines += ['| run | ' + ' | '.join(f'gain at {s} px' for s in sizes) + ' | per-image output PSNR at '
              f'{sizes[0]} px |', '|---|' + '---|' * (len(sizes) + 1)]
    for run, by_size in results['scale'].items():
        gains = [by_size[str(s)]['psnr_out'] - by_size[str(s)]['psnr_in'] for s in sizes]
        lines.append(f'| {run} | ' + ' | '.join(f'{g:+.2f}' for g in gains) + ' | '
                     + ' '.join(f'{v:.1f}' for v in by_size[str(sizes[0])]['per_image_out']) + ' |')
    lines += ['', '## Steps along the residual', '',
              'Normalised guidance embeddings of each validation input and its ground truth at the training size: '
              'the ground truth\'s move along the residual (`gt along`) and its length off it (`off axis`), against '
              '`ResidualTranslationLoss`\'s constant step (the set means\' distance) and the adaptive step '
              '(threshold − the input\'s projection). Errors: mean |gt along − step| over the images.', '',
              '| set | constant step | error (constant) | error (adaptive) | correlation (gt along, adaptive) | '
              'per image: gt along / adaptive / off axis |', '|---|---|---|---|---|---|']
    for model, r in results['steps'].items():
        per_image = '; '.join(f'{i["gt_along"]:.3f} / {i["adaptive"]:.3f} / {i["gt_off_axis"]:.3f}'
                              for i in r['images'])
        lines.append(f'| {model} | {r["constant_step"]:.3f} | {r["error_constant"]:.3f} | {r["error_adaptive"]:.3f} '
                     f'| {r["correlation_adaptive"]:+.2f} | {per_image} |')
    lines += ['', '## Outputs against the targets and the ground truths', '',
              'Mean over the validation images (normalised guidance embeddings at the training size) of the '
              'distance of the output to the translation loss\'s target and to the ground truth, of the target to '
              'the ground truth, and the moves along the residual of the output and of the ground truth.', '',
              '| run | output → target | output → ground truth | target → ground truth | output along | '
              'ground truth along |', '|---|---|---|---|---|---|']
    for run, r in results['targets'].items():
        lines.append(f'| {run} | {r["out_to_target"]:.3f} | {r["out_to_gt"]:.3f} | {r["target_to_gt"]:.3f} | '
                     f'{r["out_along"]:.3f} | {r["gt_along"]:.3f} |')
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work', required=True, help='the work folder of a bench_demo_robustness.py sweep')
    parser.add_argument('--opt', default=str(robustness.DEFAULT_OPT), help='the option file the sweep ran')
    parser.add_argument('--runs', nargs='+', default=['mild_x1_s0', 'mild_x4_s0', 'mild_x1_s1', 'mild_x4_s1',
                                                      'mild_x1_s2', 'mild_x4_s2'])
    parser.add_argument('--sizes', nargs='+', type=int, default=[64, 128, 256])
    parser.add_argument('--models', nargs='+', default=['mild', 'demo', 'hazy'])
    parser.add_argument('--target-runs', nargs='+', default=[f'{model}_x{factor}_s{seed}' for model in ('mild', 'demo')
                                                              for seed in (0, 1, 2) for factor in (1, 2, 4)])
    parser.add_argument('--name', default='demo_drift_checks', help='results file stem')
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    space = GuidanceSpace(load_option_file(args.opt), work)
    results = {'opt': robustness._shown_path(Path(args.opt).resolve()), 'processor': cpu_capability(),
               'sizes': args.sizes, 'scale': scale_check(work, args.runs, args.sizes),
               'steps': steps_check(space, args.models),
               'targets': targets_check(space, args.target_runs)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f'{args.name}.json').write_text(json.dumps(results, indent=2))
    (RESULTS / f'{args.name}.md').write_text(markdown(results))
    print(markdown(results))


if __name__ == '__main__':
    main()
