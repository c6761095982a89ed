"""Training-data throughput: UnpairedBacklitDataset from a folder of JPEGs vs the same images in LMDB, PNG decoding
with and without the EXIF orientation check, and CLIP-LIT's prompt batches decoded on 1, 2 and 8 threads.

The set: 64 images of 800×600 (crops of scikit-image's bundled photos, JPEG quality 95, like BAID's JPEGs; PNG for
the other parts, like DIV2K and LMDB values).
1. Squash-resized to 512² with the official augmentation, batch 8, with 0 and 2 data-loader workers. The folder is
   the baseline; each configuration runs one warm-up epoch, then ``--epochs`` timed epochs.
2. ``decode_image`` of each PNG with the orientation check against without it (the baseline: no check at all).
3. ``LabelledBacklitDataset(mode: pairs).load_batch`` (the prompt stages' ranking batches: 16 backlit/well-lit pairs
   at the default 256² with the official augmentation) with ``decode_threads`` 1 (the baseline), 2 and 8.
Writes bench/results/dataset.json and dataset.md.

    PYTHONPATH=. python bench/bench_dataset.py [--images 64] [--epochs 3]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import rave_basicsr  # noqa: F401  (the torchvision shim must precede any basicsr import)
from basicsr.data import build_dataloader, build_dataset
from rave_basicsr.data.backlit_dataset import LabelledBacklitDataset
from rave_basicsr.data.demo_data import bundled_photos
from rave_basicsr.data.epoch_sampler import EpochSampler
from rave_basicsr.data.lmdb_util import make_lmdb
from rave_basicsr.utils.hardware import cpu_capability
from rave_basicsr.utils.image_io import decode_image

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def make_images(folder: str, count: int, extension: str = '.jpg') -> None:
    """800×600 JPEGs (or PNGs): random crops of the bundled photos, resized."""
    rng = np.random.default_rng(0)
    photos = bundled_photos()
    os.makedirs(folder)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = cv2.resize(photo[top:top + ch, left:left + cw], (800, 600), interpolation=cv2.INTER_CUBIC)
        bgr = np.round(np.clip(crop, 0, 1)[:, :, ::-1] * 255).astype(np.uint8)
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if extension == '.jpg' else []
        cv2.imwrite(os.path.join(folder, f'img_{i:03d}{extension}'), bgr, params)


def images_per_second(root: str, workers: int, epochs: int) -> float:
    opt = {'name': 'bench', 'type': 'UnpairedBacklitDataset', 'phase': 'train', 'dataroot_backlit': root,
           'resize': 512, 'augment': 'official', 'use_shuffle': True, 'num_worker_per_gpu': workers,
           'batch_size_per_gpu': 8, 'persistent_workers': False}
    loader = build_dataloader(build_dataset(opt), opt, num_gpu=0, dist=False, seed=0)
    for _ in loader:  # warm-up epoch (worker start, page cache)
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            count += batch['lq'].shape[0]
    return count / (time.perf_counter() - start)


def png_decode_seconds(folder: str, repeats: int) -> dict:
    """Mean seconds per ``decode_image`` of the folder's PNGs, with and without the EXIF orientation check."""
    blobs = [Path(folder, name).read_bytes() for name in sorted(os.listdir(folder))]
    seconds = {}
    for check in (False, True, False, True):  # interleaved, the first pass of each also warms the cache
        start = time.perf_counter()
        for _ in range(repeats):
            for blob in blobs:
                decode_image(blob, apply_exif_orientation=check)
        seconds[check] = (time.perf_counter() - start) / (repeats * len(blobs))
    return {'without_check_s': seconds[False], 'with_check_s': seconds[True]}


