"""Tensor-level CLIP guidance losses of CLIP-LIT, CLIP-LIT-Latent and RAVE.

Sources (docs/references.md): CLIP-LIT code ``clip_score.py`` and ``train.py`` (identity, guidance, initialisation
and ranking losses); RAVE code ``clip_score.py`` and ``train_rave.py`` (the residual-vector loss).

The losses never own an encoder: the model encodes images with its frozen encoders and passes embeddings or
feature lists. Each loss has ``loss_weight`` (default 1.0); the official factors — 22.5 (identity, 0.9 · 25),
25 (identity warm-up), 320 (prompt/latent guidance, 16 · 20), 1920 (RAVE, 6 · 320) and 200 (ranking) — are set in
the option files, so that a loss value read in isolation is the unscaled quantity. Every other default
reproduces the official code. The guidance pair is ``[2, D]``: row 0 negative (backlit), row 1 positive (well-lit).

Every loss computes in float32, also inside a mixed-precision (autocast) region: matrix products are on autocast's
low-precision list, so ``normalize(e) @ normalize(g)`` would otherwise run in fp16/bf16, and the RAVE term
``(cos - threshold)²`` and the ×100 logits are too sensitive for that (about 12% off in bf16).
"""
import functools
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from rave_basicsr.utils.errors import RaveError

REDUCTIONS = ('mean', 'sum', 'none')


def _check_weight(loss_weight: float, name: str) -> float:
    if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)):
        raise RaveError(f'{name}: option "loss_weight" must be a number, got {loss_weight!r}.')
    return float(loss_weight)


def _check_choice(value: str, choices: Sequence[str], key: str, name: str) -> str:
    if value not in choices:
        raise RaveError(f'{name}: option "{key}" must be one of {list(choices)}, got {value!r}.')
    return value


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == 'mean':
        return values.mean()
    if reduction == 'sum':
        return values.sum()
    return values


def float32_loss(forward: Callable) -> Callable:
    """Run a loss's ``forward`` with autocast disabled on its inputs' device (see the module docstring)."""
    @functools.wraps(forward)
    def wrapper(self, first, *args, **kwargs):
        tensor = first[0] if isinstance(first, (list, tuple)) else first
        with torch.autocast(device_type=tensor.device.type, enabled=False):
            return forward(self, first, *args, **kwargs)
    return wrapper


def _check_pair(guidance: torch.Tensor, embeds: torch.Tensor, name: str) -> None:
    if guidance.dim() != 2 or guidance.shape[0] != 2:
        raise RaveError(f'{name}: the guidance pair must be a [2, D] tensor (negative, positive), '
                        f'got {list(guidance.shape)}.')
    if embeds.dim() != 2 or embeds.shape[1] != guidance.shape[1]:
        raise RaveError(f'{name}: image embeddings {list(embeds.shape)} do not match the guidance pair '
                        f'{list(guidance.shape)}; both must share the embedding size D of one encoder.')


