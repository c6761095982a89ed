"""Training sets of backlit images (RAVE, CLIP-LIT network stages) and of labelled backlit / well-lit images
(CLIP-LIT prompt stages), from folders or LMDBs, with the official resize and augmentation (CLIP-LIT code,
``dataloader_images.py``, ``dataloader_prompt_add.py``, ``dataloader_prompt_margin.py``).

Labels are explicit (0 backlit, 1 well-lit: the set an image was listed from), never guessed from paths as
CLIP-LIT does. The smaller of the two sets is repeated to the length of the larger, as the originals balance them.
"""
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils import data as data

from basicsr.utils.registry import DATASET_REGISTRY

from rave_basicsr.data.image_source import ImageSource
from rave_basicsr.data.transforms import (NETWORK_ZOOM_RANGE, PROMPT_ZOOM_RANGE, SMALL_IMAGE_POLICIES,
                                          augment_images, check_augment_mode, check_positive_range, prepare_size,
                                          to_tensor, vary_exposure)
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.image_io import DecodedImage

BACKLIT_LABEL = 0
WELLLIT_LABEL = 1


def balanced_indices(length: int, target: int) -> List[int]:
    """Indices 0..length-1 repeated in order until there are ``target`` of them (the originals' balancing)."""
    return [i % length for i in range(target)]


def _positive_int(opt: dict, key: str) -> Optional[int]:
    value = opt.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RaveError(f'option {key}: expected a positive integer or ~, got {value!r}.')
    return value


def default_decode_threads() -> int:
    """Threads that decode a prompt batch by default: 8, or fewer when this process may use fewer cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return min(8, cores)


class _BacklitTrainingSet(data.Dataset):
    """Option handling, image sources and per-image preparation shared by the training sets."""

    default_resize = 512
    default_zoom_range = NETWORK_ZOOM_RANGE

    def __init__(self, opt: dict):
        super().__init__()
        self.opt = opt
        if not opt.get('dataroot_backlit'):
            raise RaveError('option dataroot_backlit is required: the folder or LMDB of backlit training images.')
        io_backend = opt.get('io_backend')
        recursive = bool(opt.get('recursive', False))
        self.backlit = ImageSource(opt['dataroot_backlit'], io_backend, recursive=recursive)
        self.welllit = ImageSource(opt['dataroot_welllit'], io_backend, recursive=recursive) \
            if opt.get('dataroot_welllit') else None

        self.crop_size = _positive_int(opt, 'crop_size')
        if self.crop_size and opt.get('resize') is not None:
            raise RaveError('options resize and crop_size are exclusive: squash-resize every image (resize) or '
                            'take random crops (crop_size); set the other to ~.')
        self.resize = None if self.crop_size else (_positive_int(opt, 'resize') if 'resize' in opt
                                                   else self.default_resize)
        self.small_image_policy = opt.get('small_image_policy', 'upscale')
        if self.small_image_policy not in SMALL_IMAGE_POLICIES:
            raise RaveError(f'option small_image_policy: "{self.small_image_policy}" is not one of '
                            f'{", ".join(SMALL_IMAGE_POLICIES)}.')
        self.augment = opt.get('augment', 'official')
        check_augment_mode(self.augment)
        self.zoom_range = check_positive_range(opt.get('zoom_range', self.default_zoom_range), 'zoom_range')
        self.exposure_range: Optional[Tuple[float, float]] = None  # set by the sets that offer it

        if opt.get('check_images', False):
            for source in (self.backlit, self.welllit):
                if source is not None:
                    source.check_all()

    def _load(self, source: ImageSource, index: int, decoded: Optional[DecodedImage] = None):
        """Decoded RGB (alpha dropped) brought to the training size; ``decoded``: the image, already decoded."""
        rgb = (source.read(index) if decoded is None else decoded).rgb
        return prepare_size(rgb, self.resize, self.crop_size, self.small_image_policy, source.path(index))

    def _labelled_items(self) -> List[Tuple[ImageSource, int, int]]:
        """Backlit and well-lit images, each set repeated to the larger one's length, with their labels."""
        target = max(len(self.backlit), len(self.welllit))
        return ([(self.backlit, i, BACKLIT_LABEL) for i in balanced_indices(len(self.backlit), target)] +
                [(self.welllit, i, WELLLIT_LABEL) for i in balanced_indices(len(self.welllit), target)])

    def _single_item(self, source: ImageSource, index: int, sized: Optional[np.ndarray] = None) -> dict:
        """The item of one image; ``sized``: the image already brought to the training size (:meth:`_load`)."""
        img = self._load(source, index) if sized is None else sized
        img = augment_images([img], self.augment, self.zoom_range)[0]
        if self.exposure_range is not None:
            img = vary_exposure(img, self.exposure_range)
        return {'lq': to_tensor(img), 'lq_path': source.path(index)}


