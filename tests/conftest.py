"""Test configuration: offline Hugging Face hub, the plugin imported first, shared data located."""
import os
import sys
import types
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # pretrained CLIP weights can never be downloaded in tests

import rave_basicsr  # noqa: E402,F401  (the torchvision shim and registration must precede any basicsr import)
from tests.shared_data import ReleasedWeights, require_shared_data  # noqa: E402

pytest_plugins = ['pytester']  # tests/test_shared_data.py runs pytest on small test files


def pytest_configure(config) -> None:
    """Under pytest-xdist (the README's ``-n 2``): each worker's torch gets its share of the cores (two workers with a
    thread per core each would oversubscribe them; the end-to-end tests' child processes use one thread anyway,
    tests/pipeline_helpers.single_thread_env), and the controller hands out one test at a time (``--maxschedchunk
    1``, unless given) instead of a quarter of the suite per worker up front, so that the long runs put first (see
    :func:`pytest_collection_modifyitems`) are shared out instead of queued on one worker."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '0'))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if getattr(config.option, 'numprocesses', None) and getattr(config.option, 'maxschedchunk', 0) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist, the demo trainings (several minutes each), then the other end-to-end runs, then the rest,
    each group in file order: the longest runs start first, on whichever worker is free, and the short tests fill
    in around them instead of leaving one worker alone with a long run at the end. Every worker sorts its collection
    the same way, as xdist requires."""
    if os.environ.get('PYTEST_XDIST_WORKER'):
        items.sort(key=lambda item: 0 if item.get_closest_marker('demo_training') else
                   1 if item.get_closest_marker('slow') else 2)


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """The shared data folder (released weights, backlit photos, reference outputs); when it is absent the test is
    skipped, or fails under CI (tests/shared_data.py)."""
    return require_shared_data()


@pytest.fixture(scope='session')
def released_weights() -> Callable[[str], Path]:
    """``name -> Path`` of released weights: from the shared data, else downloaded by name; skipped (failed under
    CI) when neither works. For tests that need no photos."""
    return ReleasedWeights()


class FakeLPIPS:
    """Stands in for ``lpips.LPIPS``: the mean absolute difference of its two inputs, each value recorded."""
    values = []

    def __init__(self, net='alex', verbose=True):
        self.net = net

    def eval(self):
        return self

    def __call__(self, first, second):
        import torch

        value = (first - second).abs().mean(dim=(1, 2, 3), keepdim=True)
        FakeLPIPS.values.append(float(value))
        return torch.as_tensor(value)


@pytest.fixture
def lpips_package(monkeypatch) -> Callable[[bool], None]:
    """``lpips_package(installed)``: what ``import lpips`` finds for the rest of the test, whatever is installed:
    nothing (``False``), or a stand-in whose values are recorded in ``FakeLPIPS.values`` (``True``)."""
    from rave_basicsr.metrics import rave_protocol_metric

    def install(installed: bool) -> None:
        FakeLPIPS.values = []
        monkeypatch.setitem(sys.modules, 'lpips', types.SimpleNamespace(LPIPS=FakeLPIPS) if installed else None)
        rave_protocol_metric._lpips_model.cache_clear()

    yield install
    rave_protocol_metric._lpips_model.cache_clear()


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
