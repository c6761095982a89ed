"""The shared test data and what a test that needs it does when it is absent.

The folder (released weights in ``official_checkpoints/``, real backlit photos in ``backlit_samples/``, the
official code's outputs in ``reference_outputs/``) is ``$RAVE_SHARED_DATA``, else ``../shared/data`` beside the
repository; it is never copied into the repository (no licence allows redistributing it). When it is absent:

* a test that needs only released weights gets them by name through the project's own download
  (:func:`rave_basicsr.inference.weights.resolve_weights`: SHA-256 checked, cached in ``$RAVE_CACHE_DIR``, else
  ``~/.cache/rave_basicsr``);
* otherwise (offline, or the test needs the photos or the reference outputs) the test is skipped with a reason
  that names the missing folder and how to provide it (``-rfEs`` in pyproject.toml prints it in the summary);
* under CI (``CI`` set to true, 1 or yes, any case) such a skip is a failure instead: CI must run every test.
"""
import os
from pathlib import Path
from typing import Optional, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = 'RAVE_SHARED_DATA'
SUBFOLDERS = ('official_checkpoints', 'backlit_samples', 'reference_outputs')
HOW_TO_PROVIDE = (f'set {ENV_VAR} to a folder holding {SUBFOLDERS[0]}/, {SUBFOLDERS[1]}/ and {SUBFOLDERS[2]}/ '
                  '(README, "Tests")')


def shared_data_dir() -> Path:
    """``$RAVE_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    value = os.environ.get(ENV_VAR)
    return Path(value).expanduser() if value else REPO_ROOT.parent / 'shared' / 'data'


def running_in_ci() -> bool:
    """Whether ``CI`` says so (true, 1 or yes, any case), as CI services set it."""
    return os.environ.get('CI', '').strip().lower() in ('true', '1', 'yes')


def unavailable(reason: str) -> None:
    """Skip the calling test with ``reason``, or fail it with the same reason under CI."""
    __tracebackhide__ = True
    if running_in_ci():
        pytest.fail(f'{reason} [CI: tests that need the shared data fail instead of skipping]', pytrace=False)
    try:  # reported at the test's own location, not this line (pytest's flag for skip marks)
        skipped = pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:  # a pytest without the flag
        skipped = pytest.skip.Exception(reason)
    raise skipped


def require_shared_data(subfolders: Sequence[str] = SUBFOLDERS) -> Path:
    """The shared data folder when it holds ``subfolders``; otherwise :func:`unavailable`."""
    path = shared_data_dir()
    missing = [name for name in subfolders if not (path / name).is_dir()]
    if missing:
        unavailable(f'shared test data not found: {path} has no {", ".join(f"{name}/" for name in missing)}; '
                    f'{HOW_TO_PROVIDE}')
    return path


class ReleasedWeights:
    """``name -> Path`` of a released network: the shared data's file, else downloaded by name.

    A download that fails (offline) is not tried again for the other names in the same session."""

    def __init__(self):
        self.download_error: Optional[str] = None

    def __call__(self, name: str) -> Path:
        from rave_basicsr.inference import weights
        from rave_basicsr.utils.errors import RaveError

        local = shared_data_dir() / 'official_checkpoints' / weights.OFFICIAL_WEIGHTS[name].filename
        if local.is_file():
            return local
        if self.download_error is None:
            try:
                return weights.resolve_weights(name)
            except RaveError as exc:
                self.download_error = str(exc)
        unavailable(f'released weights {name!r}: {local} does not exist and they cannot be downloaded '
                    f'({self.download_error}); {HOW_TO_PROVIDE}, or run where the download works')
