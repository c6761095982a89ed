"""Validation and test sets: backlit inputs, optionally with ground truth matched by file name (BAID-style).

Inputs and ground truths are matched by file name without extension, so ``BAID/test/resize_input/x.jpg`` pairs
with ``BAID/test/resize_gt/x.png``; folders and LMDBs can be mixed. Without ground truth the set serves
no-reference validation (NIQE and the like) and testing on unpaired photos such as Backlit300.
"""
from torch.utils import data as data

from basicsr.utils.registry import DATASET_REGISTRY

from rave_basicsr.data.image_source import ImageSource
from rave_basicsr.data.transforms import to_tensor
from rave_basicsr.utils.errors import RaveError


def match_by_stem(lq: ImageSource, gt: ImageSource) -> list:
    """Index pairs (lq, gt) matched by stem; raises :class:`RaveError` listing every image without counterpart."""
    gt_by_stem = {}
    for i in range(len(gt)):
        if gt.stem(i) in gt_by_stem:
            raise RaveError(f'{gt.dataroot}: "{gt.name(gt_by_stem[gt.stem(i)])}" and "{gt.name(i)}" have the same '
                            'name without extension, so inputs cannot be matched to them; rename one.')
        gt_by_stem[gt.stem(i)] = i
    lq_stems = {lq.stem(i) for i in range(len(lq))}
    if len(lq_stems) != len(lq):
        raise RaveError(f'{lq.dataroot}: several inputs have the same name without extension; rename them.')
    no_gt = [lq.name(i) for i in range(len(lq)) if lq.stem(i) not in gt_by_stem]
    no_lq = [gt.name(i) for i in range(len(gt)) if gt.stem(i) not in lq_stems]
    if no_gt or no_lq:
        lines = []
        if no_gt:
            lines.append(f'inputs in {lq.dataroot} without ground truth in {gt.dataroot}: {_listing(no_gt)}')
        if no_lq:
            lines.append(f'ground truths in {gt.dataroot} without input in {lq.dataroot}: {_listing(no_lq)}')
        raise RaveError('the paired set has missing counterparts (matched by file name without extension):\n  ' +
                        '\n  '.join(lines) + '\nAdd or remove the files so that both sides match.')
    return [(i, gt_by_stem[lq.stem(i)]) for i in range(len(lq))]


def _listing(names: list, limit: int = 50) -> str:
    return ', '.join(names[:limit]) + (f' ... ({len(names) - limit} more)' if len(names) > limit else '')


@DATASET_REGISTRY.register()
class PairedBacklitDataset(data.Dataset):
    """Backlit inputs (``dataroot_lq``) and, optionally, their ground truths (``dataroot_gt``), unaugmented.

    Options: ``dataroot_lq`` (required), ``dataroot_gt`` (optional), ``io_backend``, ``recursive``,
    ``check_images``, ``scale`` (must be 1: enhancement keeps the size). Returns ``{'lq', 'lq_path'}`` and, with
    ground truth, ``{'gt', 'gt_path'}``, images as 3×H×W float32 RGB in [0, 1].
    """

    def __init__(self, opt: dict):
        super().__init__()
        self.opt = opt
        if not opt.get('dataroot_lq'):
            raise RaveError('option dataroot_lq is required: the folder or LMDB of backlit input images.')
        if opt.get('scale', 1) != 1:
            raise RaveError(f'option scale: enhancement keeps the image size, so scale must be 1 '
                            f'(got {opt.get("scale")!r}).')
        io_backend = opt.get('io_backend')
        recursive = bool(opt.get('recursive', False))
        self.lq = ImageSource(opt['dataroot_lq'], io_backend, recursive=recursive)
        self.gt = ImageSource(opt['dataroot_gt'], io_backend, recursive=recursive) if opt.get('dataroot_gt') \
            else None
        self.pairs = match_by_stem(self.lq, self.gt) if self.gt is not None else \
            [(i, None) for i in range(len(self.lq))]
        if opt.get('check_images', False):
            for source in (self.lq, self.gt):
                if source is not None:
                    source.check_all()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        lq_index, gt_index = self.pairs[index]
        lq = self.lq.read(lq_index).rgb
        item = {'lq': to_tensor(lq), 'lq_path': self.lq.path(lq_index)}
        if gt_index is not None:
            gt = self.gt.read(gt_index).rgb
            if gt.shape[:2] != lq.shape[:2]:
                raise RaveError(f'{self.gt.path(gt_index)} is {gt.shape[1]}×{gt.shape[0]} but its input '
                                f'{self.lq.path(lq_index)} is {lq.shape[1]}×{lq.shape[0]}; ground truth and input '
                                'must have the same size (use matching resize_input / resize_gt folders).')
            item.update(gt=to_tensor(gt), gt_path=self.gt.path(gt_index))
        return item
