"""Trace one demo training run iteration by iteration: when does the network lift the subjects, and does it keep it?

``bench_demo_robustness.py`` scores only the final checkpoint of each run. This script trains one run (one option
file, one synthetic backlight set, one seed; the same child-process ``basicsr train`` with one OpenMP thread) with a
checkpoint every ``--every`` iterations, and reports per checkpoint: the validation PSNR against the ground truth
(8-bit RGB, BasicSR's ``calculate_psnr``, as the validation during training computes it), the mean illumination map
``L`` over each validation input's darkest and brightest fifth of pixels (luminance), the mean absolute weight of the
network's convolutions, and the training losses logged at that iteration. ``--set KEY=VALUE`` changes one option of
the copy that is trained (``train:warmup:optim:weight_decay=0``), to trace a variant against the shipped file.

The network must return its illumination map (``forward(x, return_illumination=True)``, as ``BacklitUNet`` does).

    python bench/trace_demo_run.py --backlight hazy --seed 2 [--iters 400] [--every 20] [--set KEY=VALUE ...]
        [--ema 0.99 0.98] [--no-train]

Writes ``bench/results/trace_<option file stem>_<backlight>_s<seed>[_<name>].json`` and ``.md``.
"""
import argparse
import json
import re
import signal
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_demo_robustness as robustness  # noqa: E402
from basicsr.archs import build_network  # noqa: E402
from basicsr.metrics.psnr_ssim import calculate_psnr  # noqa: E402
from rave_basicsr.data.backlight_models import BACKLIGHT_MODELS  # noqa: E402
from rave_basicsr.data.demo_data import make_demo_data  # noqa: E402
from rave_basicsr.utils.checkpoint import read_state_dict  # noqa: E402
from rave_basicsr.utils.hardware import cpu_capability  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'
LOSS_PATTERN = re.compile(r'(\w+/l_\w+): ([-+0-9.e]+)')
ITER_PATTERN = re.compile(r'iter:\s*(\d+),')


def set_option(options: dict, assignment: str) -> None:
    """Apply ``a:b:c=value`` (value parsed as YAML) to nested ``options``; every key but the last must exist."""
    if '=' not in assignment:
        raise SystemExit(f'--set expects KEY=VALUE (keys joined by ":"), got {assignment!r}')
    path, value = assignment.split('=', 1)
    *parents, last = path.split(':')
    node = options
    for key in parents:
        if not isinstance(node.get(key), dict):
            raise SystemExit(f'--set {assignment}: the option file has no block {key!r} on that path')
        node = node[key]
    node[last] = yaml.safe_load(value)


def logged_losses(log_file: Path) -> Dict[int, Dict[str, float]]:
    """The losses of every logged iteration of a BasicSR training log, by iteration."""
    losses = {}
    for line in log_file.read_text().splitlines():
        found = ITER_PATTERN.search(line)
        if found:
            losses[int(found.group(1))] = {name: float(value) for name, value in LOSS_PATTERN.findall(line)}
    return losses


def load_set(folder: Path) -> torch.Tensor:
    """Every image of ``folder`` (sorted, equal sizes) as one float batch in [0, 1]."""
    images = [robustness.load8(path) for path in sorted(folder.iterdir())]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """A [0, 1] batch ``[N, 3, H, W]`` as 8-bit ``[N, H, W, 3]`` images (rounded, as BasicSR's ``tensor2img``)."""
    return (images.clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)


def mean_psnr(images8: np.ndarray, truths8: np.ndarray) -> float:
    """Mean PSNR (dB) of 8-bit images against their ground truths (BasicSR's ``calculate_psnr``, RGB)."""
    return float(np.mean([calculate_psnr(image, truth, crop_border=0) for image, truth in zip(images8, truths8)]))


