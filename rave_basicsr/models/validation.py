"""Validation of the staged models: metrics (paired, RAVE protocol, no-reference, guidance score), saved images
and tensorboard grids of input / output / illumination map. Mixed into
:class:`~rave_basicsr.models.backlit_base_model.BacklitBaseModel`; runs on rank 0, as BasicSR's ``SRModel``.
"""
import inspect
from collections import OrderedDict
from os import path as osp
from typing import Dict, Optional

import numpy as np
import torch
from basicsr.metrics import calculate_metric
from basicsr.utils import tensor2img
from basicsr.utils.registry import METRIC_REGISTRY
from torchvision.utils import make_grid

from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.image_io import encode_image, write_image_atomic

#: metrics computed by the model itself from the output tensor (not from uint8 images)
MODEL_METRICS = ('calculate_guidance_score',)


def metric_needs_reference(metric_type: str) -> bool:
    """True for full-reference metrics (their function takes ``img2``, the ground truth)."""
    if metric_type in MODEL_METRICS:
        return False
    return 'img2' in inspect.signature(METRIC_REGISTRY.get(metric_type)).parameters


class ValidationMixin:
    """``validation`` for BasicSR's loop and ``basicsr test``; needs ``feed_data``, ``test`` and
    ``guidance_direction`` from the model."""

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """As BasicSR's SRModel: validation runs on rank 0 only."""
        if self.opt['rank'] == 0:
            self.nondist_validation(dataloader, current_iter, tb_logger, save_img)

    def _once(self, key: str, message: str) -> None:
        if key not in self._messages_shown:
            self._messages_shown.add(key)
            self.logger.warning(message)

    def usable_metrics(self, dataset_opt: dict) -> Dict[str, dict]:
        """The configured metrics that run on this set: ``val:metrics``, or the names listed in the dataset's
        ``metrics`` option; unavailable optional ones (LPIPS) are skipped with one message."""
        from rave_basicsr.metrics.rave_protocol_metric import lpips_unavailable_reason

        configured = self.opt['val'].get('metrics') or {}
        selected = dataset_opt.get('metrics')
        if selected is not None:
            unknown = [name for name in selected if name not in configured]
            if unknown:
                raise RaveError(f'datasets:{dataset_opt.get("name")}:metrics names {unknown}, which val:metrics '
                                f'does not define (defined: {list(configured)}).')
            configured = OrderedDict((name, configured[name]) for name in selected)
        usable = OrderedDict()
        for name, metric_opt in configured.items():
            kind = metric_opt.get('type')
            if kind == 'calculate_rave_lpips':
                reason = lpips_unavailable_reason(metric_opt.get('net', 'alex'))
                if reason:
                    self._once(f'lpips:{name}', f'metric "{name}" (LPIPS) skipped: {reason}')
                    continue
            if kind == 'calculate_guidance_score' and self.guidance_direction() is None:
                self._once(f'guidance:{name}', f'metric "{name}" skipped: {type(self).__name__} has no guidance '
                                               'direction (a residual vector) yet.')
                continue
            usable[name] = metric_opt
        return usable

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """Validate without touching the training RNG (a resumed run skips this validation)."""
        with torch.random.fork_rng(devices=[]):
            self._validate(dataloader, current_iter, tb_logger, save_img)

    def _validate(self, dataloader, current_iter, tb_logger, save_img) -> None:
        dataset_name = dataloader.dataset.opt['name']
        val_opt = self.opt['val']
        metrics = self.usable_metrics(dataloader.dataset.opt)
        sums = {name: 0.0 for name in metrics}
        counts = {name: 0 for name in metrics}
        tb_images = int(val_opt.get('tb_images', 1))
        for idx, val_data in enumerate(dataloader):
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            self.feed_data(val_data)
            needs_gt = [name for name, m in metrics.items() if metric_needs_reference(m['type'])]
            if needs_gt and 'gt' not in val_data:
                raise RaveError(f'validation set "{dataset_name}": metrics {needs_gt} need ground truth, but '
                                f'"{img_name}" has none. Set datasets:<val>:dataroot_gt to the ground-truth folder, '
                                'or use no-reference metrics (calculate_niqe, calculate_guidance_score).')
            self.test()
            result_img = tensor2img([self.output.detach().cpu()])
            gt_img = tensor2img([self.gt.detach().cpu()]) if hasattr(self, 'gt') else None
            for name, metric_opt in metrics.items():
                value = self.compute_metric(name, metric_opt, result_img, gt_img, img_name)
                if value is not None:
                    sums[name] += value
                    counts[name] += 1
            if save_img:
                self.save_visual(dataset_name, img_name, current_iter)
            if tb_logger is not None and idx < tb_images:
                self.log_grid(tb_logger, dataset_name, img_name, current_iter)
        for attr in ('lq', 'gt', 'output', 'illumination'):
            if hasattr(self, attr):
                delattr(self, attr)
        results = {name: sums[name] / counts[name] for name in metrics if counts[name]}
        self.log_validation(dataset_name, current_iter, results, tb_logger)

    def compute_metric(self, name: str, metric_opt: dict, result_img: np.ndarray, gt_img: Optional[np.ndarray],
                       img_name: str) -> Optional[float]:
        options = {k: v for k, v in metric_opt.items() if k != 'better'}
        kind = options['type']
        if kind == 'calculate_guidance_score':
            return float(METRIC_REGISTRY.get(kind)(self.output, self.encoder('guidance_encoder'),
                                                   self.guidance_direction()))
        if kind == 'calculate_niqe' and min(result_img.shape[:2]) < 96:
            self._once(f'niqe:{img_name}', f'metric "{name}" (NIQE) skipped for "{img_name}": it needs images of '
                                           f'at least 96 px, this one is {result_img.shape[1]}x{result_img.shape[0]}.')
            return None
        data = {'img': result_img}
        if metric_needs_reference(kind):
            data['img2'] = gt_img
        return float(calculate_metric(data, options))

    def save_visual(self, dataset_name: str, img_name: str, current_iter: int) -> None:
        if self.opt['is_train']:
            path = osp.join(self.opt['path']['visualization'], img_name, f'{img_name}_{current_iter}.png')
        else:
            suffix = self.opt['val'].get('suffix')
            stem = f'{img_name}_{suffix}' if suffix else f'{img_name}_{self.opt["name"]}'
            path = osp.join(self.opt['path']['visualization'], dataset_name, f'{stem}.png')
        rgb = self.output[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        write_image_atomic(path, encode_image(rgb, '.png'))

    def log_grid(self, tb_logger, dataset_name: str, img_name: str, current_iter: int) -> None:
        """Input / output / illumination map (scaled to its max) side by side in tensorboard."""
        tiles = [self.lq[0].float().cpu().clamp(0, 1), self.output[0].cpu()]
        if self.illumination is not None:
            light = self.illumination[0].cpu()
            tiles.append((light / light.max().clamp_min(1e-8)).expand(3, -1, -1))
        tb_logger.add_image(f'val_{dataset_name}/{img_name}', make_grid(tiles, nrow=len(tiles), padding=2),
                            current_iter)

    def log_validation(self, dataset_name: str, current_iter: int, results: dict, tb_logger) -> None:
        self.validation_results = dict(results)
        message = f'Validation {dataset_name}\n'
        for name, value in results.items():
            message += f'\t # {name}: {value:.4f}\n'
        self.logger.info(message)
        if tb_logger is not None:
            for name, value in results.items():
                tb_logger.add_scalar(f'metrics/{dataset_name}/{name}', value, current_iter)
