"""rave-basicsr: CLIP-guided backlit image enhancement (RAVE, CLIP-LIT, CLIP-LIT-Latent) for BasicSR.

Importing this package is the one place with import-time side effects:

1. the torchvision compatibility shim that lets BasicSR 1.4.2 import (:mod:`rave_basicsr.compat` lists it with
   every other change this plugin makes to BasicSR's behaviour);
2. registration of every plugin component (archs, models, losses, datasets, metrics) in BasicSR's registries,
   by importing the role-named modules (``*_arch.py``, ``*_model.py``, ``*_loss.py``, ``*_dataset.py``,
   ``*_metric.py``) exactly as BasicSR discovers its own. Python's module cache makes it happen once.
"""
from rave_basicsr.compat.torchvision_shim import install_torchvision_shim

install_torchvision_shim()

from rave_basicsr.registration import import_plugin_modules  # noqa: E402  (the shim must come first)
from rave_basicsr.version import __version__  # noqa: E402

import_plugin_modules()

__all__ = ['__version__']
