"""Every place this plugin changes BasicSR 1.4.2's behaviour, and why. Nothing else in the package patches BasicSR.

At import (``rave_basicsr/__init__.py`` calls it first):

* ``torchvision_shim.install_torchvision_shim`` puts ``torchvision.transforms.functional_tensor`` (removed in
  torchvision 0.17) back into ``sys.modules``: BasicSR 1.4.2 imports it and cannot be imported otherwise.

When the ``basicsr`` command (or ``python -m rave_basicsr.train`` / ``.test``) runs a pipeline,
``basicsr_pipelines.patch_basicsr_pipelines`` replaces, in this process only:

* ``basicsr.train.parse_options`` / ``basicsr.test.parse_options``: a safe YAML loader (``!!python/*`` tags are
  refused; BasicSR builds arbitrary objects from them), ``--force_yml`` parsed as YAML (BasicSR runs ``exec`` on
  it), registry names checked before any work, nccl on GPUs and gloo on CPU-only machines, a collective timeout, and
  one GPU per local rank;
* ``basicsr.train.load_resume_state``: training states are loaded onto the CPU with ``weights_only=True``
  (BasicSR unpickles them onto ``torch.cuda.current_device()``, which fails on CPU-only machines);
* ``BaseModel.model_to_device``: CPU models are wrapped in DDP without ``device_ids`` (BasicSR always passes the
  current CUDA device);
* ``BaseModel.save_network`` / ``BaseModel.save_training_state``: atomic writes that raise on failure (BasicSR
  writes in place and, after three failed tries, logs the error and carries on, losing the checkpoint).

The plugin's own models do not depend on these patches: ``BacklitBaseModel`` overrides the same four methods with
the same functions (``utils/distributed.py``, ``utils/checkpoint.py``), so they work when built in-process too.
"""
from rave_basicsr.compat.basicsr_pipelines import patch_basicsr_pipelines, run_basicsr_pipeline
from rave_basicsr.compat.torchvision_shim import install_torchvision_shim

__all__ = ['install_torchvision_shim', 'patch_basicsr_pipelines', 'run_basicsr_pipeline']
