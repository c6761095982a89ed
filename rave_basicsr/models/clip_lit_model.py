"""CLIP-LIT (CLIP-LIT code, ``train.py``) and CLIP-LIT-Latent (RAVE code, ``latent_training.py``, ``train.py``)
training on the shared staged model base (sources: docs/references.md).

``guidance: prompt`` learns a soft-prompt pair ``[2, 77, width]`` that the text tower encodes (CLIP-LIT);
``guidance: latent`` learns two vectors ``[2, D]`` directly in the image-embedding space, N(0, 1) initialised, with
no text tower (CLIP-LIT-Latent; any image-only encoder works, ImageStatsEncoder included). Row 0 is the negative
(backlit) member, row 1 the positive (well-lit) one. Stages (names as logged):

* ``prompt_init`` (A): the pair alone, ``PromptInitLoss`` (cross-entropy) on guidance-encoder features of
  augmented backlit (label 0) and well-lit (label 1) images of ``prompt_data`` (a ``LabelledBacklitDataset``
  built by the model: BasicSR's single train loader serves backlit images only);
* ``warmup`` (B): the base's identity warm-up (with its re-initialisation guard);
* rounds of ``network`` (C-1: ``320·PromptGuidanceLoss + 22.5·identity`` with the pair frozen) and ``prompt``
  (C-2: ``200·PromptRankingLoss`` on backlit / well-lit couples and the enhanced training images of the latest
  one or two rounds; the network frozen).

Enhanced results feed the ranking terms as a **feature bank**: the normalised guidance-encoder features of the
network's outputs on every backlit training image at ``results: size`` (256² as the originals), recorded at the
originals' "best model" events of each network stage (``results: at: best``) or once at its end (``at: end``).
Only the latest two rounds are kept. It lives in memory and in the training state: N×D floats per round (380×512
floats = 0.8 MB for the original data) instead of a folder of PNGs per round, and it makes resuming exact.

Options beyond :mod:`rave_basicsr.models.backlit_base_model` (defaults reproduce the official code):

```yaml
guidance: prompt                  # prompt (CLIP-LIT) | latent (CLIP-LIT-Latent)
prompt_length: 16                 # "X" tokens of the init prompt (prompt guidance)
rank_order: official              # official: S(I_t) > S(I_{t-1}) (newest results nearer to backlit); paper: reverse
latent_init: random               # random: N(0, 1) as the originals; set_means: prompt_data's set means (latent)
prompt_data: {dataroot_welllit: DIR, dataroot_backlit: ~, resize: 256, augment: official, batch_size: 16,
              decode_threads: ~}   # ~: min(8, usable cores)
results: {at: best, display_iter: 20, window: 30, size: 256, batch_size: 8}
path: {pretrain_network_guidance: ~}      # a saved pair (ours, or the original's init_prompt_pair.pth) to start from
train:
  optim_g: {type: Adam, lr: !!float 2e-5, weight_decay: !!float 1e-3}
  optim_guidance: {type: Adam, lr: !!float 5e-6, weight_decay: !!float 1e-3}   # latent: 5e-4
  prompt_init: {iters: 8000, extend_by: 100, extend_threshold: 60}
  network: {iters: 2100, extend_by: 60, extend_threshold: 90}
  prompt: {iters: 1000, extend_by: 100, extend_threshold: 60, max_rounds: ~}   # ~: refine the pair every round
  num_rounds: ~                   # ~: rounds repeat until total_iter
  guidance_opt: {type: PromptGuidanceLoss, loss_weight: 320}   # or ResidualTranslationLoss (below)
  init_opt: {type: PromptInitLoss, loss_weight: 1}
  ranking_opt: {type: PromptRankingLoss, loss_weight: 200}
```

``guidance_opt: {type: ResidualTranslationLoss}`` (not in the originals; tried for the offline latent demo without
success, docs/clip_lit.md) replaces the probability of the backlit member, which sets no target per image, by a
translation of each output's normalised embedding from its input's along the pair's direction ``n(g_1) - n(g_0)``, by
the component along that direction of the difference of the well-lit and backlit set means of ``prompt_data``
(computed once at training start, as RAVE's residual). The pair still learns and is refined by the rounds.

``latent_init: set_means`` (not in the originals) starts the latent pair at those two means, backlit then well-lit,
instead of N(0, 1); with it ``prompt_init`` may have length 0 (docs/clip_lit.md). ``guidance_opt: {type:
PromptGuidanceLoss, stop_at: well_lit}`` (not in the originals) stops pushing an output once its well-lit probability
reaches the mean well-lit probability of ``prompt_data``'s well-lit images under the frozen pair, computed at the
start of every network stage (``pull_back: true`` also pulls an output that is past it back to it); ``stop_at:
set_gap`` stops each output sooner where its input's logit raised by the gap between the two sets' mean logits is
lower, so that an input the pair finds far more backlit than the backlit images is not pushed all the way.
``train:prompt:max_rounds: N`` (not in the originals, which refine the pair in every round) refines the pair in the
first N rounds only; the later rounds train the network alone against the pair as it then is, so the guidance stops
moving and a longer run converges instead of being pushed a little further by every refinement (docs/clip_lit.md).

The module is one class over 450 lines on purpose: every method is a hook of the staged base or state those hooks
share (the pair, the frozen pair, the feature bank, the samplers, the set statistics), and the pieces that stand
alone already live in their own modules (``results_bank``, ``stages``, the losses).
"""
from collections import OrderedDict
from os import path as osp
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from basicsr.losses import build_loss
from basicsr.utils.registry import MODEL_REGISTRY