def trace_checkpoint(network: torch.nn.Module, inputs: torch.Tensor, truths8: np.ndarray) -> dict:
    """Validation PSNR, ``L`` over the inputs' darkest and brightest fifths, the convolutions' mean |weight|."""
    with torch.no_grad():
        output, light = network(inputs, return_illumination=True)
    luma = robustness.luminance(inputs.permute(0, 2, 3, 1).numpy() * 255).reshape(len(inputs), -1)
    light = light.mean(1).reshape(len(inputs), -1).numpy()
    dark, bright = [], []
    for lum, lit in zip(luma, light):
        brightest, darkest = robustness.fifth_masks(lum)
        dark.append(lit[darkest].mean())
        bright.append(lit[brightest].mean())
    weights = [p.detach().abs().flatten() for p in network.parameters() if p.dim() == 4]
    return {'psnr': mean_psnr(to_uint8(output), truths8), 'light_dark': float(np.mean(dark)),
            'light_bright': float(np.mean(bright)), 'mean_abs_weight': float(torch.cat(weights).mean())}


def ema_rows(states: List[Dict[str, torch.Tensor]], every: int, decays: List[float]) -> Dict[str, List[dict]]:
    """The exponential moving averages of a run's checkpoint weights (``states``, ``every`` iterations apart, from
    the first): for each per-iteration ``decay``, the average after each checkpoint, updated once per checkpoint with
    ``decay ** every``. It approximates BasicSR's ``train:ema_decay`` (updated every iteration) without training
    again, as if the weights stayed at each checkpoint for the ``every`` iterations before it; the finer the
    checkpoints against the average's span (``1 / (1 - decay)`` iterations), the closer."""
    averages = {}
    for decay in decays:
        keep, average, series = decay ** every, None, []
        for state in states:
            average = ({k: v.clone() for k, v in state.items()} if average is None
                       else {k: keep * average[k] + (1 - keep) * state[k] for k in state})
            series.append(average)
        averages[f'{decay:g}'] = series
    return averages


