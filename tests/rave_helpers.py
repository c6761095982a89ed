"""Demo data and RAVE option dicts for the model and end-to-end tests (tiny encoders, small images, CPU)."""
import copy
from pathlib import Path

from rave_basicsr.data.demo_data import make_demo_data

TINY_IDENTITY = {'type': 'open_clip', 'model': 'rave-test-tiny-rn', 'pretrained': None, 'precision': 'fp32',
                 'preprocess': {'size': 64, 'resize': 'squash', 'interpolation': 'bilinear', 'antialias': False}}
STATS_GUIDANCE = {'type': 'arch', 'network': {'type': 'ImageStatsEncoder'}}


def demo_data(root: Path, size: int = 64, n_train: int = 8, n_welllit: int = 8, n_val: int = 2,
              backlight: str = 'demo') -> dict:
    return make_demo_data(str(root), seed=0, size=size, n_train=n_train, n_welllit=n_welllit, n_val=n_val,
                          backlight=backlight)


def rave_options(name: str, data: dict, total_iter: int = 4, warmup_iters: int = 2, save_freq: int = 2,
                 batch: int = 2, crop: int = 32, metrics: dict = None) -> dict:
    """A RAVE run on demo data: ImageStatsEncoder guidance, tiny random RN identity encoder, no augmentation."""
    out = Path(data['outdir'])
    if metrics is None:
        metrics = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
                   'rave_psnr': {'type': 'calculate_rave_psnr'},
                   'guidance': {'type': 'calculate_guidance_score'}}
    return {
        # seed 0 draws a live network (cond_add1's bias > 0); about half of all seeds draw one with L = 0 everywhere,
        # which has no gradient until the warm-up guard re-creates it, and would make these short runs data-blind
        'name': name, 'model_type': 'RAVEModel', 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': {'name': 'demo_train', 'type': 'UnpairedBacklitDataset', 'dataroot_backlit':
                      str(out / 'train_backlit'), 'io_backend': {'type': 'disk'}, 'resize': None,
                      'crop_size': crop, 'augment': 'none', 'num_worker_per_gpu': 0, 'batch_size_per_gpu': batch,
                      'dataset_enlarge_ratio': 1, 'use_shuffle': True},
            'val': {'name': 'demo_val', 'type': 'PairedBacklitDataset', 'dataroot_lq': str(out / 'val_backlit'),
                    'dataroot_gt': str(out / 'val_gt'), 'io_backend': {'type': 'disk'}},
        },
        'network_g': {'type': 'BacklitUNet'},
        'guidance_encoder': copy.deepcopy(STATS_GUIDANCE),
        'identity_encoder': copy.deepcopy(TINY_IDENTITY),
        'residual': {'well_lit': str(out / 'train_welllit'), 'batch_size': 4},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 2e-5, 'weight_decay': 1e-3},
                  'total_iter': total_iter, 'warmup_iter': -1, 'warmup': {'iters': warmup_iters},
                  'guided': {'block_iters': 2100, 'extend_by': 60, 'extend_threshold': 90.0}},
        'val': {'val_freq': save_freq, 'save_img': True, 'metrics': metrics},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': save_freq, 'use_tb_logger': False},
        'dist_params': {'backend': 'gloo', 'port': 29500},
    }


def model_options(options: dict, root: Path, is_train: bool = True) -> dict:
    """Options as parse_options would leave them, for building the model in-process."""
    opt = copy.deepcopy(options)
    experiments = root / 'experiments' / opt['name']
    opt.update(dist=False, rank=0, world_size=1, is_train=is_train, auto_resume=False)
    opt['path'].update(experiments_root=str(experiments), models=str(experiments / 'models'),
                       training_states=str(experiments / 'training_states'), log=str(experiments),
                       visualization=str(experiments / 'visualization'))
    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase.split('_')[0]
    return opt
