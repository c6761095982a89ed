"""The staged model base shared by RAVE, CLIP-LIT and CLIP-LIT-Latent: the shape of a method and its training step.

``BacklitBaseModel`` is a BasicSR ``BaseModel`` (not registered itself) holding what the methods share:

* the enhancement network ``network_g`` (``BacklitUNet``), with BasicSR's optional EMA copy;
* frozen encoders built by :func:`rave_basicsr.guidance.encoders.build_image_encoder` from top-level option blocks
  (``identity_encoder``, ``guidance_encoder``, ...). They live in ``self.encoders`` (a plain dict), so they are never
  in a saved state dict, never in an optimiser and never switched to train mode;
* the identity loss (``train: identity_opt``, default ``CLIPIdentityLoss`` 22.5 × layer weights [1, 1, 1, 1, 0.5]),
  the optional illumination smoothness loss (``train: smoothness_opt``, default ~: not in the originals), both added
  by :meth:`~BacklitBaseModel.enhance_for_guidance` to every method's guided loss, and the identity warm-up stage
  (``train: warmup``: ``iters`` 1000, ``identity_opt`` 25 × [1, 1, 1, 1, 1], the re-initialisation guard of
  :mod:`~rave_basicsr.models.warmup_guard` with ``reinit_*``, and ``optim``: an own optimiser for the warm-up;
  default: the network's ``optim_g``, as the originals);
* stage bookkeeping by iteration (:mod:`~rave_basicsr.models.stages`), per-stage optimisers, mixed precision
  (``train: mixed_precision: bf16 | fp16 | ~``) and ``train: channels_last``;
* validation (:mod:`~rave_basicsr.models.validation`) and saving / exact resuming
  (:mod:`~rave_basicsr.models.training_state`), mixed in.

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
  ``guidance_direction()`` (a [D] vector for the guidance score, or None).
* optional hooks around the stages: ``on_iteration_end(stage, iteration_in_stage, current_iter)`` after every
  optimiser step, ``on_stage_end(stage, round_, current_iter)`` and ``on_stage_start(stage)`` when a stage ends and
  the next begins.

At about 450 lines this module is over the project's 400-line guide: what is left here is the one training step and
the subclass contract it calls, which read best together.
"""
import inspect
from collections import OrderedDict
from contextlib import nullcontext
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.metrics.psnr_ssim import calculate_psnr_pt
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger

from rave_basicsr.models.stages import StageSchedule, StageSpec
from rave_basicsr.models.training_state import TrainingStateMixin
from rave_basicsr.models.validation import ValidationMixin
from rave_basicsr.models.warmup_guard import WarmupReinitGuard
from rave_basicsr.utils.distributed import wrap_for_device
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.options import option_block

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


