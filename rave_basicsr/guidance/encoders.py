"""Frozen image encoders for the guidance and identity losses, built from an option block.

:func:`build_image_encoder` is the factory in front of three sources that share one interface,
:class:`~rave_basicsr.guidance.frozen_encoder.FrozenImageEncoder`:

* ``type: open_clip`` (:mod:`~rave_basicsr.guidance.open_clip_encoder`): a CLIP model with a pretrained tag, a
  local weights file, a ``local-dir:`` folder, or ``~`` for a (seeded) random init; text tower included;
* ``type: timm`` (:mod:`~rave_basicsr.guidance.timm_encoder`): any timm image model; image-only;
* ``type: arch`` (:mod:`~rave_basicsr.guidance.arch_encoder`): any ``ARCH_REGISTRY`` module mapping images to
  ``[B, D]``, e.g. the CLIP-free ``ImageStatsEncoder``; image-only.
"""
from typing import Any, Mapping, Optional

from rave_basicsr.guidance.arch_encoder import build_arch_encoder
from rave_basicsr.guidance.frozen_encoder import FrozenImageEncoder
from rave_basicsr.guidance.open_clip_encoder import build_open_clip_encoder
from rave_basicsr.guidance.timm_encoder import build_timm_encoder
from rave_basicsr.utils.errors import RaveError

#: the originals' encoders: ViT-B/32 for guidance, RN101 in fp16 for the identity loss (CLIP's OpenAI weights)
ROLE_DEFAULTS = {
    'guidance': {'type': 'open_clip', 'model': 'ViT-B-32', 'pretrained': 'openai', 'precision': 'fp32'},
    'identity': {'type': 'open_clip', 'model': 'RN101', 'pretrained': 'openai', 'precision': 'fp16'},
}
BUILDERS = {'open_clip': build_open_clip_encoder, 'timm': build_timm_encoder, 'arch': build_arch_encoder}


def build_image_encoder(opt: Optional[Mapping[str, Any]] = None, role: str = 'guidance',
                        where: Optional[str] = None) -> FrozenImageEncoder:
    """Build a frozen encoder from an option block; missing keys take the originals' defaults for ``role``.

    ``role`` is ``guidance`` (ViT-B-32, OpenAI weights, fp32) or ``identity`` (RN101, OpenAI weights, fp16); the
    defaults apply only to an ``open_clip`` block. ``where`` names the option block in messages.
    """
    if role not in ROLE_DEFAULTS:
        raise ValueError(f'role must be one of {list(ROLE_DEFAULTS)}, got {role!r}')
    where = where or f'{role} encoder'
    opt = dict(opt or {})
    kind = opt.get('type', 'open_clip')
    if kind not in BUILDERS:
        raise RaveError(f'{where}: option "type" must be one of {list(BUILDERS)}, got {kind!r}.')
    if kind == 'open_clip':
        opt = {**ROLE_DEFAULTS[role], **opt}
    return BUILDERS[kind](opt, where)
