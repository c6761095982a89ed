"""The shared-data fixtures: found, skipped with a reason the summary shows, failed under CI, weights by name."""
import tomllib

import pytest

from rave_basicsr.inference import weights as weights_module
from tests import shared_data
from tests.shared_data import ReleasedWeights, require_shared_data

SKIPPED, FAILED = pytest.skip.Exception, pytest.fail.Exception


def outcome(call, *args):
    """(exception type, message) of what ``call(*args)`` raised: a skip or a failure is caught here, so that a test
    expecting one and getting the other fails instead of being skipped itself."""
    try:
        returned = call(*args)
    except (SKIPPED, FAILED, Exception) as exc:
        return type(exc), str(exc)
    return None, returned


@pytest.fixture
def absent(tmp_path, monkeypatch):
    """$RAVE_SHARED_DATA pointing at a folder that does not exist, outside CI, with a private weights cache."""
    folder = tmp_path / 'no_shared_data'
    monkeypatch.setenv('RAVE_SHARED_DATA', str(folder))
    monkeypatch.setenv('RAVE_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.delenv('CI', raising=False)
    return folder


def offline(monkeypatch, name='rave_paired'):
    """The released file ``name`` served from an address nobody listens on: its download fails as offline."""
    monkeypatch.setitem(weights_module.OFFICIAL_WEIGHTS, name, weights_module.OfficialWeights(
        name, f'http://127.0.0.1:9/{name}.pth', weights_module.OFFICIAL_WEIGHTS[name].sha256, ''))


def make_complete(folder, weights=()):
    for name in shared_data.SUBFOLDERS:
        (folder / name).mkdir(parents=True)
    for name in weights:
        (folder / 'official_checkpoints' / f'{name}.pth').write_bytes(b'local ' + name.encode())
    return folder


def test_the_folder_is_the_variable_else_beside_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv('RAVE_SHARED_DATA', raising=False)
    assert shared_data.shared_data_dir() == shared_data.REPO_ROOT.parent / 'shared' / 'data'
    assert (shared_data.REPO_ROOT / 'pyproject.toml').is_file()  # REPO_ROOT is the repository
    monkeypatch.setenv('RAVE_SHARED_DATA', str(tmp_path))
    assert shared_data.shared_data_dir() == tmp_path
    monkeypatch.delenv('CI', raising=False)
    make_complete(tmp_path)
    assert require_shared_data() == tmp_path


def test_absent_folder_skips_naming_it_and_how_to_provide_it(absent):
    kind, reason = outcome(require_shared_data)
    assert kind is SKIPPED
    assert reason.startswith(f'shared test data not found: {absent} has no official_checkpoints/, '
                             'backlit_samples/, reference_outputs/;')
    assert 'set RAVE_SHARED_DATA to a folder holding official_checkpoints/, backlit_samples/ and ' \
           'reference_outputs/' in reason


def test_a_partial_folder_names_what_is_missing(absent):
    absent.mkdir()
    (absent / 'official_checkpoints').mkdir()
    kind, reason = outcome(require_shared_data)
    assert kind is SKIPPED and f'{absent} has no backlit_samples/, reference_outputs/;' in reason
    assert require_shared_data(['official_checkpoints']) == absent


@pytest.mark.parametrize('value, fails', [('true', True), ('TRUE', True), ('True', True), ('1', True),
                                          ('yes', True), (' Yes ', True), ('false', False), ('0', False),
                                          ('no', False), ('', False)])
def test_under_ci_the_skip_is_a_failure_with_the_same_reason(absent, monkeypatch, value, fails):
    monkeypatch.setenv('CI', value)
    kind, reason = outcome(require_shared_data)
    assert kind is (FAILED if fails else SKIPPED)
    assert reason.startswith(f'shared test data not found: {absent} has no official_checkpoints/')
    assert reason.endswith('[CI: tests that need the shared data fail instead of skipping]') == fails


def test_released_weights_come_from_the_shared_folder_without_a_download(tmp_path, monkeypatch):
    make_complete(tmp_path, weights=['rave_paired'])
    monkeypatch.setenv('RAVE_SHARED_DATA', str(tmp_path))

    def no_download(name, *args, **kwargs):
        raise AssertionError(f'{name} must not be downloaded')

    monkeypatch.setattr(weights_module, 'resolve_weights', no_download)
    assert ReleasedWeights()('rave_paired') == tmp_path / 'official_checkpoints' / 'rave_paired.pth'


def test_without_the_folder_released_weights_are_fetched_by_name(absent, tmp_path, monkeypatch):
    fetched = []

    def resolve(name, *args, **kwargs):
        fetched.append(name)
        return tmp_path / 'cache' / f'{name}.pth'

    monkeypatch.setattr(weights_module, 'resolve_weights', resolve)
    released = ReleasedWeights()
    assert released('clip_lit_official') == tmp_path / 'cache' / 'clip_lit_official.pth'
    assert released('rave_unpaired') == tmp_path / 'cache' / 'rave_unpaired.pth'
    assert fetched == ['clip_lit_official', 'rave_unpaired']


def test_offline_without_the_folder_skips_once_and_fails_under_ci(absent, monkeypatch):
    """Through the real download code: the address refuses, so the test is skipped naming the weights, the
    missing file, the download error and how to provide the folder; later names do not try again."""
    offline(monkeypatch)
    released = ReleasedWeights()
    kind, reason = outcome(released, 'rave_paired')
    assert kind is SKIPPED
    assert reason.startswith(f"released weights 'rave_paired': {absent / 'official_checkpoints' / 'rave_paired.pth'}"
                             " does not exist and they cannot be downloaded (cannot download the 'rave_paired' "
                             'weights')
    assert 'set RAVE_SHARED_DATA to a folder holding' in reason
    tried = []
    monkeypatch.setattr(weights_module, 'resolve_weights', lambda name, *args, **kwargs: tried.append(name))
    kind, reason = outcome(released, 'rave_unpaired')
    assert kind is SKIPPED and tried == []
    assert reason.startswith("released weights 'rave_unpaired': ") and "cannot download the 'rave_paired'" in reason
    monkeypatch.setenv('CI', 'true')
    kind, reason = outcome(released, 'rave_unpaired')
    assert kind is FAILED and reason.startswith("released weights 'rave_unpaired': ") and '[CI: ' in reason


def test_a_resolve_error_other_than_offline_is_not_swallowed(absent, monkeypatch):
    def broken(name, *args, **kwargs):
        raise ValueError('a bug in resolve_weights')

    monkeypatch.setattr(weights_module, 'resolve_weights', broken)
    assert outcome(ReleasedWeights(), 'rave_paired') == (ValueError, 'a bug in resolve_weights')


TEST_FILE = '''
def test_needs_photos(shared_data):
    raise AssertionError('never reached without the shared data')


def test_needs_weights(released_weights):
    released_weights('rave_paired')
    raise AssertionError('never reached offline')
'''


@pytest.fixture
def project_run(pytester, absent, monkeypatch):
    """Runs pytest in-process on TEST_FILE with the project's fixtures and its [tool.pytest.ini_options] addopts."""
    offline(monkeypatch)
    options = tomllib.loads((shared_data.REPO_ROOT / 'pyproject.toml').read_text())['tool']['pytest']['ini_options']
    pytester.makeini(f'[pytest]\naddopts = {options["addopts"]}\n')
    pytester.makeconftest('from tests.conftest import released_weights, shared_data  # noqa: F401\n')
    pytester.makepyfile(test_needing_data=TEST_FILE)
    return lambda: pytester.runpytest_inprocess('-p', 'no:cacheprovider')


def test_the_summary_shows_each_skip_with_its_reason(project_run):
    result = project_run()
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(['*short test summary info*',
                                 'SKIPPED * shared test data not found: *no_shared_data has no official_checkpoints/*',
                                 "SKIPPED * released weights 'rave_paired': *cannot download*"])


def test_under_ci_the_run_fails(project_run, monkeypatch):
    monkeypatch.setenv('CI', 'true')
    result = project_run()
    result.assert_outcomes(errors=1, failed=1)  # the fixture's setup, and the test's call of released_weights
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["FAILED *test_needs_weights - Failed: released weights 'rave_paired'*[CI: *",
                                 'ERROR *test_needs_photos - Failed: shared test data not found*[CI: *'])
