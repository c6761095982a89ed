"""``python -m rave_basicsr.test -opt FILE [...]``: BasicSR's test pipeline with this plugin, for scripts that
call BasicSR the way HAT or Real-ESRGAN do (``python <package>/test.py -opt ...``). The same as ``basicsr test``:
same flags, ``experiments/`` and ``results/`` under the current directory, ``--launcher pytorch`` under torchrun.
"""
import sys

from rave_basicsr.cli.basicsr_cli import main

if __name__ == '__main__':
    sys.exit(main(['test'] + sys.argv[1:]))
