"""The README's demo image grid: per validation image, input / enhanced / ground truth, from a robustness-benchmark
run (``bench/bench_demo_robustness.py`` keeps its outputs in its work folder).

Made from the synthetic demo data only (crops of scikit-image's bundled photos, which the project may redistribute).

    python bench/demo_grid.py --run demo_x1_s0 --out docs/images/rave_demo_grid.png
    python bench/demo_grid.py --opt options/demo/train_clip_lit_latent_demo.yml \
        --out docs/images/clip_lit_latent_demo_grid.png
"""
import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import rave_basicsr  # noqa: E402,F401
from bench_demo_robustness import DEFAULT_OPT, default_work  # noqa: E402  (this script's folder is on sys.path)
from rave_basicsr.utils.image_io import encode_image, read_image, write_image_atomic  # noqa: E402


def grid(rows: list, gap: int = 4) -> np.ndarray:
    """Float RGB images (equal sizes) in rows, on white, ``gap`` pixels apart."""
    h, w = rows[0][0].shape[:2]
    out = np.ones((len(rows) * (h + gap) - gap, len(rows[0]) * (w + gap) - gap, 3), np.float32)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = image
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--opt', default=str(DEFAULT_OPT), help='the demo option file whose sweep made the run')
    parser.add_argument('--work', default=None,
                        help='the benchmark\'s work folder (default: that of the --opt file\'s sweep)')
    parser.add_argument('--run', default='demo_x1_s0', help='run key: <set>_x<length>_s<seed>')
    parser.add_argument('--out', default=str(REPO / 'docs' / 'images' / 'rave_demo_grid.png'))
    parser.add_argument('--images', type=int, default=4, help='validation images to show (rows)')
    args = parser.parse_args()
    work, model = Path(args.work or default_work(Path(args.opt))), args.run.split('_x')[0]
    enhanced, data = work / 'enhanced' / args.run / 'val', work / 'data' / model
    if not enhanced.is_dir():
        raise SystemExit(f'{enhanced} does not exist: run bench/bench_demo_robustness.py for {args.run} first.')
    names = sorted(p.name for p in (data / 'val_gt').iterdir())[:args.images]
    rows = [[read_image(str(folder / name)).rgb for folder in (data / 'val_backlit', enhanced, data / 'val_gt')]
            for name in names]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_image_atomic(args.out, encode_image(grid(rows), Path(args.out).suffix))
    print(f'{args.out}: columns input / enhanced / ground truth, {len(rows)} images of run {args.run}')


if __name__ == '__main__':
    main()
