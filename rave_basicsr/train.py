"""``python -m rave_basicsr.train -opt FILE [...]``: BasicSR's train pipeline with this plugin, for scripts that
call BasicSR the way HAT or Real-ESRGAN do (``python <package>/train.py -opt ...``). The same as ``basicsr train``:
same flags, ``experiments/`` and ``results/`` under the current directory, ``--launcher pytorch`` under torchrun.
"""
import sys

from rave_basicsr.cli.basicsr_cli import main

if __name__ == '__main__':
    sys.exit(main(['train'] + sys.argv[1:]))