from rave_basicsr.data.epoch_sampler import EpochSampler
from rave_basicsr.losses.clip_guidance_loss import (SET_TARGETS, ResidualTranslationLoss, member_probabilities,
                                                    pair_logits)
from rave_basicsr.models.backlit_base_model import BacklitBaseModel
from rave_basicsr.models.results_bank import ResultsBank
from rave_basicsr.models.stages import StageSchedule, StageSpec
from rave_basicsr.utils.checkpoint import torch_load_safe, torch_save_atomic
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.options import option_block

#: accepted values of the options ``guidance``, ``rank_order`` and ``latent_init``; the first of each is the default
GUIDANCE_TYPES = ('prompt', 'latent')
RANK_ORDERS = ('official', 'paper')
LATENT_INITS = ('random', 'set_means')
DEFAULT_STAGES = {'prompt_init': {'iters': 8000, 'extend_by': 100, 'extend_threshold': 60.0},
                  'network': {'iters': 2100, 'extend_by': 60, 'extend_threshold': 90.0},
                  'prompt': {'iters': 1000, 'extend_by': 100, 'extend_threshold': 60.0, 'max_rounds': None}}
DEFAULT_RESULTS = {'at': 'best', 'display_iter': 20, 'window': 30, 'size': 256, 'batch_size': 8}
DEFAULT_PROMPT_DATA = {'resize': 256, 'augment': 'official', 'batch_size': 16, 'decode_threads': None,
                       'io_backend': {'type': 'disk'}}
DEFAULT_INIT_OPT = {'type': 'PromptInitLoss'}
DEFAULT_GUIDANCE_OPT = {'type': 'PromptGuidanceLoss', 'loss_weight': 320.0}
DEFAULT_RANKING_OPT = {'type': 'PromptRankingLoss', 'loss_weight': 200.0}
#: ``train: optim_guidance`` when not given; its learning rate depends on the guidance type
DEFAULT_OPTIM_GUIDANCE = {'type': 'Adam', 'weight_decay': 1e-3}
DEFAULT_GUIDANCE_LR = {'prompt': 5e-6, 'latent': 5e-4}
#: keys under which saved pairs are accepted (ours, the original CLIP-LIT ``Prompts`` module, RAVE's latents)
PAIR_KEYS = ('pair', 'embedding_prompt', 'guidance_embeddings')


