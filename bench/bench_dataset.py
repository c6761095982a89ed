"""Images per second delivered by UnpairedBacklitDataset from a folder of JPEGs vs the same images in LMDB.

The set: 64 images of 800×600 (crops of scikit-image's bundled photos, JPEG quality 95, like BAID's JPEGs),
squash-resized to 512² with the official augmentation, batch 8, with 0 and 2 data-loader workers. The folder
is the baseline; each configuration runs one warm-up epoch, then ``--epochs`` timed epochs.
Writes bench/results/dataset.json and dataset.md.

    PYTHONPATH=. python bench/bench_dataset.py [--images 64] [--epochs 3]
"""
import argparse
import json
import os
import tempfile
import time

import cv2
import numpy as np
import torch

import rave_basicsr  # noqa: F401  (the torchvision shim must precede any basicsr import)
from basicsr.data import build_dataloader, build_dataset
from rave_basicsr.data.demo_data import bundled_photos
from rave_basicsr.data.lmdb_util import make_lmdb
from rave_basicsr.utils.hardware import cpu_capability

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def make_images(folder: str, count: int) -> None:
    """800×600 JPEGs: random crops of the bundled photos, resized."""
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
        cv2.imwrite(os.path.join(folder, f'img_{i:03d}.jpg'), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=64)
    parser.add_argument('--epochs', type=int, default=3)
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
    result = {'benchmark': 'UnpairedBacklitDataset images/s, 800x600 -> 512x512 squash resize + official '
                           'augmentation, batch 8', 'images': args.images, 'timed_epochs': args.epochs,
              'machine': f'{cpu_capability()}; torch threads 1',
              'folder_jpeg_MiB': round(folder_mb, 1), 'lmdb_png_MiB': round(lmdb_mb, 1),
              'lmdb_build_seconds': round(build_seconds, 2), 'rows': rows}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, 'dataset.json'), 'w') as handle:
        json.dump(result, handle, indent=2)
    lines = ['# Dataset throughput: folder (JPEG) vs LMDB (PNG level 1)', '',
             f'{result["benchmark"]}; {args.images} images, {args.epochs} timed epochs; {result["machine"]}.',
             f'Folder {folder_mb:.1f} MiB of JPEG, LMDB {lmdb_mb:.1f} MiB of PNG (built in {build_seconds:.1f} s).',
             '', '| workers | folder img/s | LMDB img/s | LMDB / folder |', '|---|---|---|---|']
    lines += [f'| {r["workers"]} | {r["folder_jpeg_img_per_s"]} | {r["lmdb_png_img_per_s"]} | '
              f'{r["lmdb_vs_folder"]} |' for r in rows]
    with open(os.path.join(RESULTS, 'dataset.md'), 'w') as handle:
        handle.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
