"""Inference throughput and peak memory of the enhancement network on this machine.

Compares, at the same thread count and on the same photo, a straightforward float32 forward (the official network
as written: stock ``nn.Conv2d`` with reflect padding, out-of-place residual sums, NCHW, whole image, under
``torch.no_grad``: what the official ``inference.py`` runs) with this project's inference paths
(:func:`rave_basicsr.inference.enhance.enhance_tensor`): whole-image and exact tiled, in fp32, mixed (bf16 in the
middle of the network) and bf16. Each configuration runs in its own subprocess so that its peak RSS
(``ru_maxrss``) is its own. Reports megapixels/s, GFLOP/s (0.555 MFLOP per pixel: 277.6 k multiply-adds per pixel,
counted from the layer shapes) against the matrix-multiply GFLOP/s measured in the same run, the output difference
against the baseline, and a 24-megapixel run's time and peak RSS.

Goals (issue #3): at least 3× the baseline's throughput at equal output, i.e. every pixel within one grey level of
the baseline's 8-bit output (a float difference under 1/255, the tolerance of the parity with the official
outputs); a 24-megapixel photo in under 4 GB peak RSS.

    PYTHONPATH=. python bench/bench_inference.py            # writes bench/results/inference.{json,md}
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLOP_PER_PIXEL = 0.555e6
REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    'baseline_fp32': 'straightforward fp32 forward of the official network: no_grad, NCHW, whole image',
    'whole_fp32': 'enhance_tensor fp32, whole image (inference_mode, channels-last)',
    'tiled_fp32': 'enhance_tensor fp32, exact tiling',
    'whole_mixed': 'enhance_tensor mixed (bf16 from ResidualBlock1 to condy, fp32 at both ends), whole image',
    'tiled_mixed': 'enhance_tensor mixed, exact tiling',
    'whole_bf16': 'enhance_tensor bf16 (bfloat16 network copy), whole image',
    'tiled_bf16': 'enhance_tensor bf16, exact tiling',
}
#: a float difference under this (in grey levels) keeps every 8-bit output pixel within one level of the baseline
EQUAL_OUTPUT_GREY_LEVELS = 1.0


def _shared_data() -> Path:
    """The project's shared data folder: ``$RAVE_SHARED_DATA``, which :func:`main` sets for its workers to the
    tests' default (``tests/shared_data.py``) when it is not set."""
    return Path(os.environ.get('RAVE_SHARED_DATA', ''))


def backlit_photo(height: int, width: int) -> np.ndarray:
    """A real backlit photo resized to height×width, float64 RGB in [0, 1] (random pixels when the shared data is
    absent)."""
    import cv2

    sample = _shared_data() / 'backlit_samples' / 'backlit_1.png'
    if sample.is_file():
        image = cv2.imread(str(sample))[:, :, ::-1]
        return np.ascontiguousarray(cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)) / 255.0
    return np.random.default_rng(0).random((height, width, 3))


def released_network():
    """``rave_unpaired`` as the official inference runs it (reflect padding, no epsilon), on the CPU; a random
    network when the shared data is absent. Also used by ``bench/bench_gpu.py``."""
    import torch
    from rave_basicsr.archs.backlit_unet_arch import BacklitUNet
    from rave_basicsr.inference.weights import load_enhancement_network

    weights = _shared_data() / 'official_checkpoints' / 'rave_unpaired.pth'
    if weights.is_file():
        return load_enhancement_network(weights, outer_padding='reflect', division_eps=0.0)
    torch.manual_seed(0)
    return BacklitUNet(outer_padding='reflect', division_eps=0.0).eval()