@MODEL_REGISTRY.register()
class CLIPLITModel(BacklitBaseModel):
    """CLIP-LIT / CLIP-LIT-Latent: pair initialisation, identity warm-up, then network / pair refinement rounds."""

    ENCODERS = {'identity_encoder': 'identity', 'guidance_encoder': 'guidance'}

    def __init__(self, opt: dict) -> None:
        self.guidance_type = opt.get('guidance', GUIDANCE_TYPES[0])
        if self.guidance_type not in GUIDANCE_TYPES:
            raise RaveError(f'option guidance must be one of {list(GUIDANCE_TYPES)} (prompt: CLIP-LIT, latent: '
                            f'CLIP-LIT-Latent), got {self.guidance_type!r}.')
        self.latent_init = opt.get('latent_init', LATENT_INITS[0])
        if self.latent_init not in LATENT_INITS:
            raise RaveError(f'option latent_init must be one of {list(LATENT_INITS)}, got {self.latent_init!r}.')
        if self.latent_init == 'set_means' and self.guidance_type != 'latent':
            raise RaveError('option latent_init: set_means starts the two guidance vectors at image-embedding means; '
                            'it needs guidance: latent (a prompt pair lives in the text tower\'s input space).')
        self.pair_param: Optional[torch.nn.Parameter] = None
        super().__init__(opt)

    # ------------------------------------------------------------------ the learnable pair
    def build_pair(self) -> torch.nn.Parameter:
        """A fresh pair (official init) or the one from ``path: pretrain_network_guidance``."""
        from rave_basicsr.guidance.frozen_encoder import check_embedding_size, require_text_tower
        from rave_basicsr.guidance.prompts import DEFAULT_PROMPT_LENGTH, init_eot_index, init_soft_prompts

        encoder = self.encoder('guidance_encoder')
        if self.guidance_type == 'prompt':
            require_text_tower(encoder, 'guidance: prompt (CLIP-LIT learned text prompts)')
            length = self.opt.get('prompt_length', DEFAULT_PROMPT_LENGTH)
            self.eot_index = init_eot_index(encoder, length)
            value = init_soft_prompts(encoder, 2, length)
        else:
            value = torch.randn(2, encoder.embed_dim)
        load_path = self.opt['path'].get('pretrain_network_guidance')
        if load_path:
            loaded = self.read_pair_file(load_path)
            if self.guidance_type == 'latent':
                check_embedding_size(encoder, loaded.shape[-1], f'the latent pair in {load_path}')
            if loaded.shape != value.shape:
                raise RaveError(f'path:pretrain_network_guidance {load_path}: the pair has shape {list(loaded.shape)}, but '
                                f'guidance: {self.guidance_type} with this encoder needs {list(value.shape)}.')
            value = loaded
            self.logger.info(f'Guidance pair loaded from {load_path}.')
        return torch.nn.Parameter(value.float().to(self.device))

    @staticmethod
    def read_pair_file(path: str) -> torch.Tensor:
        state = torch_load_safe(path)
        if isinstance(state, torch.Tensor):
            return state
        if isinstance(state, dict):
            for key in PAIR_KEYS:
                if key in state:
                    return state[key]
        raise RaveError(f'{path}: no guidance pair found (expected a tensor or a dict with one of {list(PAIR_KEYS)}, '
                        'e.g. a guidance_*.pth saved by CLIPLITModel or the original init_prompt_pair.pth).')

    def guidance_pair(self) -> torch.Tensor:
        """``[2, D]`` guidance embeddings (unnormalised), differentiable w.r.t. the learnable pair."""
        if self.guidance_type == 'latent':
            return self.pair_param
        return self.encoder('guidance_encoder').encode_soft_prompts(self.pair_param, self.eot_index)

    # ------------------------------------------------------------------ set-up
    def setup_guidance(self, train_opt: dict, resuming: bool) -> None:
        from rave_basicsr.data.backlit_dataset import LabelledBacklitDataset

        self.cri_init = build_loss(dict(train_opt.get('init_opt') or DEFAULT_INIT_OPT))
        self.cri_guidance = build_loss(dict(train_opt.get('guidance_opt') or DEFAULT_GUIDANCE_OPT))
        order = self.opt.get('rank_order', RANK_ORDERS[0])
        if order not in RANK_ORDERS:
            raise RaveError(f'option rank_order must be one of {list(RANK_ORDERS)}, got {order!r}.')
        ranking = dict(train_opt.get('ranking_opt') or DEFAULT_RANKING_OPT)
        ranking.setdefault('newest_closer_to_backlit', order == 'official')
        self.cri_ranking = build_loss(ranking)

        results = option_block(self.opt, 'results', DEFAULT_RESULTS, 'results')
        if results['at'] not in ('best', 'end'):
            raise RaveError(f'option results:at must be best or end, got {results["at"]!r}.')
        for key in ('display_iter', 'window', 'size', 'batch_size'):
            if isinstance(results[key], bool) or not isinstance(results[key], int) or results[key] < 1:
                raise RaveError(f'option results:{key} must be a positive integer, got {results[key]!r}.')
        self.results_opt = results

        data_opt = option_block(self.opt, 'prompt_data', DEFAULT_PROMPT_DATA, 'prompt_data')
        if not data_opt.get('dataroot_welllit'):
            raise RaveError('option prompt_data:dataroot_welllit is missing: the folder or LMDB of well-lit images '
                            'the prompt stages contrast with the backlit ones (unpaired: DIV2K_384; paired: the '
                            'ground truth of the backlit training images).')
        data_opt.setdefault('dataroot_backlit', None)
        data_opt['dataroot_backlit'] = data_opt['dataroot_backlit'] or \
            (self.opt['datasets'].get('train') or {}).get('dataroot_backlit')
        batch_size = data_opt.pop('batch_size')
        self.init_data = LabelledBacklitDataset(dict(data_opt, mode='single'))
        self.pair_data = LabelledBacklitDataset(dict(data_opt, mode='pairs'))
        seed = int(self.opt.get('manual_seed') or 0) + self.opt['rank']
        self.init_sampler = EpochSampler(len(self.init_data), batch_size, seed)
        self.pair_sampler = EpochSampler(len(self.pair_data), batch_size, seed + 7919)

        self.bank = ResultsBank(results['window'], results['display_iter'])
        self.frozen_pair: Optional[torch.Tensor] = None
        self.set_difference: Optional[torch.Tensor] = None
        self.guidance_target: Optional[torch.Tensor] = None
        if self.latent_init == 'set_means' and self.opt['path'].get('pretrain_network_guidance'):
            raise RaveError('options latent_init: set_means and path:pretrain_network_guidance both give the starting '
                            'pair of a training; keep one of them.')
        self.pair_param = self.build_pair()
        translation = isinstance(self.cri_guidance, ResidualTranslationLoss)
        stop_at = getattr(self.cri_guidance, 'stop_at', None)
        self.set_target = stop_at if stop_at in SET_TARGETS else None
        needs_means = (translation or self.latent_init == 'set_means') and not resuming
        vector = (self.embed_prompt_data(data_opt, keep_embeddings=self.set_target is not None)
                  if needs_means or self.set_target else None)
        if needs_means:
            means = self.set_means(vector)
            if translation:
                self.set_difference = means[1] - means[0]
            if self.latent_init == 'set_means':
                with torch.no_grad():
                    self.pair_param.copy_(means)
                self.logger.info('Latent pair initialised at the backlit and well-lit set means of prompt_data.')
        self.set_embeds = None  # rank 0: the normalised embeddings of prompt_data's two sets, for stop_at's target
        if self.set_target and vector is not None:
            self.set_embeds = {name: F.normalize(vector.embeddings[name].float(), dim=-1).to(self.device)
                               for name in ('backlit', 'well_lit')}
        if self.opt['dist']:
            dist.broadcast(self.pair_param.data, 0)
            world = self.opt['world_size']
            self.pair_param.register_hook(lambda grad: self._mean_over_ranks(grad, world))

    def embed_prompt_data(self, data_opt: dict, keep_embeddings: bool):
        """The :class:`ResidualVector` of ``prompt_data``'s two sets (with the per-image embeddings when asked), on
        rank 0 (None elsewhere: the other ranks receive what they need of it by broadcast)."""
        from rave_basicsr.residual.compute import compute_residual

        if self.opt['rank'] != 0:
            return None
        return compute_residual(self.encoder('guidance_encoder'), data_opt['dataroot_welllit'],
                                data_opt['dataroot_backlit'], keep_embeddings=keep_embeddings, progress=False)

    def set_means(self, vector) -> torch.Tensor:
        """``[v_backlit, v_well_lit]``: the normalised mean guidance embeddings of ``prompt_data``'s two sets
        (``vector`` from :meth:`embed_prompt_data`, broadcast from rank 0), in the pair's row order.
        ``ResidualTranslationLoss`` projects their difference on the pair; ``latent_init: set_means`` starts the
        pair there."""
        if self.opt['rank'] == 0:
            means = torch.stack([vector.backlit_mean, vector.well_lit_mean]).float().to(self.device)
            self.logger.info(f'Set means of prompt_data ({vector.counts}): distance '
                             f'{float((means[1] - means[0]).norm()):.4f}.')
        else:
            means = torch.zeros(2, self.encoder('guidance_encoder').embed_dim, device=self.device)
        if self.opt['dist']:
            dist.broadcast(means, 0)
        return means

    def set_targets(self) -> torch.Tensor:
        """``[well-lit probability, logit gap]`` of ``prompt_data`` under the frozen pair, at the guidance loss's
        logit scale (computed on rank 0, broadcast): the well-lit images' mean well-lit probability, where
        ``stop_at: well_lit`` stops the push, and the well-lit minus the backlit images' mean logit, by which
        ``stop_at: set_gap`` raises each input's."""
        targets = torch.zeros(2, device=self.device)
        if self.opt['rank'] == 0:
            scale = self.cri_guidance.logit_scale
            well_lit = pair_logits(self.set_embeds['well_lit'], self.frozen_pair, scale)
            backlit = pair_logits(self.set_embeds['backlit'], self.frozen_pair, scale)
            targets = torch.stack([well_lit.sigmoid().mean(), well_lit.mean() - backlit.mean()])
        if self.opt['dist']:
            dist.broadcast(targets, 0)
        return targets

    @staticmethod
    def _mean_over_ranks(grad: torch.Tensor, world: int) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world

    def define_stages(self, train_opt: dict) -> StageSchedule:
        options = {name: option_block(train_opt, name, defaults, f'train:{name}')
                   for name, defaults in DEFAULT_STAGES.items()}
        for name, stage in options.items():
            iters = stage['iters']
            if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
                raise RaveError(f'train:{name}:iters must be an integer >= 0, got {iters!r}.')
        if options['prompt_init']['iters'] == 0 and not self.opt['path'].get('pretrain_network_guidance') and \
                self.latent_init != 'set_means':
            raise RaveError('train:prompt_init:iters is 0 but no trained pair is given: the pair would start '
                            f'{"as two identical prompts" if self.guidance_type == "prompt" else "random"} and '
                            'guide nothing. Give path:pretrain_network_guidance (a saved pair), latent_init: set_means '
                            '(guidance: latent) or a positive length.')
        if options['network']['iters'] == 0:
            raise RaveError('train:network:iters is 0: the rounds would never train the network. Give it a '
                            'positive length (the original: 2100).')
        if options['network'].get('max_rounds') is not None:
            raise RaveError('train:network:max_rounds is set, but the network trains in every round; to stop '
                            'refining the pair after some rounds, give train:prompt:max_rounds instead.')

        def spec(name: str, optimizer: str) -> StageSpec:
            stage = options[name]
            return StageSpec(name, int(stage['iters']), optimizer, extend_by=int(stage['extend_by'] or 0),
                             extend_threshold=stage['extend_threshold'], max_extensions=stage.get('max_extensions'),
                             max_rounds=stage.get('max_rounds') if name == 'prompt' else None)

        return StageSchedule([spec('prompt_init', 'guidance'), self.warmup_stage(train_opt)],
                             [spec('network', 'net_g'), spec('prompt', 'guidance')],
                             num_rounds=train_opt.get('num_rounds'))

    def define_optimizers(self, train_opt: dict):
        optimizers = super().define_optimizers(train_opt)
        options = dict(train_opt.get('optim_guidance')
                       or dict(DEFAULT_OPTIM_GUIDANCE, lr=DEFAULT_GUIDANCE_LR[self.guidance_type]))
        optimizers['guidance'] = ([self.pair_param], options)
        return optimizers

    # ------------------------------------------------------------------ stage losses
    def stage_loss(self, stage: StageSpec) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if stage.name == 'prompt_init':
            return self.prompt_init_loss()
        if stage.name == 'network':
            return self.network_loss()
        if stage.name == 'prompt':
            return self.ranking_loss()
        return super().stage_loss(stage)

    def encode_normalised(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.encoder('guidance_encoder').encode_image(images.to(self.device)).float(), dim=-1)

    def prompt_init_loss(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Stage A: cross-entropy of the pair on well-lit vs backlit image features (explicit labels)."""
        items = self.init_data.load_batch(self.init_sampler.next())
        features = self.encode_normalised(torch.stack([item['lq'] for item in items]))
        labels = torch.tensor([item['label'] for item in items], dtype=torch.int64, device=self.device)
        loss = self.cri_init(features, self.guidance_pair(), labels)
        return loss, {'l_init': loss}

    def network_loss(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Stage C-1: 320·p_backlit(output) (or the translation loss) + 22.5·L_id (and the optional smoothness term)
        with the pair frozen (encoded once per stage)."""
        stage_start = self.frozen_pair is None
        if stage_start:
            with torch.no_grad():
                self.frozen_pair = self.guidance_pair().detach().float()
        terms = self.enhance_for_guidance()
        encoder = self.encoder('guidance_encoder')
        embeds = encoder.encode_image(self.output)
        if isinstance(self.cri_guidance, ResidualTranslationLoss):
            direction, step = self.translation()
            if stage_start:
                self.logger.info(f'Round {self.schedule.round + 1}: translation step {float(step):.4f} along the '
                                 'pair.')
            with torch.no_grad():
                input_embeds = encoder.encode_image(self.lq)
            l_clip = self.cri_guidance(embeds, input_embeds, direction, step)
        elif self.set_target:
            if stage_start:
                self.guidance_target = self.set_targets()
                self.logger.info(f'Round {self.schedule.round + 1}: the guidance stops at a well-lit probability of '
                                 f'{float(self.guidance_target[0]):.4f} (the well-lit images\' mean)' +
                                 ('' if self.set_target == 'well_lit' else
                                  f', and at the input\'s logit raised by {float(self.guidance_target[1]):.4f} '
                                  '(the sets\' gap) where that is lower') + '.')
            well_lit, gap = self.guidance_target
            if self.set_target == 'set_gap':
                with torch.no_grad():
                    inputs = pair_logits(encoder.encode_image(self.lq), self.frozen_pair, self.cri_guidance.logit_scale)
                    target = torch.sigmoid(inputs + gap).clamp(max=well_lit)
            else:
                target = well_lit
            l_clip = self.cri_guidance(embeds, self.frozen_pair, target)
        else:
            l_clip = self.cri_guidance(embeds, self.frozen_pair)
        return l_clip + sum(terms.values()), OrderedDict(l_clip=l_clip, **terms)

    def translation(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The frozen pair's unit direction ``n(g_1) - n(g_0)`` (normalised) and the set means' difference along it."""
        if self.set_difference is None:
            raise RaveError('train:guidance_opt ResidualTranslationLoss needs the set means of prompt_data, which '
                            'this training state (written without that loss) lacks; start a new run or resume with '
                            'the guidance_opt of the interrupted run.')
        pair = F.normalize(self.frozen_pair, dim=-1)
        direction = F.normalize(pair[1] - pair[0], dim=0)
        return direction, self.set_difference @ direction

    def ranking_loss(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Stage C-2: 200·rank loss on backlit / well-lit couples plus the latest rounds' results."""
        indices = self.pair_sampler.next()
        items = self.pair_data.load_batch(indices)
        backlit = self.encode_normalised(torch.stack([item['backlit'] for item in items]))
        welllit = self.encode_normalised(torch.stack([item['welllit'] for item in items]))
        rows = torch.tensor([self.pair_data.pairs[i][0] for i in indices])
        newest, previous = self.bank.ranking_sets(self.schedule.round)
        sets = {'backlit': backlit, 'welllit': welllit}
        if newest is not None:
            sets['newest'] = self.bank.rounds[newest][rows].to(self.device)
        if previous is not None:
            sets['previous'] = self.bank.rounds[previous][rows].to(self.device)
        loss = self.cri_ranking(self.guidance_pair(), **sets)
        return loss, {'l_rank': loss}

    # ------------------------------------------------------------------ results of the rounds (feature bank)
    def on_iteration_end(self, stage: StageSpec, iteration_in_stage: int, current_iter: int) -> None:
        """``results: at: best``: record the results at the network stage's best-model events."""
        if (stage.name == 'network' and self.results_opt['at'] == 'best' and self.results_ranked(self.schedule.round)
                and self.bank.is_best(self.monitored_loss, iteration_in_stage)):
            self.record_results(self.schedule.round, current_iter)

    def on_stage_end(self, stage: StageSpec, round_: int, current_iter: int) -> None:
        """``results: at: end``: record the results once, when the network stage ends."""
        if stage.name == 'network' and self.results_opt['at'] == 'end' and self.results_ranked(round_):
            self.record_results(round_, current_iter)

    def results_ranked(self, round_: int) -> bool:
        """Whether a prompt stage will rank the results of round ``round_``, that is, whether the round's prompt
        stage runs (none runs after a round without one): past ``train:prompt:max_rounds`` recording them would be
        wasted work."""
        return self.schedule.runs_in_round('prompt', round_)

    def record_results(self, round_: int, current_iter: int) -> None:
        """Enhance every backlit training image at ``results:size``² and keep their normalised features.

        The originals write these outputs as PNGs at each "best model" event and read them back in the prompt
        stage; their features are all the ranking loss uses. Every rank computes the same bank (deterministic).
        """
        from rave_basicsr.data.transforms import prepare_size, to_tensor

        source, size = self.pair_data.backlit, self.results_opt['size']
        net = self.get_bare_model(self.net_g)
        was_training = net.training
        net.eval()
        features = []
        with torch.no_grad(), self.autocast():
            for start in range(0, len(source), self.results_opt['batch_size']):
                stop = min(start + self.results_opt['batch_size'], len(source))
                images = torch.stack([to_tensor(prepare_size(source.read(i).rgb, size, None, 'upscale',
                                                             source.path(i))) for i in range(start, stop)])
                features.append(self.encode_normalised(net(images.to(self.device)).float()).cpu())
        net.train(was_training)
        self.bank.record(round_, torch.cat(features))
        self.logger.info(f'Iteration {current_iter}: results of round {round_ + 1} recorded '
                         f'({len(source)} backlit images at {size}²; feature bank holds rounds '
                         f'{[r + 1 for r in self.bank.rounds]}).')

    def on_stage_start(self, stage: StageSpec) -> None:
        if stage.name == 'network':
            self.frozen_pair = None
            self.bank.start_stage()
        if stage.name == 'prompt':
            newest, previous = self.bank.ranking_sets(self.schedule.round)
            self.logger.info(f'Prompt refinement of round {self.schedule.round + 1} ranks backlit, well-lit' +
                             ('' if newest is None else f' and the results of round {newest + 1}') +
                             ('' if previous is None else f' and {previous + 1}') + '.')

    # ------------------------------------------------------------------ state
    def guidance_state_dict(self) -> dict:
        state = {'type': self.guidance_type, 'pair': self.pair_param.detach().cpu().clone(), **self.bank.state_dict(),
                 'init_sampler': self.init_sampler.state_dict(), 'pair_sampler': self.pair_sampler.state_dict()}
        if self.set_difference is not None:
            state['set_difference'] = self.set_difference.detach().cpu().clone()
        return state

    def load_guidance_state_dict(self, state: dict) -> None:
        from rave_basicsr.guidance.frozen_encoder import check_embedding_size

        if state.get('type') != self.guidance_type:
            raise RaveError(f'the training state holds a "{state.get("type")}" pair but option guidance is '
                            f'"{self.guidance_type}"; resume with the option file of the interrupted run.')
        pair = state['pair']
        if self.guidance_type == 'latent':
            check_embedding_size(self.encoder('guidance_encoder'), pair.shape[-1], 'the training state\'s latent pair')
        if pair.shape != self.pair_param.shape:
            raise RaveError(f'the training state\'s pair has shape {list(pair.shape)}, the options need '
                            f'{list(self.pair_param.shape)}; resume with the option file of the interrupted run.')
        with torch.no_grad():
            self.pair_param.copy_(pair.to(self.device))
        self.bank.load_state_dict(state)
        self.init_sampler.load_state_dict(state['init_sampler'])
        self.pair_sampler.load_state_dict(state['pair_sampler'])
        self.frozen_pair = None
        difference = state.get('set_difference')
        self.set_difference = None if difference is None else difference.float().to(self.device)

    def save(self, epoch: int, current_iter: int) -> None:
        """Network and training state as the base, plus ``models/guidance_{iter}.pth`` (the pair alone)."""
        super().save(epoch, current_iter)
        if self.opt['rank'] == 0 and self.pair_param is not None:
            label = 'latest' if current_iter == -1 else current_iter
            torch_save_atomic({'pair': self.pair_param.detach().cpu(), 'guidance': self.guidance_type},
                              osp.join(self.opt['path']['models'], f'guidance_{label}.pth'))

    # ------------------------------------------------------------------ validation
    def guidance_direction(self) -> Optional[torch.Tensor]:
        """Positive minus negative normalised member (None before a pair exists, e.g. testing without one)."""
        if self.pair_param is None and not self.is_train and self.opt['path'].get('pretrain_network_guidance'):
            self.pair_param = self.build_pair()
        if self.pair_param is None:
            return None
        with torch.no_grad():
            pair = F.normalize(self.guidance_pair().float(), dim=-1)
        return pair[1] - pair[0]

    def compute_metric(self, name: str, metric_opt: dict, result_img, gt_img, img_name: str) -> Optional[float]:
        """The guidance score here is the mean probability of the well-lit member (1 - p_neg of the guidance loss),
        at the metric's ``logit_scale`` if given, else at the training guidance loss's (CLIP's 100 without one)."""
        if metric_opt['type'] != 'calculate_guidance_score':
            return super().compute_metric(name, metric_opt, result_img, gt_img, img_name)
        scale = metric_opt.get('logit_scale') or getattr(getattr(self, 'cri_guidance', None), 'logit_scale', 100.0)
        with torch.no_grad():
            embeds = self.encoder('guidance_encoder').encode_image(self.output.float())
            return float(member_probabilities(embeds, self.guidance_pair(), float(scale))[:, 1].mean())
