"""Training cost of the three methods: iterations/s of every stage and the projected wall time of each default
schedule, with RAVE's guided stage measured in the same run as the baseline.

Stages measured (one untimed iteration first, then ``--iters`` timed ones, CPU or the one GPU present):
CLIP-LIT / CLIP-LIT-Latent ``prompt_init`` (A), ``warmup`` (B), ``network`` (C-1), ``prompt`` (C-2), the
per-best-model inference over the training images that feeds the ranking loss (seconds per image), and RAVE's
``guided`` stage. Encoders: the tiny ones (ImageStatsEncoder for latent/RAVE guidance, rave-test-tiny-vit for the
prompts, rave-test-tiny-rn identity) and ViT-B-32 + RN101-sized random open_clip models (the originals'
architecture; random weights, speed only).

Projection assumptions (stated in the results too):
* the network stages (B, C-1, RAVE guided) are measured at ``--crop`` px, batch ``--batch`` and scaled linearly to
  the originals' 512 px, batch 8 (pixels × batch; an upper-bound-style estimate since the CLIP inputs stay 224 px);
* the prompt stages (A, C-2) are measured at batch ``--prompt-batch`` and scaled linearly to the originals' 16;
  their CLIP inputs are 224 px whatever the source size;
* the results inference is measured per image at ``--crop`` px and scaled by pixels to 256 px, for 380 images;
* CLIP-LIT schedule (read from options/train_clip_lit.yml): 8000 A + 1000 B, then rounds of 2100 C-1 + 1000 C-2
  up to 50 000 iterations (the README's "at least 50K" from scratch), ``--best-events`` best-model events per round
  (each enhances all 380 images); extensions (+60 / +100) not counted;
* RAVE schedule (options/train_rave.yml): 1000 B + ``--rave-guided`` guided iterations (default: total_iter 20000
  less the warm-up).

``bench/bench_gpu.py`` reuses the model builders, the stage timing and the projection at the originals' sizes.

    python bench/bench_methods.py [--crop 64] [--batch 2] [--prompt-batch 4] [--iters 2]
"""
import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import rave_basicsr  # noqa: E402,F401
from rave_basicsr.utils.hardware import device_description  # noqa: E402
from rave_basicsr.utils.options import load_option_file  # noqa: E402
from basicsr.models import build_model  # noqa: E402

from tests.clip_lit_helpers import TINY_VIT, clip_lit_options  # noqa: E402
from tests.rave_helpers import STATS_GUIDANCE, TINY_IDENTITY, demo_data, model_options, rave_options  # noqa: E402

VIT = {'type': 'open_clip', 'model': 'ViT-B-32', 'pretrained': None, 'precision': 'fp32'}
RN101 = {'type': 'open_clip', 'model': 'RN101', 'pretrained': None, 'precision': 'fp32'}
ENCODERS = {  # name: (latent/RAVE guidance, prompt guidance, identity)
    'tiny': (STATS_GUIDANCE, TINY_VIT, TINY_IDENTITY),
    'ViT-B-32 + RN101 sized (random)': (VIT, VIT, RN101),
}
REPO = Path(__file__).resolve().parents[1]
#: images of the originals' training set (BAID_380)
TRAIN_IMAGES = 380


def default_schedule(rave_file: Path = REPO / 'options' / 'train_rave.yml',
                     clip_lit_file: Path = REPO / 'options' / 'train_clip_lit.yml') -> dict:
    """The default schedules and sizes of the shipped option files (the originals'): CLIP-LIT's stage lengths,
    crop, batch, prompt batch and results size, RAVE's warm-up and guided iterations."""
    clip_lit, rave = load_option_file(str(clip_lit_file)), load_option_file(str(rave_file))
    train = clip_lit['train']
    return {'crop': clip_lit['datasets']['train']['resize'], 'batch': clip_lit['datasets']['train']['batch_size_per_gpu'],
            'prompt_batch': clip_lit['prompt_data']['batch_size'], 'result_size': clip_lit['results']['size'],
            'train_images': TRAIN_IMAGES, 'clip_lit_total': train['total_iter'],
            'prompt_init': train['prompt_init']['iters'], 'warmup': train['warmup']['iters'],
            'network': train['network']['iters'], 'prompt': train['prompt']['iters'],
            'rave_warmup': rave['train']['warmup']['iters'],
            'rave_guided': rave['train']['total_iter'] - rave['train']['warmup']['iters']}


