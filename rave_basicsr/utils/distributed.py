"""Distributed set-up for BasicSR's pipelines (torchrun or slurm; nccl on GPUs, gloo on CPUs), and ending every rank
at once when one fails.

A distributed run must never hang when one rank fails. A rank that raises announces the failure in the
process group's key-value store and exits at once; every rank watches that key from a background thread and
exits with the failed rank's message within seconds, even while it runs rank-0-only work (validation, the RAVE
residual) or waits in an nccl collective, which would otherwise only fail at the collective timeout. Launchers
handle ranks that die without a word (``torchrun`` stops the others and names the rank; under slurm use
``srun --kill-on-bad-exit=1``).
"""
import datetime
import os
import subprocess
import sys
import threading
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from rave_basicsr.utils.options import OptionError

TORCHRUN_HINT = ('launch distributed runs with torchrun, e.g. '
                 '`torchrun --nproc_per_node=2 -m rave_basicsr.cli.basicsr_cli train -opt FILE --launcher pytorch`')


#: seconds a collective waits for the other ranks before failing (``dist_params: timeout``). Generous, because
#: rank 0 alone validates (NIQE, LPIPS at 1024 px) and computes the RAVE residual while the others wait; the
#: libraries' defaults (10 minutes for nccl) end such runs with a watchdog error.
DEFAULT_DIST_TIMEOUT = 7200


def distributed_timeout(dist_params: Optional[dict]) -> datetime.timedelta:
    """``dist_params: timeout`` (seconds, default :data:`DEFAULT_DIST_TIMEOUT`) as a timedelta."""
    seconds = (dist_params or {}).get('timeout', DEFAULT_DIST_TIMEOUT)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise OptionError(f'dist_params:timeout must be a positive number of seconds, got {seconds!r}.')
    return datetime.timedelta(seconds=seconds)


def gpu_for_local_rank(local_rank: int, launcher: str) -> int:
    """The GPU of a process: its local rank, which must name a visible GPU (two ranks on one GPU make nccl fail
    with "duplicate GPU")."""
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise OptionError(f'local rank {local_rank} has no GPU of its own: {count} GPU(s) are visible '
                          f'(CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}). Start at most '
                          f'{count} process(es) per node ({"--nproc_per_node" if launcher == "pytorch" else "--ntasks-per-node"}), '
                          'or set num_gpu: 0 to train on the CPU.')
    return local_rank


