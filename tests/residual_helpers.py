"""Shared helpers of the residual tests: tiny image sets and tiny encoders."""
from pathlib import Path

import cv2
import numpy as np

TINY_VIT = {'type': 'open_clip', 'model': 'rave-test-tiny-vit', 'pretrained': None}
TINY_VIT_OTHER_SEED = {'type': 'open_clip', 'model': 'rave-test-tiny-vit', 'pretrained': None, 'seed': 1}
STATS = {'type': 'arch', 'network': {'type': 'ImageStatsEncoder'}}


def write_image_set(folder: Path, count: int, brightness: float, seed: int, sizes=((24, 40), (40, 24), (33, 33))
                    ) -> Path:
    """``count`` PNGs of varied sizes around ``brightness`` (0..1), reproducible from ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        image = np.clip(brightness + 0.25 * rng.standard_normal((h, w, 3)), 0, 1)
        cv2.imwrite(str(folder / f'img_{i:02d}.png'), np.round(image * 255).astype(np.uint8))
    return folder


def make_sets(root: Path, well: int = 5, back: int = 4):
    """(well-lit folder, backlit folder) of small synthetic images."""
    return (write_image_set(root / 'well', well, 0.7, seed=1),
            write_image_set(root / 'back', back, 0.25, seed=2))
