"""The staged model base shared by RAVE, CLIP-LIT and CLIP-LIT-Latent (spec §1.3, §1.5, §1.6).

``BacklitBaseModel`` is a BasicSR ``BaseModel`` (not registered itself) holding what the methods share:

* the enhancement network ``network_g`` (e.g. ``BacklitUNet``), with BasicSR's optional EMA copy;
* frozen encoders built by :func:`rave_basicsr.guidance.encoders.build_image_encoder` from top-level option blocks
  (``identity_encoder``, ``guidance_encoder``, ...). They live in ``self.encoders`` (a plain dict), so they are never
  in a saved state dict, never in an optimiser and never switched to train mode;
* the identity loss (``train: identity_opt``, default ``CLIPIdentityLoss`` 22.5 × layer weights [1, 1, 1, 1, 0.5])
  and the identity warm-up stage (``train: warmup``: ``iters`` 1000, ``identity_opt`` 25 × [1, 1, 1, 1, 1], and the
  originals' re-initialisation guard: when the mean Y-PSNR(input, output) of the last ``reinit_window`` warm-up
  iterations is below ``reinit_psnr`` dB after ``reinit_after`` warm-up iterations, re-initialise the network and its
  optimiser and lengthen the warm-up by ``reinit_extend``; ``reinit_psnr: ~`` turns the guard off; ``optim``: an own
  optimiser for the warm-up, e.g. ``{type: Adam, lr: !!float 1e-3}``; default: the network's ``optim_g``, as the
  originals);
* stage bookkeeping by iteration (:mod:`rave_basicsr.models.stages`), per-stage optimisers, mixed precision
  (``train: mixed_precision: bf16 | fp16 | ~``; fp16 uses a GradScaler on CUDA) and ``train: channels_last``;
* validation (paired: BasicSR metrics and the RAVE protocol; unpaired: NIQE and the guidance score), images saved,
  tensorboard grids of input / output / illumination map;
* atomic saving and exact resuming (stage counters, RNG states, guard state, scaler, encoder identities and the
  subclass's guidance state are part of the training state, all loadable with ``torch.load(weights_only=True)``).

How a subclass declares its method:

* ``ENCODERS``: ``{option key: role}`` of the encoders it needs for training (roles as in ``build_image_encoder``).
* ``define_stages(train_opt) -> StageSchedule``: the stage sequence, rounds and extension rules; each stage names an
  optimiser key. ``self.warmup_stage(train_opt)`` gives the shared warm-up :class:`StageSpec` (name ``warmup``).
* ``define_optimizers(train_opt) -> {key: (parameters, optim_options)}``: one optimiser per key, in a fixed order
  (that order is the order of ``self.optimizers``, which BasicSR saves and restores). Default: ``net_g`` from
  ``train: optim_g``.
* ``setup_guidance(train_opt, resuming)``: build guidance losses and state (``resuming`` is True when the state
  will come from a training state: do not recompute it).
* ``stage_loss(stage) -> (total loss tensor, {name: tensor})`` for the stages it adds (the base handles
  ``warmup``); ``guidance_state_dict()`` / ``load_guidance_state_dict(state)`` for its resumable guidance state;
  ``guidance_direction()`` (a [D] vector for the guidance score, or None); ``on_stage_start(stage)`` (optional).
"""
import inspect
import math
import random
from collections import OrderedDict, deque
from contextlib import nullcontext
from os import path as osp
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.metrics.psnr_ssim import calculate_psnr_pt
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.registry import METRIC_REGISTRY
from torchvision.utils import make_grid

from rave_basicsr.models.stages import StageSchedule, StageSpec
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.checkpoint import save_basicsr_network, torch_save_atomic
from rave_basicsr.utils.distributed import wrap_for_device
from rave_basicsr.utils.image_io import encode_image, write_image_atomic

#: metrics computed by the model itself from the output tensor (not from uint8 images)
MODEL_METRICS = ('calculate_guidance_score',)
DEFAULT_IDENTITY_OPT = {'type': 'CLIPIdentityLoss', 'loss_weight': 22.5, 'layer_weights': [1, 1, 1, 1, 0.5],
                        'batch_reduction': 'sum'}