@DATASET_REGISTRY.register()
class UnpairedBacklitDataset(_BacklitTrainingSet):
    """Backlit training images for the enhancement network (the originals' ``lowlight_loader``).

    Options: ``dataroot_backlit`` (required); ``resize`` (512, squash as the originals) or ``crop_size`` (random
    crop; ``small_image_policy: upscale | error`` for smaller images); ``augment: official | none``;
    ``zoom_range`` ([0.7, 1.3]); ``exposure_range`` (``~``: none; ``[low, high]``: each image multiplied by a gain
    drawn from it and clipped, :func:`vary_exposure`, not in the originals); ``io_backend``; ``recursive``;
    ``check_images``. With ``dataroot_welllit`` and ``return_welllit: true`` it serves balanced, labelled backlit +
    well-lit images instead (without ``exposure_range``: a gain would move images across the labels).

    Returns ``{'lq': 3×H×W float32 RGB in [0, 1], 'lq_path': str}``, plus ``'label'`` (0 backlit, 1 well-lit)
    when labelled.
    """

    def __init__(self, opt: dict):
        super().__init__(opt)
        self.labelled = bool(opt.get('return_welllit', False))
        if self.labelled and self.welllit is None:
            raise RaveError('option return_welllit: true needs dataroot_welllit (the well-lit image set).')
        self.items = self._labelled_items() if self.labelled else \
            [(self.backlit, i, BACKLIT_LABEL) for i in range(len(self.backlit))]
        if opt.get('exposure_range') is not None:
            if self.labelled:
                raise RaveError('option exposure_range cannot be used with return_welllit: true (a gain would move '
                                'images across the backlit / well-lit labels); set one of them to ~.')
            self.exposure_range = check_positive_range(opt['exposure_range'], 'exposure_range')

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        source, source_index, label = self.items[index]
        item = self._single_item(source, source_index)
        if self.labelled:
            item['label'] = label
        return item


