"""Compatibility with BasicSR 1.4.2 on current torch / torchvision.

BasicSR 1.4.2 (the last release) imports ``torchvision.transforms.functional_tensor``, which torchvision removed
in 0.17, so ``import basicsr`` fails on any modern torchvision. Upstream fixed it after the release (PR #650).
``install_torchvision_shim`` puts a stand-in module into ``sys.modules`` before basicsr is imported; it is the
only import-time side effect besides registration, and ``rave_basicsr/__init__.py`` calls it first.
"""
import sys
import types


def install_torchvision_shim() -> None:
    """Make ``torchvision.transforms.functional_tensor`` importable (idempotent)."""
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision: nothing to do)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional

    shim = types.ModuleType(name)
    shim.__doc__ = 'Stand-in created by rave_basicsr.compat for basicsr 1.4.2 (removed in torchvision 0.17).'
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[name] = shim
