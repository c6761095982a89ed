"""CLIP guidance losses against independent hand computations on small tensors (definitions: the originals'
``clip_score.py`` and ``train.py``, docs/references.md)."""
import math

import cv2
import numpy as np
import pytest
import torch
from basicsr.losses import build_loss

from rave_basicsr.guidance.encoders import build_image_encoder
from rave_basicsr.losses.clip_guidance_loss import (CLIPIdentityLoss, PromptGuidanceLoss, PromptInitLoss,
                                                    PromptRankingLoss, ResidualTranslationLoss,
                                                    ResidualVectorLoss, member_probabilities, pair_logits)
from rave_basicsr.losses.illumination_loss import IlluminationSmoothnessLoss
from rave_basicsr.utils.errors import RaveError


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def p_neg_hand(e, g):
    """Softmax over 100·cos with the (negative, positive) pair, by plain Python arithmetic."""
    e = unit(e)
    sims = [100 * sum(a * b for a, b in zip(e, unit(gi))) for gi in g]
    m = max(sims)
    exps = [math.exp(s - m) for s in sims]
    return exps[0] / sum(exps)


E = [[1.0, 0.0, 0.5], [0.2, 0.3, -0.1], [-0.4, 0.1, 0.9]]
G = [[0.9, 0.1, 0.4], [0.0, 1.0, 0.2]]


def test_identity_loss_hand_computation():
    out = [torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]]), torch.tensor([[3.0], [1.0]])]
    inp = [torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]]), torch.tensor([[1.0], [1.0]])]
    # image 0: layer0 mse (1+4)/2 = 2.5, layer1 (3-1)^2 = 4; image 1: layer0 1, layer1 0
    loss = CLIPIdentityLoss(layer_weights=[1.0, 0.5])
    assert loss(out, inp).item() == pytest.approx((2.5 + 0.5 * 4) + (1 + 0))
    assert CLIPIdentityLoss(layer_weights=[1.0, 0.5], batch_reduction='mean')(out, inp).item() == pytest.approx(2.75)
    assert CLIPIdentityLoss(loss_weight=22.5, layer_weights=[1, 1])(out, inp).item() == pytest.approx(22.5 * 7.5)
    assert loss(out, inp, layer_weights=[1, 1]).item() == pytest.approx(7.5)
    assert CLIPIdentityLoss().layer_weights == [1, 1, 1, 1, 0.5]


def test_identity_loss_bad_input():
    with pytest.raises(RaveError, match=r'option "layer_weights" must be a list of non-negative numbers, '
                                        r'.*got \[1, -1\]'):
        CLIPIdentityLoss(layer_weights=[1, -1])
    with pytest.raises(RaveError, match=r"""option "batch_reduction" must be one of \['sum', 'mean'\], got 'avg'"""):
        CLIPIdentityLoss(batch_reduction='avg')
    with pytest.raises(RaveError, match='5 layer weights'):
        CLIPIdentityLoss()([torch.zeros(1, 2)], [torch.zeros(1, 2)])


def test_prompt_guidance_hand_computation():
    expected = [p_neg_hand(e, G) for e in E]
    loss = PromptGuidanceLoss()
    assert loss(torch.tensor(E), torch.tensor(G)).item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    per = PromptGuidanceLoss(reduction='none', loss_weight=320)(torch.tensor(E), torch.tensor(G))
    assert per.tolist() == pytest.approx([320 * p for p in expected], rel=1e-5)
    with pytest.raises(RaveError, match=r'\[2, D\]'):
        loss(torch.tensor(E), torch.tensor(G[:1]))
    with pytest.raises(RaveError, match=r'image embeddings \[3, 4\] do not match the guidance pair \[2, 3\]'):
        loss(torch.zeros(3, 4), torch.tensor(G))


def test_pair_logits_are_the_logits_of_the_well_lit_probability():
    logits = pair_logits(torch.tensor(E), torch.tensor(G), 20.0)
    probabilities = member_probabilities(torch.tensor(E), torch.tensor(G), 20.0)
    torch.testing.assert_close(logits.sigmoid(), probabilities[:, 1])
    by_hand = [20 * sum(a * (b1 - b0) for a, b0, b1 in zip(unit(e), unit(G[0]), unit(G[1]))) for e in E]
    assert logits.tolist() == pytest.approx(by_hand, rel=1e-5)


