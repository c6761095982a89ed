"""``rave demo-data OUTDIR``: the small synthetic backlit / well-lit / ground-truth set (offline, seconds)."""
import argparse

from rave_basicsr.data.backlight_models import BACKLIGHT_MODELS, DEFAULT_BACKLIGHT
from rave_basicsr.data.demo_data import make_demo_data

COMMAND = 'demo-data'
HELP = 'write a small synthetic backlit / well-lit / ground-truth image set for demos and tests'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('outdir', metavar='OUTDIR', help='folder to write (must not exist or be empty)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (same seed, same files; default 0)')
    parser.add_argument('--size', type=int, default=128, help='image side in pixels (default 128; 96+ for NIQE)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace the demo folders and README.txt of an existing OUTDIR')
    parser.add_argument('--backlight', default=DEFAULT_BACKLIGHT, metavar='NAME',
                        help=f'synthetic backlight model: {", ".join(BACKLIGHT_MODELS)} (default {DEFAULT_BACKLIGHT}, '
                             'the demo recipe\'s own; the others check a recipe on data it was not tuned on)')


def run(args: argparse.Namespace) -> int:
    result = make_demo_data(args.outdir, seed=args.seed, size=args.size, overwrite=args.overwrite,
                            backlight=args.backlight)
    counts = result['counts']
    print(f'wrote {counts["train"]} train, {counts["welllit"]} well-lit and {counts["val"]} validation images '
          f'({args.size}x{args.size}, seed {args.seed}, backlight {args.backlight}) to {args.outdir}')
    return 0
