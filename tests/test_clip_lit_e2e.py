"""`basicsr train` with CLIPLITModel from YAML on the CPU: both guidance types through every stage and two rounds,
a run interrupted in the middle of a prompt-refinement stage that resumes to identical weights, the shipped
CLIP-LIT-Latent demo enhancing the demo set and the CLIP-LIT demo's prompts separating its two sets."""
import re
from pathlib import Path

import pytest
import torch

from rave_basicsr.utils.options import load_option_file
from tests.clip_lit_helpers import clip_lit_options, well_lit_probabilities
from tests.pipeline_helpers import (read_log, run_basicsr, run_two_process_torchrun, subprocess_env,
                                    train_interrupted_and_reference, train_shipped_demo, write_demo_data,
                                    write_options)
from tests.rave_helpers import demo_data

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    # 4 backlit training images, batch 2: 2 iterations per epoch
    return demo_data(tmp_path_factory.mktemp('demo'), size=48, n_train=4, n_welllit=4, n_val=2)


@pytest.mark.parametrize('guidance', ['latent', 'prompt'])
def test_every_stage_and_two_rounds_from_yaml(data, tmp_path, guidance):
    # prompt_init 2, warmup 2, then rounds of network 2 + prompt 2: two rounds end at iteration 12
    options = clip_lit_options('e2e_' + guidance, data, guidance=guidance, total_iter=12, stages=(2, 2, 2, 2),
                               save_freq=12)
    options['val']['metrics'] = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
                                 'guidance': {'type': 'calculate_guidance_score'}}
    result = run_basicsr(['train', '-opt', str(write_options(tmp_path / 'clip_lit.yml', options))], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = tmp_path / 'experiments' / options['name']
    for name in ('models/net_g_12.pth', 'models/guidance_12.pth', 'training_states/12.state'):
        assert (experiment / name).is_file(), name
    log = read_log(experiment)
    ends = re.findall(r'Iteration (\d+): stage "(\w+)" ended', log)
    assert ends == [('2', 'prompt_init'), ('4', 'warmup'), ('6', 'network'), ('8', 'prompt'), ('10', 'network'),
                    ('12', 'prompt')]
    assert 'ranks backlit, well-lit and the results of round 2 and 1' in log
    assert re.search(r'# guidance: [01]\.\d+', log) and re.search(r'# psnr: \d+\.\d+', log)
    state = torch.load(experiment / 'training_states' / '12.state', weights_only=True)['backlit']
    assert state['guidance']['type'] == guidance and sorted(state['guidance']['bank']) == ['0', '1']
    assert (state['stages']['round'], state['stages']['iter_in_stage']) == (2, 0)  # round 3 starts next


def final(root: Path, name: str, label: str) -> dict:
    models = root / 'experiments' / name / 'models'
    return {'net': torch.load(models / f'net_g_{label}.pth', weights_only=True)['params'],
            'pair': torch.load(models / f'guidance_{label}.pth', weights_only=True)['pair']}


def test_resume_in_the_middle_of_prompt_refinement_is_exact(data, tmp_path):
    # prompt_init 2, warmup 2, round 1: network 5-6, prompt 7-10; round 2: network 11-12, prompt 13-16.
    # Interrupted at 14 (an epoch end), in round 2's prompt stage with the results of rounds 1 and 2 in the bank.
    options = clip_lit_options('resume', data, total_iter=16, stages=(2, 2, 2, 4), save_freq=14)
    options['val']['val_freq'] = 1000
    options['train']['optim_g']['lr'] = 1e-4
    options['train']['optim_guidance']['lr'] = 1e-2
    opt = write_options(tmp_path / 'resume.yml', options)
    reference_dir, resumed_dir = train_interrupted_and_reference(opt, tmp_path, stop_at=14)
    log = read_log(resumed_dir / 'experiments' / 'resume')
    assert re.search(r'Resumed in stage "prompt", round 2: iteration 2/4', log)
    state = torch.load(resumed_dir / 'experiments' / 'resume' / 'training_states' / '14.state',
                       weights_only=True)['backlit']
    assert sorted(state['guidance']['bank']) == ['0', '1']
    interrupted = final(resumed_dir, 'resume', '14')
    reference, resumed = final(reference_dir, 'resume', 'latest'), final(resumed_dir, 'resume', 'latest')
    assert not torch.equal(interrupted['pair'], reference['pair'])  # the pair moved after the interruption
    torch.testing.assert_close(resumed['pair'], reference['pair'], rtol=0, atol=0)
    for key in reference['net']:
        torch.testing.assert_close(resumed['net'][key], reference['net'][key], rtol=0, atol=0)


def test_two_process_cpu_torchrun_keeps_ranks_identical(data, tmp_path):
    """Both ranks end every stage of a round with the same network, the same learned pair (DDP for the network,
    averaged gradients for the pair) and the same feature bank (recorded at "best" events that every rank decides
    from the all-rank mean loss: the logged losses are reduced to rank 0 only). The pair starts at the set means and
    the guidance stops at the well-lit images' probability, both computed on rank 0 and broadcast."""
    options = clip_lit_options('ddp_clip_lit', data, total_iter=11, stages=(1, 1, 8, 1), save_freq=11, batch=1)
    options['latent_init'] = 'set_means'
    options['train']['guidance_opt'] = {'type': 'PromptGuidanceLoss', 'loss_weight': 320.0, 'logit_scale': 20.0,
                                        'stop_at': 'well_lit'}
    options['val']['val_freq'] = 1000
    rank0, rank1 = run_two_process_torchrun(write_options(tmp_path / 'ddp.yml', options), tmp_path,
                                            subprocess_env())
    torch.testing.assert_close(rank0['pair'], rank1['pair'], rtol=0, atol=0)
    assert list(rank0['bank']) == list(rank1['bank']) == [0]
    torch.testing.assert_close(rank0['bank'][0], rank1['bank'][0], rtol=0, atol=0)
    saved = final(tmp_path, options['name'], '11')
    torch.testing.assert_close(rank0['pair'], saved['pair'], rtol=0, atol=0)
    for key in saved['net']:
        torch.testing.assert_close(rank0['net'][key], rank1['net'][key], rtol=0, atol=0)
        torch.testing.assert_close(rank0['net'][key], saved['net'][key], rtol=0, atol=0)
    log = read_log(tmp_path / 'experiments' / options['name'])
    assert 'world_size: 2' in log and re.search(r'Iteration 11: stage "prompt" ended', log)
    assert re.search(r'Round 1: the guidance stops at a well-lit probability of 0\.\d{4}', log)


@pytest.mark.demo_training
def test_offline_latent_demo_enhances_the_demo_set(tmp_path):
    """The CLIP-LIT-Latent demo option file as shipped, on `rave demo-data --backlight hazy` (the set it is measured
    on; on an earlier form of the RAVE demo's set it gained only 0.57 dB, docs/clip_lit.md): mean PSNR gain against
    the ground truth >= 2 dB with at least 5 of 6 images improved (the robustness benchmark's criteria). The first
    shipped recipe (the originals' random start and 150-iteration initialisation) took the same images from 8.82 to
    6.67 dB."""
    psnr = train_shipped_demo('train_clip_lit_latent_demo.yml', 'CLIP_LIT_Latent_demo', tmp_path, 'hazy')
    before, after = psnr['before'], psnr['after']
    assert len(before) == 6
    assert after.mean() - before.mean() >= 2.0, (before, after)
    assert (after > before).sum() >= 5, (before, after)


@pytest.mark.demo_training
def test_offline_clip_lit_demo_prompts_separate_backlit_from_well_lit(tmp_path):
    """The CLIP-LIT demo's prompt initialisation as shipped (through the tiny random CLIP, on `rave demo-data
    --backlight hazy`, the set it is measured on): the learned pair scores the validation ground truths as well-lit
    and the backlit inputs as backlit (measured at seed 0: 0.74 against 0.04; on the RAVE demo's set 0.54 against
    0.16). This is what a random text tower can show; the outputs stay at the input (docs/clip_lit.md)."""
    val = write_demo_data(tmp_path, 'hazy')
    option_file = REPO / 'options' / 'demo' / 'train_clip_lit_demo.yml'
    options = load_option_file(str(option_file))
    init = options['train']['prompt_init']['iters']
    result = run_basicsr(['train', '-opt', str(option_file), '--force_yml', 'logger:use_tb_logger=false',
                          f'train:total_iter={init}'], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'Iteration {init}: stage "prompt_init" ended' in read_log(tmp_path / 'experiments' / options['name'])
    scores = well_lit_probabilities(options, tmp_path / 'experiments' / options['name'],
                                    {'input': val / 'val_backlit', 'gt': val / 'val_gt'})
    assert scores['input'] <= 0.2 and scores['gt'] - scores['input'] >= 0.5, scores