def straightforward_network(state_dict: dict):
    """The official network as written (CLIP-LIT ``model_small.py``, RAVE ``enhancement_model.py``): stock
    ``nn.Conv2d`` layers (reflect padding by a padded copy), in-place LeakyReLU/ReLU as in the original,
    out-of-place residual sums, ``clamp(I / L, 0, 1)``; built here, apart from the project's architecture, so that
    optimisations of :class:`~rave_basicsr.archs.backlit_unet_arch.BacklitUNet` never speed up the baseline."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def conv(cin, cout, bias=True, padding_mode='reflect'):
        return nn.Conv2d(cin, cout, 3, 1, 1, bias=bias, padding_mode=padding_mode)

    class Block(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv1, self.conv2 = conv(channels, channels, False), conv(channels, channels, False)

        def forward(self, x):
            return F.leaky_relu_(self.conv2(F.leaky_relu_(self.conv1(x), 0.2)) + x, 0.2)

    class Pyramid(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(32, 8, 1, bias=False),
                                                         nn.PReLU()) for b in (1, 2, 3, 6)])
            self.fuse = nn.Sequential(conv(64, 32, False, 'zeros'), nn.PReLU())

        def forward(self, x):
            size = x.shape[-2:]
            branches = [F.interpolate(f(x), size, mode='bilinear', align_corners=True) for f in self.features]
            return self.fuse(torch.cat([x, *branches], 1))

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.cond1, self.condx, self.condy, self.cond_add1 = conv(3, 32), conv(32, 64), conv(64, 32), conv(32, 1)
            for index, channels in enumerate((32, 32, 64, 64, 32, 32), 1):
                setattr(self, f'ResidualBlock{index}', Block(channels))
            self.PPM1 = Pyramid()

        def forward(self, image):
            x = self.ResidualBlock2(self.ResidualBlock1(F.leaky_relu_(self.cond1(image), 0.2)))
            x = self.ResidualBlock4(self.ResidualBlock3(self.condx(self.PPM1(x))))
            x = self.ResidualBlock6(self.ResidualBlock5(self.condy(x)))
            return torch.clamp(image / F.relu_(self.cond_add1(x)), 0, 1)

    network = Network().eval()
    network.load_state_dict(state_dict)
    return network


def worker(args: argparse.Namespace) -> None:
    """Run one configuration; print one JSON line (seconds per run, peak RSS) and save the output."""
    import torch
    import rave_basicsr  # noqa: F401
    from rave_basicsr.inference.enhancer import Enhancer

    torch.set_num_threads(args.threads)
    network = released_network()
    image = torch.from_numpy(backlit_photo(args.height, args.width).astype(np.float32)).permute(2, 0, 1)[None]
    if args.worker == 'baseline_fp32':
        network = straightforward_network(network.state_dict())

        def run():
            with torch.no_grad():
                return network(image)
    else:
        layout, precision = args.worker.split('_')
        tile = 0 if layout == 'whole' else args.tile
        enhancer = Enhancer(network, precision)

        def run():
            return enhancer.enhance(image, tile=tile)

    times = []
    for index in range(args.repeats + (1 if args.warmup else 0)):
        started = time.perf_counter()
        output = run()
        if index or not args.warmup:
            times.append(time.perf_counter() - started)
    if args.save:
        np.save(args.save, output[0].permute(1, 2, 0).numpy())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({'times_s': times, 'peak_rss_mb': peak_kib / 1024}))


def matmul_gflops(threads: int, dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of a size×size matrix multiplication."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.rand(size, size).to(dtype), torch.rand(size, size).to(dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def run_config(name: str, args: argparse.Namespace, height: int, width: int, repeats: int, warmup: bool,
               save: str = '', tile: int = 0) -> dict:
    command = [sys.executable, __file__, '--worker', name, '--height', str(height), '--width', str(width),
               '--repeats', str(repeats), '--tile', str(tile or args.tile), '--threads', str(args.threads)]
    command += (['--warmup'] if warmup else []) + (['--save', save] if save else [])
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE='1')
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f'{name} failed:\n{result.stderr[-3000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--height', type=int, default=768)
    parser.add_argument('--width', type=int, default=1024)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--tile', type=int, default=512)
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--big', default='6000x4000', help='W×H of the large-photo run ("" to skip)')
    parser.add_argument('--big-tile', type=int, default=990, help='tile of the large run (rave enhance default)')
    parser.add_argument('--big-configs', default='tiled_fp32,tiled_mixed,tiled_bf16',
                        help='configurations of the large run')
    parser.add_argument('--worker', choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument('--warmup', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--save', default='', help=argparse.SUPPRESS)
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'inference'))
    args = parser.parse_args()
    from rave_basicsr.utils.hardware import cpu_capability

    if args.worker:
        worker(args)
        return
    if 'RAVE_SHARED_DATA' not in os.environ:  # the workers read the photo and the weights the tests use
        sys.path.insert(0, str(REPO))
        from tests.shared_data import shared_data_dir
        os.environ['RAVE_SHARED_DATA'] = str(shared_data_dir())

    megapixels = args.height * args.width / 1e6
    report = {'machine': {'platform': platform.platform(), 'processor': cpu_capability(),
                          'cpu_count': os.cpu_count(), 'threads': args.threads,
                          'load_average_at_start': os.getloadavg()},
              'image': f'{args.width}x{args.height}', 'tile': args.tile, 'repeats': args.repeats,
              'flop_per_pixel': FLOP_PER_PIXEL,
              'matmul_gflops': {'fp32': matmul_gflops(args.threads, 'float32'),
                                'bf16': matmul_gflops(args.threads, 'bfloat16')},
              'configs': {}}
    with tempfile.TemporaryDirectory() as folder:
        # the baseline runs first and last, to show how much the machine's load drifted during the run
        order = ['baseline_fp32', *(name for name in CONFIGS if name != 'baseline_fp32'), 'baseline_fp32']
        outputs = {}
        for position, name in enumerate(order):
            key = name if position == 0 or name != 'baseline_fp32' else 'baseline_fp32_again'
            save = os.path.join(folder, f'{key}.npy')
            measured = run_config(name, args, args.height, args.width, args.repeats, True, save)
            outputs[key] = np.load(save)
            best = min(measured['times_s'])
            report['configs'][key] = {
                'description': CONFIGS[name], 'times_s': measured['times_s'], 'best_s': best,
                'megapixels_per_s': megapixels / best, 'gflops': megapixels * 1e6 * FLOP_PER_PIXEL / best / 1e9,
                'peak_rss_mb': measured['peak_rss_mb']}
            print(key, json.dumps(report['configs'][key]), flush=True)
    baseline_best = min(report['configs'][k]['best_s'] for k in ('baseline_fp32', 'baseline_fp32_again'))
    for key, entry in report['configs'].items():
        difference = np.abs(outputs[key] - outputs['baseline_fp32'])
        entry['speedup_vs_baseline'] = baseline_best / entry['best_s']
        entry['max_abs_diff_vs_baseline_grey_levels'] = float(difference.max() * 255)
        entry['mean_abs_diff_vs_baseline_grey_levels'] = float(difference.mean() * 255)
        matmul = report['matmul_gflops']['fp32' if key.split('_')[1] == 'fp32' else 'bf16']  # mixed: 86% in bf16
        entry['fraction_of_matmul_gflops'] = entry['gflops'] / matmul
        entry['equal_output'] = entry['max_abs_diff_vs_baseline_grey_levels'] < EQUAL_OUTPUT_GREY_LEVELS
    equal = [key for key, entry in report['configs'].items() if entry['equal_output'] and key != 'baseline_fp32'
             and not key.startswith('baseline')]
    fastest = max(equal, key=lambda key: report['configs'][key]['speedup_vs_baseline'])
    report['goals'] = {'fastest_equal_output': fastest,
                       'fastest_equal_output_speedup': report['configs'][fastest]['speedup_vs_baseline'],
                       'speedup_goal_met': report['configs'][fastest]['speedup_vs_baseline'] >= 3}
    if args.big:
        width, height = (int(v) for v in args.big.lower().split('x'))
        big = {}
        for name in args.big_configs.split(','):
            measured = run_config(name, args, height, width, 1, False, tile=args.big_tile)
            big[name] = {'seconds': measured['times_s'][0], 'peak_rss_mb': measured['peak_rss_mb'],
                         'megapixels_per_s': width * height / 1e6 / measured['times_s'][0]}
            print('big', name, json.dumps(big[name]), flush=True)
        report['large_photo'] = {'image': args.big, 'tile': args.big_tile, 'runs': big,
                                 'baseline_activation_estimate_mb':
                                     64 * width * height * 4 / 2 ** 20}
        report['goals']['large_photo_under_4gb'] = all(run['peak_rss_mb'] < 4096 for run in big.values())
    report['machine']['load_average_at_end'] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + '.json').write_text(json.dumps(report, indent=2) + '\n')
    Path(args.out + '.md').write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    """The short human-readable summary written beside the JSON."""
    lines = [f"# Inference benchmark ({report['image']}, tile {report['tile']}, {report['machine']['threads']} "
             f"threads, best of {report['repeats']})", '',
             f"Machine: {report['machine']['processor']} ({report['machine']['platform']}); load average "
             f"{report['machine']['load_average_at_start'][0]:.1f} at start, "
             f"{report['machine']['load_average_at_end'][0]:.1f} at end (the machine is shared: absolute figures "
             'are noisy, compare within the run).',
             f"Matrix multiply (2048²): {report['matmul_gflops']['fp32']:.1f} GFLOP/s fp32, "
             f"{report['matmul_gflops']['bf16']:.1f} GFLOP/s bf16.", '',
             '| configuration | MP/s | GFLOP/s | of matmul | speedup | peak RSS MB | max / mean diff (grey levels) '
             '| equal output |', '|---|---|---|---|---|---|---|---|']
    for key, entry in report['configs'].items():
        lines.append(f"| {key} | {entry['megapixels_per_s']:.4f} | {entry['gflops']:.1f} | "
                     f"{entry['fraction_of_matmul_gflops']:.0%} | {entry['speedup_vs_baseline']:.2f}× | "
                     f"{entry['peak_rss_mb']:.0f} | {entry['max_abs_diff_vs_baseline_grey_levels']:.3f} / "
                     f"{entry['mean_abs_diff_vs_baseline_grey_levels']:.4f} | {'yes' if entry['equal_output'] else 'no'} |")
    goals = report['goals']
    lines += ['', f"Equal output: every pixel within {EQUAL_OUTPUT_GREY_LEVELS:g} grey level of the baseline (so the "
              "8-bit outputs differ by at most one level). 'of matmul' is against the fp32 matmul for fp32 "
              "configurations and the bf16 one otherwise.",
              f"- Goal ≥3× at equal output: {'met' if goals['speedup_goal_met'] else 'NOT met'} — fastest "
              f"equal-output configuration {goals['fastest_equal_output']} at "
              f"{goals['fastest_equal_output_speedup']:.2f}×."]
    if 'large_photo_under_4gb' in goals:
        lines.append(f"- Goal 24-megapixel photo under 4 GB peak RSS: "
                     f"{'met' if goals['large_photo_under_4gb'] else 'NOT met'}.")
    if 'large_photo' in report:
        big = report['large_photo']
        lines += ['', f"Large photo {big['image']} (tile {big['tile']}):"]
        for name, run in big['runs'].items():
            lines.append(f"- {name}: {run['seconds']:.0f} s ({run['megapixels_per_s']:.3f} MP/s), peak RSS "
                         f"{run['peak_rss_mb']:.0f} MB")
        lines.append(f"- the straightforward forward would hold 64-channel float32 activations of "
                     f"{big['baseline_activation_estimate_mb']:.0f} MB each (several at once): not run.")
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