def test_prompt_guidance_stops_at_its_target_probability():
    expected = [p_neg_hand(e, G) for e in E]
    low, middle, _ = sorted(expected)
    target = 1 - (low + middle) / 2  # one image is past the target, two fall short of it
    per = PromptGuidanceLoss(reduction='none', stop_at=target)(torch.tensor(E), torch.tensor(G))
    assert per.tolist() == pytest.approx([max(0.0, p - (1 - target)) for p in expected], abs=1e-6)
    assert sum(v > 0 for v in per.tolist()) == 2
    well_lit = PromptGuidanceLoss(reduction='none', stop_at='well_lit')
    torch.testing.assert_close(well_lit(torch.tensor(E), torch.tensor(G), torch.tensor(target)), per)
    with pytest.raises(RaveError, match='stop_at: well_lit needs the target probability'):
        well_lit(torch.tensor(E), torch.tensor(G))
    per_image = torch.tensor([0.9, 1 - low, 0.2])  # set_gap: one target per image
    gap = PromptGuidanceLoss(reduction='none', stop_at='set_gap')(torch.tensor(E), torch.tensor(G), per_image)
    assert gap.tolist() == pytest.approx([max(0.0, p - (1 - t)) for p, t in zip(expected, per_image.tolist())],
                                         abs=1e-6)
    for bad in (0, 1.0, 'ground_truth', True):
        with pytest.raises(RaveError, match='option "stop_at" must be ~, well_lit, set_gap or a probability'):
            PromptGuidanceLoss(stop_at=bad)
    both = PromptGuidanceLoss(reduction='none', stop_at=target, pull_back=True)(torch.tensor(E), torch.tensor(G))
    assert both.tolist() == pytest.approx([abs(p - (1 - target)) for p in expected], abs=1e-6)
    assert all(v > 0 for v in both.tolist())  # the image past the target is pulled back too
    for bad in ({'pull_back': True}, {'pull_back': 'yes', 'stop_at': 0.5}):
        with pytest.raises(RaveError, match='option "pull_back" must be true or false and needs "stop_at"'):
            PromptGuidanceLoss(**bad)


def test_prompt_init_cross_entropy_hand_computation():
    labels = [1, 0, 0]  # mostly against the similarities, so that the loss is far from zero in float32
    expected = 0.0
    for e, y in zip(E, labels):  # CE = log Σ exp(s_i) − s_y with s_i = 100·cos(e, g_i)
        sims = [100 * sum(a * b for a, b in zip(unit(e), unit(g))) for g in G]
        m = max(sims)
        expected += m + math.log(sum(math.exp(s - m) for s in sims)) - sims[y]
    loss = PromptInitLoss()(torch.tensor(E), torch.tensor(G), torch.tensor(labels))
    assert loss.item() == pytest.approx(expected / 3, rel=1e-4)
    with pytest.raises(RaveError, match=r'PromptInitLoss: labels must be an integer \[B\] tensor .*got torch.float32'):
        PromptInitLoss()(torch.tensor(E), torch.tensor(G), torch.tensor([1.0, 0.0, 0.0]))


def hinge(higher, lower, margin):
    return sum(max(0.0, lo - hi + margin) for hi, lo in zip(higher, lower)) / len(higher)


B = [[1.0, 0.1, 0.4], [0.8, 0.0, 0.3]]
W = [[0.1, 1.0, 0.2], [0.0, 0.9, 0.1]]
T = [[0.5, 0.5, 0.3], [0.6, 0.4, 0.3]]
P = [[0.3, 0.7, 0.2], [0.2, 0.6, 0.3]]


@pytest.mark.parametrize('sets', [2, 3, 4])
def test_ranking_loss_variants_hand_computation(sets):
    s = {k: [p_neg_hand(e, G) for e in v] for k, v in dict(b=B, w=W, t=T, p=P).items()}
    if sets == 2:
        expected = hinge(s['b'], s['w'], 1.0)
        args = ()
    elif sets == 3:
        expected = hinge(s['b'], s['w'], 0.9) + hinge(s['b'], s['t'], 0.9) + hinge(s['t'], s['w'], 0.2)
        args = (torch.tensor(T),)
    else:  # official: S(b) > S(I_t) > S(I_{t-1}) > S(w)
        expected = (hinge(s['b'], s['w'], 0.9) + hinge(s['b'], s['t'], 0.9) + hinge(s['t'], s['p'], 0.1)
                    + hinge(s['p'], s['w'], 0.1))
        args = (torch.tensor(T), torch.tensor(P))
    loss = PromptRankingLoss(loss_weight=200)(torch.tensor(G), torch.tensor(B), torch.tensor(W), *args)
    assert loss.item() == pytest.approx(200 * expected, rel=1e-5, abs=1e-6)


