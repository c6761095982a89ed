"""`rave residual compute | interpret | debias` end to end, and every bad input the issue lists."""
import json
import os
import subprocess
from pathlib import Path

import cv2
import pytest
import torch

from rave_basicsr.cli.rave_cli import main
from rave_basicsr.residual.encoder_spec import parse_encoder_spec
from rave_basicsr.residual.vector import ResidualVector
from tests.residual_helpers import make_sets

TINY = 'open_clip:rave-test-tiny-vit'
REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures('vocab_cache')  # the vocabulary cache never goes to ~/.cache


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    return make_sets(tmp_path_factory.mktemp('sets'), well=6, back=5)


@pytest.fixture(scope='module')
def residual_file(sets, tmp_path_factory):
    well, back = sets
    path = tmp_path_factory.mktemp('res') / 'residual.safetensors'
    assert main(['residual', 'compute', '--well-lit', str(well), '--backlit', str(back), '--encoder', TINY,
                 '-o', str(path), '--keep-embeddings', '--workers', '2', '--batch-size', '4']) == 0
    return path


def test_end_to_end(residual_file, tmp_path, capsys):
    vector = ResidualVector.load(residual_file)
    assert vector.counts == {'well_lit': 6, 'backlit': 5} and vector.embeddings['backlit'].shape == (5, 32)
    assert vector.encoder_identity['model'] == 'rave-test-tiny-vit'
    capsys.readouterr()

    plot = tmp_path / 'plot.png'
    assert main(['residual', 'interpret', str(residual_file), '--encoder', TINY, '--top', '7', '--vocab-limit',
                 '3000', '--plot', str(plot), '--json']) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary['top']) == 7 and len(summary['bottom']) == 7
    assert summary['top'][0]['score'] >= summary['top'][-1]['score'] > summary['bottom'][-1]['score']
    assert summary['threshold'] == pytest.approx(vector.threshold)
    image = cv2.imread(str(plot))
    assert image is not None and image.shape[1] > 1000   # bar chart and projection side by side

    assert main(['residual', 'interpret', str(residual_file), '--encoder', TINY, '--top', '3', '--vocab-limit',
                 '3000']) == 0
    text = capsys.readouterr().out
    assert 'most aligned with the residual' in text and repr(summary['top'][0]['text']) in text

    shifted = tmp_path / 'shifted.safetensors'
    assert main(['residual', 'debias', str(residual_file), '--encoder', TINY, '--remove-top', '15',
                 '--remove-bottom', '15', '--vocab-limit', '3000', '-o', str(shifted)]) == 0
    out = capsys.readouterr().out
    new = ResidualVector.load(shifted)
    cosine = float(vector.residual.double() @ new.residual.double())
    assert f'cosine(old, new residual) = {cosine:.6f}' in out and f'-> {new.threshold:.6f}' in out
    assert new.history[-1]['remove_top'] == 15 and len(new.history[-1]['bottom']) == 15

    cleaned = tmp_path / 'cleaned.safetensors'
    assert main(['residual', 'debias', str(shifted), '--encoder', TINY, '--remove-concept', 'indoor', 'a person',
                 '-o', str(cleaned)]) == 0
    final = ResidualVector.load(cleaned)
    assert [h['step'] for h in final.history] == ['compute', 'remove_tokens', 'remove_concepts']
    assert 0 < float(final.residual.double() @ new.residual.double()) < 1


def test_encoder_defaults_to_the_one_recorded_in_the_file(residual_file, sets, tmp_path, capsys):
    capsys.readouterr()
    assert main(['residual', 'interpret', str(residual_file), '--top', '3', '--vocab-limit', '3000', '--json']) == 0
    implicit = json.loads(capsys.readouterr().out)
    assert main(['residual', 'interpret', str(residual_file), '--encoder', TINY, '--top', '3', '--vocab-limit',
                 '3000', '--json']) == 0
    assert json.loads(capsys.readouterr().out) == implicit
    # an image-only encoder is rebuilt too (and refused for interpretation, which needs a text tower)
    well, back = sets
    stats = tmp_path / 'stats.safetensors'
    assert main(['residual', 'compute', '--well-lit', str(well), '--backlit', str(back), '--encoder',
                 'arch:ImageStatsEncoder', '-o', str(stats), '--workers', '0']) == 0
    assert main(['residual', 'interpret', str(stats)]) == 2
    assert 'rave residual interpret needs an encoder with a text tower' in capsys.readouterr().err
    # an encoder loaded from a local weights file is known by its hash only: --encoder is required
    vector = ResidualVector.load(residual_file)
    vector.encoder_identity = dict(vector.encoder_identity, weights_sha256='0' * 64)
    local = tmp_path / 'local.safetensors'
    vector.save(str(local))
    assert main(['residual', 'interpret', str(local)]) == 2
    assert 'pass the same encoder with --encoder' in capsys.readouterr().err


