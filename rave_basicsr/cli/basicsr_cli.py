"""The ``basicsr`` command: BasicSR's train / test pipelines with every installed plugin loaded.

Parsing and messages only; the work is BasicSR's ``train_pipeline`` / ``test_pipeline`` (run and patched by
:mod:`rave_basicsr.compat`) and :mod:`rave_basicsr.utils.plugins`.
"""
import sys
import traceback
from typing import List, Optional

from rave_basicsr.compat import run_basicsr_pipeline
from rave_basicsr.utils.checkpoint import CheckpointWriteError
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.plugins import load_plugins, registered_components

USAGE = """usage: basicsr {train,test,list} ...

Run BasicSR with its installed plugins (entry-point group "basicsr.plugins").

commands:
  train -opt FILE [--launcher none|pytorch|slurm] [--auto_resume] [--debug] [--force_yml k:k=v ...]
                  train with BasicSR's training loop (experiments/ and tb_logger/ under the current directory)
  test -opt FILE [...]   run BasicSR's test pipeline (results/ under the current directory)
  list                   print the registered archs, models, losses, datasets and metrics and their plugins

`basicsr train --help` describes the flags. Distributed: torchrun --nproc_per_node=N $(which basicsr) train
-opt FILE --launcher pytorch (nccl on GPUs, gloo on CPU-only machines).
"""


def print_registry_listing() -> None:
    """Print every registered component grouped by registry, with the plugin that provides it."""
    load_plugins()
    for registry_name, rows in registered_components().items():
        print(f'{registry_name} ({len(rows)}):')
        width = max((len(name) for name, _ in rows), default=0)
        for name, origin in rows:
            print(f'  {name:<{width}}  [{origin}]')


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in ('train', 'test'):
            run_basicsr_pipeline(command, rest)
        elif command == 'list':
            print_registry_listing()
        else:
            print(f'basicsr: unknown command {command!r}\n\n{USAGE}', file=sys.stderr)
            return 2
    except Exception as exc:
        if isinstance(exc, CheckpointWriteError) and command == 'train':
            again = ' '.join(arg for arg in rest if arg != '--auto_resume')
            exc = CheckpointWriteError(f'{exc} Training stopped there. Free space (or fix the folder), then continue '
                                       f'with: basicsr train {again} --auto_resume (it resumes from the newest '
                                       'complete checkpoint).')
        end_distributed_run_on_error(command, exc)
        if not isinstance(exc, RaveError):
            raise
        print(f'basicsr {command}: error: {exc}', file=sys.stderr)
        return 2
    return 0


def end_distributed_run_on_error(command: str, exc: Exception) -> None:
    """In a distributed run, report ``exc`` with this rank's number, tell the other ranks, and exit at once (they
    stop within seconds instead of waiting in a collective until the timeout). Returns outside distributed runs."""
    import torch.distributed as dist

    from rave_basicsr.utils.distributed import announce_failure, exit_now

    if not (dist.is_available() and dist.is_initialized()):
        return
    rank = dist.get_rank()
    summary = str(exc) if isinstance(exc, RaveError) else f'{type(exc).__name__}: {exc}'
    if not isinstance(exc, RaveError):
        traceback.print_exc()
    announce_failure(summary)
    exit_now(f'basicsr {command}: rank {rank}: error: {summary}', 2 if isinstance(exc, RaveError) else 1)


if __name__ == '__main__':
    sys.exit(main())