DEFAULT_WARMUP = {'iters': 1000, 'reinit_psnr': 8.0, 'reinit_after': 100, 'reinit_window': 30,
                  'reinit_extend': 100,
                  'identity_opt': {'type': 'CLIPIdentityLoss', 'loss_weight': 25.0, 'layer_weights': [1, 1, 1, 1, 1],
                                   'batch_reduction': 'sum'}}


#: an fp16 loss scale below this, with gradients still overflowing, means training diverged (from the initial
#: 65536 it takes 26 consecutive overflowing steps)
FP16_MIN_LOSS_SCALE = 2.0 ** -10


class TrainingDivergedError(RaveError):
    """A non-finite loss or gradient: training stops before the weights are touched (last checkpoint kept)."""


def metric_needs_reference(metric_type: str) -> bool:
    """True for full-reference metrics (their function takes ``img2``, the ground truth)."""
    if metric_type in MODEL_METRICS:
        return False
    return 'img2' in inspect.signature(METRIC_REGISTRY.get(metric_type)).parameters


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


class BacklitBaseModel(BaseModel):
    """Shared staged model; see the module docstring for the subclass contract."""

    #: option key -> encoder role (``build_image_encoder``); encoders needed for training
    ENCODERS: Dict[str, str] = {'identity_encoder': 'identity'}

    def __init__(self, opt: dict) -> None:
        super().__init__(opt)
        self.logger = get_root_logger()
        train_opt = opt.get('train') or {}
        self.channels_last = bool(train_opt.get('channels_last', False))
        self.net_g = build_network(opt['network_g'])
        if self.channels_last:
            self.net_g = self.net_g.to(memory_format=torch.channels_last)
        self.net_g = self.model_to_device(self.net_g)
        self.print_network(self.net_g)
        load_path = opt['path'].get('pretrain_network_g')
        if load_path is not None:
            param_key = opt['path'].get('param_key_g', 'params')
            self.load_network(self.net_g, load_path, opt['path'].get('strict_load_g', True), param_key)
        self.encoders: Dict[str, torch.nn.Module] = {}
        self.schedule: Optional[StageSchedule] = None
        self.scaler = None
        self.autocast_dtype = None  # set by setup_precision when training
        self.log_dict = OrderedDict()
        self._messages_shown = set()
        if self.is_train:
            self.init_training_settings()

    # ------------------------------------------------------------------ set-up
    def encoder(self, key: str) -> torch.nn.Module:
        """The frozen encoder of option block ``key`` (built on first use, shared between identical blocks)."""
        from rave_basicsr.guidance.encoders import build_image_encoder

        if key not in self.encoders:
            block = self.opt.get(key)
            if block is None:
                raise RaveError(f'option "{key}" is missing: it configures the encoder this model needs '
                                '(see docs/training.md).')
            role = self.ENCODERS.get(key, 'guidance')
            for other, encoder in self.encoders.items():
                if self.opt.get(other) == block and self.ENCODERS.get(other, 'guidance') == role:
                    self.encoders[key] = encoder
                    break
            else:
                self.encoders[key] = build_image_encoder(block, role=role, where=key).to(self.device)
        return self.encoders[key]

    def init_training_settings(self) -> None:
        train_opt = self.opt['train']
        self.net_g.train()
        self.ema_decay = train_opt.get('ema_decay', 0)
        if self.ema_decay > 0:
            self.net_g_ema = build_network(self.opt['network_g']).to(self.device)
            load_path = self.opt['path'].get('pretrain_network_g')
            if load_path is not None:
                self.load_network(self.net_g_ema, load_path, self.opt['path'].get('strict_load_g', True),
                                  'params_ema')
            else:
                self.model_ema(0)
            self.net_g_ema.eval()
        for key in self.ENCODERS:
            self.encoder(key)
        self.cri_identity = build_loss(dict(train_opt.get('identity_opt') or DEFAULT_IDENTITY_OPT))
        warmup = dict(DEFAULT_WARMUP, **(train_opt.get('warmup') or {}))
        self.warmup_opt = warmup
        self.cri_warmup = build_loss(dict(warmup['identity_opt']))
        self.psnr_window = deque(maxlen=int(warmup['reinit_window']))
        self.reinit_count = 0
        self.setup_precision(train_opt)
        resuming = bool(self.opt['path'].get('resume_state'))
        self.setup_guidance(train_opt, resuming)
        self.schedule = self.define_stages(train_opt)
        self.setup_optimizers()
        self.setup_schedulers()
        self.logger.info('Training stages: ' + ', '.join(
            f'{s.name} ({"open-ended" if s.length is None else s.length} it, optimiser {s.optimizer})'
            for s in self.schedule.specs) + (f'; rounds repeat {self.schedule.num_rounds or "until total_iter"}'
                                             if self.schedule.rounds else ''))

    def setup_precision(self, train_opt: dict) -> None:
        """``mixed_precision: bf16 | fp16 | ~``: autocast of the network and the encoders (losses stay float32).

        bf16 needs native hardware support on a GPU (Ampere or newer; older GPUs emulate it); on a CPU without it
        the run works but is slow, which is said once. fp16 scales the loss with a GradScaler, on CUDA as on the
        CPU (where it is emulated and slow, but the same code path runs).
        """
        from rave_basicsr.utils.hardware import native_bf16

        mode = train_opt.get('mixed_precision')
        self.autocast_dtype = None
        if mode in (None, False, 'fp32', 'none'):
            return
        if mode == 'bf16':
            if not native_bf16(self.device):
                if self.device.type == 'cuda':
                    raise RaveError('train:mixed_precision is bf16 but this GPU has no native bfloat16 (it needs '
                                    'Ampere or newer); use fp16 or ~.')
                self.logger.warning('train:mixed_precision bf16: this CPU has no native bfloat16 (AVX512_BF16 or '
                                    'AMX); it is emulated and slower than float32 here.')
            self.autocast_dtype = torch.bfloat16
        elif mode == 'fp16':
            if self.device.type != 'cuda':
                self.logger.warning('train:mixed_precision fp16 on the CPU is emulated and slow; it is meant for '
                                    'GPUs (bf16 is the fast reduced precision of CPUs that have it).')
            self.autocast_dtype = torch.float16
            self.scaler = torch.amp.GradScaler(self.device.type)
        else:
            raise RaveError(f'train:mixed_precision must be bf16, fp16 or ~ (off), got {mode!r}.')

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def warmup_stage(self, train_opt: dict) -> StageSpec:
        """The shared identity warm-up stage (0 iterations: guided training from the start)."""
        iters = self.warmup_opt['iters']
        if not isinstance(iters, int) or iters < 0:
            raise RaveError(f'train:warmup:iters must be an integer >= 0 (0 skips the warm-up), got {iters!r}.')
        return StageSpec('warmup', iters, 'net_g_warmup' if self.warmup_opt.get('optim') else 'net_g')

    def define_optimizers(self, train_opt: dict) -> Dict[str, Tuple[List[torch.nn.Parameter], dict]]:
        """Optimiser key -> (parameters, options); the base trains the network with ``train: optim_g``."""
        params = [p for p in self.net_g.parameters() if p.requires_grad]
        optimizers = OrderedDict(net_g=(params, train_opt['optim_g']))
        if self.warmup_opt.get('optim'):  # a warm-up with its own optimiser (e.g. a higher lr for short demos)
            optimizers['net_g_warmup'] = (params, self.warmup_opt['optim'])
        return optimizers

    def build_optimizer(self, params, options: dict, where: str) -> torch.optim.Optimizer:
        options = dict(options)
        kind = options.pop('type', 'Adam')
        if kind not in ('Adam', 'AdamW', 'SGD'):
            raise RaveError(f'train:{where}:type must be Adam, AdamW or SGD, got {kind!r}.')
        return getattr(torch.optim, kind)(params, **options)

    def setup_optimizers(self) -> None:
        self.optimizer_specs = self.define_optimizers(self.opt['train'])
        self.optimizer_by_name = OrderedDict()
        for key, (params, options) in self.optimizer_specs.items():
            self.optimizer_by_name[key] = self.build_optimizer(params, options, key)
        self.optimizers = list(self.optimizer_by_name.values())
        for spec in self.schedule.specs:
            if spec.optimizer not in self.optimizer_by_name:
                raise RaveError(f'stage "{spec.name}" uses optimiser "{spec.optimizer}", which is not defined '
                                f'(defined: {list(self.optimizer_by_name)}).')

    def setup_schedulers(self) -> None:
        """BasicSR's schedulers, or none when ``train: scheduler`` is absent or has ``type: ~`` (the originals)."""
        scheduler = self.opt['train'].get('scheduler')
        self.schedulers = []
        if not scheduler or scheduler.get('type') is None:
            return
        saved = self.opt['train']['scheduler']
        self.opt['train']['scheduler'] = dict(saved)  # BasicSR pops 'type'; keep the option intact
        try:
            super().setup_schedulers()
        finally:
            self.opt['train']['scheduler'] = saved

    # ------------------------------------------------------------------ subclass hooks
    def setup_guidance(self, train_opt: dict, resuming: bool) -> None:
        """Build the guidance losses and state (none in the base)."""

    def define_stages(self, train_opt: dict) -> StageSchedule:
        raise NotImplementedError

    def stage_loss(self, stage: StageSpec) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if stage.name == 'warmup':
            return self.warmup_loss()
        raise NotImplementedError(f'{type(self).__name__} has no loss for stage {stage.name!r}')

    def guidance_state_dict(self) -> dict:
        return {}

    def load_guidance_state_dict(self, state: dict) -> None:
        """Restore what ``guidance_state_dict`` saved."""

    def guidance_direction(self) -> Optional[torch.Tensor]:
        """A [D] direction in the guidance encoder's space for the guidance score (None: not defined)."""
        return None

    def on_stage_start(self, stage: StageSpec) -> None:
        """Called when a new stage begins (after the previous one ended)."""

    # ------------------------------------------------------------------ training
    def feed_data(self, data: dict) -> None:
        self.lq = data['lq'].to(self.device)
        if self.channels_last:
            self.lq = self.lq.contiguous(memory_format=torch.channels_last)
        if 'gt' in data:
            self.gt = data['gt'].to(self.device)
        elif hasattr(self, 'gt'):
            del self.gt

    def identity_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        return self.encoder('identity_encoder').encode_image_features(images)

    def warmup_loss(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """25 · L_id(output, input; [1, 1, 1, 1, 1]): the network learns the identity mapping (L ≈ 1)."""
        self.output = self.net_g(self.lq)
        with torch.no_grad():
            target = self.identity_features(self.lq)
        loss = self.cri_warmup(self.identity_features(self.output), target)
        return loss, {'l_id': loss}

    def optimize_parameters(self, current_iter: int) -> None:
        stage = self.schedule.current
        optimizer = self.optimizer_by_name[stage.optimizer]
        optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, parts = self.stage_loss(stage)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        self.check_finite(loss, optimizer, current_iter, stage)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        parts = OrderedDict((f'{stage.name}/{name}', value.detach().float()) for name, value in parts.items())
        parts[f'{stage.name}/l_total'] = loss.detach().float()
        self.log_dict = self.reduce_loss_dict(parts)  # BasicSR reduces it to rank 0 only: for logging alone
        self.monitored_loss = self.all_ranks_mean(loss.detach().float())  # what decisions use: equal on every rank
        if stage.name == 'warmup':
            self.reinit_guard()
        if self.schedule.step(self.monitored_loss):
            self.logger.info(f'Iteration {current_iter}: stage "{stage.name}" ended; now {self.schedule.describe()}.')
            self.on_stage_start(self.schedule.current)

    def all_ranks_mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over ranks (every rank gets it: stage decisions must agree)."""
        if self.opt['dist']:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.opt['world_size']
        return float(value)

    def check_finite(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, current_iter: int,
                     stage: StageSpec) -> None:
        """Stop before the optimiser step when the loss or a gradient is NaN/Inf (on any rank).

        With fp16's GradScaler, overflowing gradients are expected now and then (the scaler skips that step and
        halves its scale); only when they keep overflowing until the scale falls below
        :data:`FP16_MIN_LOSS_SCALE` has training diverged.
        """
        finite = torch.isfinite(loss.detach()).all()
        grads_finite = torch.ones((), dtype=torch.bool, device=finite.device)
        for group in optimizer.param_groups:
            for param in group['params']:
                if param.grad is not None:
                    grads_finite = grads_finite & torch.isfinite(param.grad).all()
        if self.scaler is None:
            finite = finite & grads_finite
        elif self.scaler.get_scale() < FP16_MIN_LOSS_SCALE:
            finite = finite & grads_finite
        flag = finite.float().reshape(1)
        if self.opt['dist']:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() < 1:
            where = self.opt['path'].get('models', 'the models folder')
            scale = '' if self.scaler is None else f', fp16 loss scale {self.scaler.get_scale():.3g}'
            raise TrainingDivergedError(
                f'iteration {current_iter} ({self.schedule.describe()}): the loss or its gradient is NaN/Inf '
                f'(loss = {float(loss.detach()):.4g}{scale}); training stopped before updating the weights. The last '
                f'good checkpoint is the newest one in {where}. Lower train:optim_g:lr, turn off '
                'train:mixed_precision (or use bf16), or check the training images, then resume with --auto_resume.')

    def reinit_guard(self) -> None:
        """The originals' warm-up guard: re-initialise a network whose output stays far from its input."""
        threshold = self.warmup_opt.get('reinit_psnr')
        if threshold is None:
            return
        with torch.no_grad():
            psnr = calculate_psnr_pt(self.output.detach().float().clamp(0, 1), self.lq.float(), crop_border=0,
                                     test_y_channel=True).mean()
        self.psnr_window.append(self.all_ranks_mean(psnr))
        if (self.schedule.iter_in_stage + 1 > int(self.warmup_opt['reinit_after'])
                and len(self.psnr_window) == self.psnr_window.maxlen
                and sum(self.psnr_window) / len(self.psnr_window) < float(threshold)):
            self.reinitialise_network()

    def reinitialise_network(self) -> None:
        net = self.get_bare_model(self.net_g)
        if not hasattr(net, 'reset_parameters'):
            raise RaveError(f'train:warmup:reinit_psnr needs a network with reset_parameters(); '
                            f'{type(net).__name__} has none. Set train:warmup:reinit_psnr: ~.')
        net.reset_parameters()
        if self.opt['dist']:
            for tensor in net.state_dict().values():
                dist.broadcast(tensor, 0)
        key = self.schedule.current.optimizer
        params, options = self.optimizer_specs[key]
        self.optimizer_by_name[key] = self.build_optimizer(params, options, key)
        self.optimizers = list(self.optimizer_by_name.values())
        self.schedule.extend(int(self.warmup_opt['reinit_extend']))
        self.psnr_window.clear()
        self.reinit_count += 1
        self.logger.warning(f'Warm-up: mean Y-PSNR(input, output) stayed below {self.warmup_opt["reinit_psnr"]} '
                            f'dB; network re-initialised (#{self.reinit_count}), warm-up lengthened by '
                            f'{self.warmup_opt["reinit_extend"]} iterations.')

    def get_current_log(self) -> dict:
        return dict(self.log_dict)

    # ------------------------------------------------------------------ inference
    def test(self) -> None:
        """Enhance ``self.lq`` (EMA network when present) into ``self.output`` and ``self.illumination``.

        Always in float32, also in mixed-precision training (validation figures stay comparable between runs and
        with ``basicsr test``). ``val: tile`` tiles large images exactly, as ``rave enhance`` does: ``~`` (default)
        tiles images above one megapixel, 0 never, N uses N-px tiles; 12-24 MP photos then fit on any GPU.
        """
        from rave_basicsr.archs.backlit_unet_arch import BacklitUNet
        from rave_basicsr.inference.enhancer import Enhancer

        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.get_bare_model(self.net_g)
        if isinstance(net, BacklitUNet):
            tile = (self.opt.get('val') or {}).get('tile')
            self.output, self.illumination = Enhancer.for_model(net).enhance(self.lq, tile, return_illumination=True)
            return
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output, self.illumination = net(self.lq).float(), None
        net.train(was_training)

    def get_current_visuals(self) -> dict:
        visuals = OrderedDict(lq=self.lq.detach().cpu(), result=self.output.detach().cpu())
        if hasattr(self, 'gt'):
            visuals['gt'] = self.gt.detach().cpu()
        return visuals

    # ------------------------------------------------------------------ validation
    def dist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """As BasicSR's SRModel: validation runs on rank 0 only."""
        if self.opt['rank'] == 0:
            self.nondist_validation(dataloader, current_iter, tb_logger, save_img)

    def _once(self, key: str, message: str) -> None:
        if key not in self._messages_shown:
            self._messages_shown.add(key)
            self.logger.warning(message)

    def usable_metrics(self, dataset_opt: dict) -> Dict[str, dict]:
        """The configured metrics that run on this set: ``val:metrics``, or the names listed in the dataset's
        ``metrics`` option; unavailable optional ones (LPIPS) are skipped with one message."""
        from rave_basicsr.metrics.rave_protocol_metric import lpips_unavailable_reason

        configured = self.opt['val'].get('metrics') or {}
        selected = dataset_opt.get('metrics')
        if selected is not None:
            unknown = [name for name in selected if name not in configured]
            if unknown:
                raise RaveError(f'datasets:{dataset_opt.get("name")}:metrics names {unknown}, which val:metrics '
                                f'does not define (defined: {list(configured)}).')
            configured = OrderedDict((name, configured[name]) for name in selected)
        usable = OrderedDict()
        for name, metric_opt in configured.items():
            kind = metric_opt.get('type')
            if kind == 'calculate_rave_lpips':
                reason = lpips_unavailable_reason(metric_opt.get('net', 'alex'))
                if reason:
                    self._once(f'lpips:{name}', f'metric "{name}" (LPIPS) skipped: {reason}')
                    continue
            if kind == 'calculate_guidance_score' and self.guidance_direction() is None:
                self._once(f'guidance:{name}', f'metric "{name}" skipped: {type(self).__name__} has no guidance '
                                               'direction (a residual vector) yet.')
                continue
            usable[name] = metric_opt
        return usable

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """Validate without touching the training RNG (a resumed run skips this validation)."""
        with torch.random.fork_rng(devices=[]):
            self._validate(dataloader, current_iter, tb_logger, save_img)

    def _validate(self, dataloader, current_iter, tb_logger, save_img) -> None:
        dataset_name = dataloader.dataset.opt['name']
        val_opt = self.opt['val']
        metrics = self.usable_metrics(dataloader.dataset.opt)
        sums = {name: 0.0 for name in metrics}
        counts = {name: 0 for name in metrics}
        tb_images = int(val_opt.get('tb_images', 1))
        for idx, val_data in enumerate(dataloader):
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            self.feed_data(val_data)
            needs_gt = [name for name, m in metrics.items() if metric_needs_reference(m['type'])]
            if needs_gt and 'gt' not in val_data:
                raise RaveError(f'validation set "{dataset_name}": metrics {needs_gt} need ground truth, but '
                                f'"{img_name}" has none. Set datasets:<val>:dataroot_gt to the ground-truth folder, '
                                'or use no-reference metrics (calculate_niqe, calculate_guidance_score).')
            self.test()
            result_img = tensor2img([self.output.detach().cpu()])
            gt_img = tensor2img([self.gt.detach().cpu()]) if hasattr(self, 'gt') else None
            for name, metric_opt in metrics.items():
                value = self.compute_metric(name, metric_opt, result_img, gt_img, img_name)
                if value is not None:
                    sums[name] += value
                    counts[name] += 1
            if save_img:
                self.save_visual(dataset_name, img_name, current_iter)
            if tb_logger is not None and idx < tb_images:
                self.log_grid(tb_logger, dataset_name, img_name, current_iter)
        for attr in ('lq', 'gt', 'output', 'illumination'):
            if hasattr(self, attr):
                delattr(self, attr)
        results = {name: sums[name] / counts[name] for name in metrics if counts[name]}
        self.log_validation(dataset_name, current_iter, results, tb_logger)

    def compute_metric(self, name: str, metric_opt: dict, result_img: np.ndarray, gt_img: Optional[np.ndarray],
                       img_name: str) -> Optional[float]:
        options = {k: v for k, v in metric_opt.items() if k != 'better'}
        kind = options['type']
        if kind == 'calculate_guidance_score':
            return float(METRIC_REGISTRY.get(kind)(self.output, self.encoder('guidance_encoder'),
                                                   self.guidance_direction()))
        if kind == 'calculate_niqe' and min(result_img.shape[:2]) < 96:
            self._once(f'niqe:{img_name}', f'metric "{name}" (NIQE) skipped for "{img_name}": it needs images of '
                                           f'at least 96 px, this one is {result_img.shape[1]}x{result_img.shape[0]}.')
            return None
        data = {'img': result_img}
        if metric_needs_reference(kind):
            data['img2'] = gt_img
        return float(calculate_metric(data, options))

    def save_visual(self, dataset_name: str, img_name: str, current_iter: int) -> None:
        if self.opt['is_train']:
            path = osp.join(self.opt['path']['visualization'], img_name, f'{img_name}_{current_iter}.png')
        else:
            suffix = self.opt['val'].get('suffix')
            stem = f'{img_name}_{suffix}' if suffix else f'{img_name}_{self.opt["name"]}'
            path = osp.join(self.opt['path']['visualization'], dataset_name, f'{stem}.png')
        rgb = self.output[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        write_image_atomic(path, encode_image(rgb, '.png'))

    def log_grid(self, tb_logger, dataset_name: str, img_name: str, current_iter: int) -> None:
        """Input / output / illumination map (scaled to its max) side by side in tensorboard."""
        tiles = [self.lq[0].float().cpu().clamp(0, 1), self.output[0].cpu()]
        if self.illumination is not None:
            light = self.illumination[0].cpu()
            tiles.append((light / light.max().clamp_min(1e-8)).expand(3, -1, -1))
        tb_logger.add_image(f'val_{dataset_name}/{img_name}', make_grid(tiles, nrow=len(tiles), padding=2),
                            current_iter)

    def log_validation(self, dataset_name: str, current_iter: int, results: dict, tb_logger) -> None:
        self.validation_results = dict(results)
        message = f'Validation {dataset_name}\n'
        for name, value in results.items():
            message += f'\t # {name}: {value:.4f}\n'
        self.logger.info(message)
        if tb_logger is not None:
            for name, value in results.items():
                tb_logger.add_scalar(f'metrics/{dataset_name}/{name}', value, current_iter)

    # ------------------------------------------------------------------ saving and resuming
    def save(self, epoch: int, current_iter: int) -> None:
        if hasattr(self, 'net_g_ema'):
            self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter, param_key=['params', 'params_ema'])
        else:
            self.save_network(self.net_g, 'net_g', current_iter)
        self.save_training_state(epoch, current_iter)

    def save_network(self, net, net_label: str, current_iter: int, param_key='params') -> None:
        """BasicSR's checkpoint layout (``{param_key: state_dict}``), written atomically by rank 0."""
        save_basicsr_network(self, net, net_label, current_iter, param_key)

    def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
        """BasicSR's wrapping (DDP, DataParallel), CPU DDP included."""
        return wrap_for_device(net, self.device, self.opt)

    def extra_training_state(self) -> dict:
        """Everything beyond optimisers/schedulers that exact resuming needs (gathered on every rank)."""
        rngs = [rng_state()]
        if self.opt['dist']:
            rngs = [None] * self.opt['world_size']
            dist.all_gather_object(rngs, rng_state())
        return {'stages': self.schedule.state_dict(), 'rng': rngs,
                'scaler': self.scaler.state_dict() if self.scaler is not None else {},
                'warmup_guard': {'psnr_window': list(self.psnr_window), 'reinit_count': self.reinit_count},
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
        self.psnr_window.clear()
        self.psnr_window.extend(extra['warmup_guard']['psnr_window'])
        self.reinit_count = int(extra['warmup_guard']['reinit_count'])
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