def render(result: dict) -> str:
    """The markdown report of one trace."""
    names = sorted({name for row in result['trace'] for name in row['losses']})
    decays = list(result['trace'][0].get('ema_psnr', {})) if result['trace'] else []
    lines = ['# Trace of one demo run (`bench/trace_demo_run.py`)', '',
             f'Option file `{result["opt"]}`, set `{result["backlight"]}` (`rave demo-data --backlight '
             f'{result["backlight"]}`, seed 0, {result["size"]} px), training seed {result["seed"]}, '
             f'{result["iters"]} iterations, changed options: {", ".join(result["changes"]) or "none"}. Machine: '
             f'{result["machine"]}; training in a child process with 1 OpenMP thread. Validation input PSNR '
             f'{result["input_psnr"]:.2f} dB.', '',
             'L dark / bright: the mean illumination map over each validation input\'s darkest / brightest fifth of '
             'pixels (luminance); mean abs weight: the mean absolute weight of the convolutions; losses as logged '
             '(weighted).' + (' EMA d: the PSNR of the moving average of the checkpoints\' weights with per-iteration '
                              'decay d, updated once per checkpoint (`ema_rows`: an estimate of train:ema_decay d).'
                              if decays else ''), '',
             '| iteration | PSNR (dB) | ' + ''.join(f'EMA {d} | ' for d in decays)
             + 'L dark | L bright | mean abs weight | ' + ' | '.join(names) + ' |',
             '|' + '---|' * (5 + len(decays) + len(names))]
    for row in result['trace']:
        losses = ' | '.join(f'{row["losses"][n]:.4g}' if n in row['losses'] else '' for n in names)
        ema = ''.join(f'{row["ema_psnr"][d]:.2f} | ' for d in decays)
        lines.append(f'| {row["iteration"]} | {row["psnr"]:.2f} | {ema}{row["light_dark"]:.3f} | '
                     f'{row["light_bright"]:.3f} | {row["mean_abs_weight"]:.2e} | {losses} |')
    return '\n'.join(lines) + '\n'


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--opt', default=str(robustness.DEFAULT_OPT), help='demo option file (a copy is trained)')
    parser.add_argument('--backlight', default='hazy', choices=list(BACKLIGHT_MODELS))
    parser.add_argument('--seed', type=int, default=0, help='training seed (manual_seed)')
    parser.add_argument('--iters', type=int, help='total_iter (default: the option file\'s)')
    parser.add_argument('--every', type=int, default=20, help='checkpoint interval in iterations')
    parser.add_argument('--size', type=int, default=128, help='demo image side (rave demo-data --size)')
    parser.add_argument('--set', dest='changes', action='append', default=[], metavar='KEY=VALUE',
                        help='change one option of the trained copy, keys joined by ":" (repeatable)')
    parser.add_argument('--ema', nargs='+', type=float, default=[], metavar='DECAY',
                        help='also score the moving averages of the checkpoints\' weights with these per-iteration '
                             'decays (ema_rows: train:ema_decay estimated without training it)')
    parser.add_argument('--no-train', action='store_true',
                        help='score the checkpoints of this trace\'s earlier run in --work again (no training)')
    parser.add_argument('--name', default='', help='suffix of the results files (for a variant)')
    parser.add_argument('--work', help='work folder (default: under the system temp folder)')
    parser.add_argument('--out', default=str(RESULTS))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, robustness.stop_on_signal)  # a stopped trace ends its training too

    opt_path = Path(args.opt).resolve()
    base = robustness.load_option_file(str(opt_path))
    for change in args.changes:
        set_option(base, change)
    if args.iters:
        base['train']['total_iter'] = args.iters
    iters = int(base['train']['total_iter'])
    work = Path(args.work) if args.work else robustness.default_work(opt_path) / 'trace'
    data_dir = work / 'data' / args.backlight
    make_demo_data(str(data_dir), seed=0, size=args.size, backlight=args.backlight, overwrite=True)
    name = f'trace_{opt_path.stem}_{args.backlight}_s{args.seed}' + (f'_{args.name}' if args.name else '')
    options = robustness.run_options(base, data_dir, name, 1, args.seed)
    options['logger']['save_checkpoint_freq'] = args.every
    if args.ema and float(base['train'].get('ema_decay') or 0) > 0:
        raise SystemExit('--ema estimates a moving average from a run without one; this run keeps its own '
                         '(train:ema_decay > 0): trace it without --ema, or add --set train:ema_decay=0 '
                         '(bench/options/train_rave_demo_raw.yml is the shipped demo without it)')
    experiment = work / 'experiments' / name
    if args.no_train:
        if not (experiment / 'models' / f'net_g_{iters}.pth').is_file():
            raise SystemExit(f'--no-train: {experiment} has no checkpoint net_g_{iters}.pth; run the trace first')
    else:
        try:
            experiment = robustness.train_copy(options, work)
        except RuntimeError as error:
            raise SystemExit(str(error))

    inputs, truths8 = load_set(data_dir / 'val_backlit'), to_uint8(load_set(data_dir / 'val_gt'))
    network = build_network(dict(options['network_g'])).eval()
    losses = logged_losses(next(experiment.glob('train_*.log')))
    iterations = list(range(args.every, iters + 1, args.every))
    # the weights inference uses: the EMA copy when the run keeps one (train:ema_decay > 0)
    states = [read_state_dict(experiment / 'models' / f'net_g_{iteration}.pth') for iteration in iterations]
    trace = []
    for iteration, state in zip(iterations, states):
        network.load_state_dict(state)
        trace.append({'iteration': iteration, **trace_checkpoint(network, inputs, truths8),
                      'losses': losses.get(iteration, {})})
    for decay, series in ema_rows(states, args.every, args.ema).items():
        for row, state in zip(trace, series):
            network.load_state_dict(state)
            row.setdefault('ema_psnr', {})[decay] = trace_checkpoint(network, inputs, truths8)['psnr']
    result = {'opt': robustness._shown_path(opt_path), 'backlight': args.backlight, 'seed': args.seed,
              'iters': iters, 'size': args.size, 'changes': args.changes, 'machine': cpu_capability(),
              'input_psnr': mean_psnr(to_uint8(inputs), truths8),
              'trace': trace}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{name}.json').write_text(json.dumps(result, indent=2))
    (out / f'{name}.md').write_text(render(result))
    print(render(result))


if __name__ == '__main__':
    main()