def prompt_batches_per_second(backlit: str, welllit: str, threads: int, batches: int) -> float:
    """Ranking batches (16 pairs, 256², official augmentation) per second, as the prompt stage loads them."""
    dataset = LabelledBacklitDataset({'dataroot_backlit': backlit, 'dataroot_welllit': welllit, 'mode': 'pairs',
                                      'decode_threads': threads})
    sampler = EpochSampler(len(dataset), min(16, len(dataset)), seed=0)
    dataset.load_batch(sampler.next())  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        dataset.load_batch(sampler.next())
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=64)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--batches', type=int, default=8, help='timed prompt batches per thread count')
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, lmdb_root = os.path.join(tmp, 'jpg'), os.path.join(tmp, 'set.lmdb')
        make_images(folder, args.images)
        start = time.perf_counter()
        make_lmdb(folder, lmdb_root)
        build_seconds = time.perf_counter() - start
        folder_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2 ** 20
        lmdb_mb = os.path.getsize(os.path.join(lmdb_root, 'data.mdb')) / 2 ** 20
        for workers in (0, 2):
            baseline = images_per_second(folder, workers, args.epochs)
            lmdb_rate = images_per_second(lmdb_root, workers, args.epochs)
            rows.append({'workers': workers, 'folder_jpeg_img_per_s': round(baseline, 1),
                         'lmdb_png_img_per_s': round(lmdb_rate, 1), 'lmdb_vs_folder': round(lmdb_rate / baseline, 2)})
        backlit, welllit = os.path.join(tmp, 'png_backlit'), os.path.join(tmp, 'png_welllit')
        make_images(backlit, args.images, '.png')
        make_images(welllit, args.images, '.png')
        png = png_decode_seconds(backlit, repeats=2)
        prompt = {threads: prompt_batches_per_second(backlit, welllit, threads, args.batches) for threads in (1, 2, 8)}
    result = {'benchmark': 'UnpairedBacklitDataset images/s, 800x600 -> 512x512 squash resize + official '
                           'augmentation, batch 8', 'images': args.images, 'timed_epochs': args.epochs,
              'machine': f'{cpu_capability()}; torch threads 1',
              'folder_jpeg_MiB': round(folder_mb, 1), 'lmdb_png_MiB': round(lmdb_mb, 1),
              'lmdb_build_seconds': round(build_seconds, 2), 'rows': rows,
              'png_decode_ms': {key: round(value * 1000, 2) for key, value in png.items()},
              'prompt_batches_per_s': {str(threads): round(rate, 2) for threads, rate in prompt.items()}}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, 'dataset.json'), 'w') as handle:
        json.dump(result, handle, indent=2)
    lines = ['# Dataset throughput: folder (JPEG) vs LMDB (PNG level 1), PNG decoding, prompt batches', '',
             f'{result["benchmark"]}; {args.images} images, {args.epochs} timed epochs; {result["machine"]}.',
             f'Folder {folder_mb:.1f} MiB of JPEG, LMDB {lmdb_mb:.1f} MiB of PNG (built in {build_seconds:.1f} s).',
             '', '| workers | folder img/s | LMDB img/s | LMDB / folder |', '|---|---|---|---|']
    lines += [f'| {r["workers"]} | {r["folder_jpeg_img_per_s"]} | {r["lmdb_png_img_per_s"]} | '
              f'{r["lmdb_vs_folder"]} |' for r in rows]
    lines += ['', f'PNG decoding (800x600), ms per image: {png["without_check_s"] * 1000:.2f} without the EXIF '
              f'orientation check (baseline), {png["with_check_s"] * 1000:.2f} with it '
              f'({png["with_check_s"] / png["without_check_s"]:.2f}x).', '',
              f'Prompt batches (LabelledBacklitDataset pairs, 16 pairs of 800x600 PNGs -> 256x256, official '
              f'augmentation), {args.batches} timed batches:', '', '| decode_threads | batches/s | vs 1 thread |',
              '|---|---|---|']
    lines += [f'| {threads} | {rate:.2f} | {rate / prompt[1]:.2f} |' for threads, rate in prompt.items()]
    with open(os.path.join(RESULTS, 'dataset.md'), 'w') as handle:
        handle.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