def test_console_script(sets, tmp_path, python_executable):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')])))
    well, back = sets
    run = subprocess.run([python_executable, '-m', 'rave_basicsr.cli.rave_cli', 'residual', 'compute',
                          '--well-lit', str(well), '--backlit', str(back), '--encoder', 'arch:ImageStatsEncoder',
                          '-o', str(tmp_path / 'stats.safetensors'), '--workers', '0'],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert '(0 and 0 unreadable ones skipped)' in run.stdout
    assert ResidualVector.load(tmp_path / 'stats.safetensors').dim == 31


def test_existing_output_refused_without_overwrite(residual_file, sets, tmp_path, capsys):
    well, back = sets
    target = tmp_path / 'exists.safetensors'
    target.write_bytes(b'precious')
    argv = ['residual', 'compute', '--well-lit', str(well), '--backlit', str(back), '--encoder', TINY, '-o',
            str(target), '--workers', '0']
    assert main(argv) == 2
    assert 'already exists' in capsys.readouterr().err and target.read_bytes() == b'precious'
    assert main(argv + ['--overwrite']) == 0
    assert ResidualVector.load(target).counts == {'well_lit': 6, 'backlit': 5}
    # debias and the interpret plot refuse too
    assert main(['residual', 'debias', str(residual_file), '--encoder', TINY, '--remove-concept', 'sky', '-o',
                 str(target)]) == 2
    plot = tmp_path / 'plot.png'
    plot.write_bytes(b'mine')
    assert main(['residual', 'interpret', str(residual_file), '--encoder', TINY, '--vocab-limit', '500',
                 '--plot', str(plot)]) == 2
    assert plot.read_bytes() == b'mine' and '--overwrite' in capsys.readouterr().err


def test_empty_and_image_less_folders(sets, tmp_path, capsys):
    well, _ = sets
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'readme.txt').write_text('not an image')
    for folder, message in (('empty', 'folder is empty'), ('docs', 'no image files')):
        assert main(['residual', 'compute', '--well-lit', str(well), '--backlit', str(tmp_path / folder),
                     '--encoder', TINY, '-o', str(tmp_path / 'r.safetensors')]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / 'r.safetensors').exists()


def test_encoder_spec_that_does_not_exist(sets, tmp_path, capsys):
    well, back = sets
    base = ['residual', 'compute', '--well-lit', str(well), '--backlit', str(back), '-o', str(tmp_path / 'r.st')]
    assert main(base + ['--encoder', 'open_clip:rave-test-tiny-vitt']) == 2
    assert "Close matches: ['rave-test-tiny-vit'" in capsys.readouterr().err  # (the spec itself contains it)
    assert main(base + ['--encoder', 'openclip:ViT-B-32']) == 2
    assert "did you mean 'open_clip'" in capsys.readouterr().err
    assert main(base + ['--encoder', 'arch:ImageStatEncoder']) == 2
    assert "Close matches: ['ImageStatsEncoder', 'LogHistogramEncoder']" in capsys.readouterr().err
    assert main(base + ['--encoder', str(tmp_path / 'missing.yml')]) == 2
    assert f'--encoder {tmp_path / "missing.yml"}: option file not found' in capsys.readouterr().err
    assert main(base + ['--encoder', 'timm:resnet1888']) == 2
    assert "unknown timm model 'resnet1888'. Close matches: ['resnet18'" in capsys.readouterr().err


