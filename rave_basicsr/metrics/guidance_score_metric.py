"""Guidance score: how far enhanced images have moved along the guidance direction (no reference needed).

For RAVE the direction is the residual vector, and the score is the mean cosine between the guidance encoder's
embeddings of the outputs and the residual; the training target of each image is the residual's threshold
(⟨v_well-lit, v_residual⟩). The model calls it with its output tensor, encoder and direction.
"""
import torch
import torch.nn.functional as F
from basicsr.utils.registry import METRIC_REGISTRY

from rave_basicsr.utils.errors import RaveError


@METRIC_REGISTRY.register()
def calculate_guidance_score(images: torch.Tensor, encoder, direction: torch.Tensor, **kwargs) -> float:
    """Mean cosine of ``encoder.encode_image(images)`` ([B, 3, H, W] in [0, 1]) to ``direction`` ([D])."""
    if direction is None or direction.dim() != 1:
        raise RaveError('calculate_guidance_score needs a [D] guidance direction (the residual vector).')
    with torch.no_grad():
        embeds = encoder.encode_image(images.float())
    if embeds.shape[-1] != direction.shape[0]:
        raise RaveError(f'calculate_guidance_score: encoder embeddings have {embeds.shape[-1]} dimensions, the '
                        f'direction {direction.shape[0]}; they must come from the same encoder.')
    cosine = F.normalize(embeds.float(), dim=-1) @ F.normalize(direction.float().to(embeds.device), dim=0)
    return float(cosine.mean())
