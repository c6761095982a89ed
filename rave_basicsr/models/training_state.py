"""Saving and exact resuming of the staged models: networks and training states written atomically, and
everything exact resuming needs beyond BasicSR's optimisers and schedulers (stage counters, the random states of
every rank, the warm-up guard, the GradScaler, the encoder identities and the method's guidance state). Mixed into
:class:`~rave_basicsr.models.backlit_base_model.BacklitBaseModel`. Everything saved is tensors / numbers / strings
/ lists / dicts, loadable with ``torch.load(weights_only=True)``.
"""
import math
import random
from os import path as osp
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from rave_basicsr.utils.checkpoint import save_basicsr_network, torch_save_atomic
from rave_basicsr.utils.errors import RaveError


def rng_state() -> dict:
    """Python, NumPy, torch (and the current CUDA device's) RNG states as tensors/lists/numbers (``weights_only``
    loadable). One CUDA generator, not every visible GPU's: each rank draws from its own device only, and a run
    resumed with fewer visible GPUs must still find its state."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': [version, list(internal), gauss],
             'numpy': [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state().cpu()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (tensors may come from any device)."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'].cpu())


class TrainingStateMixin:
    """``save`` / ``resume_training`` for BasicSR's loop; needs ``schedule``, ``scaler``, ``warmup_guard``,
    ``encoder()``, ``ENCODERS`` and the guidance-state hooks from the model."""

    def save(self, epoch: int, current_iter: int) -> None:
        if hasattr(self, 'net_g_ema'):
            self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter, param_key=['params', 'params_ema'])
        else:
            self.save_network(self.net_g, 'net_g', current_iter)
        self.save_training_state(epoch, current_iter)

    def save_network(self, net, net_label: str, current_iter: int, param_key='params') -> None:
        """BasicSR's checkpoint layout (``{param_key: state_dict}``), written atomically by rank 0."""
        save_basicsr_network(self, net, net_label, current_iter, param_key)


    def extra_training_state(self) -> dict:
        """Everything beyond optimisers/schedulers that exact resuming needs (gathered on every rank)."""
        rngs = [rng_state()]
        if self.opt['dist']:
            rngs = [None] * self.opt['world_size']
            dist.all_gather_object(rngs, rng_state())
        return {'stages': self.schedule.state_dict(), 'rng': rngs,
                'scaler': self.scaler.state_dict() if self.scaler is not None else {},
                'warmup_guard': self.warmup_guard.state_dict(),
                'encoders': {key: self.encoder(key).identity for key in self.ENCODERS},
                'guidance': self.guidance_state_dict(), 'model_type': type(self).__name__}

    def save_training_state(self, epoch: int, current_iter: int) -> None:
        if current_iter == -1:
            return
        extra = self.extra_training_state()  # collective in distributed runs: every rank takes part
        if self.opt['rank'] != 0:
            return
        state = {'epoch': epoch, 'iter': current_iter,
                 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers],
                 'backlit': extra}
        torch_save_atomic(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    def resume_training(self, resume_state: dict) -> None:
        extra = resume_state.get('backlit')
        if extra is None or extra.get('model_type') != type(self).__name__:
            raise RaveError(f'the training state {self.opt["path"].get("resume_state")!r} was not written by '
                            f'{type(self).__name__}; resume with the option file of the run that wrote it.')
        super().resume_training(resume_state)
        for key, identity in extra['encoders'].items():
            if key in self.ENCODERS and self.encoder(key).identity != identity:
                raise RaveError(f'option "{key}" describes a different encoder than the interrupted run used '
                                f'({identity}); resume with the same encoder options.')
        self.schedule.load_state_dict(extra['stages'])
        self.warmup_guard.load_state_dict(extra['warmup_guard'])
        if self.scaler is not None and extra['scaler']:
            self.scaler.load_state_dict(extra['scaler'])
        self.load_guidance_state_dict(extra['guidance'])
        rngs = extra['rng']
        set_rng_state(rngs[self.opt['rank']] if self.opt['rank'] < len(rngs) else rngs[0])
        resume_state['epoch'] = self.resume_epoch(resume_state['epoch'], resume_state['iter'])
        self.logger.info(f'Resumed in {self.schedule.describe()}.')

    def resume_epoch(self, epoch: int, current_iter: int) -> int:
        """The epoch to continue with: the next one when the checkpoint closed an epoch.

        BasicSR's loop restarts the saved epoch from its first batch; for a checkpoint at an epoch's last
        iteration that would replay the finished epoch. Resuming is exact for checkpoints at epoch ends (choose
        ``save_checkpoint_freq`` as a multiple of the iterations per epoch); mid-epoch checkpoints replay the
        epoch's first batches, as in BasicSR.
        """
        per_epoch = self.iterations_per_epoch()
        if per_epoch and current_iter % per_epoch == 0 and current_iter // per_epoch > epoch:
            return current_iter // per_epoch
        return epoch

    def iterations_per_epoch(self) -> Optional[int]:
        """Iterations per epoch of BasicSR's training loader (drop_last), computed from the train set options."""
        from basicsr.data import build_dataset

        dataset_opt = (self.opt.get('datasets') or {}).get('train')
        if dataset_opt is None:
            return None
        samples = len(build_dataset(dataset_opt)) * dataset_opt.get('dataset_enlarge_ratio', 1)
        per_rank = math.ceil(samples / self.opt['world_size'])
        return per_rank // dataset_opt['batch_size_per_gpu'] or None
