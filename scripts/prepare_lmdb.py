"""Pack image folders into LMDB: the same as `rave prepare-lmdb` (see `python scripts/prepare_lmdb.py -h`)."""
import sys

import rave_basicsr  # noqa: F401  (the torchvision shim must precede any basicsr import)
from rave_basicsr.cli.rave_cli import main

if __name__ == '__main__':
    sys.exit(main(['prepare-lmdb'] + sys.argv[1:]))
