"""CLIP-LIT's results of the rounds, kept as a feature bank, and when to record them.

The ranking loss of CLIP-LIT's prompt refinement compares the backlit and well-lit images with the enhanced
training images of the latest one or two rounds. The originals write those outputs as PNGs at each "best model"
event of a network-training stage and read them back; their guidance-encoder features are all the ranking loss
uses, so :class:`ResultsBank` keeps the normalised features instead (N×D floats per round: 380×512 floats, 0.8 MB,
for the original data), in memory and in the training state, which also makes resuming exact.

A "best model" event (``results: at: best``, the originals' rule): every ``display_iter`` iterations of a network
stage, the mean of the negated losses of the last ``window`` iterations is compared with the best so far; a better
one records the results. ``at: end`` records once, when the stage ends.
"""
from collections import OrderedDict, deque
from typing import Dict, Optional, Tuple

import torch

#: how many rounds of results the ranking uses (the newest and the one before)
KEPT_ROUNDS = 2


class ResultsBank:
    """Features of each round's results (round -> ``[N_backlit, D]``, normalised), and the best-event tracker."""

    def __init__(self, window: int, display_iter: int) -> None:
        self.rounds: Dict[int, torch.Tensor] = OrderedDict()
        self.display_iter = display_iter
        self.loss_window = deque(maxlen=window)
        self.best_score = float('-inf')

    def record(self, round_: int, features: torch.Tensor) -> None:
        """Keep ``features`` as the results of ``round_``, dropping rounds too old for the ranking."""
        self.rounds[round_] = features
        for old in [r for r in self.rounds if r <= round_ - KEPT_ROUNDS]:
            del self.rounds[old]

    def ranking_sets(self, round_: int) -> Tuple[Optional[int], Optional[int]]:
        """The rounds whose results enter round ``round_``'s prompt stage: (newest I_t, previous I_{t-1}), None
        where absent."""
        newest = round_ if round_ in self.rounds else None
        previous = round_ - 1 if newest is not None and round_ - 1 in self.rounds else None
        return newest, previous

    def start_stage(self) -> None:
        """A network stage begins: the best-event tracking starts afresh."""
        self.loss_window.clear()
        self.best_score = float('-inf')

    def is_best(self, loss: float, iteration_in_stage: int) -> bool:
        """Record a network-stage iteration's loss; True at a best-model event (see the module docstring)."""
        self.loss_window.append(-float(loss))
        if iteration_in_stage % self.display_iter:
            return False
        score = sum(self.loss_window) / len(self.loss_window)
        if score > self.best_score:
            self.best_score = score
            return True
        return False

    def state_dict(self) -> dict:
        return {'bank': {str(r): f.clone() for r, f in self.rounds.items()},
                'loss_window': list(self.loss_window), 'best_score': self.best_score}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = OrderedDict((int(r), f) for r, f in state['bank'].items())
        self.loss_window.clear()
        self.loss_window.extend(state['loss_window'])
        self.best_score = float(state['best_score'])
