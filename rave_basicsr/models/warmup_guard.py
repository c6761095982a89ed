"""The originals' warm-up re-initialisation guard, as an object with its own state.

With the official initialisation (conv weights N(0, 0.02), default biases), the sign of the last convolution's
bias decides whether the illumination map is 0 everywhere; such a network outputs white and has no gradient, and
about half of all seeds draw one. The originals re-create the network when the identity warm-up does not bring
the output near the input: when the mean Y-PSNR(input, output) of the last ``reinit_window`` warm-up iterations is
below ``reinit_psnr`` dB after ``reinit_after`` warm-up iterations, the network and its optimiser are
re-initialised and the warm-up is lengthened by ``reinit_extend`` iterations.
"""
from collections import deque
from typing import Optional

from rave_basicsr.utils.errors import RaveError


class WarmupReinitGuard:
    """Watches the warm-up's Y-PSNR(input, output) and says when to re-initialise (``reinit_psnr: ~``: never)."""

    def __init__(self, reinit_psnr: Optional[float], reinit_after: int, reinit_window: int,
                 reinit_extend: int) -> None:
        for key, value in (('reinit_after', reinit_after), ('reinit_window', reinit_window),
                           ('reinit_extend', reinit_extend)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == 'reinit_window' else 0):
                raise RaveError(f'train:warmup:{key} must be a whole number of iterations, got {value!r}.')
        self.threshold = None if reinit_psnr is None else float(reinit_psnr)
        self.after, self.extend_by = reinit_after, reinit_extend
        self.window = deque(maxlen=reinit_window)
        self.count = 0

    @property
    def enabled(self) -> bool:
        return self.threshold is not None

    def observe(self, psnr: float, warmup_iteration: int) -> bool:
        """Record the PSNR of warm-up iteration ``warmup_iteration`` (1-based); True when the network must be
        re-initialised now (the window then starts afresh and the count goes up)."""
        self.window.append(float(psnr))
        if (warmup_iteration > self.after and len(self.window) == self.window.maxlen
                and sum(self.window) / len(self.window) < self.threshold):
            self.window.clear()
            self.count += 1
            return True
        return False

    def state_dict(self) -> dict:
        return {'psnr_window': list(self.window), 'reinit_count': self.count}

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(float(value) for value in state['psnr_window'])
        self.count = int(state['reinit_count'])
