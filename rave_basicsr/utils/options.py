"""BasicSR's command line and option files, read safely: the flags of ``train.py`` / ``test.py``, option files,
``--force_yml`` overrides and the registry names they use.

BasicSR 1.4.2 reads option files with PyYAML's full ``Loader`` (which builds arbitrary Python objects from
``!!python/...`` tags) and applies ``--force_yml`` with ``exec``. This module keeps BasicSR's semantics (key order
kept, ``!!float 1e-4`` read as a float, ``--force_yml a:b=value`` sets ``opt['a']['b']``) without executing
anything from the file or the command line.
"""
import argparse
import difflib
from collections import OrderedDict
from os import path as osp
from typing import Any, Iterable, Mapping, Optional

import yaml

from rave_basicsr.utils.errors import RaveError


class OptionError(RaveError):
    """A problem with an option file or an override, worded for the user."""


class _OrderedSafeLoader(yaml.SafeLoader):
    """SafeLoader that keeps mapping order in an OrderedDict, as BasicSR's loader does."""


def _construct_ordered_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> OrderedDict:
    """Option keys are strings: a number written as a key (``margins: {3: [0.9, 0.2]}``) is kept as its text, since
    BasicSR's option logging (``dict2str``) fails on any other key."""
    loader.flatten_mapping(node)
    return OrderedDict((str(key), value) for key, value in loader.construct_pairs(node))


_OrderedSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_ordered_mapping)


def load_yaml_text(text: str, source: str = '<string>') -> Any:
    """Parse YAML with the safe ordered loader; errors name ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_OrderedSafeLoader)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f'{source}, line {mark.line + 1}' if mark is not None else source
        tag = ''
        if exc.problem and 'tag' in exc.problem:
            tag = exc.problem.split('tag', 1)[1].strip(" '!")
        raise OptionError(f'{where}: the tag {tag!r} is not allowed. Option files are read with a safe loader that '
                          'builds only plain data (mappings, lists, strings, numbers, booleans, null); '
                          'write the value as plain YAML instead.') from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f'{source}, line {mark.line + 1}, column {mark.column + 1}' if mark is not None else source
        problem = getattr(exc, 'problem', None) or str(exc)
        raise OptionError(f'{where}: YAML syntax error: {problem}') from None


def load_option_file(path: str) -> OrderedDict:
    """Read an option file into an OrderedDict, with errors that name the file."""
    if not osp.exists(path):
        raise OptionError(f'option file {path!r} does not exist (current directory: {osp.abspath(".")}).')
    if osp.isdir(path):
        raise OptionError(f'option file {path!r} is a directory; pass a .yml file.')
    try:
        with open(path, encoding='utf-8') as handle:
            text = handle.read()
    except OSError as exc:
        raise OptionError(f'option file {path!r} cannot be read: {exc.strerror}.') from None
    except UnicodeDecodeError as exc:
        raise OptionError(f'option file {path!r} cannot be read: it is not UTF-8 text (byte {exc.start}).') from None
    opt = load_yaml_text(text, source=path)
    if not isinstance(opt, dict):
        raise OptionError(f'option file {path!r} must hold a mapping of options at the top level.')
    return opt


def parse_override_value(text: str) -> Any:
    """Parse the value of one ``--force_yml`` entry as a YAML scalar or flow collection (never ``eval``)."""
    text = text.strip()
    if text.lower() == 'none':  # BasicSR accepts "None" as well as "~"
        return None
    return load_yaml_text(text, source='--force_yml value')


def apply_overrides(opt: dict, entries: Optional[Iterable[str]]) -> None:
    """Apply ``--force_yml k1:k2=value`` entries in place; intermediate keys must already exist."""
    for entry in entries or ():
        if '=' not in entry:
            raise OptionError(f'--force_yml entry {entry!r} must look like key1:key2=value.')
        keys_text, value_text = entry.split('=', 1)
        keys = [key.strip() for key in keys_text.strip().split(':')]
        node = opt
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node, dict) or key not in node:
                known = list(node) if isinstance(node, dict) else []
                raise OptionError(f'--force_yml {entry!r}: no option {":".join(keys[:depth + 1])!r} in the file'
                                  f'{close_matches_hint(key, known)} (--force_yml changes existing sections only).')
            node = node[key]
        if not isinstance(node, dict):
            raise OptionError(f'--force_yml {entry!r}: {":".join(keys[:-1])!r} is not a section.')
        node[keys[-1]] = parse_override_value(value_text)


def close_matches_hint(name: str, candidates: Iterable[str]) -> str:
    """A '; did you mean ...' suffix listing close matches, or an empty string."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=4, cutoff=0.5)
    return f'; did you mean {", ".join(repr(m) for m in matches)}?' if matches else ''