class BacklitBaseModel(ValidationMixin, TrainingStateMixin, BaseModel):
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
        smoothness = train_opt.get('smoothness_opt')
        self.cri_smoothness = None if smoothness is None else build_loss(dict(smoothness))
        warmup = option_block(train_opt, 'warmup', DEFAULT_WARMUP, 'train:warmup', tilde_keys=('reinit_psnr',))
        self.warmup_opt = warmup
        self.cri_warmup = build_loss(dict(warmup['identity_opt']))
        self.warmup_guard = WarmupReinitGuard(warmup['reinit_psnr'], warmup['reinit_after'], warmup['reinit_window'],
                                              warmup['reinit_extend'])
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

    def on_iteration_end(self, stage: StageSpec, iteration_in_stage: int, current_iter: int) -> None:
        """Called after every optimiser step of ``stage`` (``iteration_in_stage`` counts from 1), before the
        schedule moves on; ``self.monitored_loss`` holds the step's loss (mean over ranks)."""

    def on_stage_end(self, stage: StageSpec, round_: int, current_iter: int) -> None:
        """Called when ``stage`` (of round ``round_``) has ended, before the next one starts."""

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

    def enhance_for_guidance(self) -> Dict[str, torch.Tensor]:
        """Enhance the batch for a guided stage (``self.output``) and return the terms every method adds to its
        guidance: ``l_id``, the identity loss of the output against the input, and with ``train:smoothness_opt``
        ``l_smooth``, the smoothness of the illumination map (which needs a network that returns it)."""
        if self.cri_smoothness is None:
            self.output = self.net_g(self.lq)
        else:
            network = self.get_bare_model(self.net_g)
            if 'return_illumination' not in inspect.signature(network.forward).parameters:
                raise RaveError(f'train:smoothness_opt needs a network that returns its illumination map '
                                f'(forward(x, return_illumination=True), as BacklitUNet); {type(network).__name__} '
                                'does not. Remove train:smoothness_opt for this network.')
            self.output, light = self.net_g(self.lq, return_illumination=True)
        with torch.no_grad():
            target = self.identity_features(self.lq)
        terms = OrderedDict(l_id=self.cri_identity(self.identity_features(self.output), target))
        if self.cri_smoothness is not None:
            terms['l_smooth'] = self.cri_smoothness(light)
        return terms

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
        round_ = self.schedule.round
        self.on_iteration_end(stage, self.schedule.iter_in_stage + 1, current_iter)
        if self.schedule.step(self.monitored_loss):
            self.logger.info(f'Iteration {current_iter}: stage "{stage.name}" ended; now {self.schedule.describe()}.')
            self.on_stage_end(stage, round_, current_iter)
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
        """Feed the warm-up guard this iteration's Y-PSNR(input, output) (mean over ranks, so that every rank
        decides alike) and re-initialise the network when it says so."""
        if not self.warmup_guard.enabled:
            return
        with torch.no_grad():
            psnr = calculate_psnr_pt(self.output.detach().float().clamp(0, 1), self.lq.float(), crop_border=0,
                                     test_y_channel=True).mean()
        if self.warmup_guard.observe(self.all_ranks_mean(psnr), self.schedule.iter_in_stage + 1):
            self.reinitialise_network()

    def reinitialise_network(self) -> None:
        """Draw every parameter of the network again (rank 0's on every rank), with a fresh optimiser that the
        learning-rate schedulers follow and a restarted EMA copy, and lengthen the warm-up. A network without its own
        ``reset_parameters`` (any BasicSR arch) gets each layer's PyTorch default initialisation."""
        net = self.get_bare_model(self.net_g)
        layers = [net] if hasattr(net, 'reset_parameters') else [m for m in net.modules() if
                                                                   hasattr(m, 'reset_parameters')]
        if not layers:
            raise RaveError(f'train:warmup:reinit_psnr needs a network whose layers can be re-initialised; '
                            f'{type(net).__name__} has none. Set train:warmup:reinit_psnr: ~.')
        for layer in layers:
            layer.reset_parameters()
        if self.opt['dist']:
            for tensor in net.state_dict().values():
                dist.broadcast(tensor, 0)
        if hasattr(self, 'net_g_ema'):
            self.model_ema(0)  # the average restarts from the new network, not from the discarded one
        key = self.schedule.current.optimizer
        params, options = self.optimizer_specs[key]
        old = self.optimizer_by_name[key]
        self.optimizer_by_name[key] = self.build_optimizer(params, options, key)
        self.optimizers = list(self.optimizer_by_name.values())
        for scheduler in self.schedulers:
            if scheduler.optimizer is old:
                scheduler.optimizer = self.optimizer_by_name[key]
                for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                    group['lr'] = lr
        self.schedule.extend(self.warmup_guard.extend_by)
        self.logger.warning(f'Warm-up: mean Y-PSNR(input, output) stayed below {self.warmup_guard.threshold} dB; '
                            f'network re-initialised (#{self.warmup_guard.count}), warm-up lengthened by '
                            f'{self.warmup_guard.extend_by} iterations.')

    def get_current_log(self) -> dict:
        return dict(self.log_dict)

    # ------------------------------------------------------------------ inference
    def test(self) -> None:
        """Enhance ``self.lq`` (EMA network when present) into ``self.output`` and ``self.illumination``.

        Always in float32, also in mixed-precision training (validation figures stay comparable between runs and
        with ``basicsr test``). ``val: tile`` tiles large images exactly, as ``rave enhance`` does: ``~`` (default)
        tiles images above one megapixel, 0 never, N uses N-px tiles; 12-24 MP photos then fit on any GPU.
        """
        from rave_basicsr.inference.enhancer import Enhancer

        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.get_bare_model(self.net_g)
        tile = (self.opt.get('val') or {}).get('tile')
        self.output, self.illumination = Enhancer.for_model(net).enhance(self.lq, tile, return_illumination=True)

    def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
        """BasicSR's wrapping (DDP, DataParallel), CPU DDP included."""
        return wrap_for_device(net, self.device, self.opt)

    def get_current_visuals(self) -> dict:
        visuals = OrderedDict(lq=self.lq.detach().cpu(), result=self.output.detach().cpu())
        if hasattr(self, 'gt'):
            visuals['gt'] = self.gt.detach().cpu()
        return visuals

