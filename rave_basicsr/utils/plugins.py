"""Discovery of BasicSR plugins through the ``basicsr.plugins`` entry-point group.

A plugin is any installed distribution that declares ``[basicsr.plugins] name = package``; importing the package
registers its components. This package declares itself there, so ``basicsr train`` works the same for every
plugin.
"""
from collections import OrderedDict
from importlib import metadata
from typing import Dict, List, Tuple

from rave_basicsr.utils.errors import RaveError

ENTRY_POINT_GROUP = 'basicsr.plugins'


class PluginLoadError(RaveError):
    """A declared plugin failed to import."""


def plugin_entry_points() -> list:
    """The installed ``basicsr.plugins`` entry points, sorted by name."""
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def load_plugins() -> Dict[str, str]:
    """Import every declared plugin; returns {top-level module: plugin name}. Names the plugin that fails."""
    loaded = {}
    for entry_point in plugin_entry_points():
        try:
            module = entry_point.load()
        except Exception as exc:  # any import-time failure of third-party code is reported the same way
            raise PluginLoadError(f'the BasicSR plugin {entry_point.name!r} ({entry_point.value}) failed to import: '
                                  f'{type(exc).__name__}: {exc}. Fix or uninstall that package.') from exc
        loaded[getattr(module, '__name__', entry_point.value).split('.')[0]] = entry_point.name
    return loaded


def registered_components() -> 'OrderedDict[str, List[Tuple[str, str]]]':
    """{registry name: [(registered name, origin)]} where origin is 'basicsr' or the providing plugin's name."""
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

    plugins = load_plugins()
    listing = OrderedDict()
    for registry in (ARCH_REGISTRY, MODEL_REGISTRY, LOSS_REGISTRY, DATASET_REGISTRY, METRIC_REGISTRY):
        rows = []
        for name, obj in sorted(registry):
            top = getattr(obj, '__module__', '').split('.')[0]
            rows.append((name, 'basicsr' if top == 'basicsr' else plugins.get(top, top or 'unknown')))
        listing[registry._name] = rows
    return listing
