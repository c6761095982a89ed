"""Factory calls without ``device=`` would put tensors on the CPU while the model runs on a GPU. CI has no GPU, so
the code that builds tensors inside losses, preprocessing, tiling, the residual, the NaN check and the rank-mean
helpers runs here on real CPU inputs with the *default* device set to ``meta``: any tensor made without naming its
device lands on ``meta`` and the computation fails, as it would on CUDA."""
import contextlib

import pytest
import torch
import torch.distributed as dist
from basicsr.models import build_model

from rave_basicsr.archs.backlit_unet_arch import BacklitUNet
from rave_basicsr.guidance.encoders import build_image_encoder
from rave_basicsr.guidance.preprocess import parse_preprocess, preprocess_images
from rave_basicsr.inference.enhancer import Enhancer
from rave_basicsr.inference.tiling import tiled_forward
from rave_basicsr.losses.clip_guidance_loss import (CLIPIdentityLoss, PromptGuidanceLoss, PromptInitLoss,
                                                    PromptRankingLoss, ResidualTranslationLoss,
                                                    ResidualVectorLoss)
from rave_basicsr.data.image_source import ImageSource
from rave_basicsr.data.transforms import to_tensor
from rave_basicsr.residual.compute import compute_residual, residual_from_embeddings
from tests.pipeline_helpers import free_port
from tests.rave_helpers import STATS_GUIDANCE, demo_data, model_options, rave_options


@contextlib.contextmanager
def default_device_meta():
    """Inside, a factory call without ``device=`` makes a ``meta`` tensor, which cannot meet real ones."""
    with torch.device('meta'):
        assert torch.empty(1).device.type == 'meta'
        yield


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp('demo'), size=40, n_train=3, n_welllit=3, n_val=1)


def test_losses():
    g = torch.Generator().manual_seed(0)
    pair, embeds, other = torch.randn(2, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    features = [torch.rand(4, 3, 5, 5, generator=g) for _ in range(5)]
    labels, threshold = torch.tensor([0, 1, 0, 1]), torch.tensor(0.1)
    with default_device_meta():
        values = [CLIPIdentityLoss()(features, [f.flip(0) for f in features]), PromptGuidanceLoss()(embeds, pair),
                  PromptInitLoss()(embeds, pair, labels), PromptRankingLoss()(pair, embeds, other, other, embeds),
                  ResidualVectorLoss()(embeds, pair[0], 0.1), ResidualVectorLoss()(embeds, pair[0], threshold),
                  ResidualTranslationLoss()(embeds, other, pair[0], threshold)]
    assert all(value.device.type == 'cpu' and torch.isfinite(value) for value in values)


@pytest.mark.parametrize('resize', ['squash', 'shorter_side_center_crop'])
def test_preprocessing(resize):
    images = torch.rand(2, 3, 30, 50)
    cfg = parse_preprocess({'size': 24, 'resize': resize})
    with default_device_meta():
        out = preprocess_images(images, cfg)
    assert out.device.type == 'cpu' and out.shape == (2, 3, 24, 24)


def test_exact_tiling_and_the_enhancer():
    torch.manual_seed(0)
    network = BacklitUNet(outer_padding='reflect', division_eps=0.0).eval()
    image = torch.rand(1, 3, 37, 45)
    enhancer = Enhancer(network, 'fp32')
    reference = enhancer.enhance(image, tile=0)
    with default_device_meta():
        tiled = tiled_forward(network, image, 16)
        whole = enhancer.enhance(image, tile=0)
        via_enhancer = enhancer.enhance(image, tile=20)
    assert tiled.device.type == 'cpu'
    for result in (tiled, whole, via_enhancer):
        torch.testing.assert_close(result, reference, atol=1e-5, rtol=0)


def test_residual_computation(data):
    """The encoder forward and the residual arithmetic (the DataLoader that reads the files is PyTorch's own and
    draws its seed without a device, so it stays outside)."""
    encoder = build_image_encoder(STATS_GUIDANCE)
    reference = compute_residual(encoder, data['train_welllit'], data['train_backlit'], progress=False)
    sets = {key: torch.stack([to_tensor(source.read(i).rgb) for i in range(len(source))])
            for key, source in (('well_lit', ImageSource(data['train_welllit'])),
                                ('backlit', ImageSource(data['train_backlit'])))}
    with default_device_meta():
        embedded = {key: encoder.encode_image(images) for key, images in sets.items()}
        residual, threshold, _, _ = residual_from_embeddings(embedded['well_lit'], embedded['backlit'])
    assert residual.device.type == 'cpu'
    torch.testing.assert_close(residual, reference.residual, atol=1e-5, rtol=0)
    assert float(threshold) == pytest.approx(reference.threshold, abs=1e-5)


@pytest.fixture
def single_process_group():
    """A one-rank gloo group: the model's collectives run for real."""
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_nan_check_rank_means_and_residual_broadcast(data, tmp_path, single_process_group):
    """The model's own collectives (NaN flag, rank means, the residual broadcast) with every tensor they send
    checked to be on the model's device."""
    options = rave_options('meta', data, warmup_iters=1)
    vector = compute_residual(build_image_encoder(STATS_GUIDANCE), data['train_welllit'], data['train_backlit'],
                              progress=False)
    vector.save(tmp_path / 'residual.safetensors')
    options['residual'] = {'path': str(tmp_path / 'residual.safetensors')}  # no DataLoader (see above)
    opt = model_options(options, tmp_path)
    opt['dist'] = True
    torch.manual_seed(0)
    model = build_model(opt)
    sent = []
    original_all_reduce, original_broadcast = dist.all_reduce, dist.broadcast

    def checked(function):
        def wrapper(tensor, *args, **kwargs):
            sent.append(tensor.device)
            return function(tensor, *args, **kwargs)
        return wrapper

    dist.all_reduce, dist.broadcast = checked(original_all_reduce), checked(original_broadcast)
    try:
        loss = torch.tensor(1.5)
        with default_device_meta():
            assert model.all_ranks_mean(loss) == 1.5
            model.check_finite(loss, model.optimizers[0], 1, model.schedule.current)
            residual, threshold, _, _ = model.prepare_residual()
    finally:
        dist.all_reduce, dist.broadcast = original_all_reduce, original_broadcast
    assert residual.device.type == 'cpu' and abs(threshold - model.threshold) < 1e-6
    torch.testing.assert_close(residual, model.residual.cpu())
    assert len(sent) >= 3 and all(device == model.device for device in sent)
