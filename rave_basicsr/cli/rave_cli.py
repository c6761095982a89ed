"""The ``rave`` command: method tools (enhance photos, residual vectors, LMDB preparation, demo data).

Each subcommand lives in its own ``rave_basicsr/cli/*_cmd.py`` module, which defines ``COMMAND`` (its name),
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; this module only discovers and dispatches
them. Errors caused by the input (:class:`~rave_basicsr.utils.errors.RaveError`) are printed without a traceback
and exit with status 2.
"""
import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional

from rave_basicsr.utils.errors import RaveError
from rave_basicsr.version import __version__


def subcommand_modules() -> list:
    """The ``*_cmd`` modules of this folder, imported, in name order."""
    folder = Path(__file__).resolve().parent
    return [importlib.import_module(f'rave_basicsr.cli.{path.stem}') for path in sorted(folder.glob('*_cmd.py'))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='rave',
        description='Tools for CLIP-guided backlit image enhancement (RAVE, CLIP-LIT, CLIP-LIT-Latent). '
        'Training and testing run through `basicsr train` / `basicsr test`.')
    parser.add_argument('--version', action='version', version=f'rave-basicsr {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for module in subcommand_modules():
        sub = subparsers.add_parser(module.COMMAND, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, 'run', None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except RaveError as exc:
        print(f'rave {args.command}: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'rave {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
