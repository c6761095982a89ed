"""Exact tiled inference: tiled output equals the whole-image output; memory bounded by the tile size."""
import pytest
import torch
import torch.nn.functional as F

from rave_basicsr.archs.backlit_unet_arch import BacklitUNet
from rave_basicsr.inference.tiling import (bilinear_weights, iter_tiles, pooling_membership, tile_ranges,
                                           tiled_forward)


def _network(padding: str, seed: int = 0) -> BacklitUNet:
    torch.manual_seed(seed)
    network = BacklitUNet(outer_padding=padding, division_eps=0.0).eval()
    with torch.no_grad():  # lift the illumination so the image is not mostly saturated (a stricter comparison)
        network.cond_add1.bias.fill_(0.6)
        for branch in network.PPM1.features:  # make the global context matter, as in trained networks
            branch[1].weight.mul_(50)
        network.PPM1.fuse[0].weight.mul_(5)
    return network


def test_tile_ranges_cover_exactly():
    assert tile_ranges(10, 4) == [(0, 3), (3, 6), (6, 10)]  # three tiles as with 4+4+2, without the thin one
    assert tile_ranges(8, 4) == [(0, 4), (4, 8)] and tile_ranges(3, 5) == [(0, 3)]
    for size, tile in ((6000, 990), (4000, 990), (1, 1), (17, 3)):
        ranges = tile_ranges(size, tile)
        assert ranges[0][0] == 0 and ranges[-1][1] == size and len(ranges) == -(-size // tile)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(stop - start for start, stop in ranges) <= tile
        assert max(stop - start for start, stop in ranges) - min(stop - start for start, stop in ranges) <= 1
    assert len(list(iter_tiles(10, 7, 4))) == 6


@pytest.mark.parametrize('size,bins', [(7, 6), (97, 3), (143, 6), (1, 6), (5, 2)])
def test_pooling_membership_matches_adaptive_avg_pool(size, bins):
    values = torch.rand(size, dtype=torch.float64)
    membership = pooling_membership(size, bins, 0, size)
    ours = membership @ values / membership.sum(1)
    expected = F.adaptive_avg_pool1d(values.view(1, 1, -1), bins).flatten()
    assert torch.allclose(ours, expected)


@pytest.mark.parametrize('size,bins', [(97, 6), (143, 3), (1, 2), (10, 1)])
def test_bilinear_weights_match_interpolate(size, bins):
    small = torch.rand(bins, dtype=torch.float64)
    expected = F.interpolate(small.view(1, 1, 1, -1), size=(1, size), mode='bilinear', align_corners=True).flatten()
    assert torch.allclose(bilinear_weights(size, bins, 0, size) @ small, expected)
    assert torch.allclose(bilinear_weights(size, bins, 3 % size, size) @ small, expected[3 % size:])


@pytest.mark.parametrize('padding', ['reflect', 'zeros'])
@pytest.mark.parametrize("tile", [37, 64, 500])
def test_tiled_equals_whole_image_non_square_non_dividing(padding, tile):
    network = _network(padding)
    image = torch.rand(1, 3, 97, 143)
    with torch.no_grad():
        whole, whole_light = network.forward_with_illumination(image)
    tiled, tiled_light = tiled_forward(network, image, tile, return_illumination=True)
    assert (tiled - whole).abs().max() < 1e-4
    assert (tiled_light - whole_light).abs().max() < 1e-4
    assert 0.05 < (whole < 1).float().mean()  # the comparison is not between saturated images


def test_naive_tiling_would_differ():
    """The check above is meaningful: tiles processed independently give a different image."""
    network = _network('reflect')
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        whole = network(image)
        naive = torch.cat([network(image[..., :48]), network(image[..., 48:])], dim=3)
    assert (naive - whole).abs().max() > 1e-3


def test_tiny_images_and_tiles():
    network = _network('reflect')
    for shape, tile in (((1, 3, 1, 1), 1), ((1, 3, 3, 40), 7), ((1, 3, 20, 2), 1)):
        image = torch.rand(shape)
        with torch.no_grad():
            whole = network(image)
        assert (tiled_forward(network, image, tile) - whole).abs().max() < 1e-4


def test_bf16_tiled_close_to_fp32():
    network = _network('reflect')
    image = torch.rand(1, 3, 50, 70)
    with torch.no_grad():
        whole = network(image)
    tiled = tiled_forward(network, image, 32, autocast_dtype=torch.bfloat16)
    assert tiled.dtype == torch.float32 and torch.isfinite(tiled).all()
    assert (tiled - whole).abs().mean() < 0.01


def test_peak_memory_is_bounded_by_the_tile(monkeypatch):
    """No tensor the network sees is larger than the tile plus its halo, whatever the image size."""
    network = _network('reflect')
    largest = []
    original = F.conv2d

    def spy(input, *args, **kwargs):
        largest.append(input.shape[-2] * input.shape[-1])
        return original(input, *args, **kwargs)

    monkeypatch.setattr(F, 'conv2d', spy)
    tiled_forward(network, torch.rand(1, 3, 300, 410), 48)
    assert max(largest) <= (48 + 2 * 17) ** 2
