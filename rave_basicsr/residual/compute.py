"""Computing RAVE's residual vector from a well-lit and a backlit image set (RAVE code, ``train_rave.py``).

The official definition: each image embedding is L2-normalised, each set's mean of normalised embeddings is
re-normalised (``v_well_lit``, ``v_backlit``), the residual is ``normalize(v_well_lit - v_backlit)`` and the
threshold is ``<v_well_lit, v_residual>``.

Images are read through :class:`~rave_basicsr.data.image_source.ImageSource` (folders or LMDBs) in a torch
``DataLoader``; each image is decoded and preprocessed to the encoder's input size inside the dataset (on CPU, in the
workers), so batches of differently sized photos stack and loading overlaps the encoder. Unreadable images are
skipped, counted and named (``strict=True`` makes them fatal). The result does not depend on the number of workers.

Default preprocessing (``preprocess=None``): the originals embed the residual sets with the standard CLIP PIL
transform (bicubic resize of the shorter side to 224, centre crop, normalise). Here it is approximated by the tensor
transform ``resize: shorter_side_center_crop, interpolation: bicubic, antialias: true`` at the encoder's input size
with the encoder's mean/std; it differs from PIL's uint8 pipeline by interpolation round-off only (documented in
docs/residual.md). ``preprocess='encoder'`` uses the encoder's own (loss-path) preprocessing instead; a mapping is a
``preprocess`` option block. Encoders that take raw images (``preprocess`` None, e.g. ``ImageStatsEncoder`` without
a block) get each image at its own size.
"""
import logging
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rave_basicsr.data.image_source import ImageSource
from rave_basicsr.guidance.preprocess import PreprocessConfig, parse_preprocess, preprocess_images
from rave_basicsr.residual.vector import ResidualVector
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.version import __version__

logger = logging.getLogger('rave_basicsr')

#: the originals' residual preprocessing (CLIP PIL transform), as a tensor preprocess block (size and mean/std
#: come from the encoder)
CLIP_PIL_APPROXIMATION = {'resize': 'shorter_side_center_crop', 'interpolation': 'bicubic', 'antialias': True}
#: recorded in a residual file for encoders that take each image at its native size
NATIVE_SIZE_PREPROCESS = {'resize': 'none', 'note': 'images given to the encoder at their own size, in [0, 1]'}


def _normalised_mean(embeddings: torch.Tensor) -> torch.Tensor:
    unit = embeddings / embeddings.norm(dim=1, keepdim=True)
    mean = unit.mean(dim=0)
    return mean / mean.norm()


def residual_from_embeddings(well_lit: torch.Tensor, backlit: torch.Tensor
                             ) -> Tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """``(residual, threshold, well_lit_mean, backlit_mean)`` from unnormalised ``[N, D]`` / ``[M, D]`` embeddings.

    The arithmetic runs in float64 (summation order fixed), the vectors are returned as float32 and the threshold is
    computed from the returned float32 vectors, so that a stored file is self-consistent.
    """
    for name, value in (('well-lit', well_lit), ('backlit', backlit)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] == 0 or value.shape[1] == 0:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise RaveError(f'{name} embeddings must be a non-empty [N, D] tensor, got {shape}.')
        if not torch.isfinite(value).all():
            raise RaveError(f'{name} embeddings contain NaN or Inf values; the encoder output is broken.')
        zero = (value.double().norm(dim=1) == 0).nonzero().flatten().tolist()
        if zero:
            raise RaveError(f'{name} embeddings of rows {zero[:10]} are zero vectors and cannot be normalised.')
    if well_lit.shape[1] != backlit.shape[1]:
        raise RaveError(f'well-lit embeddings have size {well_lit.shape[1]} but backlit ones {backlit.shape[1]}; '
                        'both sets must be embedded by the same encoder.')
    v_well = _normalised_mean(well_lit.detach().cpu().double())
    v_back = _normalised_mean(backlit.detach().cpu().double())
    difference = v_well - v_back
    if float(difference.norm()) < 1e-8:
        raise RaveError('the well-lit and backlit sets have the same mean embedding, so the residual is zero; '
                        'check that the two paths point at different image sets.')
    residual = (difference / difference.norm()).float()
    v_well, v_back = v_well.float(), v_back.float()
    threshold = float(v_well.double() @ residual.double())
    return residual, threshold, v_well, v_back


# ---------------------------------------------------------------------------------------------- data loading
class EncoderInputDataset(Dataset):
    """Decodes image ``i`` of a source and preprocesses it to encoder input size (no normalisation).

    Returns ``(index, image [3, H, W] float32 in [0, 1] or None, error message or None)``; read errors are
    returned, not raised, so that one bad file does not stop the loader.
    """

    def __init__(self, source: Any, resize_cfg: Optional[PreprocessConfig]) -> None:
        self.source = source
        self.resize_cfg = resize_cfg

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            decoded = self.source.read(index)
        except RaveError as exc:
            return index, None, str(exc)
        image = torch.from_numpy(decoded.rgb).permute(2, 0, 1).contiguous()
        if self.resize_cfg is not None:
            with torch.no_grad():
                image = preprocess_images(image[None], self.resize_cfg)[0]
        return index, image, None


def _collate(items: list) -> list:
    return items


def _as_source(value: Any, label: str) -> ImageSource:
    if isinstance(value, ImageSource):
        return value
    if not isinstance(value, (str, bytes)) and not hasattr(value, '__fspath__'):
        raise RaveError(f'{label} set must be a folder or LMDB path, or an ImageSource; got {type(value).__name__}.')
    return ImageSource(str(value))