def build_argument_parser(is_train: bool, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The flags of BasicSR's ``train.py`` / ``test.py``, with help texts."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=('Train a model with BasicSR\'s training loop.' if is_train else
                     'Test a model with BasicSR\'s test pipeline (writes results/<name>/).'),
        epilog='Experiments, results and tensorboard logs are written under the current directory.')
    parser.add_argument('-opt', required=True, metavar='FILE', help='path to the option YAML file')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='job launcher: none (single process), pytorch (started by torchrun) or slurm (srun)')
    parser.add_argument('--auto_resume', action='store_true',
                        help='resume from the newest training state in experiments/<name>/training_states')
    parser.add_argument('--debug', action='store_true',
                        help='debug mode: name prefixed by debug_, print/save/validate every few iterations')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help='accepted for torch.distributed.launch; torchrun passes LOCAL_RANK instead')
    parser.add_argument('--force_yml', nargs='+', default=None, metavar='KEY:KEY=VALUE',
                        help='override options, e.g. train:ema_decay=0.999 (values are parsed as YAML)')
    return parser


def check_registered_types(opt: dict) -> None:
    """Fail before any work when a ``type`` / ``model_type`` names nothing registered, listing close matches."""
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

    def check(registry, name, where):
        if name is None:
            return
        if name not in registry and f'{name}_basicsr' not in registry:
            raise OptionError(f'{where}: {name!r} is not in BasicSR\'s {registry._name} registry'
                              f'{close_matches_hint(name, registry.keys())} '
                              '(run `basicsr list` to see every registered name; is the plugin installed?)')

    check(MODEL_REGISTRY, opt.get('model_type', 'SRModel'), 'model_type')
    for key, value in opt.items():
        if key.startswith('network_') and isinstance(value, dict):
            check(ARCH_REGISTRY, value.get('type'), f'{key}:type')
    for phase, dataset_opt in (opt.get('datasets') or {}).items():
        if isinstance(dataset_opt, dict):
            check(DATASET_REGISTRY, dataset_opt.get('type'), f'datasets:{phase}:type')
    for key, value in (opt.get('train') or {}).items():
        if key.endswith('_opt') and isinstance(value, dict) and 'type' in value:
            check(LOSS_REGISTRY, value['type'], f'train:{key}:type')
    for name, metric_opt in ((opt.get('val') or {}).get('metrics') or {}).items():
        if isinstance(metric_opt, dict):
            check(METRIC_REGISTRY, metric_opt.get('type'), f'val:metrics:{name}:type')