FULL = default_schedule()


def timed(step, iters: int) -> float:
    """Median seconds per call of ``step(i)`` after one untimed call (the median resists a busy shared CPU)."""
    step(0)
    times = []
    for i in range(iters):
        start = time.perf_counter()
        step(i + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_seconds(model, stage: str, batch: dict, iters: int) -> float:
    """Seconds per iteration of ``stage`` (the model's schedule is moved to it first; on a GPU each iteration
    waits for its kernels)."""
    names = [spec.name for spec in model.schedule.specs]
    model.schedule.index, model.schedule.iter_in_stage = names.index(stage), 0
    model.schedule.length = 10 ** 9
    model.on_stage_start(model.schedule.current)

    def step(i):
        model.feed_data(batch)
        model.optimize_parameters(i + 1)
        if model.device.type == 'cuda':
            torch.cuda.synchronize(model.device)
    return timed(step, iters)


def _on_device(options: dict, device: str, train_extra: dict = None) -> dict:
    """``options`` on ``device`` (one GPU or the CPU) with ``train_extra`` (``mixed_precision``,
    ``channels_last``) added to its ``train`` block."""
    options['num_gpu'] = 1 if device == 'cuda' else 0
    options['train'].update(train_extra or {})
    return options


def training_image_counts(prompt_batch: int) -> Dict[str, int]:
    """Backlit and well-lit training images of the benchmark's data: 4 of each, more when CLIP-LIT's prompt batch
    needs them (its prompt stage draws that many backlit/well-lit pairs without repeats)."""
    each = max(4, prompt_batch)
    return {'n_train': each, 'n_welllit': each}


def clip_lit_model(data, root, guidance: str, encoders, args, device: str = 'cpu', train_extra: dict = None):
    latent_guidance, prompt_guidance, identity = encoders
    options = clip_lit_options('bench', data, guidance=guidance, stages=(1, 1, 1, 1), batch=args.batch,
                               crop=args.crop, prompt_batch=args.prompt_batch,
                               results={'at': 'end', 'size': args.crop, 'batch_size': args.batch})
    options['guidance_encoder'] = copy.deepcopy(latent_guidance if guidance == 'latent' else prompt_guidance)
    options['identity_encoder'] = copy.deepcopy(identity)
    options['prompt_data']['resize'] = args.crop
    options['train']['warmup']['reinit_psnr'] = None
    torch.manual_seed(0)
    return build_model(model_options(_on_device(options, device, train_extra), root))


def rave_model(data, root, encoders, args, device: str = 'cpu', train_extra: dict = None):
    latent_guidance, _, identity = encoders
    options = rave_options('bench_rave', data, warmup_iters=0, crop=args.crop, batch=args.batch)
    options['guidance_encoder'], options['identity_encoder'] = copy.deepcopy(latent_guidance), copy.deepcopy(identity)
    options['train']['warmup']['reinit_psnr'] = None
    torch.manual_seed(0)
    return build_model(model_options(_on_device(options, device, train_extra), root))


def project(rows: dict, args, scaled: bool, schedule: dict = None) -> dict:
    """Full-schedule wall time (hours) of each method from per-iteration seconds (see the module docstring).

    ``scaled``: per-iteration costs scaled to the originals' sizes (linear in pixels × batch: an upper-bound-style
    estimate); otherwise the schedules are costed at the bench's own sizes (a lower-bound-style estimate).
    ``schedule``: :func:`default_schedule`'s layout (default :data:`FULL`).
    """
    full = schedule or FULL
    net_scale = (full['crop'] ** 2 * full['batch']) / (args.crop ** 2 * args.batch) if scaled else 1.0
    prompt_scale = full['prompt_batch'] / args.prompt_batch if scaled else 1.0
    result_scale = full['result_size'] ** 2 / args.crop ** 2 if scaled else 1.0
    rest = full['clip_lit_total'] - full['prompt_init'] - full['warmup']
    rounds_full, left = divmod(rest, full['network'] + full['prompt'])
    rounds = rounds_full + (1 if left else 0)
    c1_iters = rounds_full * full['network'] + min(left, full['network'])
    c2_iters = rounds_full * full['prompt'] + max(0, left - full['network'])
    out = {'assumptions': {'network_scale': net_scale, 'prompt_scale': prompt_scale, 'result_scale': result_scale,
                           'clip_lit_rounds': rounds, 'c1_iters': c1_iters, 'c2_iters': c2_iters,
                           'best_events_per_round': args.best_events, 'rave_guided_iters': args.rave_guided,
                           **full}}
    rave = (full['rave_warmup'] * rows['rave']['warmup'] + args.rave_guided * rows['rave']['guided']) * net_scale
    out['rave_hours'] = rave / 3600
    for method in ('clip_lit', 'clip_lit_latent'):
        r = rows[method]
        seconds = (full['prompt_init'] * r['prompt_init'] * prompt_scale + full['warmup'] * r['warmup'] * net_scale
                   + c1_iters * r['network'] * net_scale + c2_iters * r['prompt'] * prompt_scale
                   + rounds * args.best_events * full['train_images'] * r['results_per_image'] * result_scale)
        out[f'{method}_hours'] = seconds / 3600
        out[f'ratio_{method}_to_rave'] = seconds / rave
        # RAVE guided iterations whose schedule would be 25x shorter than this method's (the paper's claim)
        out[f'rave_guided_iters_for_25x_{method}'] = max(0.0, (seconds / 25 / net_scale - full['rave_warmup'] *
                                                              rows['rave']['warmup']) / rows['rave']['guided'])
    return out


def _shown_path(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (reports name no machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--crop', type=int, default=64)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--prompt-batch', type=int, default=4)
    parser.add_argument('--iters', type=int, default=2)
    parser.add_argument('--best-events', type=int, default=10)
    parser.add_argument('--rave-guided', type=int, default=FULL['rave_guided'])
    parser.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results'))
    args = parser.parse_args()
    root = Path(tempfile.gettempdir()) / 'rave_bench_methods'
    counts = training_image_counts(args.prompt_batch)
    data = demo_data(root / 'data', size=max(args.crop, 48), n_val=1, **counts) \
        if not (root / 'data' / 'train_backlit').is_dir() else \
        {'outdir': str(root / 'data'), 'train_welllit': str(root / 'data' / 'train_welllit')}
    batch = {'lq': torch.rand(args.batch, 3, args.crop, args.crop, generator=torch.Generator().manual_seed(0))}
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    results = {'device': device, 'hardware': device_description(torch.device(device)), 'torch': torch.__version__,
               'platform': platform.platform(),
               'threads': torch.get_num_threads(), 'settings': dict(vars(args), out=_shown_path(args.out)),
               'encoders': {}}
    for enc_name, encoders in ENCODERS.items():
        rows = {}
        for method, guidance in (('clip_lit', 'prompt'), ('clip_lit_latent', 'latent')):
            model = clip_lit_model(data, root, guidance, encoders, args, device)
            rows[method] = {stage: stage_seconds(model, stage, batch, args.iters)
                            for stage in ('prompt_init', 'warmup', 'network', 'prompt')}
            images = len(model.pair_data.backlit)
            rows[method]['results_per_image'] = timed(lambda i: model.record_results(0, i), 1) / images
            print(enc_name, method, rows[method], flush=True)
        model = rave_model(data, root, encoders, args, device)
        rows['rave'] = {stage: stage_seconds(model, stage, batch, args.iters) for stage in ('warmup', 'guided')}
        print(enc_name, 'rave', rows['rave'], flush=True)
        results['encoders'][enc_name] = {'seconds_per_iter': rows,
                                         'projection': {'bench_sizes': project(rows, args, scaled=False),
                                                        'original_sizes': project(rows, args, scaled=True)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'methods.json').write_text(json.dumps(results, indent=2))
    (out / 'methods.md').write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    s = results['settings']
    lines = ['# Training cost of RAVE, CLIP-LIT and CLIP-LIT-Latent (`bench/bench_methods.py`)', '',
             f'Device: {results["device"]} ({results["threads"]} threads), torch {results["torch"]}. Measured at '
             f'{s["crop"]} px, batch {s["batch"]} (network stages) and batch {s["prompt_batch"]} (prompt stages), '
             f'{s["iters"]} timed iterations per stage after one untimed one; random encoder weights.', '']
    for enc_name, entry in results['encoders'].items():
        rows = entry['seconds_per_iter']
        lines += [f'## {enc_name}', '', '| method | A prompt_init | B warmup | C-1 network | C-2 prompt | '
                  'results s/image | RAVE guided |', '|---|---|---|---|---|---|---|']
        for method in ('clip_lit', 'clip_lit_latent'):
            r = rows[method]
            lines.append(f'| {method} (it/s) | {1 / r["prompt_init"]:.2f} | {1 / r["warmup"]:.2f} | '
                         f'{1 / r["network"]:.2f} | {1 / r["prompt"]:.2f} | {r["results_per_image"]:.4f} | |')
        lines.append(f'| rave (it/s) | | {1 / rows["rave"]["warmup"]:.2f} | | | | {1 / rows["rave"]["guided"]:.2f} |')
        a = entry['projection']['bench_sizes']['assumptions']
        lines += ['', f'Projected default schedules on this device (CLIP-LIT {a["clip_lit_total"]} iterations = '
                      f'{a["prompt_init"]} A + {a["warmup"]} B + {a["c1_iters"]} C-1 + {a["c2_iters"]} C-2 in '
                      f'{a["clip_lit_rounds"]} rounds, {a["best_events_per_round"]} best-model inferences of '
                      f'{a["train_images"]} images per round; RAVE {a["rave_warmup"]} B + {a["rave_guided_iters"]} '
                      'guided), costed at the bench sizes and scaled linearly to the originals\' sizes '
                      '(512 px batch 8, prompt batch 16, results at 256 px):', '',
                  '| costing | RAVE | CLIP-LIT | CLIP-LIT-Latent | CLIP-LIT / RAVE | CLIP-LIT-Latent / RAVE | '
                  'RAVE guided iterations for 25× (CLIP-LIT / Latent) |', '|---|---|---|---|---|---|---|']
        for label, key in (('bench sizes', 'bench_sizes'), ('original sizes (linear)', 'original_sizes')):
            p = entry['projection'][key]
            lines.append(f'| {label} | {p["rave_hours"]:.2f} h | {p["clip_lit_hours"]:.2f} h | '
                         f'{p["clip_lit_latent_hours"]:.2f} h | {p["ratio_clip_lit_to_rave"]:.1f}× | '
                         f'{p["ratio_clip_lit_latent_to_rave"]:.1f}× | {p["rave_guided_iters_for_25x_clip_lit"]:.0f}'
                         f' / {p["rave_guided_iters_for_25x_clip_lit_latent"]:.0f} |')
        lines.append('')
    lines += ['The ratios count wall time of the default schedules, not convergence: the RAVE paper reports '
              'convergence up to ~25× faster, which also depends on how many iterations each method needs (RAVE\'s '
              'iteration count is unpublished; 20 000 is options/train_rave.yml\'s choice).', '']
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
