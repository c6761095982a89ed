"""Exact tiled inference of :class:`BacklitUNet` for photos too large to process at once.

Naive tiling is wrong for this network: its pyramid pooling averages the whole image. Tiled inference here gives
the whole-image result (up to float rounding) in two passes (design: docs/inference.md, "Exact tiling for large
photos"):

1. statistics: each tile plus a 5-px halo (the receptive radius before the pooling) gives the exact pooling
   input on the tile; its sums are added into the adaptive-pooling regions it overlaps;
2. output: each tile plus a 17-px halo is recomputed; the branch maps are upsampled only at the region's pixels,
   with the global ``align_corners=True`` bilinear weights, and the rest of the network runs on the region.

Halo regions are clipped at the image border, so border padding matches the whole-image run; padding at interior
seams only touches halo pixels, which are discarded. Peak memory depends on the tile size, not the image size.
"""
import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from rave_basicsr.archs.backlit_unet_arch import BacklitUNet, divide_by_illumination

#: receptive radius (px) of the layers before the pyramid pooling, and of the whole network
HALO_BEFORE_POOLING = 5
HALO_FULL = 17


def tile_ranges(size: int, tile: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``tile`` covering ``0..size``: the fewest possible, of nearly equal
    lengths (a thin last tile would cost more in halo than it holds, and its thin convolutions run slowly)."""
    count = -(-size // tile)
    bounds = [size * index // count for index in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def iter_tiles(height: int, width: int, tile: int) -> Iterator[Tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of each tile, row by row."""
    for y0, y1 in tile_ranges(height, tile):
        for x0, x1 in tile_ranges(width, tile):
            yield y0, y1, x0, x1


def _with_halo(start: int, stop: int, halo: int, size: int) -> Tuple[int, int]:
    return max(start - halo, 0), min(stop + halo, size)


def pooling_membership(size: int, bins: int, start: int, stop: int, dtype=torch.float64,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """``bins × (stop - start)`` 0/1 matrix: which adaptive-pooling bins contain each of the rows ``start..stop``.

    PyTorch's adaptive average pooling of ``size`` rows into ``bins`` uses rows
    ``floor(i * size / bins) .. ceil((i + 1) * size / bins) - 1`` for bin ``i`` (bins may overlap).
    """
    device = torch.device('cpu') if device is None else device
    rows = torch.arange(start, stop, device=device)
    first = torch.tensor([(i * size) // bins for i in range(bins)], device=device)
    last = torch.tensor([-((-(i + 1) * size) // bins) for i in range(bins)], device=device)  # ceil, exclusive
    return ((rows[None, :] >= first[:, None]) & (rows[None, :] < last[:, None])).to(dtype)


def bilinear_weights(size: int, bins: int, start: int, stop: int, dtype=torch.float64,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """``(stop - start) × bins`` weights that upsample ``bins`` samples to ``size`` (bilinear,
    ``align_corners=True``), evaluated at the global positions ``start..stop`` only."""
    device = torch.device('cpu') if device is None else device
    positions = torch.arange(start, stop, dtype=torch.float64, device=device)
    scale = (bins - 1) / (size - 1) if size > 1 else 0.0
    source = positions * scale
    lower = source.floor().long().clamp(max=bins - 1)
    upper = (lower + 1).clamp(max=bins - 1)
    frac = source - lower.to(torch.float64)
    weights = torch.zeros(stop - start, bins, dtype=torch.float64, device=device)
    index = torch.arange(stop - start, device=device)
    weights[index, lower] += 1 - frac
    weights[index, upper] += frac
    return weights.to(dtype)


def _compute_context(device: torch.device, autocast_dtype: Optional[torch.dtype]):
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype)


def _separable_product(rows: torch.Tensor, maps: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows @ maps @ cols.T`` for every map of an N×C×h×w tensor (rows: H'×h, cols: W'×w) → N×C×H'×W' in
    channels-last memory. Works on the channels-last data as it is (one GEMM over the rows, one BMM over the
    columns), so full-resolution activations are never transposed or copied; broadcast ``matmul`` and ``einsum``
    are up to 100× slower for these shapes."""
    n, c, h, w = maps.shape
    height, width = rows.shape[0], cols.shape[0]
    nhwc = maps.permute(0, 2, 3, 1).contiguous()  # a view for channels-last maps
    down = torch.stack([rows.mm(image.view(h, w * c)) for image in nhwc])  # N × H' × (w·C)
    out = torch.bmm(cols.expand(n * height, -1, -1), down.view(n * height, w, c))  # (N·H') × W' × C
    return out.view(n, height, width, c).permute(0, 3, 1, 2)


def _to_compute(network: BacklitUNet, region: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A region as the network computes it: on ``device``, in the parameters' dtype, channels-last (the fast
    layout for oneDNN and cuDNN convolutions)."""
    dtype = next(network.parameters()).dtype
    return region.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)


def pooled_branch_maps(network: BacklitUNet, image: torch.Tensor, tile: int, device: torch.device,
                       autocast_dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """Pass 1: the PPM branch maps (N×8×b×b per bin, float32 on ``device``) of the whole image, tile by tile."""
    height, width = image.shape[-2:]
    ppm = network.PPM1
    sums: List[Optional[torch.Tensor]] = [None] * len(ppm.bins)
    for y0, y1, x0, x1 in iter_tiles(height, width, tile):
        ry0, ry1 = _with_halo(y0, y1, HALO_BEFORE_POOLING, height)
        rx0, rx1 = _with_halo(x0, x1, HALO_BEFORE_POOLING, width)
        with _compute_context(device, autocast_dtype):
            features = network.encode(_to_compute(network, image[:, :, ry0:ry1, rx0:rx1], device))
        interior = features[:, :, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0].float()  # stays channels-last
        for k, bins in enumerate(ppm.bins):
            rows = pooling_membership(height, bins, y0, y1, torch.float32, device)
            cols = pooling_membership(width, bins, x0, x1, torch.float32, device)
            part = _separable_product(rows, interior, cols).double()  # float32 per tile, float64 across tiles
            sums[k] = part if sums[k] is None else sums[k] + part
    maps = []
    for k, bins in enumerate(ppm.bins):
        rows = pooling_membership(height, bins, 0, height, device=device).sum(1)
        cols = pooling_membership(width, bins, 0, width, device=device).sum(1)
        area = rows[:, None] * cols[None, :]
        pooled = (sums[k] / area).to(ppm.features[k][1].weight.dtype)  # the branch's dtype (mixed precision)
        with _compute_context(device, autocast_dtype):
            maps.append(ppm.branch_from_pooled(k, pooled).float())
    return maps


def _region_illumination(network: BacklitUNet, region: torch.Tensor, branch_maps: List[torch.Tensor],
                         bounds: Tuple[int, int, int, int], size: Tuple[int, int]) -> torch.Tensor:
    """Pass 2 on one region: the illumination map, with the branch maps upsampled at the region's pixels."""
    (ry0, ry1, rx0, rx1), (height, width) = bounds, size
    features = network.encode(region)
    parts = [features]
    for bins, small in zip(network.PPM1.bins, branch_maps):
        rows = bilinear_weights(height, bins, ry0, ry1, torch.float32, small.device)
        cols = bilinear_weights(width, bins, rx0, rx1, torch.float32, small.device)
        parts.append(_separable_product(rows, small, cols).to(features.dtype))
    fused_input = torch.cat(parts, 1).contiguous(memory_format=torch.channels_last)
    return network.decode(fused_input)


@torch.inference_mode()
def tiled_forward(network: BacklitUNet, image: torch.Tensor, tile: int, device: Optional[torch.device] = None,
                  autocast_dtype: Optional[torch.dtype] = None, return_illumination: bool = False):
    """Exact tiled ``network.forward_with_illumination`` of an N×C×H×W float image with ``tile``-px square tiles.

    The image and the results stay where the image is (e.g. host memory); each tile and its halo are moved to
    ``device`` (default: the network's) and computed there in the network's dtype (e.g. a bfloat16 copy of the
    network), under autocast when ``autocast_dtype`` is given. ``I / L`` always uses the float32 image.
    Returns the enhanced image (float32), and the illumination map too with ``return_illumination``.
    """
    if tile < 1:
        raise ValueError(f'tile must be >= 1, got {tile}')
    device = torch.device(device) if device is not None else next(network.parameters()).device
    n, channels, height, width = image.shape
    branch_maps = pooled_branch_maps(network, image, tile, device, autocast_dtype)
    enhanced = torch.empty(n, channels, height, width, dtype=torch.float32, device=image.device)
    light = torch.empty(n, 1, height, width, dtype=torch.float32, device=image.device) if return_illumination else None
    for y0, y1, x0, x1 in iter_tiles(height, width, tile):
        ry0, ry1 = _with_halo(y0, y1, HALO_FULL, height)
        rx0, rx1 = _with_halo(x0, x1, HALO_FULL, width)
        region = _to_compute(network, image[:, :, ry0:ry1, rx0:rx1], device)
        with _compute_context(device, autocast_dtype):
            region_light = _region_illumination(network, region, branch_maps, (ry0, ry1, rx0, rx1), (height, width))
        inner_light = region_light[:, :, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0].float()
        inner_image = image[:, :, y0:y1, x0:x1].to(device=device, dtype=torch.float32)  # full-precision I in I / L
        result = divide_by_illumination(inner_image, inner_light, network.division_eps)
        enhanced[:, :, y0:y1, x0:x1] = result.to(enhanced.device)
        if light is not None:
            light[:, :, y0:y1, x0:x1] = inner_light.to(light.device)
    return (enhanced, light) if return_illumination else enhanced


def aligned_ranges(size: int, tile: int, align: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``tile`` (rounded up to ``align``) covering ``0..size``, every start a
    multiple of ``align``."""
    step = -(-tile // align) * align
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def overlapping_tiled_forward(run: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tile: int,
                              overlap: int, align: int = 1) -> torch.Tensor:
    """Tiled inference for networks other than :class:`BacklitUNet`: each ``tile``-px tile is computed with an
    ``overlap``-px margin of real neighbouring pixels (clipped at the image border) and only its interior is kept.

    ``run`` maps an N×C×h×w region to the enhanced region of the same size (on the image's device). Tiles and
    margins start at multiples of ``align`` (a window-attention network's window size), so that every region
    partitions the image into the same windows as the whole image does. The result equals the whole-image one for
    networks whose receptive field is within ``overlap`` pixels (convolutional networks without global pooling or
    attention across the image); for others it is an approximation whose seams shrink as the overlap grows. Peak
    memory depends on the tile size, not the image size.
    """
    height, width = image.shape[-2:]
    overlap = -(-overlap // align) * align
    enhanced = None
    tiles = [(y0, y1, x0, x1) for y0, y1 in aligned_ranges(height, tile, align)
             for x0, x1 in aligned_ranges(width, tile, align)]
    for y0, y1, x0, x1 in tiles:
        ry0, ry1 = _with_halo(y0, y1, overlap, height)
        rx0, rx1 = _with_halo(x0, x1, overlap, width)
        region = run(image[:, :, ry0:ry1, rx0:rx1])
        if enhanced is None:
            enhanced = torch.empty(image.shape[0], region.shape[1], height, width, dtype=region.dtype,
                                   device=image.device)
        enhanced[:, :, y0:y1, x0:x1] = region[:, :, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0].to(image.device)
    return enhanced
