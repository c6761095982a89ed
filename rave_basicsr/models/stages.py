"""Stage bookkeeping by iteration: which training stage runs now, for how long, in which round.

Pure logic (no torch), shared by every model built on :class:`~rave_basicsr.models.backlit_base_model.BacklitBaseModel`
and saved in its training state so that ``--auto_resume`` continues in the same stage with the same counters.

How a model declares its schedule (``BacklitBaseModel.define_stages`` returns a :class:`StageSchedule`):

* ``prefix`` stages run once, in order; then the ``rounds`` stages repeat as a group, ``num_rounds`` times
  (``None``: until BasicSR's ``total_iter`` ends the run). RAVE: ``prefix=[warmup, guided]`` with an open-ended
  ``guided`` (length ``None``); CLIP-LIT: ``prefix=[prompt_init, warmup]``, ``rounds=[network, prompt]``.
* Each :class:`StageSpec` names the optimiser it steps (``optimizer``: a key of the model's per-stage optimisers;
  several stages may share one, e.g. warm-up and guided training both step ``net_g``).
* ``length`` is in iterations; 0 skips the stage (a warm-up of 0 means guided training from the start); ``None``
  never ends (only valid for the last stage of the schedule).
* Extension rule (the originals': at the end of a stage, extend it by ``extend_by`` iterations while the
  monitored loss is above ``extend_threshold``): the model passes the monitored value to :meth:`StageSchedule.step`
  after every iteration; the check happens when the stage's iteration count reaches its (extended) length.
  ``max_extensions`` bounds the number of extensions (``None``: unbounded, as in the originals).
* ``max_rounds`` (stages repeated in rounds only) runs the stage in the first ``max_rounds`` rounds and skips it in
  the later ones (``None``: every round, as in the originals); CLIP-LIT uses it to stop refining the pair while the
  network trains on.
* :meth:`StageSchedule.extend` lengthens the current stage from outside (the warm-up re-initialisation guard adds
  100 iterations this way).
"""
from dataclasses import dataclass
from typing import List, Optional

from rave_basicsr.utils.errors import RaveError


@dataclass(frozen=True)
class StageSpec:
    """One stage: name, length in iterations, the optimiser it steps, and its optional extension rule."""
    name: str
    length: Optional[int]
    optimizer: str
    extend_by: int = 0
    extend_threshold: Optional[float] = None
    max_extensions: Optional[int] = None
    max_rounds: Optional[int] = None

    def __post_init__(self):
        if self.length is not None and (not isinstance(self.length, int) or self.length < 0):
            raise RaveError(f'stage "{self.name}": its length must be a whole number of iterations >= 0 or ~ '
                            f'(never ends), got {self.length!r}.')
        if not isinstance(self.extend_by, int) or self.extend_by < 0:
            raise RaveError(f'stage "{self.name}": extend_by must be an integer >= 0, got {self.extend_by!r}.')
        if self.extend_by and self.extend_threshold is None:
            raise RaveError(f'stage "{self.name}": extend_by is {self.extend_by} but no extend_threshold is set.')
        if self.max_rounds is not None and (isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int)
                                            or self.max_rounds < 0):
            raise RaveError(f'stage "{self.name}": max_rounds must be an integer >= 0 or ~ (every round), got '
                            f'{self.max_rounds!r}.')

    def runs_in(self, round_: int) -> bool:
        """Whether the stage runs (has iterations and is within its ``max_rounds``) in ``round_`` (0-based)."""
        return self.length != 0 and (self.max_rounds is None or round_ < self.max_rounds)


