"""Frozen guidance encoders, differentiable preprocessing and the image-statistics encoder."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rave_basicsr.archs.image_stats_encoder_arch import ImageStatsEncoder
from rave_basicsr.archs.log_histogram_encoder_arch import LogHistogramEncoder
from rave_basicsr.guidance import open_clip_encoder
from rave_basicsr.guidance.encoders import build_image_encoder
from rave_basicsr.guidance.frozen_encoder import check_embedding_size, require_text_tower
from rave_basicsr.guidance.preprocess import CLIP_MEAN, CLIP_STD, parse_preprocess, preprocess_images
from rave_basicsr.utils.errors import RaveError

TINY_VIT = {'type': 'open_clip', 'model': 'rave-test-tiny-vit', 'pretrained': None}
TINY_RN = {'type': 'open_clip', 'model': 'rave-test-tiny-rn', 'pretrained': None, 'precision': 'fp32'}
STATS = {'type': 'arch', 'network': {'type': 'ImageStatsEncoder'}}


@pytest.fixture(scope='module')
def tiny_vit():
    return build_image_encoder(TINY_VIT)


@pytest.fixture(scope='module')
def tiny_rn():
    return build_image_encoder(TINY_RN, role='identity')


# ---------------------------------------------------------------- preprocessing
def test_default_preprocess_matches_original_loss_path():
    images = torch.rand(2, 3, 37, 53)
    cfg = parse_preprocess(None)
    expected = F.interpolate(images, size=(224, 224), mode='bilinear', align_corners=False, antialias=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(preprocess_images(images, cfg), (expected - mean) / std, atol=1e-6)


def test_gamma_raises_the_resized_images_to_its_power_before_the_normalisation():
    images = torch.rand(2, 3, 37, 53)
    cfg = parse_preprocess({'size': 32, 'gamma': 1.5})
    assert cfg.to_dict()['gamma'] == 1.5 and parse_preprocess(None).gamma == 1.0
    resized = F.interpolate(images, size=(32, 32), mode='bilinear', align_corners=False, antialias=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(preprocess_images(images, cfg), (resized.pow(1.5) - mean) / std, atol=1e-6)
    # the power spreads the highlights and squeezes the shadows: the same step costs more at the top than at black
    dark, bright = torch.full((1, 3, 32, 32), 0.1), torch.full((1, 3, 32, 32), 0.9)
    step = 0.02
    shift = {x: (preprocess_images(x + step, cfg) - preprocess_images(x, cfg)).abs().mean() for x in (dark, bright)}
    assert shift[bright] > 2.5 * shift[dark]


def test_center_crop_preprocess_approximates_clip_pil_preprocess():
    """Shorter-side bicubic antialiased resize + centre crop ≈ torchvision's PIL path (CLIP's own preprocess)."""
    from PIL import Image
    from torchvision import transforms

    generator = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 12, 18, generator=generator), size=(120, 180), mode='bilinear',
                           align_corners=False)
    array = (smooth[0].permute(1, 2, 0).numpy() * 255).round().astype('uint8')
    pil = transforms.Compose([transforms.Resize(64, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(64), transforms.ToTensor(),
                              transforms.Normalize(CLIP_MEAN, CLIP_STD)])(Image.fromarray(array))
    cfg = parse_preprocess({'size': 64, 'resize': 'shorter_side_center_crop', 'interpolation': 'bicubic',
                            'antialias': True})
    ours = preprocess_images(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255, cfg)[0]
    assert ours.shape == pil.shape == (3, 64, 64)
    assert (ours - pil).abs().mean() < 0.02  # in normalised units; differences are PIL's uint8 rounding


def test_preprocess_is_differentiable():
    images = torch.rand(1, 3, 20, 30, requires_grad=True)
    cfg = parse_preprocess({'size': 16, 'resize': 'shorter_side_center_crop'})
    preprocess_images(images, cfg).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize('block, message', [
    ({'resize': 'crop'}, r"""option "resize" must be one of \['squash', 'shorter_side_center_crop'\], got 'crop'"""),
    ({'interpolation': 'nearest'},
     r"""option "interpolation" must be one of \['bilinear', 'bicubic'\], got 'nearest'"""),
    ({'size': 0}, r'option "size" must be a positive integer \(pixels\), got 0'),
    ({'antialias': 'yes'}, r"""option "antialias" must be true or false, got 'yes'"""),
    ({'gamma': 0.5}, r'option "gamma" must be a number of at least 1 \(below 1 the power\'s gradient at black is '
                     r'infinite\), got 0.5'),
    ({'mean': [0.5]}, r"option 'mean' must be a list of three numbers \(R, G, B\), got \[0.5\]"),
    ({'colour': 1}, r"unknown option\(s\) \['colour'\]; known options are \['antialias', "),
])
def test_bad_preprocess_options(block, message):
    with pytest.raises(RaveError, match='^preprocess: ' + message):
        parse_preprocess(block)


# ---------------------------------------------------------------- open_clip encoders
def test_frozen_eval_and_out_of_owner_state_dict(tiny_rn):
    params = list(tiny_rn.network.parameters())
    assert params and not any(p.requires_grad for p in params)
    owner = torch.nn.Module()
    owner.conv = torch.nn.Conv2d(3, 3, 1)
    owner.encoder = tiny_rn
    owner.train()
    assert not tiny_rn.training and not tiny_rn.network.training
    assert all(not m.training for m in tiny_rn.network.modules())
    assert set(owner.state_dict()) == {'conv.weight', 'conv.bias'}
    assert len(list(owner.parameters())) == 2
    owner.load_state_dict(owner.state_dict(), strict=True)


def test_moves_with_owner_to(tiny_vit):
    owner = torch.nn.Module()
    owner.encoder = tiny_vit
    owner.to('meta')
    try:
        assert tiny_vit.device.type == 'meta'
    finally:
        owner.to_empty(device='cpu')  # restores real (uninitialised) storage; rebuild below for later tests
    rebuilt = build_image_encoder(TINY_VIT)
    assert rebuilt.device.type == 'cpu'


def test_encode_image_grad_reaches_image_not_weights(tiny_vit):
    encoder = build_image_encoder(TINY_VIT)
    images = torch.rand(2, 3, 40, 48, requires_grad=True)
    out = encoder.encode_image(images)
    assert out.shape == (2, encoder.embed_dim) and out.dtype == torch.float32
    out.pow(2).sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.network.parameters())


def test_random_init_is_deterministic_and_identity():
    a, b = build_image_encoder(TINY_VIT), build_image_encoder(TINY_VIT)
    c = build_image_encoder({**TINY_VIT, 'seed': 1})
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(a.encode_image(x), b.encode_image(x))
    assert not torch.equal(a.encode_image(x), c.encode_image(x))
    assert a.identity == b.identity != c.identity
    assert a.identity == {'type': 'open_clip', 'model': 'rave-test-tiny-vit', 'pretrained': None, 'init_seed': 0,
                          'quick_gelu': False, 'embed_dim': 32}
    state = torch.get_rng_state()
    build_image_encoder(TINY_VIT)
    assert torch.equal(state, torch.get_rng_state())  # building does not disturb the caller's random stream


def test_resnet_intermediate_features(tiny_rn):
    feats = tiny_rn.encode_image_features(torch.rand(2, 3, 50, 70))
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 16, 16), (32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    images = torch.rand(1, 3, 64, 64)  # already at the input size: preprocessing only normalises
    stem = tiny_rn.network.visual.stem(preprocess_images(images, tiny_rn.preprocess))
    assert torch.allclose(tiny_rn.encode_image_features(images)[0], stem, atol=1e-5)


def test_vit_has_no_intermediate_features(tiny_vit):
    with pytest.raises(RaveError, match=r'encoder \{.*"model": "rave-test-tiny-vit".*\} has no intermediate ResNet '
                                        r'features \(stem, layer1..layer4\), which the identity loss needs'):
        tiny_vit.encode_image_features(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize('precision, dtype', [('fp16', torch.float16), ('bf16', torch.bfloat16)])
def test_reduced_precision_identity_encoder(precision, dtype):
    half = build_image_encoder({**TINY_RN, 'precision': precision}, role='identity')
    full = build_image_encoder(TINY_RN, role='identity')
    assert half.network.visual.conv1.weight.dtype == dtype
    x = torch.rand(2, 3, 64, 64)
    feats_half, feats_full = half.encode_image_features(x), full.encode_image_features(x)
    assert all(f.dtype == torch.float32 for f in feats_half)
    for a, b in zip(feats_half, feats_full):
        assert (a - b).abs().max() <= 0.05 * b.abs().max() + 1e-3
    assert half.identity == full.identity  # precision does not change the embedding space


def test_identity_role_defaults_to_fp16():
    encoder = build_image_encoder({'model': 'rave-test-tiny-rn', 'pretrained': None}, role='identity')
    assert encoder.precision == 'fp16' and encoder.network.visual.conv1.weight.dtype == torch.float16
    guidance = build_image_encoder({'model': 'rave-test-tiny-rn', 'pretrained': None}, role='guidance')
    assert guidance.precision == 'fp32' and guidance.network.visual.conv1.weight.dtype == torch.float32


def test_openai_tag_gets_quick_gelu(monkeypatch):
    """OpenAI weights were trained with QuickGELU; open_clip 3.3.0 needs force_quick_gelu for them."""
    monkeypatch.setattr(open_clip_encoder, '_fetch_tag_weights', lambda model, tag, cache_dir: 'unused.bin')
    monkeypatch.setattr(open_clip_encoder, 'load_checked', lambda *args, **kwargs: None)
    encoder = build_image_encoder({}, role='guidance')  # defaults: ViT-B-32 + openai
    acts = [type(m).__name__ for m in encoder.network.modules()]
    assert 'QuickGELU' in acts and 'GELU' not in acts
    assert encoder.identity == {'type': 'open_clip', 'model': 'ViT-B-32', 'pretrained': 'openai',
                                'quick_gelu': True, 'embed_dim': 512}
    assert encoder.preprocess.size == 224 and encoder.preprocess.resize == 'squash'


def test_offline_fails_fast_with_local_file_hint():
    code = ('import rave_basicsr, time\n'
            'from rave_basicsr.guidance.encoders import build_image_encoder\n'
            'from rave_basicsr.utils.errors import RaveError\n'
            't = time.time()\n'
            'try:\n'
            '    build_image_encoder({}, role="identity")\n'
            'except RaveError as e:\n'
            '    print("ERR", time.time() - t, e)\n')
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': '/nonexistent-rave-hf-home'}
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('ERR')]
    assert line, proc.stdout + proc.stderr
    elapsed = float(line[0].split()[1])
    assert elapsed < 5.0
    assert "'openai'" in line[0] and "'RN101'" in line[0] and 'pretrained: /path/to/' in line[0]
    assert 'quick_gelu: true' in line[0]


def test_unknown_model_lists_close_matches():
    with pytest.raises(RaveError, match=r"unknown open_clip model 'ViT-B-23'.*ViT-B-32"):
        build_image_encoder({'model': 'ViT-B-23', 'pretrained': None})


def test_unknown_tag_lists_close_matches():
    with pytest.raises(RaveError, match=r"unknown pretrained tag 'opnai'.*openai"):
        build_image_encoder({'model': 'ViT-B-32', 'pretrained': 'opnai'})


def test_missing_weights_file():
    with pytest.raises(RaveError, match=r"""weights file '/nonexistent/weights.bin' \(option "pretrained"\) does """
                                        'not exist'):
        build_image_encoder({**TINY_VIT, 'pretrained': '/nonexistent/weights.bin'})


def test_local_weights_file_roundtrip_and_identity(tmp_path):
    source = build_image_encoder({**TINY_VIT, 'seed': 3})
    path = tmp_path / 'tiny.pt'
    torch.save(source.network.state_dict(), path)
    loaded = build_image_encoder({**TINY_VIT, 'pretrained': str(path)})
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded.encode_image(x), source.encode_image(x))
    assert loaded.identity['weights_sha256'] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert 'init_seed' not in loaded.identity


def test_weights_file_that_does_not_fit(tmp_path):
    path = tmp_path / 'rn.pt'
    torch.save(build_image_encoder(TINY_RN).network.state_dict(), path)
    with pytest.raises(RaveError) as info:
        build_image_encoder({**TINY_VIT, 'pretrained': str(path)})
    message = str(info.value)
    assert 'does not fit' in message and "'rave-test-tiny-vit'" in message and str(path) in message
    assert 'size mismatch' not in message and len(message) < 800


def test_local_dir(tmp_path):
    import json
    source = build_image_encoder({**TINY_VIT, 'seed': 5})
    cfg = json.loads((open_clip_encoder.CONFIG_DIR / 'rave-test-tiny-vit.json').read_text())
    (tmp_path / 'open_clip_config.json').write_text(json.dumps({'model_cfg': cfg}))
    torch.save(source.network.state_dict(), tmp_path / 'open_clip_pytorch_model.bin')
    loaded = build_image_encoder({'model': f'local-dir:{tmp_path}'})
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded.encode_image(x), source.encode_image(x))
    assert loaded.has_text_tower and loaded.identity['model'] == 'local-dir'
    with pytest.raises(RaveError, match='open_clip_config.json'):
        build_image_encoder({'model': f'local-dir:{tmp_path / "missing"}'})


@pytest.mark.parametrize('block, message', [
    ({'type': 'clip'}, r"""option "type" must be one of \['open_clip', 'timm', 'arch'\], got 'clip'"""),
    ({**TINY_VIT, 'precision': 'fp8'}, r"""option "precision" must be one of \['fp32', 'fp16', 'bf16'\], got 'fp8'"""),
    ({**TINY_VIT, 'seed': 'x'}, r"""option "seed" \(random-init seed\) must be an integer, got 'x'"""),
    ({**TINY_VIT, 'quick_gelu': 1}, r'option "quick_gelu" must be auto, true or false, got 1'),
    ({'model': 'hf-hub:org/x'}, r'"model: hf-hub:org/x" is not supported; download the repository .* and use '
                                r'"model: local-dir:FOLDER"'),
])
def test_bad_encoder_options(block, message):
    with pytest.raises(RaveError, match='^guidance encoder: ' + message):
        build_image_encoder(block)


# ---------------------------------------------------------------- image-only encoders
def test_timm_encoder_image_only():
    encoder = build_image_encoder({'type': 'timm', 'model': 'resnet18', 'preprocess': {'size': 64}})
    assert not encoder.has_text_tower
    images = torch.rand(2, 3, 48, 48, requires_grad=True)
    out = encoder.encode_image(images)
    assert out.shape == (2, 512) == (2, encoder.embed_dim)
    out.sum().backward()
    assert images.grad.abs().sum() > 0
    assert len(encoder.encode_image_features(torch.rand(1, 3, 64, 64))) == 5
    with pytest.raises(RaveError, match='CLIP-LIT text prompts needs an encoder with a text tower'):
        require_text_tower(encoder, 'CLIP-LIT text prompts')
    with pytest.raises(RaveError, match='^encode_soft_prompts needs an encoder with a text tower'):
        encoder.encode_soft_prompts(torch.zeros(2, 77, 8))


def test_timm_bad_inputs(tmp_path):
    with pytest.raises(RaveError, match=r"unknown timm model 'resnet181'.*resnet18"):
        build_image_encoder({'type': 'timm', 'model': 'resnet181'})
    with pytest.raises(RaveError, match=r'option "pretrained" of a timm encoder must be ~ \(random init\) or an '
                                        'existing weights file, got True'):
        build_image_encoder({'type': 'timm', 'model': 'resnet18', 'pretrained': True})
    path = tmp_path / 'r34.pth'
    import timm
    torch.save(timm.create_model('resnet34', num_classes=0).state_dict(), path)
    with pytest.raises(RaveError, match="does not fit timm model 'resnet18'"):
        build_image_encoder({'type': 'timm', 'model': 'resnet18', 'pretrained': str(path)})


def test_arch_encoder_and_bad_arch():
    encoder = build_image_encoder(STATS)
    assert encoder.embed_dim == ImageStatsEncoder().embed_dim == 31 and not encoder.has_text_tower
    assert encoder.identity == {'type': 'arch', 'network': {'type': 'ImageStatsEncoder'}, 'embed_dim': 31}
    with pytest.raises(RaveError, match=r"'ImageStatEncoder' is not in ARCH_REGISTRY.*ImageStatsEncoder"):
        build_image_encoder({'type': 'arch', 'network': {'type': 'ImageStatEncoder'}})
    with pytest.raises(RaveError, match=r'\[B, D\]'):  # an image-to-image network is no encoder
        build_image_encoder({'type': 'arch', 'network': {'type': 'SRVGGNetCompact', 'num_feat': 4, 'num_conv': 1,
                                                         'upscale': 1}})


def test_check_embedding_size(tiny_vit):
    check_embedding_size(tiny_vit, 32, 'residual file r.pth')
    with pytest.raises(RaveError, match=r'residual file r\.pth has 512-dimensional.*produces 32'):
        check_embedding_size(tiny_vit, 512, 'residual file r.pth')


# ---------------------------------------------------------------- image statistics encoder
def test_image_stats_encoder_layout_and_gradient():
    net = ImageStatsEncoder(grid_size=2, histogram_levels=4, histogram_softness=0.01)
    grey = torch.full((1, 3, 8, 8), 0.55)
    emb = net(grey)
    assert emb.shape == (1, 4 + 3 + 4 + 4)
    assert torch.allclose(emb[0, :4], torch.full((4,), 0.1), atol=1e-5)   # grid: 2·0.55 − 1
    assert torch.allclose(emb[0, 4:7], torch.full((3,), 0.1), atol=1e-5)  # channel means
    assert torch.allclose(emb[0, 7:11], -torch.ones(4), atol=1e-5)        # no spread
    # levels 0.125, 0.375, 0.625, 0.875: the grey is brighter than the first two, darker than the last two
    assert torch.allclose(emb[0, 11:], torch.tensor([-1.0, -1.0, 1.0, 1.0]), atol=2e-3)
    with pytest.raises(RaveError, match='option "histogram_levels" must be a positive integer, got 0'):
        ImageStatsEncoder(histogram_levels=0)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    net(images).sum().backward()
    assert images.grad.abs().sum() > 0


def test_image_stats_encoder_cone():
    """cone: the same statistics in [0, 1] (away from the origin); differences only halve, cosines to a residual
    change."""
    centred, cone = ImageStatsEncoder(), ImageStatsEncoder(cone=True)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cone(images), 0.5 * (centred(images) + 1), atol=1e-6)
    assert cone(images).min() >= 0 and cone(images).max() <= 1
    white, dark = torch.ones(1, 3, 16, 16), torch.full((1, 3, 16, 16), 0.1)
    assert torch.allclose(cone(white) - cone(dark), 0.5 * (centred(white) - centred(dark)), atol=1e-6)
    assert torch.nn.functional.cosine_similarity(cone(images[:1]), cone(images[1:2])) > 0.5


def test_image_stats_mean_abs_spread_does_not_grow_with_the_distance_from_the_mean():
    """spread: std gives a pixel leverage on the spread in proportion to its distance from the mean (the sky's
    brightest pixels the most); mean_abs gives every pixel on one side of the mean the same, and equals the mean
    absolute deviation."""
    backlit = torch.full((1, 3, 10, 10), 0.2)
    backlit[..., :2, :] = 0.9
    backlit[..., 1, 9] = 0.6  # a bright fifth of 0.9 but one pixel of 0.6
    with pytest.raises(RaveError, match="option \"spread\" must be one of \\['std', 'mean_abs'\\], got 'mad'"):
        ImageStatsEncoder(spread='mad')
    mean = backlit.mean().item()
    leverage = {}
    for spread in ('std', 'mean_abs'):
        net = ImageStatsEncoder(grid_size=1, histogram_levels=1, spread=spread)
        image = backlit.clone().requires_grad_(True)
        luma_spread = net(image)[0, 7]  # 1 grid cell, 3 means, 3 channel spreads, then the luminance spread
        luma_spread.backward()
        grad = image.grad[0].sum(0)
        leverage[spread] = (grad[0, 0] / grad[1, 9]).item()  # the 0.9 pixel's leverage over the 0.6 pixel's
        if spread == 'mean_abs':
            luma = backlit.mean(1)
            assert luma_spread.item() == pytest.approx(4 * (luma - luma.mean()).abs().mean().item() - 1, abs=1e-6)
    assert leverage['std'] == pytest.approx((0.9 - mean) / (0.6 - mean), rel=1e-3)
    assert leverage['mean_abs'] == pytest.approx(1.0, rel=1e-3)


def test_image_stats_residual_pushes_backlit_towards_welllit():
    """The RAVE residual of the stats encoder: a gradient step on a backlit image brightens its dark subject."""
    generator = torch.Generator().manual_seed(0)
    welllit = (0.45 + 0.2 * torch.rand(6, 3, 32, 32, generator=generator)).clamp(0, 1)
    backlit = 0.08 * torch.rand(6, 3, 32, 32, generator=generator)
    backlit[..., :10, :] = 0.95  # bright sky, dark subject
    encoder = build_image_encoder(STATS)
    with torch.no_grad():
        v_w = F.normalize(F.normalize(encoder.encode_image(welllit), dim=-1).mean(0), dim=0)
        v_b = F.normalize(F.normalize(encoder.encode_image(backlit), dim=-1).mean(0), dim=0)
    residual = F.normalize(v_w - v_b, dim=0)
    threshold = float(v_w @ residual)
    image = backlit[:1].clone().requires_grad_(True)
    cos_before = float(F.normalize(encoder.encode_image(image), dim=-1) @ residual)
    loss = (F.normalize(encoder.encode_image(image), dim=-1) @ residual - threshold).pow(2).mean()
    loss.backward()
    assert cos_before < threshold
    assert image.grad[..., 10:, :].mean() < 0  # descending the loss raises the dark subject's values


# ---------------------------------------------------------------- log-luminance histogram encoder
def test_log_histogram_encoder_layout():
    """levels at log2 -4, -3, -2, -1 (1/16 .. 1/2): a grey of 0.3 (log2 -1.74) lies above the first three, below
    the last; the anchor is constant."""
    net = LogHistogramEncoder(levels=4, log2_range=(-4, -1), softness=0.01, anchor=3.0, epsilon=1e-6)
    emb = net(torch.full((2, 3, 8, 8), 0.3))
    assert emb.shape == (2, 5) and net.embed_dim == 5
    assert torch.allclose(emb[0], torch.tensor([0.0, 0.0, 0.0, 1.0, 3.0]), atol=1e-4)
    half = torch.full((1, 3, 8, 8), 0.3)
    half[..., :4, :] = 0.01  # half the pixels below every level
    assert torch.allclose(net(half)[0, :4], torch.tensor([0.5, 0.5, 0.5, 1.0]), atol=1e-4)


def test_log_histogram_encoder_highlight_coordinate():
    """With highlight_weight > 0 one more coordinate: the weight times the fraction of pixels above
    highlight_level in linear luminance; the histogram and the anchor are unchanged."""
    plain = LogHistogramEncoder(levels=4, log2_range=(-4, -1))
    net = LogHistogramEncoder(levels=4, log2_range=(-4, -1), highlight_weight=2.0, highlight_level=0.9,
                              highlight_softness=0.001)
    image = torch.full((1, 3, 8, 8), 0.3)
    image[..., :2, :] = 1.0  # a quarter of the pixels blown out
    emb = net(image)
    assert emb.shape == (1, 6) and net.embed_dim == 6 and plain.embed_dim == 5
    assert torch.allclose(emb[:, :5], plain(image))
    assert torch.allclose(emb[0, 5], torch.tensor(2.0 * 0.25), atol=1e-4)


@pytest.mark.parametrize('option, value, message', [
    ('levels', 1, 'option "levels" must be an integer >= 2, got 1'),
    ('log2_range', (0, -7), r'option "log2_range" must be \[low, high\] with low < high'),
    ('softness', 0, 'option "softness" must be positive, got 0'),
    ('anchor', -1.0, 'option "anchor" must be positive'),
    ('highlight_weight', -1, r'option "highlight_weight" must be >= 0 \(0 leaves the highlight coordinate out\)'),
    ('highlight_level', 1.0, r'option "highlight_level" \(linear luminance\) must lie in \(0, 1\), got 1.0'),
    ('highlight_softness', 0, 'option "highlight_softness" must be positive'),
])
def test_log_histogram_encoder_rejects_bad_options(option, value, message):
    with pytest.raises(RaveError, match=message):
        LogHistogramEncoder(**{option: value})
    with pytest.raises(RaveError, match=r'expects \[B, 3, H, W\] images, got shape \[3, 8, 8\]'):
        LogHistogramEncoder()(torch.rand(3, 8, 8))


def test_log_histogram_encoder_pulls_dark_and_bright_pixels_alike():
    """Through the network's output I / L, a change of log L moves every pixel's log-luminance alike, so a dark and a
    bright pixel, each sitting on a level, get the same gradient per unit of log L; the linear statistics of the
    ImageStatsEncoder weigh them by their brightness."""
    levels = LogHistogramEncoder(levels=8, log2_range=(-7, 0), softness=0.3, epsilon=1e-9)
    dark, bright = 2.0 ** -7, 1.0  # the first and the last level
    image = torch.tensor([dark, bright]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    log_illumination = torch.zeros(1, 1, 1, 2, requires_grad=True)
    levels(image * torch.exp(-log_illumination)).sum().backward()
    grad = log_illumination.grad.flatten()
    assert torch.allclose(grad[0], grad[1], rtol=1e-3) and grad[0] > 0
    log_illumination.grad = None
    ImageStatsEncoder(grid_size=1, histogram_levels=8)(image * torch.exp(-log_illumination)).sum().backward()
    grad = log_illumination.grad.flatten().abs()
    assert grad[1] > 20 * grad[0]


def test_log_histogram_encoder_computes_in_float32_under_autocast():
    """Mixed-precision training hands it bf16 images inside autocast: the histogram is still computed in float32
    (a luminance taken by a convolution or a matmul would run in bf16 under autocast, and bf16 log-luminance moves
    pixels between levels)."""
    net = LogHistogramEncoder()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = net(images.bfloat16().float())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = net(images.bfloat16())
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, reference, atol=1e-6)
