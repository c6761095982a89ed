"""RAVE: identity warm-up, then guided training with the residual-vector loss plus the identity loss.

Options beyond :mod:`rave_basicsr.models.backlit_base_model` (defaults reproduce the official code, RAVE code
``train_rave.py`` and ``clip_score.py``; sources: docs/references.md):

```yaml
guidance_encoder: {type: open_clip, model: ViT-B-32, pretrained: openai}
identity_encoder: {type: open_clip, model: RN101, pretrained: openai, precision: fp16}
residual:
  path: ~                 # a residual file (`rave residual compute`); its encoder must be guidance_encoder
  well_lit: DIR_OR_LMDB   # unpaired: DIV2K_384; paired: the ground truth of the backlit training images
  backlit: ~              # default: datasets:train:dataroot_backlit
  preprocess: ~           # compute_residual's default (the originals' CLIP PIL transform)
  batch_size: 16
  save: true              # write experiments/<name>/residual.safetensors (rank 0)
  shifted: ~              # {remove_top: 15, remove_bottom: 15}: the originals' shifted residual (toolkit's
                          # debias_residual; also concepts: [...], vocab, limit); needs a text tower
train:
  guidance_opt: {type: ResidualVectorLoss, loss_weight: !!float 1920}   # or ResidualTranslationLoss (the
                          # offline demo's per-image target, not in the RAVE code; losses/clip_guidance_loss.py)
  identity_opt: {type: CLIPIdentityLoss, loss_weight: 22.5, layer_weights: [1, 1, 1, 1, 0.5]}
  guided: {block_iters: 2100, extend_by: 60, extend_threshold: 90}   # blocks = rounds; block_iters: ~ = one stage
```

The residual is computed once, at training start, on rank 0 of a distributed run and broadcast; resumed runs take
it from the training state (with the encoder identity it was computed with).
"""
import importlib
from collections import OrderedDict
from os import path as osp
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from basicsr.losses import build_loss
from basicsr.utils.registry import MODEL_REGISTRY

from rave_basicsr.losses.clip_guidance_loss import ResidualTranslationLoss
from rave_basicsr.models.backlit_base_model import BacklitBaseModel
from rave_basicsr.models.stages import StageSchedule, StageSpec
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.options import option_block

DEFAULT_GUIDANCE_OPT = {'type': 'ResidualVectorLoss', 'loss_weight': 1920.0}
DEFAULT_GUIDED = {'block_iters': 2100, 'extend_by': 60, 'extend_threshold': 90.0}