def init_distributed(launcher: str, num_gpu, dist_params: Optional[dict] = None) -> None:
    """Initialise torch.distributed for ``torchrun`` (pytorch) or slurm launches.

    The backend is nccl when the run uses GPUs and gloo otherwise; ``dist_params: {backend: ...}`` is honoured
    on GPUs only (option files written for GPUs say nccl, which cannot run on a CPU-only machine). As in BasicSR,
    ``dist_params: {port: ...}`` applies to slurm launches; ``dist_params: {timeout: seconds}`` bounds how long a
    collective waits (:data:`DEFAULT_DIST_TIMEOUT`).
    """
    dist_params = dict(dist_params or {})
    timeout = distributed_timeout(dist_params)
    use_cuda = torch.cuda.is_available() and num_gpu not in (0, '0')
    backend = dist_params.get('backend', 'nccl') if use_cuda else 'gloo'
    if launcher == 'pytorch':
        missing = [key for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if key not in os.environ]
        if missing:
            raise OptionError(f'--launcher pytorch needs the environment variables {", ".join(missing)}, which '
                              f'torchrun sets: {TORCHRUN_HINT}.')
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
    elif launcher == 'slurm':
        if 'SLURM_PROCID' not in os.environ:
            raise OptionError('--launcher slurm must run inside a slurm job step (srun): SLURM_PROCID is not set.')
        proc_id, ntasks = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
        local_rank = int(os.environ.get('SLURM_LOCALID', proc_id % max(torch.cuda.device_count(), 1)))
        node_list = os.environ['SLURM_NODELIST']
        os.environ.setdefault('MASTER_ADDR', subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1'))
        os.environ['MASTER_PORT'] = str(dist_params.get('port', os.environ.get('MASTER_PORT', 29500)))
        os.environ.update(WORLD_SIZE=str(ntasks), RANK=str(proc_id), LOCAL_RANK=str(local_rank))
    else:
        raise OptionError(f'unknown launcher {launcher!r}; use none, pytorch or slurm.')
    if use_cuda:
        torch.cuda.set_device(gpu_for_local_rank(local_rank, launcher))
    dist.init_process_group(backend=backend, timeout=timeout)
    watch_for_failures()


def wrap_for_device(net: torch.nn.Module, device: torch.device, opt: dict) -> torch.nn.Module:
    """A network on ``device``, wrapped as BasicSR's ``model_to_device`` does (DDP in distributed runs,
    DataParallel for several GPUs in one process), but working for CPU DDP (gloo) too: no ``device_ids`` there."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    net = net.to(device)
    if opt['dist']:
        device_ids = [torch.cuda.current_device()] if device.type == 'cuda' else None
        return DistributedDataParallel(net, device_ids=device_ids,
                                       find_unused_parameters=opt.get('find_unused_parameters', False))
    if opt['num_gpu'] > 1:
        return DataParallel(net)
    return net


#: the store key a failing rank writes its message under
FAILURE_KEY = 'rave_basicsr/failure'
#: how often each rank looks for that key (seconds)
FAILURE_POLL_SECONDS = 2.0


def _default_store():
    """The process group's key-value store, or None (not initialised, or a PyTorch without the accessor)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # the accessor is private API: without it, failures end ranks through the launcher alone
        return None


def exit_now(message: str, code: int) -> None:
    """Print ``message`` to stderr and end the process at once, skipping interpreter teardown (where nccl's
    destructors can wait for peers that will never answer)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


class _FailureWatch(NamedTuple):
    thread: threading.Thread
    stop: threading.Event


#: this process's failure watch (:func:`watch_for_failures`), stopped by :func:`end_distributed_run`
_watch: Optional[_FailureWatch] = None


def watch_for_failures(poll_seconds: float = FAILURE_POLL_SECONDS) -> Optional[threading.Thread]:
    """Start the daemon thread that ends this rank when another rank announces a failure (see the module
    docstring). A store that stops answering ends the watch, not the rank: the run may simply be over."""
    global _watch
    store = _default_store()
    if store is None:
        return None
    rank = dist.get_rank()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll_seconds):
            try:
                if not store.check([FAILURE_KEY]):
                    continue
                message = store.get(FAILURE_KEY).decode('utf-8', errors='replace')
            except Exception:  # the store's host has gone: nothing more to watch
                return
            exit_now(f'rank {rank}: stopping because {message}', 1)

    thread = threading.Thread(target=watch, name='rave-failure-watch', daemon=True)
    thread.start()
    _watch = _FailureWatch(thread, stop)
    return thread


def end_distributed_run() -> None:
    """Close a distributed run that finished normally (no-op otherwise): wait until every rank is done (rank 0 may
    still be saving or validating), stop the failure watch, and destroy the process group.

    Without this, each rank tore the interpreter down with its process group alive and the watch thread possibly
    inside a store call, and a rank could abort there ("terminate called without an active exception") after a
    finished run, which the launcher then reports as failed."""
    global _watch
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # a failure announced meanwhile still ends this rank through the watch
    if _watch is not None:
        _watch.stop.set()
        _watch.thread.join(timeout=5 * FAILURE_POLL_SECONDS)
        _watch = None
    dist.destroy_process_group()


def announce_failure(message: str) -> None:
    """Tell every rank that this one failed with ``message`` (best effort; no-op outside distributed runs)."""
    store = _default_store() if dist.is_available() and dist.is_initialized() else None
    if store is None:
        return
    try:
        store.set(FAILURE_KEY, f'rank {dist.get_rank()} failed: {message}')
    except Exception:  # the store's host has gone: the launcher ends the others
        pass