def test_encoder_spec_forms(tmp_path):
    assert parse_encoder_spec('open_clip:ViT-B-32') == {'type': 'open_clip', 'model': 'ViT-B-32',
                                                        'pretrained': 'openai'}
    assert parse_encoder_spec('open_clip:rave-test-tiny-vit')['pretrained'] is None
    assert parse_encoder_spec('open_clip:ViT-B-32:random')['pretrained'] is None
    assert parse_encoder_spec('open_clip:ViT-B-32:/w/x.bin')['pretrained'] == '/w/x.bin'
    assert parse_encoder_spec('timm:resnet18') == {'type': 'timm', 'model': 'resnet18', 'pretrained': None}
    assert parse_encoder_spec('arch:ImageStatsEncoder') == {'type': 'arch', 'network': {'type': 'ImageStatsEncoder'}}
    block = tmp_path / 'enc.yml'
    block.write_text('type: arch\nnetwork: {type: ImageStatsEncoder, grid_size: 2}\n')
    assert parse_encoder_spec(str(block))['network'] == {'type': 'ImageStatsEncoder', 'grid_size': 2}
    as_json = tmp_path / 'enc.json'
    as_json.write_text(json.dumps({'type': 'open_clip', 'model': 'rave-test-tiny-vit', 'pretrained': None}))
    assert parse_encoder_spec(str(as_json))['model'] == 'rave-test-tiny-vit'


def test_interpret_residual_from_another_encoder(residual_file, tmp_path, capsys):
    other = tmp_path / 'other.yml'
    other.write_text('type: open_clip\nmodel: rave-test-tiny-vit\npretrained: ~\nseed: 7\n')
    assert main(['residual', 'interpret', str(residual_file), '--encoder', str(other), '--vocab-limit', '100']) == 2
    err = capsys.readouterr().err
    assert 'computed with another encoder' in err and 'init_seed' in err
    assert main(['residual', 'interpret', str(residual_file), '--encoder', 'arch:ImageStatsEncoder']) == 2
    assert '32-dimensional' in capsys.readouterr().err


def test_image_only_encoder_cannot_interpret(sets, tmp_path, capsys):
    well, back = sets
    path = tmp_path / 'stats.safetensors'
    assert main(['residual', 'compute', '--well-lit', str(well), '--backlit', str(back), '--encoder',
                 'arch:ImageStatsEncoder', '-o', str(path), '--workers', '0']) == 0
    assert main(['residual', 'interpret', str(path), '--encoder', 'arch:ImageStatsEncoder']) == 2
    assert 'text tower' in capsys.readouterr().err
    assert main(['residual', 'debias', str(path), '--encoder', 'arch:ImageStatsEncoder', '--remove-concept', 'x',
                 '-o', str(tmp_path / 'd.safetensors')]) == 2
    assert 'text tower' in capsys.readouterr().err


def test_k_larger_than_vocabulary(residual_file, tmp_path, capsys):
    out = str(tmp_path / 'd.safetensors')
    assert main(['residual', 'debias', str(residual_file), '--encoder', TINY, '--remove-top', '300',
                 '--remove-bottom', '1', '--vocab-limit', '200', '-o', out]) == 2
    assert 'larger than the vocabulary' in capsys.readouterr().err
    words = tmp_path / 'words.txt'
    words.write_text('bright\ndark\nsky\n')
    assert main(['residual', 'debias', str(residual_file), '--encoder', TINY, '--remove-top', '2',
                 '--remove-bottom', '4', '--vocab', str(words), '-o', out]) == 2
    assert '--remove-bottom 4 is larger than the vocabulary (3' in capsys.readouterr().err
    assert main(['residual', 'interpret', str(residual_file), '--encoder', TINY, '--top', '5', '--vocab',
                 str(words)]) == 2
    assert 'larger than the vocabulary' in capsys.readouterr().err
    assert not os.path.exists(out)


def test_debias_option_combinations(residual_file, tmp_path, capsys):
    out = str(tmp_path / 'd.safetensors')
    for extra in ([], ['--remove-top', '3', '--remove-concept', 'sky']):
        assert main(['residual', 'debias', str(residual_file), '--encoder', TINY, '-o', out] + extra) == 2
        assert 'either --remove-top' in capsys.readouterr().err
    assert main(['residual', 'debias', str(residual_file), '--encoder', TINY, '--remove-top', '0', '-o', out]) == 2
    assert 'nothing to remove' in capsys.readouterr().err
    # one side only: the other side is 0
    assert main(['residual', 'debias', str(residual_file), '--encoder', TINY, '--remove-top', '4', '--vocab-limit',
                 '500', '-o', out]) == 0
    step = ResidualVector.load(out).history[-1]
    assert len(step['top']) == 4 and step['bottom'] == []
    assert torch.isfinite(ResidualVector.load(out).residual).all()
