"""A small synthetic backlit / well-lit / ground-truth set, built offline in seconds, for demos and tests.

Well-lit photos are scikit-image's bundled colour photographs (``skimage.data``: astronaut, coffee, chelsea,
rocket, motorcycle), cut into deterministic random square crops (45-100 % of the short side, random position,
random horizontal flip) and resized to ``size``². Backlit versions come from a backlight model of
:mod:`rave_basicsr.data.backlight_models`; the default, ``demo``, is
:func:`~rave_basicsr.data.backlight_models.synthesize_backlight`:

1. a smooth *subject mask* m in [0, 1]: a soft ellipse around a random point in the lower-middle of the frame
   joined with the foreground below a random soft horizon, lowered on the photo's highlights, blurred, then
   cleared wherever the photo is bright (blurred luma above 0.45 fades out of it, above 0.7 is out);
2. the subject is under-exposed, gently: ``s = exposure · x^gamma`` (gamma 1.15-1.4, exposure 0.58-0.7);
3. ``y = m · s + (1 - m) · x``: the camera exposed for the background, which keeps its values, highlights included
   (as in a real backlit photo, where an enhancer should lift the subject and leave the sky alone).

Until 2026-12-02 the demo set was made by the ``hazy`` model (its background hazed, lit by a glow and bloomed), whose
right answer darkens every highlight; a network trained on it darkened the skies of real photos (docs/training.md).
The ground truth of a backlit image is the crop it was made from. Everything is drawn from
``numpy.random.default_rng(seed)`` streams, so a seed gives byte-identical files.
"""
import os
import shutil
from typing import Dict, List

import cv2
import numpy as np

from rave_basicsr.data.backlight_models import DEFAULT_BACKLIGHT, DEMO_LIGHTING, get_backlight_model
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.image_io import encode_image, write_image_atomic

DEMO_FOLDERS = ('train_backlit', 'train_welllit', 'train_gt', 'val_backlit', 'val_gt')
README_NAME = 'README.txt'


def bundled_photos() -> List[np.ndarray]:
    """scikit-image's bundled colour photographs as float32 RGB in [0, 1] (no download needed)."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.stereo_motorcycle()[0]]
    return [np.ascontiguousarray(p[:, :, :3], dtype=np.float32) / 255.0 for p in photos]


def random_square_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (45-100 % of the short side), maybe mirrored, resized to size²."""
    h, w = photo.shape[:2]
    side = int(round(min(h, w) * rng.uniform(0.45, 1.0)))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[top:top + side, left:left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.clip(cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA), 0, 1)


def _write_png(path: str, rgb: np.ndarray) -> None:
    write_image_atomic(path, encode_image(rgb, '.png'))


def _prepare_outdir(outdir: str, overwrite: bool) -> None:
    if os.path.isfile(outdir):
        raise RaveError(f'{outdir} is a file; give a folder for the demo data.')
    if os.path.isdir(outdir) and os.listdir(outdir):
        if not overwrite:
            raise RaveError(f'{outdir} exists and is not empty; choose another folder or pass --overwrite '
                            f'(which replaces {", ".join(DEMO_FOLDERS)} and {README_NAME} only).')
        for folder in DEMO_FOLDERS:
            shutil.rmtree(os.path.join(outdir, folder), ignore_errors=True)
        if os.path.isfile(os.path.join(outdir, README_NAME)):
            os.remove(os.path.join(outdir, README_NAME))
    os.makedirs(outdir, exist_ok=True)


def make_demo_data(outdir: str, seed: int = 0, size: int = 128, overwrite: bool = False, n_train: int = 24,
                   n_welllit: int = 16, n_val: int = 6, backlight: str = DEFAULT_BACKLIGHT) -> Dict:
    """Write the demo set (``train_backlit``, ``train_welllit``, ``train_gt``, ``val_backlit``, ``val_gt``,
    ``README.txt``) into ``outdir``; returns the folder paths and the image counts.

    ``train_welllit`` holds other crops than ``train_gt`` (the unpaired regime never sees the ground truth).
    Sizes of 96 px or more keep NIQE usable on the validation images. ``backlight`` names the backlight model
    (other models check a recipe on backlit sets it was not tuned on).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise RaveError(f'demo image size must be an integer of at least 32 pixels (96+ for NIQE), got {size!r}.')
    for name, count in (('n_train', n_train), ('n_welllit', n_welllit), ('n_val', n_val)):
        if count < 1:
            raise RaveError(f'{name} must be at least 1, got {count}.')
    synthesize = get_backlight_model(backlight).synthesize
    _prepare_outdir(outdir, overwrite)
    photos = bundled_photos()
    train_rng, welllit_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    paths = {folder: os.path.join(outdir, folder) for folder in DEMO_FOLDERS}
    for split, rng, count in (('train', train_rng, n_train), ('val', val_rng, n_val)):
        for i in range(count):
            gt = random_square_crop(photos[int(rng.integers(len(photos)))], size, rng)
            backlit, _ = synthesize(gt, rng)
            name = f'{split}_{i:03d}.png'
            _write_png(os.path.join(paths[f'{split}_gt'], name), gt)
            _write_png(os.path.join(paths[f'{split}_backlit'], name), backlit)
    for i in range(n_welllit):
        crop = random_square_crop(photos[int(welllit_rng.integers(len(photos)))], size, welllit_rng)
        _write_png(os.path.join(paths['train_welllit'], f'welllit_{i:03d}.png'), crop)
    with open(os.path.join(outdir, README_NAME), 'w', encoding='utf-8') as handle:
        handle.write(_readme(seed, size, n_train, n_welllit, n_val, backlight))
    return dict(paths, outdir=outdir, seed=seed, size=size, backlight=backlight,
                counts={'train': n_train, 'welllit': n_welllit, 'val': n_val})


def _demo_model_readme() -> str:
    """The demo model's description, its ranges read from ``DEMO_LIGHTING`` (so the two cannot disagree)."""
    def span(bounds):
        return f'{bounds[0]:g}-{bounds[1]:g}'
    light = DEMO_LIGHTING
    return ('Backlight model: a smooth subject mask (soft ellipse in the lower-middle plus a dark foreground, cleared\n'
            f'wherever the photo is bright); subject = exposure * x^gamma (gamma {span(light.gamma)}, exposure '
            f'{span(light.exposure)});\nthe background and every highlight keep their values (the camera exposed '
            'for them).\n')


def _readme(seed: int, size: int, n_train: int, n_welllit: int, n_val: int, backlight: str) -> str:
    if backlight != DEFAULT_BACKLIGHT:
        model = (f'Backlight model: {backlight!r} (rave_basicsr.data.backlight_models), not the demo\'s own: '
                 'a set for checking a recipe on data it was not tuned on.\n')
    else:
        model = _demo_model_readme()
    return f"""RAVE / CLIP-LIT demo data (synthetic, made by `rave demo-data`, seed {seed}, {size}x{size} PNG)

train_backlit/  {n_train} synthetic backlit images (training input)
train_gt/       their ground truth (same file names): the well-lit crops they were made from
train_welllit/  {n_welllit} other well-lit crops, NOT the ground truth of train_backlit (unpaired regime)
val_backlit/    {n_val} synthetic backlit images for validation
val_gt/         their ground truth (same file names)

Photos: scikit-image's bundled images (astronaut, coffee, chelsea, rocket, motorcycle), random square crops.
{model}This is a toy stand-in for BAID / DIV2K: use it to check that pipelines run, not to compare methods.
"""