def settle_empty_options(opt: dict, is_train: bool) -> None:
    """Give every option that is present but empty (``~``) its meaning, or a clear error naming it.

    ``~`` switches off what BasicSR users switch off by leaving it out: a validation metric
    (``val:metrics:NAME``), all metrics (``val:metrics``), validation (``val``), a validation or test set
    (``datasets:NAME``, not the training set), a wandb or tensorboard block (``logger:wandb``), a learning-rate
    scheduler (``train:scheduler``, the plugin's models only) and the EMA copy (``train:ema_decay`` becomes 0).
    Blocks a run cannot do without (``datasets``, ``datasets:train``, ``path``, ``train``, ``logger``, every
    ``network_*``, an optimiser), a ``type``, and a value inside a metric or optimiser block are errors naming the key:
    leave such a key out to get its default.
    """
    def where(*keys) -> str:
        return ':'.join(keys)

    def require_block(value: Any, *keys) -> None:
        if not isinstance(value, dict):
            what = 'empty (~)' if value is None else f'{value!r}, not a block of options'
            raise OptionError(f'option {where(*keys)} is {what}; this run needs it (see the option files in '
                              'options/).')

    def no_empty_leaves(block: dict, *keys) -> None:
        for key, value in block.items():
            if value is None:
                hint = 'name the registered type' if key == 'type' else 'give a value, or leave the key out for its default'
                raise OptionError(f'option {where(*keys, key)} is empty (~); {hint}.')

    for key in ('datasets', 'path') + (('train', 'logger') if is_train else ()):
        require_block(opt.get(key), key)
    for key in [k for k in opt if k.startswith('network_')]:
        require_block(opt[key], key)
        if opt[key].get('type') is None:
            raise OptionError(f'option {key}:type is empty (~); name the registered network (e.g. BacklitUNet).')
    for phase in list(opt['datasets']):
        if opt['datasets'][phase] is None and not (is_train and phase == 'train'):
            del opt['datasets'][phase]  # an unused validation or test set
            continue
        require_block(opt['datasets'][phase], 'datasets', phase)
        if opt['datasets'][phase].get('type', '') is None:
            raise OptionError(f'option datasets:{phase}:type is empty (~); name the registered dataset.')
    if is_train:
        require_block(opt['datasets'].get('train'), 'datasets', 'train')
        train = opt['train']
        if 'ema_decay' in train and train['ema_decay'] is None:
            train['ema_decay'] = 0
        for key, value in train.items():
            if key.startswith('optim_'):
                require_block(value, 'train', key)
                no_empty_leaves(value, 'train', key)
            elif key.endswith('_opt') and isinstance(value, dict) and 'type' in value and value['type'] is None:
                raise OptionError(f'option train:{key}:type is empty (~); name the registered loss, or set '
                                  f'train:{key}: ~ to use the default.')
        warmup = train.get('warmup')
        if isinstance(warmup, dict) and isinstance(warmup.get('optim'), dict):
            no_empty_leaves(warmup['optim'], 'train', 'warmup', 'optim')
    if not is_train:
        require_block(opt.get('val'), 'val')  # basicsr test reads val:save_img
    logger = opt.get('logger')
    if isinstance(logger, dict):
        for key in [k for k, v in logger.items() if v is None and k in ('wandb', 'tensorboard')]:
            del logger[key]
    val = opt.get('val')
    if isinstance(val, dict):
        if val.get('metrics') is None and 'metrics' in val:
            val['metrics'] = {}
        metrics = val.get('metrics') or {}
        require_block(metrics, 'val', 'metrics')
        for name in list(metrics):
            if metrics[name] is None:
                del metrics[name]  # this metric switched off
                continue
            require_block(metrics[name], 'val', 'metrics', name)
            no_empty_leaves(metrics[name], 'val', 'metrics', name)


def option_block(opt: Mapping, key: str, defaults: Mapping, where: str, tilde_keys: Iterable[str] = ()) -> dict:
    """``opt[key]`` over ``defaults``, for the plugin's own option blocks: a missing or empty (``~``) block, and an
    empty key inside it, take the default; only ``tilde_keys`` give ``~`` a meaning of its own (e.g.
    ``warmup:reinit_psnr: ~`` turns the guard off)."""
    block = opt.get(key)
    if block is None:
        block = {}
    if not isinstance(block, Mapping):
        raise OptionError(f'option {where} must be a block of options (key: value lines), got {block!r}.')
    tilde_keys = set(tilde_keys)
    return dict(defaults, **{k: v for k, v in block.items() if v is not None or k in tilde_keys})