def test_ranking_loss_paper_order_and_bad_input():
    s = {k: [p_neg_hand(e, G) for e in v] for k, v in dict(b=B, w=W, t=T, p=P).items()}
    expected = (hinge(s['b'], s['w'], 0.9) + hinge(s['b'], s['p'], 0.9) + hinge(s['p'], s['t'], 0.1)
                + hinge(s['t'], s['w'], 0.1))
    loss = PromptRankingLoss(newest_closer_to_backlit=False)(*(torch.tensor(x) for x in (G, B, W, T, P)))
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    with pytest.raises(RaveError, match=r'option "margins" maps a number of image sets \(2, 3 or 4\) to .*got 5'):
        PromptRankingLoss(margins={5: [1, 1]})
    with pytest.raises(RaveError, match='"previous" results need "newest" results too'):
        PromptRankingLoss()(torch.tensor(G), torch.tensor(B), torch.tensor(W), None, torch.tensor(P))


def test_residual_loss_hand_computation():
    residual = [0.3, -0.2, 0.9]
    thr = 0.4
    r = unit(residual)
    expected = sum((sum(a * b for a, b in zip(unit(e), r)) - thr) ** 2 for e in E) / 3
    loss = ResidualVectorLoss(loss_weight=1920)(torch.tensor(E), torch.tensor(residual), thr)
    assert loss.item() == pytest.approx(1920 * expected, rel=1e-5)
    with pytest.raises(RaveError, match=r'ResidualVectorLoss: image embeddings \[3, 3\] and residual \[4\] must be'):
        ResidualVectorLoss()(torch.tensor(E), torch.zeros(4), thr)


def test_translation_loss_hand_computation():
    residual, step = [0.3, -0.2, 0.9], 0.25
    inputs = [[0.2, 0.5, 0.1], [1.0, 0.0, 0.3], [0.4, 0.4, 0.4]]
    r = unit(residual)
    expected = sum(sum((a - (b + step * c)) ** 2 for a, b, c in zip(unit(e), unit(x), r))
                   for e, x in zip(E, inputs)) / 3
    loss = ResidualTranslationLoss(loss_weight=50)(torch.tensor(E), torch.tensor(inputs), torch.tensor(residual), step)
    assert loss.item() == pytest.approx(50 * expected, rel=1e-5)
    # embeddings count by direction only, and an output left at its input costs nothing when the step is 0
    scaled = ResidualTranslationLoss(loss_weight=50)(3 * torch.tensor(E), torch.tensor(inputs), torch.tensor(residual),
                                                      step)
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-5)
    assert ResidualTranslationLoss()(torch.tensor(inputs), torch.tensor(inputs), torch.tensor(residual), 0.0) < 1e-12
    with pytest.raises(RaveError, match=r'ResidualTranslationLoss: image embeddings \[3, 3\], input embeddings '
                                        r'\[2, 3\] and residual \[3\] must be'):
        ResidualTranslationLoss()(torch.tensor(E), torch.tensor(inputs[:2]), torch.tensor(residual), step)


def test_translation_loss_weights_the_off_residual_part():
    residual, step = [0.3, -0.2, 0.9], 0.25
    inputs = [[0.2, 0.5, 0.1], [1.0, 0.0, 0.3], [0.4, 0.4, 0.4]]
    r = unit(residual)
    gaps = [[a - (b + step * c) for a, b, c in zip(unit(e), unit(x), r)] for e, x in zip(E, inputs)]
    along = [sum(g * c for g, c in zip(gap, r)) for gap in gaps]
    off = [sum(g * g for g in gap) - a * a for gap, a in zip(gaps, along)]
    args = (torch.tensor(E), torch.tensor(inputs), torch.tensor(residual), step)
    for weight in (0.0, 0.3, 1.0):
        expected = sum(a * a + weight * o for a, o in zip(along, off)) / 3
        loss = ResidualTranslationLoss(loss_weight=2, off_axis_weight=weight)(*args)
        assert loss.item() == pytest.approx(2 * expected, rel=1e-5)
    assert ResidualTranslationLoss(off_axis_weight=0.3)(*args) < ResidualTranslationLoss()(*args)
    with pytest.raises(RaveError, match=r'"off_axis_weight" must lie in \[0, 1\], got 1.5'):
        ResidualTranslationLoss(off_axis_weight=1.5)


