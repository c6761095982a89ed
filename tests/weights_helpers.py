"""A small random enhancement network saved as a checkpoint, for tests that need weights but not the released ones."""
from pathlib import Path

import torch

from rave_basicsr.archs.backlit_unet_arch import BacklitUNet
from rave_basicsr.utils.checkpoint import torch_save_atomic


def save_live_network(path: Path) -> Path:
    """Save a seeded random `BacklitUNet` as `{'params': ...}` (BasicSR's layout) and return `path`.

    cond_add1's bias is set positive so that the illumination map is non-zero everywhere: about half of all random
    draws give L = 0, whose output is white whatever the input, and would make the tests that use this data-blind.
    """
    torch.manual_seed(0)
    network = BacklitUNet()
    with torch.no_grad():
        network.cond_add1.bias.fill_(0.5)
    torch_save_atomic({'params': network.state_dict()}, path)
    return path
