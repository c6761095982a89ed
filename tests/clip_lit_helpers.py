"""CLIP-LIT option dicts for the model and end-to-end tests (tiny encoders, small images, CPU), and a trained
pair's judgement of image folders."""
import copy
from pathlib import Path
from typing import Dict

import torch

import rave_basicsr  # noqa: F401  (the torchvision shim and registration must precede any basicsr import)
from basicsr.models import build_model  # noqa: E402
from rave_basicsr.losses.clip_guidance_loss import member_probabilities
from rave_basicsr.utils.image_io import read_image
from tests.rave_helpers import STATS_GUIDANCE, TINY_IDENTITY, model_options, rave_options  # noqa: F401

TINY_VIT = {'type': 'open_clip', 'model': 'rave-test-tiny-vit', 'pretrained': None, 'precision': 'fp32',
            'preprocess': {'size': 32, 'resize': 'squash', 'interpolation': 'bilinear', 'antialias': False}}


def clip_lit_options(name: str, data: dict, guidance: str = 'latent', total_iter: int = 14,
                     stages: tuple = (3, 2, 2, 2), save_freq: int = 100, batch: int = 2, crop: int = 32,
                     prompt_batch: int = 4, results: dict = None) -> dict:
    """A CLIP-LIT run on demo data: stages (prompt_init, warmup, network, prompt) of the given lengths.

    ``latent`` uses the ImageStatsEncoder, ``prompt`` the tiny random CLIP (it needs a text tower).
    """
    options = rave_options(name, data, total_iter=total_iter, warmup_iters=stages[1], save_freq=save_freq,
                           batch=batch, crop=crop)
    del options['residual']
    options['model_type'] = 'CLIPLITModel'
    options['guidance'] = guidance
    options['guidance_encoder'] = copy.deepcopy(STATS_GUIDANCE if guidance == 'latent' else TINY_VIT)
    options['prompt_data'] = {'dataroot_welllit': data['train_welllit'], 'resize': 32, 'augment': 'official',
                              'batch_size': prompt_batch}
    options['results'] = dict({'at': 'best', 'display_iter': 1, 'window': 2, 'size': 32, 'batch_size': 4},
                              **(results or {}))
    train = options['train']
    del train['guided']
    train['optim_guidance'] = {'type': 'Adam', 'lr': 5e-4 if guidance == 'latent' else 5e-6,
                               'weight_decay': 1e-3}
    train['prompt_init'] = {'iters': stages[0], 'extend_by': 0}
    train['network'] = {'iters': stages[2], 'extend_by': 0}
    train['prompt'] = {'iters': stages[3], 'extend_by': 0}
    train['guidance_opt'] = {'type': 'PromptGuidanceLoss', 'loss_weight': 320.0}
    train['ranking_opt'] = {'type': 'PromptRankingLoss', 'loss_weight': 200.0}
    return options


def well_lit_probabilities(options: dict, experiment: Path, folders: Dict[str, Path],
                           checkpoint: str = 'latest') -> Dict[str, float]:
    """A CLIP-LIT / CLIP-LIT-Latent run's pair judging images: per folder, the mean probability of the well-lit
    member (``softmax(100 · cos)``, the model's guidance score). Built as ``basicsr test`` builds the model, from the
    run's options and its saved ``net_g_{checkpoint}.pth`` and ``guidance_{checkpoint}.pth`` (the final pair by
    default; an iteration for an earlier one)."""
    models = experiment / 'models'
    opt = copy.deepcopy(options)
    opt.pop('train')
    opt['path'].update(pretrain_network_g=str(models / f'net_g_{checkpoint}.pth'),
                       pretrain_network_guidance=str(models / f'guidance_{checkpoint}.pth'))
    model = build_model(model_options(opt, experiment / 'well_lit_probabilities', is_train=False))
    model.guidance_direction()  # loads the saved pair
    encoder = model.encoder('guidance_encoder')
    probabilities = {}
    with torch.no_grad():
        pair = model.guidance_pair()
        for label, folder in folders.items():
            images = torch.stack([torch.from_numpy(read_image(str(path)).rgb).permute(2, 0, 1)
                                  for path in sorted(folder.iterdir())]).to(model.device)
            probabilities[label] = float(member_probabilities(encoder.encode_image(images), pair)[:, 1].mean())
    return probabilities
