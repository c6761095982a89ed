"""Stage bookkeeping: sequence, rounds, zero-length stages, the extension rule and exact state round trips."""
import pytest

from rave_basicsr.models.stages import StageSchedule, StageSpec
from rave_basicsr.utils.errors import RaveError


def run(schedule, iterations, losses=None):
    """Step ``iterations`` times and return the stage name (with round) of each iteration."""
    names = []
    for i in range(iterations):
        names.append((schedule.name, schedule.round))
        schedule.step(None if losses is None else losses(i))
    return names


def test_prefix_then_open_ended_stage():
    schedule = StageSchedule([StageSpec('warmup', 3, 'net_g'), StageSpec('guided', None, 'net_g')])
    names = [name for name, _ in run(schedule, 10)]
    assert names == ['warmup'] * 3 + ['guided'] * 7
    assert not schedule.finished and schedule.iter_in_stage == 7


def test_zero_length_warmup_starts_guided():
    schedule = StageSchedule([StageSpec('warmup', 0, 'net_g'), StageSpec('guided', None, 'net_g')])
    assert schedule.name == 'guided'
    assert schedule.history == [{'name': 'warmup', 'round': 0, 'iterations': 0}]


def test_rounds_alternate_and_count():
    schedule = StageSchedule([StageSpec('init', 2, 'prompt'), StageSpec('warmup', 1, 'net_g')],
                             [StageSpec('network', 3, 'net_g'), StageSpec('prompt', 2, 'prompt')], num_rounds=2)
    names = run(schedule, 13)
    assert names == ([('init', 0)] * 2 + [('warmup', 0)] + [('network', 0)] * 3 + [('prompt', 0)] * 2
                     + [('network', 1)] * 3 + [('prompt', 1)] * 2)
    assert schedule.finished and schedule.name == 'prompt'  # the last stage continues once rounds are done


def test_extension_rule_extends_while_loss_above_threshold():
    spec = StageSpec('guided', 4, 'net_g', extend_by=2, extend_threshold=90.0)
    schedule = StageSchedule([], [spec], num_rounds=None)
    losses = [100.0] * 4 + [50.0] * 10  # above 90 at iteration 4 (extend to 6), below at 6 -> next round
    names = run(schedule, 8, losses=lambda i: losses[i])
    assert names[:6] == [('guided', 0)] * 6 and names[6:] == [('guided', 1)] * 2
    assert schedule.history[0] == {'name': 'guided', 'round': 0, 'iterations': 6}


def test_max_extensions_bounds_the_rule():
    spec = StageSpec('guided', 2, 'net_g', extend_by=1, extend_threshold=0.0, max_extensions=2)
    schedule = StageSchedule([], [spec])
    run(schedule, 4, losses=lambda i: 1.0)
    assert schedule.round == 1 and schedule.history[0]['iterations'] == 4


def test_external_extension_lengthens_current_stage():
    schedule = StageSchedule([StageSpec('warmup', 2, 'net_g'), StageSpec('guided', None, 'net_g')])
    schedule.step()
    schedule.extend(3)
    assert [name for name, _ in run(schedule, 5)] == ['warmup'] * 4 + ['guided']


def test_state_round_trip_continues_identically():
    def make():
        return StageSchedule([StageSpec('warmup', 2, 'net_g')],
                             [StageSpec('network', 3, 'net_g', extend_by=1, extend_threshold=5.0),
                              StageSpec('prompt', 2, 'prompt')])
    losses = [float(i % 7) for i in range(40)]
    reference = make()
    expected = run(reference, 30, losses=lambda i: losses[i])
    first = make()
    head = run(first, 11, losses=lambda i: losses[i])
    second = make()
    second.load_state_dict(first.state_dict())
    tail = run(second, 19, losses=lambda i: losses[i + 11])
    assert head + tail == expected
    assert second.state_dict() == reference.state_dict()


def test_state_from_other_schedule_is_refused():
    one = StageSchedule([StageSpec('warmup', 2, 'net_g'), StageSpec('guided', None, 'net_g')])
    other = StageSchedule([StageSpec('init', 2, 'p'), StageSpec('guided', None, 'net_g')])
    with pytest.raises(RaveError, match=r"saved with stages \['warmup', 'guided'\] but the options define "
                                        r"\['init', 'guided'\]"):
        other.load_state_dict(one.state_dict())


@pytest.mark.parametrize('kwargs, message', [
    (dict(prefix=[StageSpec('a', None, 'x'), StageSpec('b', 1, 'x')]),
     r'stage "a" has no length \(~\) but is followed by other stages'),
    (dict(prefix=[StageSpec('a', 1, 'x'), StageSpec('a', 1, 'x')]), r"stage names must be unique, got \['a', 'a'\]"),
    (dict(prefix=[], rounds=[StageSpec('a', 0, 'x')]), 'every repeated round stage has length 0'),
    (dict(prefix=[]), 'a training schedule needs at least one stage'),
])
def test_invalid_schedules_are_refused(kwargs, message):
    with pytest.raises(RaveError, match=message):
        StageSchedule(**kwargs)


def test_invalid_specs_are_refused():
    with pytest.raises(RaveError, match=r'stage "a": its length must be a whole number of iterations >= 0 or ~ '
                                        r'\(never ends\), got -1'):
        StageSpec('a', -1, 'x')
    with pytest.raises(RaveError, match='stage "a": extend_by is 3 but no extend_threshold is set'):
        StageSpec('a', 2, 'x', extend_by=3)


def test_max_rounds_skips_a_round_stage_after_its_rounds():
    schedule = StageSchedule([StageSpec('warmup', 1, 'net_g')],
                             [StageSpec('network', 2, 'net_g'), StageSpec('prompt', 1, 'prompt', max_rounds=2)])
    names = run(schedule, 12)
    assert names == ([('warmup', 0)] + [('network', 0)] * 2 + [('prompt', 0)] + [('network', 1)] * 2
                     + [('prompt', 1)] + [('network', 2)] * 2 + [('network', 3)] * 2 + [('network', 4)])
    assert schedule.runs_in_round('prompt', 1) and not schedule.runs_in_round('prompt', 2)
    assert {'name': 'prompt', 'round': 2, 'iterations': 0} in schedule.history
    restored = StageSchedule([StageSpec('warmup', 1, 'net_g')],
                             [StageSpec('network', 2, 'net_g'), StageSpec('prompt', 1, 'prompt', max_rounds=2)])
    restored.load_state_dict(schedule.state_dict())
    assert run(restored, 3) == run(schedule, 3) == [('network', 4), ('network', 5), ('network', 5)]


def test_max_rounds_zero_never_runs_the_stage():
    schedule = StageSchedule([], [StageSpec('network', 1, 'net_g'), StageSpec('prompt', 1, 'prompt', max_rounds=0)])
    assert [name for name, _ in run(schedule, 3)] == ['network'] * 3


@pytest.mark.parametrize('prefix, rounds, message', [
    ([StageSpec('warmup', 1, 'net_g', max_rounds=1)], [StageSpec('network', 1, 'net_g')], 'before the rounds'),
    ([], [StageSpec('network', 1, 'net_g', max_rounds=3), StageSpec('prompt', 0, 'prompt')], 'never advance'),
])
def test_max_rounds_refusals(prefix, rounds, message):
    with pytest.raises(RaveError, match=message):
        StageSchedule(prefix, rounds)


def test_max_rounds_must_be_a_count():
    with pytest.raises(RaveError, match='max_rounds must be an integer >= 0'):
        StageSpec('prompt', 1, 'prompt', max_rounds=-1)