def resolve_preprocess(encoder: Any, preprocess: Union[None, str, Mapping[str, Any], PreprocessConfig]
                       ) -> Optional[PreprocessConfig]:
    """The encoder-input preprocessing config for residual embeddings (None: native size); see the module doc."""
    own = getattr(encoder, 'preprocess', None)
    if isinstance(preprocess, PreprocessConfig):
        return preprocess
    if preprocess == 'encoder':
        return own
    if isinstance(preprocess, str):
        raise RaveError(f'preprocess must be None (the originals\' CLIP PIL transform), "encoder" or an option '
                        f'block, got {preprocess!r}.')
    if own is None and preprocess is None:
        return None
    block = dict(CLIP_PIL_APPROXIMATION if preprocess is None else preprocess)
    if own is None:  # raw-input encoder given an explicit block: CLIP defaults for what the block leaves out
        return parse_preprocess(block, where='residual preprocess')
    return parse_preprocess(block, default_size=own.size, default_mean=own.mean, default_std=own.std,
                            where='residual preprocess')


def resize_only(cfg: PreprocessConfig) -> PreprocessConfig:
    """The geometric part of ``cfg`` (identity normalisation): what the loader workers apply."""
    return replace(cfg, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _group_by_shape(images: Sequence[torch.Tensor]) -> List[List[int]]:
    groups: Dict[tuple, List[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(position)
    return list(groups.values())


def embed_source(encoder: Any, source: ImageSource, cfg: Optional[PreprocessConfig], label: str,
                 batch_size: int = 16, num_workers: int = 0, strict: bool = False,
                 progress: bool = True) -> Tuple[torch.Tensor, List[str]]:
    """``(embeddings [K, D] float32 of the K readable images, messages naming the skipped ones)`` of one set.

    Embeddings keep the source's sorted order; read failures are collected (``strict``: the first one raises).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise RaveError(f'batch size must be a positive integer, got {batch_size!r}.')
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise RaveError(f'number of workers must be a non-negative integer, got {num_workers!r}.')
    dataset = EncoderInputDataset(source, None if cfg is None else resize_only(cfg))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate, persistent_workers=False,
                        prefetch_factor=4 if num_workers > 0 else None)
    device = encoder.device
    embeddings: Dict[int, torch.Tensor] = {}
    skipped: List[str] = []
    bar = tqdm(total=len(dataset), desc=f'embedding {label}', unit='img', disable=not progress, leave=False)
    with torch.no_grad():
        for items in loader:
            good = [(index, image) for index, image, error in items if error is None]
            for index, image, error in items:
                if error is not None:
                    if strict:
                        raise RaveError(f'{error} (strict mode: fix or remove it, or run without --strict to skip '
                                        'unreadable images).')
                    skipped.append(error)
            images = [image for _, image in good]
            for group in _group_by_shape(images):
                batch = torch.stack([images[p] for p in group]).to(device)
                out = encoder.encode_image(batch, preprocess=cfg) if cfg is not None else encoder.encode_image(batch)
                for position, row in zip(group, out.float().cpu()):
                    embeddings[good[position][0]] = row
            bar.update(len(items))
    bar.close()
    order = sorted(embeddings)
    if not order:
        raise RaveError(f'none of the {len(dataset)} images of the {label} set {source.dataroot} could be read:\n  '
                        + '\n  '.join(skipped[:20]))
    return torch.stack([embeddings[i] for i in order]), skipped


def compute_residual(encoder: Any, well_lit: Any, backlit: Any, preprocess: Union[None, str, Mapping] = None,
                     batch_size: int = 16, num_workers: int = 0, strict: bool = False,
                     keep_embeddings: bool = False, progress: bool = True) -> ResidualVector:
    """Embed both image sets with ``encoder`` and return their :class:`ResidualVector` (definition: module docstring).

    ``well_lit`` / ``backlit``: a folder or LMDB path, or an ``ImageSource``. ``preprocess``: None (the originals'
    CLIP PIL transform, approximated), ``'encoder'`` or an option block. Unreadable images are skipped and listed in
    the history entry (``strict=True``: fatal). ``keep_embeddings`` stores the per-image embeddings (interpretation
    plots). Deterministic for a given encoder, inputs and batch size.
    """
    sources = {'well_lit': _as_source(well_lit, 'well-lit'), 'backlit': _as_source(backlit, 'backlit')}
    cfg = resolve_preprocess(encoder, preprocess)
    embedded: Dict[str, torch.Tensor] = {}
    skipped: Dict[str, List[str]] = {}
    for key, source in sources.items():
        embedded[key], skipped[key] = embed_source(encoder, source, cfg, key.replace('_', '-'), batch_size,
                                                      num_workers, strict, progress)
        if skipped[key]:
            logger.warning('%d of %d %s images skipped (unreadable):\n  %s', len(skipped[key]), len(source),
                           key.replace('_', '-'), '\n  '.join(skipped[key]))
    residual, threshold, v_well, v_back = residual_from_embeddings(embedded['well_lit'], embedded['backlit'])
    step = {'step': 'compute', 'rave_basicsr': __version__,
            'sources': {k: s.dataroot for k, s in sources.items()},
            'skipped': {k: v for k, v in skipped.items()}, 'batch_size': batch_size}
    return ResidualVector(
        residual=residual, threshold=threshold, well_lit_mean=v_well, backlit_mean=v_back,
        counts={k: int(v.shape[0]) for k, v in embedded.items()}, encoder_identity=dict(encoder.identity),
        preprocess=NATIVE_SIZE_PREPROCESS if cfg is None else cfg.to_dict(),
        embeddings=dict(embedded) if keep_embeddings else None, history=[step])
