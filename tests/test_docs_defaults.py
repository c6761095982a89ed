"""Documented defaults against the code, their single source; the repository stands on its own.

Every default lives once in the code (``DEFAULT_*`` constants, ``ROLE_DEFAULTS``, the CLI's argument defaults). The
option tables of docs/training.md, docs/clip_lit.md, docs/guidance.md and docs/inference.md, the YAML blocks of the
models' docstrings and the shipped training option files (which set the official hyperparameters) must agree with
it wherever they state the same option. A drifted value fails with the file, the option and both values. Over 400
lines: one test per documentation table, which share the table-reading helpers at the top.
"""
import inspect
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.shared_data import REPO_ROOT

DOCS = REPO_ROOT / 'docs'
TRAIN_OPTION_FILES = sorted((REPO_ROOT / 'options').glob('train_*.yml'))


# ------------------------------------------------------------------------------------------------ helpers
def normalise(value):
    """YAML 1.1 reads ``1e-3`` as a string and ``25`` as an int: compare numbers as floats, containers deeply."""
    if isinstance(value, dict):
        return {key: normalise(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(item) for item in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def same(a, b) -> bool:
    a, b = normalise(a), normalise(b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def first_code_span(cell: str) -> str:
    match = re.search(r'`([^`]*)`', cell)
    assert match, f'no `...` value in table cell {cell!r}'
    return match.group(1)


def cell_value(cell: str):
    """The YAML value of a table cell: its first `...` span, or the bare cell (``~``, ``16``, ``8.0``)."""
    text = first_code_span(cell) if '`' in cell else cell.strip()
    return yaml.safe_load(text)


def markdown_tables(path: Path):
    """Every table of a Markdown file as (header cells, [row cells])."""
    tables, rows, header = [], None, None
    for line in path.read_text(encoding='utf-8').splitlines() + ['']:
        if line.startswith('|'):
            cells = [cell.strip() for cell in re.split(r'(?<!\\)\|', line.strip())[1:-1]]
            if header is None:
                header, rows = cells, []
            elif not all(set(cell) <= set('-: ') for cell in cells):
                rows.append(cells)
        elif header is not None:
            tables.append((header, rows))
            header = None
    return tables


def option_table(path: Path) -> dict:
    """``{option: {column: cell}}`` from the tables whose columns start with ``option | default``."""
    options = {}
    for header, rows in markdown_tables(path):
        if header[:2] == ['option', 'default']:
            for row in rows:
                options[first_code_span(row[0])] = dict(zip(header, row))
    assert options, f'{path.name}: no "| option | default | ... |" table found'
    return options


def table_with(path: Path, first_column: str):
    for header, rows in markdown_tables(path):
        if header[0] == first_column:
            return header, rows
    raise AssertionError(f'{path.name}: no table with first column {first_column!r}')


def section(path: Path, title: str) -> str:
    text = path.read_text(encoding='utf-8')
    start = text.index(f'## {title}')
    end = text.find('\n## ', start + 1)
    return text[start:end if end >= 0 else None]


def check_default(where: str, option: str, documented, code_default) -> None:
    assert same(documented, code_default), (f'{where}: {option} says {documented!r}, but the code default is '
                                            f'{code_default!r}')


def loss_defaults(block: dict) -> dict:
    """A loss block's effective options: the loss class's keyword defaults, overridden by ``block``."""
    from basicsr.utils.registry import LOSS_REGISTRY

    signature = inspect.signature(LOSS_REGISTRY.get(block['type']).__init__)
    defaults = {name: parameter.default for name, parameter in signature.parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    return {'type': block['type'], **defaults, **block}


def optimizer_defaults(block: dict) -> dict:
    """An optimiser block's effective options: the torch optimiser's keyword defaults, overridden by ``block``."""
    import torch

    signature = inspect.signature(getattr(torch.optim, block['type']).__init__)
    defaults = {name: parameter.default for name, parameter in signature.parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    return {'type': block['type'], **defaults, **block}


def check_block(where: str, option: str, given: dict, default: dict, loss: bool = False,
                optimizer: bool = False) -> None:
    """Every key ``given`` sets must equal the default (for a loss or an optimiser, also the class's defaults)."""
    expected = loss_defaults(default) if loss else optimizer_defaults(default) if optimizer else default
    for key, value in given.items():
        assert key in expected, f'{where}: {option}:{key} has no default in the code (known: {sorted(expected)})'
        check_default(where, f'{option}:{key}', value, expected[key])


# ------------------------------------------------------------------------------------------------ code defaults
def code_defaults():
    from rave_basicsr.guidance.encoders import ROLE_DEFAULTS
    from rave_basicsr.guidance.prompts import DEFAULT_PROMPT_LENGTH
    from rave_basicsr.inference.enhancer import AUTO_TILE
    from rave_basicsr.models import clip_lit_model as clip_lit
    from rave_basicsr.models import rave_model as rave
    from rave_basicsr.models.backlit_base_model import DEFAULT_IDENTITY_OPT, DEFAULT_WARMUP
    from rave_basicsr.utils.distributed import DEFAULT_DIST_TIMEOUT

    return SimpleNamespace(
        ROLE_DEFAULTS=ROLE_DEFAULTS, DEFAULT_PROMPT_LENGTH=DEFAULT_PROMPT_LENGTH, AUTO_TILE=AUTO_TILE,
        DEFAULT_IDENTITY_OPT=DEFAULT_IDENTITY_OPT, DEFAULT_WARMUP=DEFAULT_WARMUP,
        DEFAULT_DIST_TIMEOUT=DEFAULT_DIST_TIMEOUT, rave=rave, clip_lit=clip_lit)


# ------------------------------------------------------------------------------------------------ docs
def test_training_doc_option_table_matches_the_code():
    code = code_defaults()
    path = DOCS / 'training.md'
    table = option_table(path)
    expected = {
        'train:warmup:identity_opt': code.DEFAULT_WARMUP['identity_opt'],
        'train:identity_opt': code.DEFAULT_IDENTITY_OPT,
        'train:guidance_opt': code.rave.DEFAULT_GUIDANCE_OPT,
        'train:guided': code.rave.DEFAULT_GUIDED,
        'dist_params:timeout': code.DEFAULT_DIST_TIMEOUT,
        **{f'train:warmup:{key}': value for key, value in code.DEFAULT_WARMUP.items() if key != 'identity_opt'},
    }
    for option, default in expected.items():
        assert option in table, f'training.md: option {option} is missing from the options table'
        check_default('docs/training.md', option, cell_value(table[option]['default']), default)
    assert f'{code.AUTO_TILE}-px tiles' in table['val:tile']['meaning'], \
        f'training.md: val:tile must name the code\'s automatic tile size ({code.AUTO_TILE} px)'
    for option, role in (('guidance_encoder', 'guidance'), ('identity_encoder', 'identity')):
        check_block('docs/training.md', option, cell_value(table[option]['meaning']), code.ROLE_DEFAULTS[role])


def test_training_doc_stage_table_matches_the_code():
    code = code_defaults()
    header, rows = table_with(DOCS / 'training.md', 'stage')
    loss = {row[0].strip('`'): row[header.index('loss')] for row in rows}
    warmup = code.DEFAULT_WARMUP['identity_opt']
    documented = re.fullmatch(r'([\d.]+) · L_id\(out, in; \[([\d., ]+)\]\).*', loss['warmup'])
    assert documented, loss['warmup']
    check_default('docs/training.md', 'stage warmup: loss factor', documented.group(1), warmup['loss_weight'])
    check_default('docs/training.md', 'stage warmup: layer weights', yaml.safe_load(f'[{documented.group(2)}]'),
                  warmup['layer_weights'])
    documented = re.fullmatch(r'([\d.]+) · L_RAVE \+ ([\d.]+) · L_id\(out, in; \[([\d., ]+)\]\)', loss['guided'])
    assert documented, loss['guided']
    check_default('docs/training.md', 'stage guided: RAVE factor', documented.group(1),
                  code.rave.DEFAULT_GUIDANCE_OPT['loss_weight'])
    check_default('docs/training.md', 'stage guided: identity factor', documented.group(2),
                  code.DEFAULT_IDENTITY_OPT['loss_weight'])
    check_default('docs/training.md', 'stage guided: layer weights', yaml.safe_load(f'[{documented.group(3)}]'),
                  code.DEFAULT_IDENTITY_OPT['layer_weights'])


def test_clip_lit_doc_tables_match_the_code():
    code = code_defaults()
    clip_lit = code.clip_lit
    path = DOCS / 'clip_lit.md'
    table = option_table(path)
    expected = {
        'guidance': clip_lit.GUIDANCE_TYPES[0], 'prompt_length': code.DEFAULT_PROMPT_LENGTH,
        'rank_order': clip_lit.RANK_ORDERS[0], 'prompt_data': clip_lit.DEFAULT_PROMPT_DATA,
        'results': clip_lit.DEFAULT_RESULTS, 'train:optim_guidance': clip_lit.DEFAULT_OPTIM_GUIDANCE,
        'train:init_opt': clip_lit.DEFAULT_INIT_OPT, 'train:guidance_opt': clip_lit.DEFAULT_GUIDANCE_OPT,
        'train:ranking_opt': clip_lit.DEFAULT_RANKING_OPT,
        **{f'train:{stage}': value for stage, value in clip_lit.DEFAULT_STAGES.items()},
    }
    for option, default in expected.items():
        assert option in table, f'clip_lit.md: option {option} is missing from the options table'
        check_default('docs/clip_lit.md', option, cell_value(table[option]['default']), default)

    header, rows = table_with(path, 'option')  # the first such table: "The two guidance types"
    assert 'guidance lr' in header, header
    for row in rows:
        guidance = first_code_span(row[0]).split(': ')[1]
        check_default('docs/clip_lit.md', f'guidance lr of guidance: {guidance}', row[header.index('guidance lr')],
                      clip_lit.DEFAULT_GUIDANCE_LR[guidance])

    header, rows = table_with(path, 'stage (log name)')
    lengths = {row[0].split('`')[1]: row[header.index('length (extension)')] for row in rows}
    losses = {row[0].split('`')[1]: row[header.index('loss')] for row in rows}
    for stage, default in clip_lit.DEFAULT_STAGES.items():
        documented = re.fullmatch(rf'`train:{stage}` (\d+) \(\+(\d+) while loss > ([\d.]+)\)', lengths[stage])
        assert documented, f'clip_lit.md: stage {stage} length {lengths[stage]!r}'
        for value, key in zip(documented.groups(), ('iters', 'extend_by', 'extend_threshold')):
            check_default('docs/clip_lit.md', f'stage {stage}: {key}', value, default[key])
    documented = re.fullmatch(r'`train:warmup` (\d+) \(\+(\d+) per re-init\)', lengths['warmup'])
    assert documented, lengths['warmup']
    check_default('docs/clip_lit.md', 'stage warmup: iters', documented.group(1), code.DEFAULT_WARMUP['iters'])
    check_default('docs/clip_lit.md', 'stage warmup: extension', documented.group(2),
                  code.DEFAULT_WARMUP['reinit_extend'])
    factors = {
        'warmup': (r'`([\d.]+)·L_id', code.DEFAULT_WARMUP['identity_opt']['loss_weight']),
        'network': (r'`([\d.]+)·PromptGuidanceLoss', clip_lit.DEFAULT_GUIDANCE_OPT['loss_weight']),
        'prompt': (r'`([\d.]+)·PromptRankingLoss', clip_lit.DEFAULT_RANKING_OPT['loss_weight']),
    }
    for stage, (pattern, default) in factors.items():
        documented = re.search(pattern, losses[stage])
        assert documented, f'clip_lit.md: stage {stage} loss {losses[stage]!r}'
        check_default('docs/clip_lit.md', f'stage {stage}: loss factor', documented.group(1), default)
    documented = re.search(r'\+ ([\d.]+)·L_id\(\[([\d.,]+)\]\)', losses['network'])
    check_default('docs/clip_lit.md', 'stage network: identity factor', documented.group(1),
                  code.DEFAULT_IDENTITY_OPT['loss_weight'])
    check_default('docs/clip_lit.md', 'stage network: layer weights', yaml.safe_load(f'[{documented.group(2)}]'),
                  code.DEFAULT_IDENTITY_OPT['layer_weights'])


def test_guidance_doc_tables_match_the_code():
    code = code_defaults()
    path = DOCS / 'guidance.md'
    header, rows = table_with(path, 'role')
    for row in rows:
        role = first_code_span(row[0])
        for column in ('model', 'pretrained', 'precision'):
            check_default('docs/guidance.md', f'{role} encoder {column}', first_code_span(row[header.index(column)]),
                          code.ROLE_DEFAULTS[role][column])
    header, rows = table_with(path, 'loss')
    factors = {row[0].split('(')[0].strip('` '): row[header.index('official factor (option file)')] for row in rows}
    expected = {'CLIPIdentityLoss': code.DEFAULT_IDENTITY_OPT, 'PromptGuidanceLoss': code.clip_lit.DEFAULT_GUIDANCE_OPT,
                'PromptInitLoss': code.clip_lit.DEFAULT_INIT_OPT, 'PromptRankingLoss': code.clip_lit.DEFAULT_RANKING_OPT,
                'ResidualVectorLoss': code.rave.DEFAULT_GUIDANCE_OPT}
    for name, block in expected.items():
        documented = re.match(r'([\d.]+)', factors[name]).group(1)
        check_default('docs/guidance.md', f'{name} factor', documented, loss_defaults(block)['loss_weight'])
    warmup = re.search(r'([\d.]+) warm-up', factors['CLIPIdentityLoss']).group(1)
    check_default('docs/guidance.md', 'CLIPIdentityLoss warm-up factor', warmup,
                  code.DEFAULT_WARMUP['identity_opt']['loss_weight'])


def test_inference_doc_cli_table_matches_the_parser():
    import argparse

    from rave_basicsr.cli import enhance_cmd

    code = code_defaults()
    parser = argparse.ArgumentParser()
    enhance_cmd.add_arguments(parser)
    defaults = {action.option_strings[0]: action for action in parser._actions if action.option_strings}
    table = option_table(DOCS / 'inference.md')
    for option, row in table.items():
        flag = option.split()[0]
        if not flag.startswith('--'):
            continue
        action = defaults[flag]
        documented = row['default']
        if action.default is False:  # store_true flags
            assert documented == 'off', f'inference.md: {flag} is a switch, documented default {documented!r}'
        elif flag == '--tile':
            assert action.default is None and documented.startswith(f'{code.AUTO_TILE}-px tiles'), \
                f'inference.md: --tile default {documented!r}, the code tiles at {code.AUTO_TILE} px'
        else:
            check_default('docs/inference.md', flag, cell_value(documented), action.default)



def test_rave_demo_trains_with_the_padding_rave_enhance_infers_with():
    """scripts/demo.sh enhances with ``rave enhance``'s default padding, so the demo network trains with it: trained
    with zero padding (the originals' training), the 4x demo networks used the image border as a cue and lost up to
    1.9 dB when enhanced with reflect padding (docs/training.md, "Padding in training and at inference")."""
    import argparse

    from rave_basicsr.cli import enhance_cmd

    parser = argparse.ArgumentParser()
    enhance_cmd.add_arguments(parser)
    inferred = parser.get_default('outer_padding')
    trained = yaml.safe_load((REPO_ROOT / 'options/demo/train_rave_demo.yml').read_text())['network_g']['outer_padding']
    assert trained == inferred, f'options/demo/train_rave_demo.yml trains with {trained!r} padding, rave enhance ' \
        f'infers with {inferred!r}'


# ------------------------------------------------------------------------------------------------ option files
def docstring_yaml(module) -> dict:
    block = re.search(r'```yaml\n(.*?)```', module.__doc__, re.S)
    assert block, f'{module.__name__}: no ```yaml block in the docstring'
    return yaml.safe_load(block.group(1))


def option_sources():
    from rave_basicsr.models import clip_lit_model, rave_model

    sources = [(path.relative_to(REPO_ROOT).as_posix(), yaml.safe_load(path.read_text(encoding='utf-8')))
               for path in TRAIN_OPTION_FILES]
    sources.append(('rave_model.py docstring', dict(docstring_yaml(rave_model), model_type='RAVEModel')))
    sources.append(('clip_lit_model.py docstring', dict(docstring_yaml(clip_lit_model), model_type='CLIPLITModel')))
    return sources


OPTION_SOURCES = option_sources()


@pytest.mark.parametrize('where, opt', OPTION_SOURCES, ids=[where for where, _ in OPTION_SOURCES])
def test_option_files_set_the_code_defaults(where, opt):
    """The shipped option files reproduce the official hyperparameters, which are the code's defaults."""
    code = code_defaults()
    train = opt.get('train') or {}
    for key, value in (train.get('warmup') or {}).items():
        if key == 'identity_opt':
            check_block(where, 'train:warmup:identity_opt', value, code.DEFAULT_WARMUP['identity_opt'], loss=True)
        elif key != 'optim':
            check_default(where, f'train:warmup:{key}', value, code.DEFAULT_WARMUP[key])
    if 'identity_opt' in train:
        check_block(where, 'train:identity_opt', train['identity_opt'], code.DEFAULT_IDENTITY_OPT, loss=True)
    for option, role in (('guidance_encoder', 'guidance'), ('identity_encoder', 'identity')):
        if isinstance(opt.get(option), dict) and opt[option].get('type') == 'open_clip':
            check_block(where, option, opt[option], code.ROLE_DEFAULTS[role])
    if 'timeout' in (opt.get('dist_params') or {}):
        check_default(where, 'dist_params:timeout', opt['dist_params']['timeout'], code.DEFAULT_DIST_TIMEOUT)

    if opt['model_type'] == 'RAVEModel':
        if 'guidance_opt' in train:
            check_block(where, 'train:guidance_opt', train['guidance_opt'], code.rave.DEFAULT_GUIDANCE_OPT, loss=True)
        if 'guided' in train:
            check_block(where, 'train:guided', train['guided'], code.rave.DEFAULT_GUIDED)
        return
    clip_lit = code.clip_lit
    assert opt['model_type'] == 'CLIPLITModel', where
    guidance = opt.get('guidance', clip_lit.GUIDANCE_TYPES[0])
    for option, default in (('prompt_length', code.DEFAULT_PROMPT_LENGTH), ('rank_order', clip_lit.RANK_ORDERS[0])):
        if option in opt:
            check_default(where, option, opt[option], default)
    for option, default in (('prompt_data', clip_lit.DEFAULT_PROMPT_DATA), ('results', clip_lit.DEFAULT_RESULTS)):
        given = {key: value for key, value in (opt.get(option) or {}).items()
                 if key not in ('dataroot_welllit', 'dataroot_backlit')}
        check_block(where, option, given, default)
    for stage, default in clip_lit.DEFAULT_STAGES.items():
        check_block(where, f'train:{stage}', train.get(stage) or {}, default)
    for option, default in (('init_opt', clip_lit.DEFAULT_INIT_OPT), ('guidance_opt', clip_lit.DEFAULT_GUIDANCE_OPT),
                            ('ranking_opt', clip_lit.DEFAULT_RANKING_OPT)):
        if option in train:
            check_block(where, f'train:{option}', train[option], default, loss=True)
    if 'optim_guidance' in train:
        check_block(where, 'train:optim_guidance', train['optim_guidance'],
                    dict(clip_lit.DEFAULT_OPTIM_GUIDANCE, lr=clip_lit.DEFAULT_GUIDANCE_LR[guidance]), optimizer=True)


@pytest.mark.parametrize('path', TRAIN_OPTION_FILES, ids=lambda path: path.name)
def test_checkpoints_at_epoch_ends_for_the_documented_data(path, monkeypatch):
    """docs/training.md: exact resumes need ``save_checkpoint_freq`` a multiple of the iterations per epoch. The
    iterations per epoch come from the model's own computation, for the image count the file's header documents."""
    import basicsr.data

    from rave_basicsr.models.training_state import TrainingStateMixin

    text = path.read_text(encoding='utf-8')
    opt = yaml.safe_load(text)
    images = int(re.search(r'(\d+) backlit BAID training images', text).group(1))
    monkeypatch.setattr(basicsr.data, 'build_dataset', lambda dataset_opt: range(images))
    per_epoch = TrainingStateMixin.iterations_per_epoch(SimpleNamespace(opt=dict(opt, world_size=opt['num_gpu'])))
    frequency = opt['logger']['save_checkpoint_freq']
    assert frequency % per_epoch == 0, (f'{path.name}: save_checkpoint_freq {frequency} is not a multiple of the '
                                        f'{per_epoch} iterations per epoch of {images} images')
    assert opt['val']['val_freq'] == frequency, f'{path.name}: validate when a checkpoint is saved'
    checkpoints = section(DOCS / 'training.md', 'Checkpoints and resuming')
    assert f'an epoch is {per_epoch} iterations' in checkpoints and str(frequency) in checkpoints, \
        f'docs/training.md, "Checkpoints and resuming": must state {per_epoch} iterations per epoch and {frequency}'


# ------------------------------------------------------------------------------------------------ standing alone
# built from pieces, so that this file does not match its own patterns when the repository is searched
PARENT_SHARED = re.escape('..' + '/') + 'shared'
OUTSIDE = [re.compile(pattern) for pattern in (PARENT_SHARED, 'shared' + '/docs', 'method' + '-spec', 'spec' + ' §',
                                                '§' + r'\s?\d', '/' + 'work/')]
#: the one allowed exception: the tests' shared data folder (project rule: RAVE_SHARED_DATA, whose default is the
#: data folder of the shared directory beside the repository), named only where it is defined
ALLOWED = {'tests/shared_data.py': {PARENT_SHARED}}


def test_no_file_refers_to_a_path_outside_the_repository():
    roots = ['rave_basicsr', 'docs', 'options', 'scripts', 'bench', 'tests', '.ci']
    files = [REPO_ROOT / name for name in ('README.md', 'pyproject.toml', 'setup.py')]
    for root in roots:
        files += [path for path in (REPO_ROOT / root).rglob('*') if path.is_file()]
    problems = []
    for path in files:
        relative = path.relative_to(REPO_ROOT).as_posix()
        if path.suffix not in ('', '.py', '.md', '.yml', '.yaml', '.sh', '.toml', '.cfg', '.json', '.txt') \
                or '__pycache__' in relative:
            continue
        text = path.read_text(encoding='utf-8', errors='replace')
        for pattern in OUTSIDE:
            if pattern.pattern in ALLOWED.get(relative, ()):
                continue
            for match in pattern.finditer(text):
                line = text.count('\n', 0, match.start()) + 1
                problems.append(f'{relative}:{line}: {match.group(0)!r}')
    assert not problems, 'references outside the repository (state the fact here, cite docs/references.md):\n' + \
        '\n'.join(problems)
