"""``rave compare``: enhance a test set with several networks, score them as ``basicsr test`` does, and report."""
import argparse
import sys

from rave_basicsr.inference.compare import compare_models
from rave_basicsr.inference.compare_plan import DEFAULT_METRICS, METRICS
from rave_basicsr.inference.compare_report import markdown_table, mean_table
from rave_basicsr.inference.enhancer import AUTO_TILE
from rave_basicsr.inference.precision import PRECISIONS
from rave_basicsr.inference.weights import OFFICIAL_WEIGHTS
from rave_basicsr.residual.encoder_spec import EXAMPLES as ENCODER_EXAMPLES

COMMAND = 'compare'
HELP = 'compare networks on a test set: enhance with each, compute the metrics, write tables, a grid and a page'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ('rave compare INPUT_DIR [--gt GT_DIR] --weights [LABEL=]SPEC [[LABEL=]SPEC ...] -o OUTDIR '
                    '[options]')
    parser.add_argument('input_dir', metavar='INPUT_DIR', nargs='?',
                        help='folder of test images (not searched recursively)')
    parser.add_argument('--weights', nargs='+', action='extend', required=True, metavar='[LABEL=]NAME|PATH',
                        help=f'networks to compare (repeatable): released names ({", ".join(OFFICIAL_WEIGHTS)}), '
                        'official .pth files, BasicSR checkpoints, or experiment folders (experiments/NAME means '
                        'experiments/NAME/models/net_g_latest.pth). LABEL= names the row and the output folder; by '
                        'default the label comes from the name or path')
    parser.add_argument('-o', '--output', required=True, metavar='OUTDIR',
                        help='output folder: OUTDIR/<label>/ holds each network\'s outputs (reused when present), '
                        'plus results.csv, per_image.csv, results.md, grid.png and index.html')
    parser.add_argument('--gt', metavar='GT_DIR',
                        help='ground-truth folder, matched to the inputs by file name without extension; enables '
                        'the full-reference metrics (PSNR, SSIM, LPIPS)')
    parser.add_argument('--metrics', nargs='+', default=list(DEFAULT_METRICS), choices=list(METRICS),
                        metavar='NAME', help='metrics to compute: ' + ', '.join(
                            f'{m.name} ({m.title})' for m in METRICS.values())
                        + f'. Default: {" ".join(DEFAULT_METRICS)} (those that cannot run are skipped with a note)')
    parser.add_argument('--residual', metavar='FILE',
                        help='residual vector file (`rave residual compute`): the direction of the guidance score')
    parser.add_argument('--encoder', metavar='SPEC',
                        help='encoder for the guidance score (default: the one recorded in --residual); '
                        f'{ENCODER_EXAMPLES}')
    parser.add_argument('--include-input', action='store_true',
                        help='add a row "input" with the metrics of the unenhanced inputs')
    parser.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda or cuda:N')
    parser.add_argument('--precision', default='fp32', choices=list(PRECISIONS),
                        help='compute precision of the enhancement (see rave enhance); default fp32, the reference')
    parser.add_argument('--tile', type=int, default=None, metavar='N',
                        help='exact tiling in N×N tiles (same result as whole-image); 0 = never. Default: '
                        f'{AUTO_TILE}-px tiles above 1 megapixel')
    parser.add_argument('--overwrite', action='store_true',
                        help='enhance again and replace existing outputs (default: reuse them)')
    parser.add_argument('--thumb', type=int, default=160, metavar='PX', help='grid cell size in pixels (160)')
    parser.add_argument('--grid-limit', type=int, default=50, metavar='N',
                        help='at most N images (rows) in grid.png; 0 = all. Default 50')
    parser.add_argument('--quiet', action='store_true', help='no progress bars or per-image lines')


def run(args: argparse.Namespace) -> int:
    from rave_basicsr.utils.errors import RaveError

    if args.input_dir is None:
        raise RaveError('INPUT_DIR is missing; give it before --weights, which takes every value that follows it '
                        '(rave compare INPUT_DIR --weights A B -o OUTDIR).')
    if args.thumb < 16:
        raise RaveError(f'--thumb {args.thumb}: use at least 16 pixels.')
    if args.grid_limit < 0:
        raise RaveError(f'--grid-limit {args.grid_limit}: use 0 (all images) or a positive number.')
    result = compare_models(args.input_dir, args.weights, args.output, gt_dir=args.gt, metrics=args.metrics,
                            encoder=args.encoder, residual=args.residual, device=args.device,
                            precision=args.precision, tile=args.tile, overwrite=args.overwrite,
                            include_input=args.include_input, thumb_size=args.thumb, grid_limit=args.grid_limit,
                            progress=not args.quiet, echo=lambda text: print(text, file=sys.stderr))
    if result.metrics:
        print(markdown_table(mean_table(result)))
    for note in result.notes:
        print(f'note: {note}')
    for problem in result.problems:
        print(f'FAILED  {problem.describe()}')
    print(f'{len(result.images)} images, {len(result.models)} models, {len(result.problems)} problems in '
          f'{result.seconds:.1f} s; wrote {", ".join(str(path) for path in result.files.values())}')
    return 0 if result.ok else 1