@MODEL_REGISTRY.register()
class RAVEModel(BacklitBaseModel):
    """RAVE training: warm-up (25·L_id) then 1920·L_RAVE + 22.5·L_id, in blocks with the originals' extension rule."""

    ENCODERS = {'identity_encoder': 'identity', 'guidance_encoder': 'guidance'}

    # ---- guidance set-up
    def setup_guidance(self, train_opt: dict, resuming: bool) -> None:
        self.cri_guidance = build_loss(dict(train_opt.get('guidance_opt') or DEFAULT_GUIDANCE_OPT))
        self.residual_info: Optional[dict] = None
        if not resuming:
            self.set_residual(*self.prepare_residual())

    def prepare_residual(self) -> Tuple[torch.Tensor, float, float, dict]:
        """Load or compute the residual (rank 0), broadcast it, and return (residual, threshold, mean distance,
        info)."""
        encoder = self.encoder('guidance_encoder')
        if self.opt['rank'] == 0:
            vector = self.residual_vector(encoder)
            residual, threshold, distance = vector.residual.float(), float(vector.threshold), vector.mean_distance
            info = {'encoder_identity': dict(vector.encoder_identity), 'counts': dict(vector.counts),
                    'history': list(vector.history)}
            self.logger.info(f'Residual vector: {residual.numel()} dims, threshold {threshold:.4f}, mean distance '
                             f'{distance:.4f}, from {info["counts"]} images.')
        else:
            residual, threshold, distance, info = torch.zeros(encoder.embed_dim, device=self.device), 0.0, 0.0, {}
        if self.opt['dist']:
            packed = torch.cat([residual.to(self.device), torch.tensor([threshold, distance], device=self.device)])
            dist.broadcast(packed, 0)
            residual, threshold, distance = packed[:-2].cpu(), float(packed[-2]), float(packed[-1])
            if self.opt['rank'] != 0:
                info = {'encoder_identity': dict(encoder.identity), 'counts': {}, 'history': ['broadcast from rank 0']}
        return residual, threshold, distance, info

    def residual_vector(self, encoder):
        """The configured residual: loaded (``residual:path``, encoder checked) or computed from the image sets."""
        from rave_basicsr.residual.compute import compute_residual
        from rave_basicsr.residual.vector import ResidualVector

        options = option_block(self.opt, 'residual', {}, 'residual')
        if options.get('path'):
            vector = ResidualVector.load(options['path'])
            vector.check_encoder(encoder)
        else:
            well_lit = options.get('well_lit')
            backlit = options.get('backlit') or (self.opt['datasets'].get('train') or {}).get('dataroot_backlit')
            if not well_lit:
                raise RaveError('option residual:well_lit is missing: the well-lit image set (folder or LMDB) that '
                                'defines the residual (unpaired: DIV2K_384; paired: the ground truth of the '
                                'backlit training set), or give residual:path, a residual file.')
            if not backlit:
                raise RaveError('option residual:backlit is missing (and datasets:train:dataroot_backlit too).')
            vector = compute_residual(encoder, well_lit, backlit, preprocess=options.get('preprocess'),
                                      batch_size=int(options.get('batch_size', 16)), progress=False)
            for key, where in (('well_lit', well_lit), ('backlit', backlit)):
                if not vector.counts.get(key):
                    raise RaveError(f'option residual:{key}: {where!r} has no readable images; the residual needs '
                                    'at least one image on each side.')
        if options.get('shifted'):
            vector = self.shift_residual(vector, encoder, dict(options['shifted']))
        if options.get('save', True) and self.opt['is_train'] and 'experiments_root' in self.opt['path']:
            target = osp.join(self.opt['path']['experiments_root'], 'residual.safetensors')
            vector.save(target, overwrite=True)  # the experiment folder is this run's own (BasicSR archives old ones)
            self.logger.info(f'Residual vector saved to {target}.')
        return vector

    def shift_residual(self, vector, encoder, options: dict):
        """The originals' shifted residual (RAVE code, ``train_rave.py``) through the residual toolkit's debiasing."""
        try:
            debias = importlib.import_module('rave_basicsr.residual.debias')
        except ImportError:
            raise RaveError('option residual:shifted needs the residual toolkit\'s debiasing, which this '
                            'installation lacks; shift the residual with `rave residual debias` and give the '
                            'result as residual:path.') from None
        return debias.debias_residual(vector, encoder, **dict({'progress': False}, **options))

    def set_residual(self, residual: torch.Tensor, threshold: float, mean_distance: Optional[float],
                     info: dict) -> None:
        self.residual = residual.float().to(self.device)
        self.threshold = float(threshold)
        self.mean_distance = None if mean_distance is None else float(mean_distance)
        self.residual_info = info

    def guidance_state_dict(self) -> dict:
        return {'residual': self.residual.detach().cpu(), 'threshold': self.threshold,
                'mean_distance': self.mean_distance, 'info': dict(self.residual_info or {})}

    def load_guidance_state_dict(self, state: dict) -> None:
        identity = (state.get('info') or {}).get('encoder_identity')
        if identity is not None and identity != self.encoder('guidance_encoder').identity:
            raise RaveError('the training state\'s residual was computed with another guidance encoder than '
                            'option guidance_encoder describes; resume with the original encoder options.')
        self.set_residual(state['residual'], state['threshold'], state.get('mean_distance'), state.get('info') or {})

    def guidance_direction(self) -> Optional[torch.Tensor]:
        if getattr(self, 'residual', None) is None and not self.is_train and (self.opt.get('residual') or {}).get('path'):
            vector = self.residual_vector(self.encoder('guidance_encoder'))
            self.set_residual(vector.residual, vector.threshold, vector.mean_distance, {})
        return getattr(self, 'residual', None)

    # ---- stages and losses
    def define_stages(self, train_opt: dict) -> StageSchedule:
        guided = option_block(train_opt, 'guided', DEFAULT_GUIDED, 'train:guided', tilde_keys=('block_iters',))
        warmup = self.warmup_stage(train_opt)
        if guided['block_iters'] is None:
            return StageSchedule([warmup, StageSpec('guided', None, 'net_g')])
        block = StageSpec('guided', int(guided['block_iters']), 'net_g', extend_by=int(guided['extend_by'] or 0),
                          extend_threshold=guided['extend_threshold'], max_extensions=guided.get('max_extensions'))
        return StageSchedule([warmup], [block], num_rounds=None)

    def stage_loss(self, stage: StageSpec) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if stage.name != 'guided':
            return super().stage_loss(stage)
        terms = self.enhance_for_guidance()
        encoder = self.encoder('guidance_encoder')
        embeds = encoder.encode_image(self.output)
        if isinstance(self.cri_guidance, ResidualTranslationLoss):
            if self.mean_distance is None:
                raise RaveError('train:guidance_opt ResidualTranslationLoss needs the residual\'s mean distance, '
                                'which this training state (written before the loss existed) lacks; start a new '
                                'run or use ResidualVectorLoss.')
            with torch.no_grad():
                input_embeds = encoder.encode_image(self.lq)
            l_rave = self.cri_guidance(embeds, input_embeds, self.residual, self.mean_distance)
        else:
            l_rave = self.cri_guidance(embeds, self.residual, self.threshold)
        return l_rave + sum(terms.values()), OrderedDict(l_rave=l_rave, **terms)
