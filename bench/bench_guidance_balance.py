"""Where RAVE's guidance pulls the illumination map: its darkest or its brightest pixels.

The network outputs ``clamp(I / L, 0, 1)``, so a pixel's output moves by ``-I / L²`` per unit of ``L``: at the same
relative change of brightness, a bright pixel pulls on ``L`` (and on the shared network weights) far harder than a
dark one. This script measures that balance for the demos' guidance encoders: at the identity start (``L = 1``) the
gradient of RAVE's loss with respect to ``L`` on every training image of each synthetic backlit set
(``rave demo-data --backlight NAME``), averaged over each image's darkest and brightest fifth of pixels (luminance).
A positive gradient lowers ``L`` (brightens), a negative one raises it (darkens).

Encoders: ``ImageStatsEncoder`` centred and in its cone form (the demos'), the cone form measuring statistics of a
log-like tone curve ``log(1 + a·x) / log(1 + a)`` of the image (``a`` = 16, 64; a probe) and ``LogHistogramEncoder``
(tried for the RAVE demo): on both, a relative brightness change counts the same at every level.

Usage: python bench/bench_guidance_balance.py [--models demo mild ...] [--size 128]
Writes bench/results/guidance_balance.json and guidance_balance.md.
"""
import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rave_basicsr.archs.image_stats_encoder_arch import LUMA_WEIGHTS, ImageStatsEncoder  # noqa: E402
from rave_basicsr.archs.log_histogram_encoder_arch import LogHistogramEncoder  # noqa: E402
from rave_basicsr.data.backlight_models import BACKLIGHT_MODELS  # noqa: E402
from rave_basicsr.data.demo_data import make_demo_data  # noqa: E402
from rave_basicsr.guidance.frozen_encoder import FrozenImageEncoder  # noqa: E402
from rave_basicsr.losses.clip_guidance_loss import ResidualVectorLoss  # noqa: E402
from rave_basicsr.residual.compute import compute_residual  # noqa: E402
from rave_basicsr.utils.hardware import cpu_capability  # noqa: E402
from rave_basicsr.utils.image_io import read_image  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'


class ToneMapped(nn.Module):
    """``encoder`` applied to ``log(1 + a·x) / log(1 + a)`` of the image (a probe, not a shipped encoder)."""

    def __init__(self, encoder: nn.Module, strength: float) -> None:
        super().__init__()
        self.encoder, self.strength = encoder, float(strength)
        self.embed_dim = encoder.embed_dim

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.encoder(torch.log1p(self.strength * images01.clamp_min(0)) / math.log1p(self.strength))


def encoders():
    """The measured encoders by name."""
    return {
        'centred': ImageStatsEncoder(),
        'cone (demo)': ImageStatsEncoder(cone=True),
        'cone, log tone a=16': ToneMapped(ImageStatsEncoder(cone=True), 16),
        'cone, log tone a=64': ToneMapped(ImageStatsEncoder(cone=True), 64),
        'log histogram': LogHistogramEncoder(),
    }


def load_images(folder: Path) -> torch.Tensor:
    """The folder's PNGs as one float ``[N, 3, H, W]`` batch in [0, 1]."""
    images = [torch.from_numpy(read_image(str(path)).rgb).permute(2, 0, 1) for path in sorted(folder.glob('*.png'))]
    return torch.stack(images).float()


def fifth_gradients(encoder: nn.Module, data: Path) -> dict:
    """Mean dLoss/dL over each training image's darkest and brightest fifth at L = 1, and their ratio."""
    frozen = FrozenImageEncoder(encoder, embed_dim=encoder.embed_dim, identity={'probe': repr(encoder)},
                                preprocess=None, precision='fp32', image_fn=encoder)
    vector = compute_residual(frozen, str(data / 'train_welllit'), str(data / 'train_backlit'), batch_size=8,
                              progress=False)
    images = load_images(data / 'train_backlit')
    illumination = torch.ones(images.shape[0], 1, *images.shape[2:], requires_grad=True)
    output = (images / illumination).clamp(0, 1)
    loss = ResidualVectorLoss()(frozen.encode_image(output), vector.residual.float(), float(vector.threshold))
    gradient, = torch.autograd.grad(loss, illumination)
    luma = (images * torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)).sum(1).flatten(1)
    low, high = torch.quantile(luma, 0.2, dim=1, keepdim=True), torch.quantile(luma, 0.8, dim=1, keepdim=True)
    gradient = gradient.flatten(1)
    dark = float(((gradient * (luma <= low)).sum(1) / (luma <= low).sum(1)).mean())
    bright = float(((gradient * (luma >= high)).sum(1) / (luma >= high).sum(1)).mean())
    return {'dark': dark, 'bright': bright, 'bright_over_dark': abs(bright / dark)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=list(BACKLIGHT_MODELS), choices=list(BACKLIGHT_MODELS))
    parser.add_argument('--size', type=int, default=128, help='demo image side (rave demo-data --size)')
    parser.add_argument('--out', default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix='rave_guidance_balance_') as work:
        for model in args.models:
            data = Path(work) / model
            make_demo_data(str(data), seed=0, size=args.size, backlight=model)
            for name, encoder in encoders().items():
                rows.append(dict(set=model, encoder=name, **fifth_gradients(encoder, data)))
                print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = cpu_capability()
    (out / 'guidance_balance.json').write_text(json.dumps({'machine': machine, 'size': args.size, 'rows': rows},
                                                          indent=1) + '\n')
    lines = ['# Where RAVE\'s guidance pulls the illumination map (`bench/bench_guidance_balance.py`)', '',
             f'Machine: {machine} (the figures are exact gradients, independent of the machine). Data: '
             f'`rave demo-data --backlight NAME` (seed 0, {args.size} px), its 24 training images. Figures: the '
             'gradient of RAVE\'s loss (weight 1) with respect to the illumination map `L` at `L = 1` (the demo\'s '
             'identity start), averaged over each image\'s darkest and brightest fifth of pixels, then over the '
             'images; positive lowers `L` (brightens), negative raises it (darkens).', '',
             '| set | encoder | darkest fifth | brightest fifth | \\|bright / dark\\| |', '|---|---|---|---|---|']
    for row in rows:
        lines.append(f"| {row['set']} | {row['encoder']} | {row['dark']:+.2e} | {row['bright']:+.2e} | "
                     f"{row['bright_over_dark']:.1f} |")
    (out / 'guidance_balance.md').write_text('\n'.join(lines) + '\n')
    print(f'wrote {out / "guidance_balance.md"}')


if __name__ == '__main__':
    main()
