"""Batches of dataset indices that a training state can resume exactly (the CLIP-LIT prompt stages draw theirs here)."""
from typing import List

import torch

from rave_basicsr.utils.errors import RaveError


class EpochSampler:
    """Batches of indices from per-epoch random permutations (drop_last), resumable from two integers.

    The prompt stages draw their batches here rather than from a DataLoader so that the position is part of the
    training state and a resumed run sees the same batches.
    """

    def __init__(self, length: int, batch_size: int, seed: int) -> None:
        if batch_size > length:
            raise RaveError(f'prompt_data:batch_size ({batch_size}) is larger than the prompt data set '
                            f'({length} items); lower it.')
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.epoch, self.position = 0, 0

    def next(self) -> List[int]:
        if self.position + self.batch_size > self.length:
            self.epoch, self.position = self.epoch + 1, 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator)
        batch = order[self.position:self.position + self.batch_size].tolist()
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'position': self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state['epoch']), int(state['position'])
