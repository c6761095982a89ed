"""The plugin's foundation: import shim, registration, option safety and the `basicsr` / `rave` commands."""
import importlib
import re
import subprocess
import sys
from importlib import metadata

import pytest

import rave_basicsr
from rave_basicsr.cli import basicsr_cli, rave_cli
from rave_basicsr.registration import plugin_module_names
from rave_basicsr.utils import plugins
from rave_basicsr.utils.options import OptionError, apply_overrides, load_option_file, load_yaml_text
from rave_basicsr.utils.distributed import init_distributed
from rave_basicsr.utils.options import check_registered_types
from tests.pipeline_helpers import subprocess_env


def test_basicsr_imports_after_plugin_on_current_torchvision():
    import basicsr  # noqa: F401
    import torchvision.transforms.functional_tensor as shim

    assert callable(shim.rgb_to_grayscale)


def test_reimport_and_submodule_first_do_not_raise():
    code = ('import rave_basicsr.registration, importlib, rave_basicsr;'
            'importlib.reload(rave_basicsr.registration); rave_basicsr.registration.import_plugin_modules();'
            'import rave_basicsr; print("ok")')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok'


#: every name the plugin registers, per BasicSR registry (the names option files use)
PLUGIN_NAMES = {
    'arch': {'BacklitUNet', 'ImageStatsEncoder', 'LogHistogramEncoder'},
    'model': {'RAVEModel', 'CLIPLITModel'},
    'loss': {'CLIPIdentityLoss', 'IlluminationSmoothnessLoss', 'PromptGuidanceLoss', 'PromptInitLoss',
             'PromptRankingLoss', 'ResidualTranslationLoss', 'ResidualVectorLoss'},
    'dataset': {'UnpairedBacklitDataset', 'LabelledBacklitDataset', 'PairedBacklitDataset'},
    'metric': {'calculate_rave_psnr', 'calculate_rave_ssim', 'calculate_rave_lpips', 'calculate_guidance_score'},
}


def plugin_registrations():
    """[(registry, registered name, object)] of every object the plugin's modules put into BasicSR's registries."""
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

    return [(registry._name, name, obj)
            for registry in (ARCH_REGISTRY, MODEL_REGISTRY, LOSS_REGISTRY, DATASET_REGISTRY, METRIC_REGISTRY)
            for name, obj in registry if obj.__module__.startswith('rave_basicsr.')]


def test_every_plugin_component_is_registered_once_under_its_own_name():
    registrations = plugin_registrations()
    assert {kind: {name for registry, name, _ in registrations if registry == kind} for kind in PLUGIN_NAMES} \
        == PLUGIN_NAMES
    assert len(registrations) == sum(len(names) for names in PLUGIN_NAMES.values())  # no other registry used
    # under its class or function name (no suffix such as BasicSR's own "_basicsr"), and never under two names
    assert all(name == obj.__name__ for _, name, obj in registrations)
    assert len({id(obj) for _, _, obj in registrations}) == len(registrations)
    assert all(obj.__module__ in plugin_module_names() for _, _, obj in registrations)
    importlib.reload(importlib.import_module('rave_basicsr'))  # a second registration pass must not raise ...
    assert plugin_registrations() == registrations  # ... nor change anything


def test_plugin_is_declared_in_the_entry_point_group():
    names = {ep.name: ep.value for ep in metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)}
    assert names.get('rave_basicsr') == 'rave_basicsr'
    assert plugins.load_plugins()['rave_basicsr'] == 'rave_basicsr'


def test_failing_plugin_entry_point_is_named(monkeypatch):
    class BrokenEntryPoint:
        name, value = 'broken_plugin', 'broken_plugin_pkg'

        def load(self):
            raise ImportError('No module named broken_plugin_pkg')

    monkeypatch.setattr(plugins, 'plugin_entry_points', lambda: [BrokenEntryPoint()])
    with pytest.raises(plugins.PluginLoadError, match="'broken_plugin'.*No module named broken_plugin_pkg"):
        plugins.load_plugins()


def test_basicsr_list_marks_the_origin(capsys):
    assert basicsr_cli.main(['list']) == 0
    out = capsys.readouterr().out
    assert 'arch (' in out and 'model (' in out and 'loss (' in out and 'dataset (' in out and 'metric (' in out
    assert 'SRModel' in out and '[basicsr]' in out
    plugin_rows = {line.split()[0] for line in out.splitlines() if line.strip().endswith('[rave_basicsr]')}
    assert plugin_rows == set().union(*PLUGIN_NAMES.values())
    assert re.search(r'^  SRModel +\[basicsr\]$', out, re.MULTILINE)


def test_help_texts(capsys):
    assert basicsr_cli.main(['--help']) == 0
    assert 'train -opt FILE' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        basicsr_cli.main(['train', '--help'])
    assert exit_info.value.code == 0
    assert '--auto_resume' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        rave_cli.main(['--help'])
    assert 'COMMAND' in capsys.readouterr().out


# ----------------------------------------------------------------------------- option files


