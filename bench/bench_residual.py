"""Residual computation throughput against the pure encoder forward time on the same images, in the same run.

The baseline is what the encoder alone costs: the same images, already decoded and resized in memory, fed in the
same batches through ``encode_image`` (normalisation included). ``compute_residual`` adds reading, decoding and
resizing in DataLoader workers; with enough workers that work overlaps the encoder and the ratio approaches 1
(goal: within 1.3x). Also reported: loading alone (no encoder) and the check that every worker count gives the
same residual.

Usage: python bench/bench_residual.py [--images 48] [--batch 16] [--workers 0 1 2] [--device auto]
           [--encoder open_clip:ViT-B-32:random]
Writes bench/results/residual.json and residual.md.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rave_basicsr.data.image_source import ImageSource  # noqa: E402
from rave_basicsr.residual.compute import (EncoderInputDataset, compute_residual, resize_only,  # noqa: E402
                                           resolve_preprocess)
from rave_basicsr.residual.encoder_spec import build_encoder_from_spec  # noqa: E402
from rave_basicsr.utils.hardware import device_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'
PHOTO_SIZES = ((480, 640), (640, 480), (600, 800), (512, 512))


def write_photos(folder: Path, count: int, brightness: float, seed: int) -> None:
    """JPEG 'photos' of typical sizes (smooth gradients plus noise), so decoding costs what it does for real."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * \
            np.linspace(0.5, 1, h, dtype=np.float32)[:, None, None]
        image = np.clip(brightness * (0.6 + 0.8 * ramp) + 0.08 * rng.standard_normal((h, w, 3)), 0, 1)
        cv2.imwrite(str(folder / f'{i:04d}.jpg'), np.round(image * 255).astype(np.uint8),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def pure_forward_seconds(encoder, sources, cfg, batch: int, device: torch.device) -> float:
    """Encoder-only time: images decoded and resized beforehand, then the same batches through encode_image."""
    batches = []
    for source in sources:
        dataset = EncoderInputDataset(source, resize_only(cfg))
        images = [dataset[i][1] for i in range(len(dataset))]
        batches += [torch.stack(images[s:s + batch]) for s in range(0, len(images), batch)]
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            encoder.encode_image(x.to(device), preprocess=cfg)
    sync(device)
    return time.perf_counter() - start


def loading_seconds(sources, cfg, batch: int, workers: int) -> float:
    """Reading + decoding + resizing alone, through the same DataLoader as compute_residual."""
    from torch.utils.data import DataLoader

    start = time.perf_counter()
    for source in sources:
        loader = DataLoader(EncoderInputDataset(source, resize_only(cfg)), batch_size=batch, num_workers=workers,
                            collate_fn=lambda items: items)
        for _ in loader:
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=48, help='images per set')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--repeats', type=int, default=3, help='interleaved rounds (the fastest of each is kept)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--encoder', default='open_clip:ViT-B-32:random',
                        help='ViT-B-32-sized, randomly initialised by default (no weights needed)')
    args = parser.parse_args()
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device)
    encoder = build_encoder_from_spec(args.encoder).to(device)
    cfg = resolve_preprocess(encoder, None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_photos(root / 'well', args.images, 0.7, 1)
        write_photos(root / 'back', args.images, 0.3, 2)
        sources = [ImageSource(str(root / 'well')), ImageSource(str(root / 'back'))]
        with torch.no_grad():  # warm-up (kernels, allocator)
            encoder.encode_image(torch.rand(args.batch, 3, cfg.size, cfg.size, device=device), preprocess=cfg)
        # rounds interleave every configuration, so that load drifts on a shared machine hit them alike
        forward_times: list = []
        times = {w: [] for w in args.workers}
        loads = {w: [] for w in args.workers}
        residuals = {}
        for _ in range(args.repeats):
            forward_times.append(pure_forward_seconds(encoder, sources, cfg, args.batch, device))
            for workers in args.workers:
                loads[workers].append(loading_seconds(sources, cfg, args.batch, workers))
                sync(device)
                start = time.perf_counter()
                residuals[workers] = compute_residual(encoder, root / 'well', root / 'back', batch_size=args.batch,
                                                      num_workers=workers, progress=False).residual
                sync(device)
                times[workers].append(time.perf_counter() - start)
        forward = min(forward_times)
        reference = residuals[args.workers[0]]
        rows = [{'workers': w, 'compute_s': min(times[w]), 'compute_all_s': times[w], 'loading_only_s': min(loads[w]),
                 'ratio_to_forward': min(times[w]) / forward, 'images_per_s': 2 * args.images / min(times[w]),
                 'same_residual_as_first': bool(torch.equal(residuals[w], reference))} for w in args.workers]
    result = {
        'benchmark': 'residual computation vs pure encoder forward (same images, same run)',
        'encoder': args.encoder, 'embed_dim': encoder.embed_dim, 'preprocess': cfg.to_dict(),
        'images_per_set': args.images, 'photo_sizes': PHOTO_SIZES, 'batch': args.batch,
        'device': str(device), 'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
        'hardware': device_description(device), 'cpu_threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
        'platform': platform.platform(),
        'torch': torch.__version__, 'load_average_at_end': os.getloadavg(),
        'repeats': args.repeats, 'pure_forward_s': forward, 'pure_forward_all_s': forward_times,
        'pure_forward_images_per_s': 2 * args.images / forward, 'runs': rows,
        'goal': 'ratio_to_forward <= 1.3 once loading overlaps',
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = '' if device.type == 'cpu' else f'_{device.type}'
    (RESULTS / f'residual{suffix}.json').write_text(json.dumps(result, indent=2) + '\n')
    title = f'{device}, {result["gpu"]}' if result['gpu'] else str(device)
    lines = [f'# Residual computation vs pure encoder forward ({title})',
             '', f'{args.encoder} ({encoder.embed_dim}-d), {2 * args.images} JPEG photos of {PHOTO_SIZES} px, '
             f'batch {args.batch}, {torch.get_num_threads()} torch threads. Pure forward: {forward:.2f} s '
             f'({result["pure_forward_images_per_s"]:.1f} img/s). {result["hardware"]}; load average '
             f'{os.getloadavg()[0]:.1f} at the end (shared machine: timings are noisy).', '',
             '| workers | compute_residual (s) | loading alone (s) | ratio to pure forward | img/s | same residual |',
             '|---:|---:|---:|---:|---:|:---:|']
    lines += [f'| {r["workers"]} | {r["compute_s"]:.2f} | {r["loading_only_s"]:.2f} | {r["ratio_to_forward"]:.2f}x '
              f'| {r["images_per_s"]:.1f} | {"yes" if r["same_residual_as_first"] else "NO"} |' for r in rows]
    (RESULTS / f'residual{suffix}.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