def _scaled_cosines(embeds: torch.Tensor, guidance: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``[B, 2]`` ``scale · cos`` similarities to the (negative, positive) members, in float32 whatever autocast says."""
    with torch.autocast(device_type=embeds.device.type, enabled=False):
        return logit_scale * F.normalize(embeds.float(), dim=-1) @ F.normalize(guidance.float(), dim=-1).t()


def member_probabilities(embeds: torch.Tensor, guidance: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """``[B, 2]`` softmax probabilities of the (negative, positive) members over ``scale · cos`` similarities,
    in float32."""
    return _scaled_cosines(embeds, guidance, logit_scale).softmax(dim=-1)


def pair_logits(embeds: torch.Tensor, guidance: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """``[B]`` logits ``scale · (cos(e, g_1) - cos(e, g_0))``: the well-lit probability of
    :func:`member_probabilities` is their sigmoid. In float32."""
    logits = _scaled_cosines(embeds, guidance, logit_scale)
    return logits[:, 1] - logits[:, 0]


def negative_probability(embeds: torch.Tensor, guidance: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """``[B]`` probability of the negative (backlit) member: CLIP-LIT's guidance loss per image."""
    return member_probabilities(embeds, guidance, logit_scale)[:, 0]


@LOSS_REGISTRY.register()
class CLIPIdentityLoss(nn.Module):
    """Identity (content) loss on encoder feature maps (CLIP-LIT code, ``clip_score.py``).

    ``L = reduce_b Σ_l w_l · MSE(Φ_l(out_b), Φ_l(in_b))`` with the MSE a mean over C×H×W. The originals *sum* over
    the batch (``batch_reduction: sum``) and use ``layer_weights [1, 1, 1, 1, 0.5]`` in guided training and
    ``[1, 1, 1, 1, 1]`` in the reconstruction warm-up (pass ``layer_weights`` to ``forward`` to switch).
    """

    def __init__(self, loss_weight: float = 1.0, layer_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 0.5),
                 batch_reduction: str = 'sum') -> None:
        super().__init__()
        self.loss_weight = _check_weight(loss_weight, 'CLIPIdentityLoss')
        self.layer_weights = self._check_layer_weights(layer_weights)
        self.batch_reduction = _check_choice(batch_reduction, ('sum', 'mean'), 'batch_reduction', 'CLIPIdentityLoss')

    @staticmethod
    def _check_layer_weights(weights: Sequence[float]) -> list:
        if (not isinstance(weights, (list, tuple)) or not weights
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)):
            raise RaveError(f'CLIPIdentityLoss: option "layer_weights" must be a list of non-negative numbers, one '
                            f'per feature map (stem, layer1..layer4), got {weights!r}.')
        return [float(w) for w in weights]

    @float32_loss
    def forward(self, output_features: Sequence[torch.Tensor], input_features: Sequence[torch.Tensor],
                layer_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
        weights = self.layer_weights if layer_weights is None else self._check_layer_weights(layer_weights)
        if not (len(output_features) == len(input_features) == len(weights)):
            raise RaveError(f'CLIPIdentityLoss: {len(weights)} layer weights (option "layer_weights") for '
                            f'{len(output_features)} output and {len(input_features)} input feature maps; '
                            'give one weight per feature map.')
        per_image = 0.0
        for weight, out, inp in zip(weights, output_features, input_features):
            if out.shape != inp.shape:
                raise RaveError(f'CLIPIdentityLoss: feature maps differ in shape: {list(out.shape)} vs '
                                f'{list(inp.shape)}.')
            per_image = per_image + weight * (out.float() - inp.float()).pow(2).flatten(1).mean(dim=1)
        return self.loss_weight * _reduce(per_image, self.batch_reduction)


#: ``PromptGuidanceLoss`` ``stop_at`` values whose target the model computes from ``prompt_data``'s two sets
SET_TARGETS = ('well_lit', 'set_gap')


@LOSS_REGISTRY.register()
class PromptGuidanceLoss(nn.Module):
    """CLIP-LIT / CLIP-LIT-Latent guidance: probability that an image matches the negative member.

    ``p_neg = softmax(scale · [cos(e, g_0), cos(e, g_1)])[0]``, reduced over the batch (official: mean).

    ``stop_at`` (not in the originals) gives the push a target: an image whose well-lit probability ``1 - p_neg``
    has reached ``t`` adds nothing, ``max(0, p_neg - (1 - t))``. ``t`` is a number in (0, 1), or ``well_lit``: the
    mean well-lit probability of the well-lit training images under the frozen pair, which the model passes to
    ``forward`` at every network stage (``CLIPLITModel``), or ``set_gap``: one target per image, its input's
    logit ``scale · (cos(e, g_1) - cos(e, g_0))`` raised by the gap between the mean logits of the well-lit and the
    backlit training images, at most the ``well_lit`` target (the model passes the ``[B]`` targets): every image
    moves as far as the two sets lie apart, and one the pair finds hard is not pushed for as long as training runs.
    ``~`` (default): the originals' loss, which pushes every image towards probability 1 however far past the
    well-lit images it already is. ``pull_back: true`` also pulls an image that is past the target back to it,
    ``|p_neg - (1 - t)|``, so that a later pair can undo what an earlier one overdid.
    """

    def __init__(self, loss_weight: float = 1.0, logit_scale: float = 100.0, reduction: str = 'mean',
                 stop_at: Union[None, str, float] = None, pull_back: bool = False) -> None:
        super().__init__()
        self.loss_weight = _check_weight(loss_weight, 'PromptGuidanceLoss')
        self.logit_scale = float(logit_scale)
        self.reduction = _check_choice(reduction, REDUCTIONS, 'reduction', 'PromptGuidanceLoss')
        if not (stop_at is None or stop_at in SET_TARGETS or (isinstance(stop_at, (int, float))
                                                               and not isinstance(stop_at, bool) and 0 < stop_at < 1)):
            raise RaveError(f'PromptGuidanceLoss: option "stop_at" must be ~, well_lit, set_gap or a probability '
                            f'strictly between 0 and 1, got {stop_at!r}.')
        if not isinstance(pull_back, bool) or (pull_back and stop_at is None):
            raise RaveError(f'PromptGuidanceLoss: option "pull_back" must be true or false and needs "stop_at" (the '
                            f'target to pull back to), got pull_back={pull_back!r}, stop_at={stop_at!r}.')
        self.stop_at = stop_at
        self.pull_back = pull_back

    @float32_loss
    def forward(self, image_embeds: torch.Tensor, guidance: torch.Tensor,
                target: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
        """``target``: the well-lit probability at which the push stops, one for the batch or ``[B]`` (required with
        ``stop_at: well_lit`` or ``set_gap``)."""
        _check_pair(guidance, image_embeds, 'PromptGuidanceLoss')
        p_neg = negative_probability(image_embeds, guidance, self.logit_scale)
        if self.stop_at in SET_TARGETS and target is None:
            raise RaveError(f'PromptGuidanceLoss with stop_at: {self.stop_at} needs the target probability as '
                            '"target"; it is computed by CLIPLITModel, or give stop_at a number.')
        if self.stop_at is not None:
            target = self.stop_at if target is None else target
            excess = p_neg - (1 - target)
            p_neg = excess.abs() if self.pull_back else excess.clamp(min=0)
        return self.loss_weight * _reduce(p_neg, self.reduction)


@LOSS_REGISTRY.register()
class PromptInitLoss(nn.Module):
    """Prompt/latent initialisation: cross-entropy of ``scale · ê · ĝᵀ`` with labels 0 backlit, 1 well-lit.

    Image features are L2-normalised here too (a no-op for the precomputed normalised features of the originals).
    """

    def __init__(self, loss_weight: float = 1.0, logit_scale: float = 100.0, reduction: str = 'mean') -> None:
        super().__init__()
        self.loss_weight = _check_weight(loss_weight, 'PromptInitLoss')
        self.logit_scale = float(logit_scale)
        self.reduction = _check_choice(reduction, REDUCTIONS, 'reduction', 'PromptInitLoss')

    @float32_loss
    def forward(self, image_embeds: torch.Tensor, guidance: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_pair(guidance, image_embeds, 'PromptInitLoss')
        if labels.shape != image_embeds.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
            raise RaveError(f'PromptInitLoss: labels must be an integer [B] tensor (0 backlit, 1 well-lit), got '
                            f'{labels.dtype} {list(labels.shape)} for {image_embeds.shape[0]} images.')
        logits = self.logit_scale * F.normalize(image_embeds.float(), dim=-1) @ F.normalize(guidance.float(),
                                                                                            dim=-1).t()
        return self.loss_weight * F.cross_entropy(logits, labels.long(), reduction=self.reduction)


@LOSS_REGISTRY.register()
class PromptRankingLoss(nn.Module):
    """Rank (margin) loss for prompt/latent refinement (CLIP-LIT code, ``train.py``), with S(I) = p_neg(I).

    ``forward(guidance, backlit, welllit, newest=None, previous=None)``; every set is a ``[B, D]`` embedding batch
    of one encoder, and every term is ``mean_b max(0, S(x2) - S(x1) + m)`` (``nn.MarginRankingLoss``):

    * 2 sets (no results yet): ``[S(w) - S(b) + 1.0]``;
    * 3 sets (``newest`` = this round's results I_t): ``[S(w)-S(b)+0.9] + [S(I_t)-S(b)+0.9] + [S(w)-S(I_t)+0.2]``;
    * 4 sets (``previous`` = I_{t-1}), official order ``S(b) > S(I_t) > S(I_{t-1}) > S(w)``:
      ``[S(w)-S(b)+0.9] + [S(I_t)-S(b)+0.9] + [S(I_{t-1})-S(I_t)+0.1] + [S(w)-S(I_{t-1})+0.1]``.

    ``newest_closer_to_backlit: false`` swaps I_t and I_{t-1} in the 4-set case, the order the CLIP-LIT paper's
    equation is recalled to use (not checked against its text); the default follows the code, which trained the
    released prompts (docs/references.md, "Decisions"). ``margins`` overrides the (large, small) margin pair of
    each variant.
    """

    DEFAULT_MARGINS = {2: (1.0, 0.2), 3: (0.9, 0.2), 4: (0.9, 0.1)}

    def __init__(self, loss_weight: float = 1.0, logit_scale: float = 100.0, reduction: str = 'mean',
                 margins: Optional[dict] = None, newest_closer_to_backlit: bool = True) -> None:
        super().__init__()
        self.loss_weight = _check_weight(loss_weight, 'PromptRankingLoss')
        self.logit_scale = float(logit_scale)
        self.reduction = _check_choice(reduction, ('mean', 'sum'), 'reduction', 'PromptRankingLoss')
        self.margins = dict(self.DEFAULT_MARGINS)
        for key, pair in (margins or {}).items():
            if int(key) not in self.margins or not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise RaveError('PromptRankingLoss: option "margins" maps a number of image sets (2, 3 or 4) to '
                                f'a [large, small] margin pair, got {key!r}: {pair!r}.')
            self.margins[int(key)] = (float(pair[0]), float(pair[1]))
        if not isinstance(newest_closer_to_backlit, bool):
            raise RaveError('PromptRankingLoss: option "newest_closer_to_backlit" must be true or false.')
        self.newest_closer_to_backlit = newest_closer_to_backlit

    def _term(self, higher: torch.Tensor, lower: torch.Tensor, margin: float) -> torch.Tensor:
        return _reduce(torch.clamp(lower - higher + margin, min=0.0), self.reduction)

    @float32_loss
    def forward(self, guidance: torch.Tensor, backlit: torch.Tensor, welllit: torch.Tensor,
                newest: Optional[torch.Tensor] = None, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        if previous is not None and newest is None:
            raise RaveError('PromptRankingLoss: "previous" results need "newest" results too.')
        sets = [s for s in (backlit, welllit, newest, previous) if s is not None]
        for embeds in sets:
            _check_pair(guidance, embeds, 'PromptRankingLoss')
        s_b, s_w = (negative_probability(e, guidance, self.logit_scale) for e in (backlit, welllit))
        large, small = self.margins[len(sets)]
        loss = self._term(s_b, s_w, large)
        if newest is not None and previous is None:
            s_t = negative_probability(newest, guidance, self.logit_scale)
            loss = loss + self._term(s_b, s_t, large) + self._term(s_t, s_w, small)
        elif previous is not None:
            s_t, s_p = (negative_probability(e, guidance, self.logit_scale) for e in (newest, previous))
            closer, farther = (s_t, s_p) if self.newest_closer_to_backlit else (s_p, s_t)
            loss = (loss + self._term(s_b, closer, large) + self._term(closer, farther, small)
                    + self._term(farther, s_w, small))
        return self.loss_weight * loss


@LOSS_REGISTRY.register()
class ResidualVectorLoss(nn.Module):
    """RAVE loss: ``reduce_b (cos(e_b, v_residual) - threshold)²`` (official: mean over the batch).

    This is the RAVE code's form (``clip_score.py``): it pulls each image's coordinate along the residual to the
    well-lit mean's (``threshold``) rather than maximising the cosine."""

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean') -> None:
        super().__init__()
        self.loss_weight = _check_weight(loss_weight, 'ResidualVectorLoss')
        self.reduction = _check_choice(reduction, REDUCTIONS, 'reduction', 'ResidualVectorLoss')

    @float32_loss
    def forward(self, image_embeds: torch.Tensor, residual: torch.Tensor,
                threshold: Union[float, torch.Tensor]) -> torch.Tensor:
        if residual.dim() != 1 or image_embeds.dim() != 2 or image_embeds.shape[1] != residual.shape[0]:
            raise RaveError(f'ResidualVectorLoss: image embeddings {list(image_embeds.shape)} and residual '
                            f'{list(residual.shape)} must be [B, D] and [D] of one encoder.')
        cosine = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(residual.float(), dim=0)
        threshold = torch.as_tensor(threshold, dtype=cosine.dtype, device=cosine.device)
        return self.loss_weight * _reduce((cosine - threshold).pow(2), self.reduction)


@LOSS_REGISTRY.register()
class ResidualTranslationLoss(nn.Module):
    """``reduce_b |n(e_b) - (n(x_b) + step · v_residual)|²``: each output's normalised embedding ``n(e_b)`` is pulled
    to its input's ``n(x_b)`` moved along the residual by ``step`` (official: no such loss; mean over the batch).

    Not in the RAVE code. RAVE's loss fixes one number per image, the cosine with the residual, and leaves the rest
    of the embedding free; with CLIP that number carries the meaning, but with a CLIP-free statistics encoder (the
    offline demos) many images share it, and the loss is met by changes the ground truth does not make. This loss
    fixes every coordinate, from where the image starts: with ``step`` the distance of the two set means
    (``ResidualVector.mean_distance``) and an undebiased residual, ``step · v_residual`` is ``v_well_lit -
    v_backlit``, so each image is moved by the average backlit-to-well-lit change. docs/training.md, "The
    translation loss", has the measurements.

    ``off_axis_weight`` (default 1: the whole squared distance) weights the part of ``n(e_b) - target`` orthogonal to
    the residual against the part along it: below 1 the output may leave its input's off-residual coordinates (which
    a ground truth does change: on the mild and demo sets by a third to four fifths as far as it moves along the
    residual), 0 fixes only the position along the residual."""

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean', off_axis_weight: float = 1.0) -> None:
        super().__init__()
        self.loss_weight = _check_weight(loss_weight, 'ResidualTranslationLoss')
        self.reduction = _check_choice(reduction, REDUCTIONS, 'reduction', 'ResidualTranslationLoss')
        weight = _check_weight(off_axis_weight, 'ResidualTranslationLoss off_axis_weight')
        if not 0.0 <= weight <= 1.0:
            raise RaveError(f'ResidualTranslationLoss: option "off_axis_weight" must lie in [0, 1], got {weight!r}.')
        self.off_axis_weight = weight

    @float32_loss
    def forward(self, image_embeds: torch.Tensor, input_embeds: torch.Tensor, residual: torch.Tensor,
                step: Union[float, torch.Tensor]) -> torch.Tensor:
        if (residual.dim() != 1 or image_embeds.dim() != 2 or image_embeds.shape != input_embeds.shape
                or image_embeds.shape[1] != residual.shape[0]):
            raise RaveError(f'ResidualTranslationLoss: image embeddings {list(image_embeds.shape)}, input embeddings '
                            f'{list(input_embeds.shape)} and residual {list(residual.shape)} must be [B, D], [B, D] '
                            'and [D] of one encoder.')
        step = torch.as_tensor(step, dtype=torch.float32, device=residual.device)
        direction = F.normalize(residual.float(), dim=0)
        target = F.normalize(input_embeds.float(), dim=-1) + step * direction
        gap = F.normalize(image_embeds.float(), dim=-1) - target
        distance = gap.pow(2).sum(-1)
        if self.off_axis_weight != 1.0:  # |gap|² = along² + off²  ->  along² + w · off²
            along = gap @ direction
            distance = self.off_axis_weight * distance + (1.0 - self.off_axis_weight) * along.pow(2)
        return self.loss_weight * _reduce(distance, self.reduction)
