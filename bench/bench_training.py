"""Training speed of RAVEModel: iterations/s of the warm-up and guided stages, at equal batch and crop size.

Encoders: the tiny test towers / ImageStatsEncoder (the offline demo) and ViT-B-32 + RN101-sized random open_clip
models (the originals' architecture, random weights: speed only). Baseline in the same run: fp32, contiguous;
variants: channels_last and bf16 autocast (CPU) / fp16 (CUDA) where the device supports them. The projected wall
time of the default schedule (1000 warm-up + total_iter guided iterations at batch 8, 512 px) scales the measured
per-pixel time linearly with the pixel count (the network and the identity features dominate; CLIP inputs are
224 px either way), which is an estimate, not a measurement.

    python bench/bench_training.py [--crop 64] [--batch 2] [--iters 3]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rave_basicsr  # noqa: E402,F401
from rave_basicsr.utils.hardware import device_description  # noqa: E402
from basicsr.models import build_model  # noqa: E402

from tests.rave_helpers import demo_data, model_options, rave_options  # noqa: E402

ENCODERS = {
    'tiny (demo)': ({'type': 'arch', 'network': {'type': 'ImageStatsEncoder'}},
                    {'type': 'open_clip', 'model': 'rave-test-tiny-rn', 'pretrained': None, 'precision': 'fp32',
                     'preprocess': {'size': 64, 'resize': 'squash', 'interpolation': 'bilinear',
                                    'antialias': False}}),
    'ViT-B-32 + RN101 sized (random)': ({'type': 'open_clip', 'model': 'ViT-B-32', 'pretrained': None},
                                        {'type': 'open_clip', 'model': 'RN101', 'pretrained': None,
                                         'precision': 'fp32'}),
}


def time_stage(model, batch, iters: int) -> float:
    """Seconds per iteration of the model's current stage (one untimed iteration first)."""
    model.feed_data(batch)
    model.optimize_parameters(1)
    start = time.perf_counter()
    for it in range(iters):
        model.feed_data(batch)
        model.optimize_parameters(it + 2)
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--crop', type=int, default=64)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results'))
    args = parser.parse_args()
    root = Path(tempfile.gettempdir()) / 'rave_bench_training'
    data = demo_data(root / 'data', size=max(args.crop, 48), n_train=4, n_welllit=4, n_val=1) \
        if not (root / 'data' / 'train_backlit').is_dir() else {'outdir': str(root / 'data')}
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    variants = [('fp32', {}), ('channels_last', {'channels_last': True})]
    if device == 'cpu' or torch.cuda.is_bf16_supported():
        variants.append(('bf16 autocast', {'mixed_precision': 'bf16'}))
    if device == 'cuda':
        variants.append(('fp16 autocast', {'mixed_precision': 'fp16'}))
    batch = {'lq': torch.rand(args.batch, 3, args.crop, args.crop, generator=torch.Generator().manual_seed(0))}
    rows = []
    for enc_name, (guidance, identity) in ENCODERS.items():
        for variant, train_extra in variants:
            for stage, warmup in (('warmup', 1000), ('guided', 0)):
                options = rave_options('bench', data, warmup_iters=warmup, crop=args.crop, batch=args.batch)
                options['num_gpu'] = 1 if device == 'cuda' else 0
                options['guidance_encoder'], options['identity_encoder'] = guidance, identity
                options['train'].update(train_extra)
                options['train']['warmup']['reinit_psnr'] = None
                torch.manual_seed(0)
                model = build_model(model_options(options, root))
                seconds = time_stage(model, batch, args.iters)
                rows.append({'encoders': enc_name, 'variant': variant, 'stage': stage,
                             'seconds_per_iter': seconds, 'iters_per_s': 1.0 / seconds})
                print(rows[-1], flush=True)
    for row in rows:
        base = next(r for r in rows if r['encoders'] == row['encoders'] and r['stage'] == row['stage']
                    and r['variant'] == 'fp32')
        row['speedup_vs_fp32'] = base['seconds_per_iter'] / row['seconds_per_iter']
    scale = (512 * 512 * 8) / (args.crop * args.crop * args.batch)
    projection = {}
    for enc_name in ENCODERS:
        per = {r['stage']: r['seconds_per_iter'] for r in rows if r['encoders'] == enc_name and r['variant'] == 'fp32'}
        hours = (1000 * per['warmup'] + 20000 * per['guided']) * scale / 3600
        projection[enc_name] = {'default_schedule_hours_estimate': hours,
                                'assumption': '1000 warm-up + 20000 guided iterations, batch 8 at 512 px, time '
                                              'scaled linearly in pixels from the measured crop/batch'}
    result = {'device': device, 'hardware': device_description(torch.device(device)), 'threads': torch.get_num_threads(),
              'torch': torch.__version__, 'crop': args.crop, 'batch': args.batch, 'timed_iters': args.iters,
              'rows': rows, 'projection': projection}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'training.json').write_text(json.dumps(result, indent=2))
    lines = ['# RAVE training speed', '',
             f'Device: {result["hardware"]}, {result["threads"]} threads, torch {torch.__version__}; batch {args.batch}, '
             f'crop {args.crop} px, {args.iters} timed iterations after one untimed (random-weight encoders).', '',
             '| encoders | variant | stage | it/s | speed-up vs fp32 |', '|---|---|---|---|---|']
    for r in rows:
        lines.append(f'| {r["encoders"]} | {r["variant"]} | {r["stage"]} | {r["iters_per_s"]:.2f} | '
                     f'{r["speedup_vs_fp32"]:.2f} |')
    lines += ['', 'Projected wall time of the default schedule on this device (estimate, see the script):', '']
    for name, p in projection.items():
        lines.append(f'- {name}: {p["default_schedule_hours_estimate"]:.1f} h')
    (out / 'training.md').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