class StageSchedule:
    """The stage sequence (prefix once, then rounds) and the position in it; see the module docstring."""

    def __init__(self, prefix: List[StageSpec], rounds: Optional[List[StageSpec]] = None,
                 num_rounds: Optional[int] = None) -> None:
        self.prefix = list(prefix)
        self.rounds = list(rounds or [])
        self.num_rounds = num_rounds if self.rounds else 0
        if num_rounds is not None and (not isinstance(num_rounds, int) or num_rounds < 0):
            raise RaveError(f'num_rounds must be an integer >= 0 or ~ (until total_iter), got {num_rounds!r}.')
        specs = self.prefix + self.rounds
        if not specs:
            raise RaveError('a training schedule needs at least one stage.')
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise RaveError(f'stage names must be unique, got {names}.')
        for spec in self.prefix[:-1] if not self.rounds else self.prefix:
            if spec.length is None:
                raise RaveError(f'stage "{spec.name}" has no length (~) but is followed by other stages.')
        if any(spec.length is None for spec in self.rounds):
            raise RaveError('stages repeated in rounds need finite lengths.')
        for spec in self.prefix:
            if spec.max_rounds is not None:
                raise RaveError(f'stage "{spec.name}" runs once, before the rounds; max_rounds applies only to '
                                'stages repeated in rounds.')
        if self.rounds and self.num_rounds is None and all(spec.length == 0 or spec.max_rounds is not None
                                                           for spec in self.rounds):
            raise RaveError('every repeated round stage has length 0 or a max_rounds, so once those rounds are '
                            'over rounds would never advance; give num_rounds or a stage that runs in every round.')
        # position
        self.index = 0          # index into prefix + rounds (flattened positions of the current round)
        self.round = 0          # 0-based round number (0 while in the prefix)
        self.iter_in_stage = 0
        self.length = None      # current stage length including extensions
        self.extensions = 0
        self.finished = False
        self.history: List[dict] = []  # completed stages: name, round, iterations
        self._enter(0)

    # ---- queries ----
    @property
    def specs(self) -> List[StageSpec]:
        return self.prefix + self.rounds

    @property
    def current(self) -> StageSpec:
        return self.specs[self.index]

    @property
    def name(self) -> str:
        return self.current.name

    def in_rounds(self) -> bool:
        return self.index >= len(self.prefix)

    def runs_in_round(self, name: str, round_: int) -> bool:
        """Whether the round stage ``name`` will run (has a length and is within its ``max_rounds``) in ``round_``
        (0-based)."""
        return next(spec for spec in self.rounds if spec.name == name).runs_in(round_)

    def describe(self) -> str:
        length = '∞' if self.length is None else self.length
        where = f', round {self.round + 1}' if self.in_rounds() else ''
        return f'stage "{self.name}"{where}: iteration {self.iter_in_stage}/{length}'

    # ---- transitions ----
    def _enter(self, index: int) -> None:
        """Enter stage ``index``, skipping zero-length stages."""
        while True:
            if index >= len(self.specs):
                if not self.rounds:
                    self.finished = True
                    index = len(self.specs) - 1
                    break
                self.round += 1
                if self.num_rounds is not None and self.round >= self.num_rounds:
                    self.finished = True
                    index = len(self.specs) - 1
                    break
                index = len(self.prefix)
            spec = self.specs[index]
            if index >= len(self.prefix) and self.num_rounds == 0:
                self.finished = True
                break
            if not spec.runs_in(self.round):  # prefix stages have no max_rounds (checked above)
                self.history.append({'name': spec.name, 'round': self.round, 'iterations': 0})
                index += 1
                continue
            break
        self.index = index
        self.iter_in_stage = 0
        self.extensions = 0
        self.length = self.current.length

    def extend(self, iterations: int) -> None:
        """Lengthen the current stage (the re-initialisation guard uses this)."""
        if self.length is not None:
            self.length += int(iterations)

    def step(self, monitored_loss: Optional[float] = None) -> bool:
        """Count one finished iteration of the current stage; returns True when the stage changed.

        ``monitored_loss`` is the value the extension rule compares with ``extend_threshold`` (the loss of the
        stage's last iteration, as in the originals).
        """
        if self.finished:
            return False
        self.iter_in_stage += 1
        if self.length is None or self.iter_in_stage < self.length:
            return False
        spec = self.current
        can_extend = spec.max_extensions is None or self.extensions < spec.max_extensions
        if (spec.extend_by and can_extend and monitored_loss is not None
                and monitored_loss > spec.extend_threshold):
            self.length += spec.extend_by
            self.extensions += 1
            return False
        self.history.append({'name': spec.name, 'round': self.round, 'iterations': self.iter_in_stage})
        previous = (self.index, self.round)
        self._enter(self.index + 1)
        return (self.index, self.round) != previous or self.finished

    # ---- persistence (plain ints/strings/lists: loads with torch.load(weights_only=True)) ----
    def state_dict(self) -> dict:
        return {'index': self.index, 'round': self.round, 'iter_in_stage': self.iter_in_stage,
                'length': -1 if self.length is None else self.length, 'extensions': self.extensions,
                'finished': self.finished, 'history': [dict(item) for item in self.history],
                'names': [spec.name for spec in self.specs]}

    def load_state_dict(self, state: dict) -> None:
        names = [spec.name for spec in self.specs]
        if list(state.get('names', [])) != names:
            raise RaveError(f'the training state was saved with stages {list(state.get("names", []))} but the '
                            f'options define {names}; resume with the option file of the interrupted run.')
        self.index = int(state['index'])
        self.round = int(state['round'])
        self.iter_in_stage = int(state['iter_in_stage'])
        self.length = None if int(state['length']) < 0 else int(state['length'])
        self.extensions = int(state['extensions'])
        self.finished = bool(state['finished'])
        self.history = [dict(item) for item in state['history']]
