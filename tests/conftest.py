"""Test configuration: offline Hugging Face hub, the plugin imported first, shared data located."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # pretrained CLIP weights can never be downloaded in tests

import rave_basicsr  # noqa: E402,F401  (the torchvision shim and registration must precede any basicsr import)

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The shared test data folder: $RAVE_SHARED_DATA, else ../shared/data beside the repository."""
    # The project's rule for test data (official checkpoints, photos, reference outputs that are not ours to
    # commit): tests read it through RAVE_SHARED_DATA, default ../shared/data. This is the one place that names a
    # path outside the repository; bench/bench_inference.py reuses this function.
    return Path(os.environ.get('RAVE_SHARED_DATA', REPO_ROOT.parent / 'shared' / 'data'))


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """The shared data folder (official checkpoints, backlit photos, reference outputs); skips when absent."""
    path = shared_data_dir()
    if not (path / 'official_checkpoints').is_dir():
        pytest.skip(f'shared test data not found at {path} (set RAVE_SHARED_DATA)')
    return path


@pytest.fixture
def python_executable() -> str:
    """The interpreter running the tests, for subprocess-based end-to-end tests."""
    return sys.executable


@pytest.fixture(scope='module')
def vocab_cache(tmp_path_factory) -> Path:
    """A private $RAVE_CACHE_DIR per test module (never ~/.cache); modules opt in with usefixtures."""
    folder = tmp_path_factory.mktemp('cache')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('RAVE_CACHE_DIR', str(folder))
        yield folder
