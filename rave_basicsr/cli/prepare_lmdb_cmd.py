"""``rave prepare-lmdb``: an image folder (or an input / ground-truth pair of folders) to BasicSR-style LMDB."""
import argparse

from rave_basicsr.data.lmdb_util import make_lmdb, make_paired_lmdb
from rave_basicsr.utils.errors import RaveError

COMMAND = 'prepare-lmdb'
HELP = 'pack an image folder (or input + ground-truth folders) into LMDB for BasicSR data loading'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('input', metavar='INPUT', help='folder of images (the inputs, for a paired set)')
    parser.add_argument('output', metavar='OUTPUT.lmdb', help='LMDB to create (its parent folders are created)')
    parser.add_argument('--gt', metavar='GT_FOLDER', help='ground-truth folder, matched to INPUT by file name')
    parser.add_argument('--gt-output', metavar='GT.lmdb', help='LMDB for the ground truth (needs --gt)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing LMDBs')
    parser.add_argument('--verify', action='store_true', help='read every key back after building')
    parser.add_argument('--compress-level', type=int, default=1, metavar='N', help='PNG compression 0..9 (1)')
    parser.add_argument('--recursive', action='store_true', help='include images in sub-folders')


def run(args: argparse.Namespace) -> int:
    if bool(args.gt) != bool(args.gt_output):
        raise RaveError('--gt and --gt-output go together: the ground-truth folder and the LMDB to build from it.')
    options = dict(overwrite=args.overwrite, compress_level=args.compress_level, recursive=args.recursive,
                   verify=args.verify)
    if args.gt:
        summaries = make_paired_lmdb(args.input, args.gt, args.output, args.gt_output, **options)
    else:
        summaries = [make_lmdb(args.input, args.output, **options)]
    for summary in summaries:
        renamed = f', {summary["renamed_keys"]} names mapped to safe keys (see key_names.tsv)' \
            if summary['renamed_keys'] else ''
        checked = ', verified' if args.verify else ''
        print(f'{summary["lmdb_path"]}: {summary["images"]} images{renamed}{checked}')
    return 0