def test_illumination_smoothness_hand_computation():
    light = torch.tensor([[[[1.0, 0.5, 0.5], [0.25, 0.25, 1e-6]]], [[[0.8, 0.8, 0.8], [0.8, 0.8, 0.8]]]])
    log = [[math.log(1.0), math.log(0.5), math.log(0.5)], [math.log(0.25), math.log(0.25), math.log(1e-3)]]
    across = sum(abs(row[j + 1] - row[j]) for row in log for j in range(2)) / 4
    down = sum(abs(log[1][j] - log[0][j]) for j in range(3)) / 3
    loss = IlluminationSmoothnessLoss(loss_weight=2.0)
    assert loss(light).item() == pytest.approx(2.0 * (across + down) / 2, rel=1e-5)  # image 2 is flat: mean of two
    per_image = IlluminationSmoothnessLoss(reduction='none')(light)
    assert per_image[1].item() == 0.0 and per_image[0].item() == pytest.approx(across + down, rel=1e-5)
    # an exposure change (a constant factor, above the floor) costs nothing; the loss is float32 under bf16 autocast
    above_floor = light[:1].clamp_min(0.1)
    assert IlluminationSmoothnessLoss()(0.3 * above_floor).item() == pytest.approx(
        IlluminationSmoothnessLoss()(above_floor).item(), rel=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert IlluminationSmoothnessLoss()(light.bfloat16()).dtype == torch.float32
    textured = (0.5 + 0.1 * torch.rand(1, 1, 16, 16)).requires_grad_(True)
    IlluminationSmoothnessLoss()(textured).backward()
    assert torch.isfinite(textured.grad).all() and textured.grad.abs().sum() > 0
    # detail_sigma: the mean distance of log L from its Gaussian blur (radius 3 sigma, reflect-101 borders)
    field = 0.2 + torch.rand(2, 1, 12, 10, generator=torch.Generator().manual_seed(0))
    expected = [np.abs(log - cv2.GaussianBlur(log, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT_101)).mean()
                for log in field.log()[:, 0].numpy()]
    detail = IlluminationSmoothnessLoss(detail_sigma=1.5, reduction='none')(field)
    assert detail.tolist() == pytest.approx(expected, rel=1e-4)
    assert IlluminationSmoothnessLoss(detail_sigma=1.5)(light[:, :, :1]).item() >= 0  # one row: replicated borders
    with pytest.raises(RaveError, match=r'IlluminationSmoothnessLoss: the illumination map must be N×C×H×W'):
        IlluminationSmoothnessLoss()(light[0])
    with pytest.raises(RaveError, match='IlluminationSmoothnessLoss: option "floor" must be a positive number'):
        IlluminationSmoothnessLoss(floor=0)


def test_losses_build_from_options():
    loss = build_loss({'type': 'ResidualVectorLoss', 'loss_weight': 1920.0})
    assert isinstance(loss, ResidualVectorLoss) and loss.loss_weight == 1920.0
    loss = build_loss({'type': 'ResidualTranslationLoss', 'loss_weight': 50.0})
    assert isinstance(loss, ResidualTranslationLoss) and loss.loss_weight == 50.0
    with pytest.raises(RaveError, match="""PromptGuidanceLoss: option "loss_weight" must be a number, got 'high'"""):
        build_loss({'type': 'PromptGuidanceLoss', 'loss_weight': 'high'})


def test_gradients_reach_image_not_encoder_weights():
    guidance = build_image_encoder({'model': 'rave-test-tiny-vit', 'pretrained': None})
    identity = build_image_encoder({'model': 'rave-test-tiny-rn', 'pretrained': None}, role='identity')
    source = torch.rand(2, 3, 40, 40)
    image = source.clone().mul_(1.2).clamp_(0, 1).requires_grad_(True)
    pair = torch.randn(2, guidance.embed_dim)
    embeds = guidance.encode_image(image)
    total = (PromptGuidanceLoss(loss_weight=320)(embeds, pair)
             + ResidualVectorLoss(loss_weight=1920)(embeds, pair[1] - pair[0], 0.2)
             + CLIPIdentityLoss(loss_weight=22.5)(identity.encode_image_features(image),
                                                  identity.encode_image_features(source)))
    total.backward()
    assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    for encoder in (guidance, identity):
        assert all(p.grad is None and not p.requires_grad for p in encoder.network.parameters())