def test_yaml_keeps_order_and_reads_float_tag():
    opt = load_yaml_text('b: 1\na: !!float 1e-4\nc: [1, 2]\n')
    assert list(opt) == ['b', 'a', 'c']
    assert opt['a'] == pytest.approx(1e-4) and isinstance(opt['a'], float)


def test_numeric_option_keys_are_read_as_text_for_basicsr_and_the_losses():
    """``margins: {3: ...}`` once crashed ``basicsr train`` in BasicSR's option logging (``dict2str``)."""
    from basicsr.utils.options import dict2str

    from rave_basicsr.losses.clip_guidance_loss import PromptRankingLoss

    opt = load_yaml_text('train:\n  ranking_opt: {type: PromptRankingLoss, margins: {3: [0.5, 0.2], 4: [0.5, 0.1]}}\n')
    margins = opt['train']['ranking_opt']['margins']
    assert list(margins) == ['3', '4']
    assert 'ranking_opt' in dict2str(opt)
    loss = PromptRankingLoss(margins=margins)
    assert loss.margins[3] == (0.5, 0.2) and loss.margins[4] == (0.5, 0.1) and loss.margins[2] == (1.0, 0.2)


@pytest.mark.parametrize('payload', [
    'x: !!python/object/apply:os.system ["echo pwned"]',
    'x: !!python/name:os.system',
    'x: !!python/object:collections.OrderedDict {}',
])
def test_python_tags_are_rejected(tmp_path, payload):
    path = tmp_path / 'evil.yml'
    path.write_text('name: a\n' + payload + '\n')
    with pytest.raises(OptionError, match=r'evil.yml, line 2: the tag .*python.* is not allowed'):
        load_option_file(str(path))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / 'broken.yml'
    path.write_text('name: a\ntrain:\n  lr: [1, 2\n  x: 3\n')
    with pytest.raises(OptionError, match=r'broken.yml, line \d+, column \d+: YAML syntax error'):
        load_option_file(str(path))


def test_missing_and_unreadable_option_files(tmp_path):
    with pytest.raises(OptionError, match=rf"option file '{re.escape(str(tmp_path / 'nope.yml'))}' does not exist"):
        load_option_file(str(tmp_path / 'nope.yml'))
    with pytest.raises(OptionError, match=rf"option file '{re.escape(str(tmp_path))}' is a directory"):
        load_option_file(str(tmp_path))
    unreadable = tmp_path / 'locked.yml'
    unreadable.write_bytes(b'\xff\xfe\x00name')
    with pytest.raises(OptionError, match='cannot be read: it is not UTF-8'):
        load_option_file(str(unreadable))


def test_force_yml_parses_values_without_eval():
    opt = {'train': {'lr': 1.0, 'milestones': [1]}, 'name': 'x', 'val': {'save_img': True}}
    apply_overrides(opt, ['train:lr=!!float 2e-4', 'train:milestones=[10, 20]', 'name=exp', 'val:save_img=false',
                          'train:new_key=~', 'name=__import__("os").system("echo pwned")'])
    assert opt['train']['lr'] == pytest.approx(2e-4)
    assert opt['train']['milestones'] == [10, 20]
    assert opt['val']['save_img'] is False and opt['train']['new_key'] is None
    assert opt['name'] == '__import__("os").system("echo pwned")'  # kept as a plain string, never evaluated
    with pytest.raises(OptionError, match="no option 'trian'.*did you mean 'train'"):
        apply_overrides(opt, ['trian:lr=1'])
    with pytest.raises(OptionError, match='key1:key2=value'):
        apply_overrides(opt, ['train:lr'])


@pytest.mark.parametrize('section, bad, registry', [
    ('model_type', 'SRModle', 'model'),
    ('network_g', 'SRVGGNetCompat', 'arch'),
    ('dataset', 'PairedImageDatset', 'dataset'),
])
def test_unknown_registered_names_list_close_matches(section, bad, registry):
    opt = {'model_type': 'SRModel', 'network_g': {'type': 'EDSR'},
           'datasets': {'train': {'type': 'PairedImageDataset'}}}
    if section == 'model_type':
        opt['model_type'] = bad
    elif section == 'network_g':
        opt['network_g']['type'] = bad
    else:
        opt['datasets']['train']['type'] = bad
    with pytest.raises(OptionError, match=rf"'{bad}' is not in BasicSR's {registry} registry; did you mean"):
        check_registered_types(opt)


def test_pytorch_launcher_without_torchrun_environment(monkeypatch):
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(OptionError, match='torchrun --nproc_per_node'):
        init_distributed('pytorch', 0)


def test_cli_reports_bad_option_file_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert basicsr_cli.main(['train', '-opt', 'missing.yml']) == 2
    assert "option file 'missing.yml' does not exist" in capsys.readouterr().err
    assert not (tmp_path / 'experiments').exists()


def test_rave_version():
    result = subprocess.run([sys.executable, '-m', 'rave_basicsr.cli.rave_cli', '--version'], capture_output=True,
                            text=True, env=subprocess_env())
    assert result.stdout.strip() == f'rave-basicsr {rave_basicsr.__version__}'