@DATASET_REGISTRY.register()
class LabelledBacklitDataset(_BacklitTrainingSet):
    """Balanced, explicitly labelled backlit and well-lit images for CLIP-LIT's prompt stages.

    ``mode: single`` (prompt initialisation, the originals' "add" loader): each item is one image,
    ``{'lq', 'lq_path', 'label'}``; length 2·max(N_backlit, N_welllit).

    ``mode: pairs`` (ranking, the originals' "margin" loader): the two balanced lists are shuffled independently
    once (``pairing_seed``, default 1143) into fixed random couples; each item is ``{'backlit', 'backlit_path',
    'welllit', 'welllit_path'}`` and, with ``dataroot_results`` (a list of folders/LMDBs of earlier enhanced
    results, newest first, matched to the backlit images by file stem), ``'results'`` (K×3×H×W) and
    ``'results_paths'``. All images of one item get the same augmentation. Length max(N_backlit, N_welllit).

    Defaults follow the prompt loaders: ``resize: 256``, ``zoom_range: [0.5, 1.5]``; the other options are those
    of :class:`UnpairedBacklitDataset`, plus ``decode_threads`` (:meth:`load_batch`; ``~``: up to 8, no more than
    the cores this process may use).
    """

    default_resize = 256
    default_zoom_range = PROMPT_ZOOM_RANGE

    def __init__(self, opt: dict):
        super().__init__(opt)
        if self.welllit is None:
            raise RaveError('option dataroot_welllit is required: the folder or LMDB of well-lit images.')
        self.decode_threads = _positive_int(opt, 'decode_threads') or default_decode_threads()
        self.mode = opt.get('mode', 'single')
        if self.mode not in ('single', 'pairs'):
            raise RaveError(f'option mode: "{self.mode}" is not one of single, pairs.')
        self.results = []
        if self.mode == 'single':
            self.items = self._labelled_items()
            return
        target = max(len(self.backlit), len(self.welllit))
        backlit = balanced_indices(len(self.backlit), target)
        welllit = balanced_indices(len(self.welllit), target)
        rng = random.Random(opt.get('pairing_seed', 1143))
        rng.shuffle(backlit)
        rng.shuffle(welllit)
        self.pairs = list(zip(backlit, welllit))
        roots = opt.get('dataroot_results') or []
        roots = [roots] if isinstance(roots, str) else list(roots)
        self.results = [self._match_results(ImageSource(root, opt.get('io_backend'))) for root in roots]

    def _match_results(self, source: ImageSource) -> Tuple[ImageSource, List[int]]:
        """For every backlit image, the index of the result with the same stem in ``source``."""
        by_stem = {source.stem(i): i for i in range(len(source))}
        missing = [self.backlit.name(i) for i in range(len(self.backlit)) if self.backlit.stem(i) not in by_stem]
        if missing:
            raise RaveError(f'{source.dataroot}: no result for {len(missing)} backlit images (matched by file '
                            f'name without extension): {", ".join(missing[:20])}' +
                            (' ...' if len(missing) > 20 else ''))
        return source, [by_stem[self.backlit.stem(i)] for i in range(len(self.backlit))]

    def __len__(self) -> int:
        return len(self.items) if self.mode == 'single' else len(self.pairs)

    def _reads(self, index: int) -> List[Tuple[ImageSource, int]]:
        """The images item ``index`` is made of, in order: (source, index in it)."""
        if self.mode == 'single':
            source, source_index, _ = self.items[index]
            return [(source, source_index)]
        b, w = self.pairs[index]
        return [(self.backlit, b)] + [(src, idx[b]) for src, idx in self.results] + [(self.welllit, w)]

    def __getitem__(self, index: int) -> dict:
        return self._item(index, [self._load(source, i) for source, i in self._reads(index)])

    def load_batch(self, indices: Sequence[int]) -> List[dict]:
        """``[self[i] for i in indices]``, decoding (and squash-resizing) the images on ``decode_threads`` threads.

        The prompt stages load a whole batch per iteration in the training process, and decoding and resizing are
        most of that time. Files are read, and every random draw (crops, augmentation) is made, in this thread in
        the order of the serial loop, so the items are exactly the same and the random state ends the same (exact
        resumes).
        """
        reads = [self._reads(index) for index in indices]
        flat = [(source, i, source.read_bytes(i)) for item_reads in reads for source, i in item_reads]

        def decode(read: Tuple[ImageSource, int, bytes]):
            source, i, data = read
            image = source.decode(i, data)
            return image if self.crop_size else self._load(source, i, image)  # a squash-resize draws nothing
        if self.decode_threads > 1 and len(flat) > 1:
            with ThreadPoolExecutor(max_workers=min(self.decode_threads, len(flat))) as pool:
                images = list(pool.map(decode, flat))
        else:
            images = [decode(read) for read in flat]
        items, start = [], 0
        for index, item_reads in zip(indices, reads):
            item_images = images[start:start + len(item_reads)]
            if self.crop_size:  # random crops: drawn here, item by item, as the serial loop draws them
                item_images = [self._load(source, i, image) for (source, i), image in zip(item_reads, item_images)]
            items.append(self._item(index, item_images))
            start += len(item_reads)
        return items

    def _item(self, index: int, images: List[np.ndarray]) -> dict:
        """Item ``index`` from its images brought to the training size (:meth:`_reads` order)."""
        if self.mode == 'single':
            source, source_index, label = self.items[index]
            return dict(self._single_item(source, source_index, images[0]), label=label)
        b, w = self.pairs[index]
        images = augment_images(images, self.augment, self.zoom_range)
        item = {'backlit': to_tensor(images[0]), 'backlit_path': self.backlit.path(b),
                'welllit': to_tensor(images[-1]), 'welllit_path': self.welllit.path(w)}
        if self.results:
            item['results'] = torch.stack([to_tensor(img) for img in images[1:-1]])
            item['results_paths'] = [src.path(idx[b]) for src, idx in self.results]
        return item
