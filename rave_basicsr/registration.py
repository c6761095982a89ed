"""Discovery of the plugin's registered components, the way BasicSR finds its own.

Each role folder holds files whose suffix names the role; importing them runs their ``@*_REGISTRY.register()``
decorators. Class names carry no BasicSR prefix clash (checked by the tests against BasicSR's own names).
"""
import importlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

#: role folder -> file suffix, mirroring basicsr/{archs,models,losses,data,metrics}
ROLE_SUFFIXES = {
    'archs': '_arch.py',
    'models': '_model.py',
    'losses': '_loss.py',
    'data': '_dataset.py',
    'metrics': '_metric.py',
}


def plugin_module_names() -> list:
    """Dotted names of every role-named module in the package, sorted for a stable registration order."""
    names = []
    for folder, suffix in ROLE_SUFFIXES.items():
        for path in sorted((PACKAGE_DIR / folder).glob(f'*{suffix}')):
            names.append(f'rave_basicsr.{folder}.{path.stem}')
    return names


def import_plugin_modules() -> None:
    """Import (and thereby register) every plugin component; repeated calls are no-ops."""
    for name in plugin_module_names():
        importlib.import_module(name)
