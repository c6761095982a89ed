"""``rave enhance``: enhance photos with a released or trained enhancement network."""
import argparse
import sys

from rave_basicsr.inference.enhance import OUTPUT_FORMATS, enhance_files
from rave_basicsr.inference.enhancer import AUTO_TILE
from rave_basicsr.inference.precision import DEFAULT_PRECISION, PRECISIONS
from rave_basicsr.inference.weights import DEFAULT_WEIGHTS, OFFICIAL_WEIGHTS

COMMAND = 'enhance'
HELP = 'enhance backlit photos (files or folders) with a released or trained enhancement network'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('inputs', nargs='+', metavar='INPUT', help='image files and/or folders of images')
    parser.add_argument('-o', '--output', required=True, metavar='OUTDIR',
                        help='output folder (created if missing); outputs keep the input names')
    parser.add_argument('--weights', default=DEFAULT_WEIGHTS, metavar='NAME|PATH',
                        help=f'released weights by name ({", ".join(OFFICIAL_WEIGHTS)}; downloaded once into '
                        '$RAVE_CACHE_DIR or ~/.cache/rave_basicsr), an official .pth, or a BasicSR checkpoint '
                        f'(params_ema preferred over params). Default: {DEFAULT_WEIGHTS}')
    parser.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda or cuda:N')
    parser.add_argument('--precision', default=DEFAULT_PRECISION, choices=list(PRECISIONS),
                        help='auto (default): mixed where the CPU or GPU has native bfloat16, else fp32; fp32 (true '
                        'float32, also on GPUs); tf32 (GPUs from Ampere on); mixed (bf16 in the middle of the '
                        'network: within 1 grey level of fp32); bf16 (fastest; within about 2 grey levels); '
                        'fp16 (CUDA only)')
    parser.add_argument('--tile', type=int, default=None, metavar='N',
                        help='process in N×N tiles (exact: same result as whole-image); 0 = never tile. '
                        f'Default: {AUTO_TILE}-px tiles for images above 1 megapixel')
    parser.add_argument('--recursive', action='store_true', help='descend into sub-folders (the tree is kept)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing outputs (default: skip them)')
    parser.add_argument('--format', dest='output_format', default='same', choices=['same', *OUTPUT_FORMATS],
                        help='output format; same keeps the input format. Default: same')
    parser.add_argument('--padding', dest='outer_padding', default='reflect', choices=['reflect', 'zeros'],
                        help='padding of the outer convolutions: reflect (official inference, default) or zeros '
                        '(as in official training)')
    parser.add_argument('--eps', dest='division_eps', type=float, default=0.0,
                        help='epsilon in I / (L + eps); 0 (default) as in official inference')
    parser.add_argument('--network', dest='network_file', default=None, metavar='OPTION_FILE',
                        help='a BasicSR option file whose network_g the weights belong to, for networks other than '
                        'BacklitUNet (found by itself for checkpoints in experiments/<name>/models/)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar or per-image lines')


def run(args: argparse.Namespace) -> int:
    summary = enhance_files(args.inputs, args.output, weights=args.weights, device=args.device,
                            precision=args.precision, tile=args.tile, recursive=args.recursive,
                            overwrite=args.overwrite, output_format=args.output_format,
                            outer_padding=args.outer_padding, division_eps=args.division_eps,
                            network_file=args.network_file, progress=not args.quiet,
                            echo=(lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr)))
    print(summary.describe())
    return 0 if summary.ok else 1
